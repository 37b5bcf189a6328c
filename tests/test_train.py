"""train.py and sample.py, run as a user runs them, on a tiny model and corpus."""
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO, TINY_MODEL, read_metrics, run_script


def train(workdir, *args, **kw):
    return run_script("train.py", *TINY_MODEL, *args, cwd=workdir, **kw)


def test_a_short_run_lowers_the_loss_and_writes_a_checkpoint(workdir):
    train(workdir, "--out_dir=out", "--max_iters=30", "--eval_interval=15")
    evals = [r for r in read_metrics(workdir / "out") if "val/loss" in r]
    assert [r["iter"] for r in evals] == [0, 15, 30]
    assert evals[-1]["val/loss"] < evals[0]["val/loss"] - 0.5
    ckpt = torch.load(workdir / "out" / "ckpt.pt", weights_only=True)
    assert ckpt["iter_num"] == 30 and ckpt["model_config"]["n_layer"] == 2
    logs = [r for r in read_metrics(workdir / "out") if "loss" in r]
    assert all(r["tokens_per_s"] > 0 for r in logs)


def test_resume_continues_from_the_saved_iteration(workdir):
    train(workdir, "--out_dir=out", "--max_iters=20", "--eval_interval=10")
    proc = train(workdir, "--out_dir=out", "--init_from=resume", "--max_iters=30", "--eval_interval=10")
    evals = [r for r in read_metrics(workdir / "out") if "val/loss" in r]
    assert [r["iter"] for r in evals] == [0, 10, 20, 30]  # one log, continued
    assert torch.load(workdir / "out" / "ckpt.pt", weights_only=True)["iter_num"] == 30
    assert "iter 25" in proc.stdout


def test_init_from_a_checkpoint_path_fine_tunes_from_its_weights(workdir):
    train(workdir, "--out_dir=base", "--max_iters=30", "--eval_interval=30")
    base_val = [r for r in read_metrics(workdir / "base") if "val/loss" in r][-1]["val/loss"]
    train(workdir, "--out_dir=tuned", "--init_from=base", "--max_iters=5", "--eval_interval=5",
          "--n_layer=7", "--learning_rate=1e-4", "--warmup_iters=0")
    first = read_metrics(workdir / "tuned")[0]
    assert first["iter"] == 0 and first["val/loss"] == pytest.approx(base_val, abs=1e-4)


def test_sample_prints_text_from_the_checkpoint(workdir):
    train(workdir, "--out_dir=out", "--max_iters=10", "--eval_interval=10")
    proc = run_script("sample.py", "--out_dir=out", "--start=To be", "--num_samples=2",
                      "--max_new_tokens=20", "--device=cpu", cwd=workdir)
    samples = [s for s in proc.stdout.split("---------------") if s.strip()]
    assert len(samples) == 2 and all(s.strip().startswith("To be") for s in samples)
    (workdir / "prompt.txt").write_text("KING")
    again = run_script("sample.py", "--out_dir=out", "--start=FILE:prompt.txt", "--max_new_tokens=5",
                       "--temperature=0", "--num_samples=1", cwd=workdir)
    assert again.stdout.startswith("KING")


@pytest.mark.parametrize("args, message", [
    (["--dataset=missing"], "dataset 'missing' not found"),
    (["--n_layers=2"], "did you mean 'n_layer'"),
    (["--batch_size=big"], "batch_size must be int"),
    (["--init_from=resume", "--out_dir=nowhere"], "no checkpoint at"),
    (["--init_from=nowhere/ckpt.pt"], "no checkpoint at"),
    (["--block_size=100000"], "fewer than block_size+1"),
    (["--gradient_accumulation_steps=3", "--dtype=float8"], "dtype"),
])
def test_bad_input_ends_with_one_line_and_a_nonzero_exit(workdir, args, message):
    proc = train(workdir, "--out_dir=out", "--max_iters=1", *args, check=False)
    assert proc.returncode != 0
    assert message in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr


def test_bad_sample_settings_end_with_one_line(workdir):
    train(workdir, "--out_dir=out", "--max_iters=2", "--eval_interval=2")
    for arg in ["--temperature=-1", "--top_k=-3", "--max_new_tokens=0", "--start=€"]:
        proc = run_script("sample.py", "--out_dir=out", arg, cwd=workdir, check=False)
        assert proc.returncode != 0 and len(proc.stderr.strip().splitlines()) == 1, (arg, proc.stderr)


