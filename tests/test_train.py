"""train.py and sample.py, run as a user runs them, on a tiny model and corpus."""
import os
import subprocess
import sys
from dataclasses import asdict

import pytest
import torch

from conftest import REPO, TINY_MODEL, copy_run, evals, one_line_error, read_metrics, run_main


def train(workdir, *args, **kw):
    return run_main("train.py", *TINY_MODEL, *args, cwd=workdir, **kw)


def test_a_short_run_lowers_the_loss_and_writes_a_checkpoint(tiny_run):
    records = evals(tiny_run / "out")
    assert [r["iter"] for r in records] == [0, 15, 30]
    assert records[-1]["val/loss"] < records[0]["val/loss"] - 0.5
    ckpt = torch.load(tiny_run / "out" / "ckpt.pt", weights_only=True)
    assert ckpt["iter_num"] == 30 and ckpt["model_config"]["n_layer"] == 2
    logs = [r for r in read_metrics(tiny_run / "out") if "loss" in r]
    assert logs and all(r["tokens_per_s"] > 0 for r in logs)


def test_resume_continues_from_the_saved_iteration(workdir):
    train(workdir, "--out_dir=out", "--max_iters=20", "--eval_interval=10")
    result = train(workdir, "--out_dir=out", "--init_from=resume", "--max_iters=30", "--eval_interval=10")
    assert [r["iter"] for r in evals(workdir / "out")] == [0, 10, 20, 30]  # one log, continued
    assert torch.load(workdir / "out" / "ckpt.pt", weights_only=True)["iter_num"] == 30
    assert "iter 25" in result.stdout


def test_eval_at_start_false_skips_only_the_evaluation_of_the_untrained_model(workdir):
    train(workdir, "--out_dir=out", "--max_iters=20", "--eval_interval=10", "--eval_at_start=False")
    assert [r["iter"] for r in evals(workdir / "out")] == [10, 20]
    assert torch.load(workdir / "out" / "ckpt.pt", weights_only=True)["iter_num"] == 20
    train(workdir, "--out_dir=once", "--max_iters=0", "--eval_at_start=False")  # nothing to train: still measured
    assert [r["iter"] for r in evals(workdir / "once")] == [0]


def test_the_settings_are_saved_as_given_with_the_architecture_actually_trained(workdir):
    train(workdir, "--out_dir=out", "--max_iters=2", "--eval_interval=2", "--n_kv_head=0")
    config = torch.load(workdir / "out" / "ckpt.pt", weights_only=True)["config"]
    assert config["n_kv_head"] == 2 and config["head_dim"] == 16  # derived from 0 by GPTConfig
    assert config["device"] == "cpu" and config["init_from"] == "scratch" and "task" not in config


def test_init_from_a_checkpoint_path_fine_tunes_from_its_weights(tiny_run, tmp_path):
    work = copy_run(tiny_run, tmp_path / "w")
    base_val = evals(work / "out")[-1]["val/loss"]
    result = train(work, "--out_dir=tuned", "--init_from=out", "--max_iters=5", "--eval_interval=5",
                   "--n_layer=7", "--learning_rate=1e-4", "--warmup_iters=0")
    assert "keeping the checkpoint's n_layer" in result.stdout
    first = read_metrics(work / "tuned")[0]
    assert first["iter"] == 0 and first["val/loss"] == pytest.approx(base_val, abs=1e-4)


def test_sample_prints_text_from_the_checkpoint(tiny_run):
    result = run_main("sample.py", "--out_dir=out", "--start=To be", "--num_samples=2", "--max_new_tokens=20",
                      "--device=cpu", cwd=tiny_run)
    samples = [s for s in result.stdout.split("---------------") if s.strip()]
    assert len(samples) == 2 and all(s.strip().startswith("To be") for s in samples)
    (tiny_run / "prompt.txt").write_text("KING")
    again = run_main("sample.py", "--out_dir=out", "--start=FILE:prompt.txt", "--max_new_tokens=5",
                     "--temperature=0", "--num_samples=1", cwd=tiny_run)
    assert again.stdout.startswith("KING")


@pytest.mark.parametrize("args, message", [
    (["--dataset=missing"], "dataset 'missing' not found"),
    (["--n_layers=2"], "did you mean 'n_layer'"),
    (["--batch_size=big"], "batch_size must be int"),
    (["--init_from=resume", "--out_dir=nowhere"], "no checkpoint at"),
    (["--init_from=nowhere/ckpt.pt"], "no checkpoint at"),
    (["--block_size=100000"], "fewer than block_size+1"),
    (["--gradient_accumulation_steps=3", "--dtype=float8"], "dtype"),
    (["--n_head=5", "--n_embd=128"], "n_embd=128 is not divisible by n_head=5"),
])
def test_bad_input_ends_with_one_line_and_exit_code_2(workdir, args, message):
    one_line_error(train(workdir, "--out_dir=out", "--max_iters=1", *args, check=False), message)


@pytest.mark.parametrize("arg, message", [("--temperature=-1", "temperature"), ("--top_k=-3", "top_k"),
                                          ("--max_new_tokens=0", "max_new_tokens"), ("--start=€", "'€'")])
def test_bad_sample_settings_end_with_one_line(tiny_run, arg, message):
    one_line_error(run_main("sample.py", "--out_dir=out", arg, cwd=tiny_run, check=False), message)


@pytest.mark.slow
def test_wandb_offline_logging_writes_a_run(workdir):
    pytest.importorskip("wandb")
    train(workdir, "--out_dir=out", "--max_iters=10", "--eval_interval=5", "--wandb_log=True",
          "--wandb_run_name=t", env={"WANDB_MODE": "offline", "WANDB_SILENT": "true"})
    runs = list((workdir / "out" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))


@pytest.mark.slow
@pytest.mark.parametrize("accum", [2, 4], ids=["accumulation 2 (1 each)", "accumulation 4 (2 each)"])
def test_two_processes_under_torchrun_match_one_process(workdir, accum):
    common = [*TINY_MODEL, "--max_iters=10", "--eval_interval=5", "--log_interval=1",
              f"--gradient_accumulation_steps={accum}", "--batch_size=4"]
    run_main("train.py", *common, "--out_dir=one", cwd=workdir)
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
    result = train(workdir, "--out_dir=bench", "--bench=3")
    for figure in ("train ms/iter:", "train tokens/s:", "train mfu:", "peak memory:", "page faults per step:",
                   "sample tokens/s:", "sample mbu:"):
        assert figure in result.stdout
    assert not (workdir / "bench").exists()


def test_the_log_shows_the_parameter_count_by_part(workdir):
    result = train(workdir, "--out_dir=out", "--max_iters=1")
    for part in ("embeddings", "attention", "mlp", "norms", "training FLOPs per token"):
        assert part in result.stdout


def test_lr_schedules_warm_up_then_reach_min_lr():
    from optim import get_lr
    from train import TrainConfig
    cfg = dict(asdict(TrainConfig()), learning_rate=1.0, min_lr=0.1, warmup_iters=10, max_iters=100)
    assert get_lr(0, cfg) < get_lr(9, cfg) < 1.0 and get_lr(10, cfg) == pytest.approx(1.0)
    assert get_lr(55, cfg) == pytest.approx(0.55) and get_lr(100, cfg) == pytest.approx(0.1)
    wsd = dict(cfg, lr_schedule="wsd", warmdown_iters=20)
    assert get_lr(79, wsd) == 1.0 and get_lr(90, wsd) == pytest.approx(0.55) and get_lr(100, wsd) == 0.1


def test_muon_trains_the_block_matrices_and_lowers_the_loss(workdir):
    train(workdir, "--out_dir=muon", "--max_iters=30", "--eval_interval=30", "--optimizer=muon",
          "--muon_lr=0.02", "--lr_schedule=wsd", "--warmdown_iters=10")
    records = evals(workdir / "muon")
    assert records[-1]["val/loss"] < records[0]["val/loss"] - 0.5


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_embedding_lr_gives_the_token_embedding_its_own_peak_and_leaves_the_rest(optimizer):
    from model import GPT, GPTConfig
    from optim import make_optimizer, set_lr
    from train import TrainConfig
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=50))
    cfg = dict(asdict(TrainConfig()), optimizer=optimizer, learning_rate=1e-3, muon_lr=0.02)
    default = make_optimizer(model, cfg, "cpu")
    own = make_optimizer(model, dict(cfg, embedding_lr=5e-3), "cpu")
    wte = model.transformer.wte.weight
    assert len(own.param_groups) == len(default.param_groups) + 1  # older checkpoints keep their groups
    for opt in (default, own):
        set_lr(opt, 0.5e-3, dict(cfg, embedding_lr=5e-3) if opt is own else cfg)  # half-way down the schedule
    lr_of = lambda opt: {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    assert lr_of(default)[id(wte)] == pytest.approx(0.5e-3) and lr_of(own)[id(wte)] == pytest.approx(2.5e-3)
    assert {k: v for k, v in lr_of(own).items() if k != id(wte)} == {
        k: v for k, v in lr_of(default).items() if k != id(wte)}


@pytest.mark.parametrize("ns_dtype", [torch.float32, torch.bfloat16])
def test_batched_muon_takes_the_steps_of_torch_muon(ns_dtype):
    from optim import BatchedMuon
    torch.manual_seed(0)
    ours = [torch.nn.Parameter(torch.randn(shape)) for shape in [(16, 48), (16, 48), (48, 16), (16, 16)]]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    opt_ours = BatchedMuon(ours, lr=0.02, weight_decay=0.1, ns_dtype=ns_dtype)
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
def test_on_cpu_freed_memory_stays_in_the_process_instead_of_being_mapped_afresh():
    # by default glibc serves a block this large from a fresh mapping and unmaps it on free, so the next
    # step faults its pages in again; mallinfo2's hblkhd counts the bytes in such mappings
    import ctypes
    from runtime import keep_freed_memory

    class Info(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in
                    "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]

    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype, libc.malloc.restype = Info, ctypes.c_void_p
    assert keep_freed_memory()
    before = libc.mallinfo2().hblkhd
    block = libc.malloc(64 << 20)
    mapped = libc.mallinfo2().hblkhd - before
    libc.free(ctypes.c_void_p(block))
    assert block and mapped == 0


def test_a_run_on_a_busy_cpu_says_so_at_the_start(workdir, monkeypatch):
    monkeypatch.setattr(os, "getloadavg", lambda: (64.0, 64.0, 64.0))
    result = train(workdir, "--out_dir=out", "--max_iters=1", "--eval_interval=1", "--device=cpu")
    lines = result.stdout.splitlines()
    note = next(i for i, line in enumerate(lines) if line.startswith("note: the load average is 64.0 on "))
    assert note < next(i for i, line in enumerate(lines) if line.startswith("step 0:"))