def test_wandb_offline_logging_writes_a_run(workdir):
    pytest.importorskip("wandb")
    train(workdir, "--out_dir=out", "--max_iters=10", "--eval_interval=5", "--wandb_log=True",
          "--wandb_run_name=t", env={"WANDB_MODE": "offline", "WANDB_SILENT": "true"})
    runs = list((workdir / "out" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))


def test_two_processes_under_torchrun_match_one_process(workdir):
    common = [*TINY_MODEL, "--max_iters=10", "--eval_interval=5", "--log_interval=1",
              "--gradient_accumulation_steps=4", "--batch_size=4"]
    run_script("train.py", *common, "--out_dir=one", cwd=workdir)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(REPO / "train.py"), *common, "--out_dir=two"], cwd=workdir, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = read_metrics(workdir / "one"), read_metrics(workdir / "two")
    assert len(one) == len(two) > 10
    for a, b in zip(one, two):
        for key in ("loss", "train/loss", "val/loss"):
            if key in a:
                assert b[key] == pytest.approx(a[key], abs=1e-5), (a["iter"], key)


def test_bench_mode_prints_each_figure_and_saves_nothing(workdir):
    proc = train(workdir, "--out_dir=bench", "--bench=3")
    for figure in ("train ms/iter:", "train tokens/s:", "train mfu:", "peak memory:", "sample tokens/s:"):
        assert figure in proc.stdout
    assert not (workdir / "bench" / "ckpt.pt").exists() and not (workdir / "bench" / "metrics.jsonl").exists()


def test_the_log_shows_the_parameter_count_by_part(workdir):
    proc = train(workdir, "--out_dir=out", "--max_iters=1")
    for part in ("embeddings", "attention", "mlp", "norms", "training FLOPs per token"):
        assert part in proc.stdout


def test_lr_schedules_warm_up_then_reach_min_lr():
    from train import TrainConfig, get_lr
    from dataclasses import asdict
    cfg = dict(asdict(TrainConfig()), learning_rate=1.0, min_lr=0.1, warmup_iters=10, max_iters=100)
    assert get_lr(0, cfg) < get_lr(9, cfg) < 1.0 and get_lr(10, cfg) == pytest.approx(1.0)
    assert get_lr(55, cfg) == pytest.approx(0.55) and get_lr(100, cfg) == pytest.approx(0.1)
    wsd = dict(cfg, lr_schedule="wsd", warmdown_iters=20)
    assert get_lr(79, wsd) == 1.0 and get_lr(90, wsd) == pytest.approx(0.55) and get_lr(100, wsd) == 0.1


def test_muon_trains_the_block_matrices_and_lowers_the_loss(workdir):
    train(workdir, "--out_dir=muon", "--max_iters=30", "--eval_interval=30", "--optimizer=muon",
          "--muon_lr=0.02", "--lr_schedule=wsd", "--warmdown_iters=10")
    evals = [r for r in read_metrics(workdir / "muon") if "val/loss" in r]
    assert evals[-1]["val/loss"] < evals[0]["val/loss"] - 0.5


def test_float32_muon_takes_the_steps_of_torch_muon():
    from train import MuonFloat32
    torch.manual_seed(0)
    ours = [torch.nn.Parameter(torch.randn(shape)) for shape in [(16, 48), (16, 48), (48, 16), (16, 16)]]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    opt_ours = MuonFloat32(ours, lr=0.02, weight_decay=0.1)
    opt_theirs = torch.optim.Muon(theirs, lr=0.02, weight_decay=0.1)  # orthogonalises in bfloat16
    for _ in range(3):
        for a, b in zip(ours, theirs):
            a.grad = torch.randn_like(a)
            b.grad = a.grad.clone()
        opt_ours.step()
        opt_theirs.step()
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, atol=2e-3, rtol=0)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator settings")
def test_on_cpu_a_training_step_reuses_freed_memory_instead_of_faulting_in_fresh_pages():
    # without keep_freed_memory this model size faults in over a thousand pages a step on glibc
    code = """
import resource, sys, torch
import train
from model import GPT, GPTConfig
train.keep_freed_memory()
model = GPT(GPTConfig(vocab_size=65, n_layer=2, n_head=4, n_embd=128, block_size=64, bias=False))
x = torch.randint(65, (12, 64))
def step():
    model(x, x)[1].backward()
for _ in range(3):
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    step()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 10)
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    assert float(proc.stdout.strip()) < 50
