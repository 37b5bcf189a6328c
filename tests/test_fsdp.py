"""parallel=fsdp: weights, gradients and optimizer state sharded over the processes, the same losses as
one process, sharded checkpoints that resume exactly, and a gathered ckpt.pt for sample.py."""
import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

from conftest import REPO, TINY_MODEL, one_line_error, prepare_tiny, read_metrics, run_main

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="needs torch.distributed with the gloo backend")
# grad_clip is below the gradient's norm, so clipping (over sharded gradients) acts on every step;
# lr_decay_iters is fixed so that a run stopped at 10 follows the schedule of the 20-iteration run;
# 5 evaluation batches do not split evenly over 2 processes, yet each must run as many forwards
RUN = [*TINY_MODEL, "--max_iters=20", "--lr_decay_iters=20", "--eval_interval=5", "--eval_iters=5",
       "--log_interval=1", "--gradient_accumulation_steps=4", "--batch_size=4", "--grad_clip=0.1",
       "--always_save_checkpoint=True"]
FSDP = [*RUN, "--parallel=fsdp"]


def torchrun(cwd, *args):
    """train.py in 2 processes on the CPU (gloo), as `torchrun --standalone --nproc_per_node=2` runs it."""
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(REPO / "train.py"), *map(str, args)], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


def curve(out_dir):
    """The logged training and validation losses of a run, in order."""
    return [(r["iter"], k, r[k]) for r in read_metrics(out_dir) for k in ("loss", "train/loss", "val/loss") if k in r]


def assert_close(got, want, tol=1e-5):
    assert [(i, k) for i, k, _ in got] == [(i, k) for i, k, _ in want]
    for (i, k, a), (_, _, b) in zip(got, want):
        assert a == pytest.approx(b, abs=tol), (i, k)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, corpus_text):
    """data/tiny and four runs: one/ (one process, no fsdp, 20 iterations), two/ (fsdp in 2 processes,
    stopped at 10), full/ (fsdp, dropout on, 20 iterations, keeping 2 checkpoints) and part/ (the same,
    stopped at 10)."""
    root = prepare_tiny(tmp_path_factory.mktemp("fsdp"), corpus_text)
    run_main("train.py", *RUN, "--out_dir=one", cwd=root)
    torchrun(root, *FSDP, "--out_dir=two", "--max_iters=10")
    torchrun(root, *FSDP, "--dropout=0.1", "--keep_checkpoints=2", "--out_dir=full")
    torchrun(root, *FSDP, "--dropout=0.1", "--keep_checkpoints=2", "--out_dir=part", "--max_iters=10")
    return root


@pytest.mark.slow  # torchrun
def test_two_fsdp_processes_log_the_losses_of_one_process(runs):
    one, two = curve(runs / "one"), curve(runs / "two")
    assert len(two) == 10 + 3 * 2  # a loss per iteration, train and val at 0, 5, 10
    assert_close(two, one[:len(two)])


@pytest.mark.slow  # torchrun
def test_the_checkpoint_is_sharded_one_file_per_process_and_ckpt_pt_names_its_folder(runs):
    from torch.distributed.checkpoint import FileSystemReader
    ckpt = torch.load(runs / "two" / "ckpt.pt", weights_only=True)
    assert ckpt["sharded"] == "ckpt-00000010.dcp" and ckpt["iter_num"] == 10 and ckpt["world_size"] == 2
    assert "optimizer" not in ckpt and len(ckpt["rng"]) == 2  # the optimizer state is in the shards only
    folder = runs / "two" / "ckpt-00000010.dcp"
    assert sorted(p.name for p in folder.iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    index = FileSystemReader(str(folder)).read_metadata()
    files = {}
    for where, stored in index.storage_data.items():
        files.setdefault(where.fqn, set()).add(stored.relative_path)
    weights = [k for k in index.state_dict_metadata if k.startswith("model.")]
    moments = [k for k in index.state_dict_metadata if k.endswith(("exp_avg", "exp_avg_sq"))]
    assert len(weights) == len(ckpt["model"]) and len(moments) == 2 * (len(weights) - 1)  # lm_head is wte
    for key in weights + moments:  # every tensor in two halves, each process's half in its own file
        assert files[key] == {"__0_0.distcp", "__1_0.distcp"}, key
    wte = index.state_dict_metadata["model.transformer.wte.weight"]
    assert [(c.offsets[0], c.sizes[0]) for c in wte.chunks] == [(0, 31), (31, 30)]  # 61 characters


@pytest.mark.slow  # torchrun
def test_keep_checkpoints_keeps_the_shard_folders_of_the_kept_checkpoints_only(runs):
    names = sorted(p.name for p in (runs / "full").iterdir() if p.name.startswith("ckpt"))
    assert names == ["ckpt-00000015.dcp", "ckpt-00000015.pt", "ckpt-00000020.dcp", "ckpt-00000020.pt",
                     "ckpt.json", "ckpt.pt"]
    assert torch.load(runs / "full" / "ckpt-00000015.pt", weights_only=True)["sharded"] == "ckpt-00000015.dcp"
    assert [p.name for p in (runs / "two").glob("ckpt*.dcp*")] == ["ckpt-00000010.dcp"]  # keep_checkpoints=0


@pytest.mark.slow  # torchrun
def test_a_run_stopped_at_10_resumes_from_its_shards_with_the_uninterrupted_runs_losses(runs, tmp_path):
    shutil.copytree(runs / "data", tmp_path / "data")
    shutil.copytree(runs / "part", tmp_path / "part")
    # what a save killed at iteration 15 leaves: a half-written folder, and one renamed before ckpt.pt was
    for leftover in ("ckpt-00000015.dcp.tmp", "ckpt-00000015.dcp"):
        (tmp_path / "part" / leftover).mkdir()
        (tmp_path / "part" / leftover / "__0_0.distcp").write_bytes(os.urandom(100))
    proc = torchrun(tmp_path, *FSDP, "--dropout=0.1", "--keep_checkpoints=2", "--out_dir=part", "--init_from=resume")
    assert "resuming with changed settings: max_iters 10 -> 20" in proc.stdout
    full = curve(runs / "full")
    assert len(full) == 20 + 5 * 2 and curve(tmp_path / "part") == full  # bit for bit: dropout's states resume too
    assert not (tmp_path / "part" / "ckpt-00000015.dcp.tmp").exists()


@pytest.mark.slow  # torchrun
def test_a_sharded_checkpoint_resumes_in_one_process_too(runs, tmp_path):
    shutil.copytree(runs / "data", tmp_path / "data")
    shutil.copytree(runs / "two", tmp_path / "two")
    run_main("train.py", *FSDP, "--out_dir=two", "--init_from=resume", cwd=tmp_path)
    assert_close(curve(tmp_path / "two"), curve(runs / "one"))  # the shards of 2 processes, read by 1


@pytest.mark.slow  # torchrun
def test_sample_reads_the_gathered_checkpoint(runs):
    proc = run_main("sample.py", "--out_dir=two", "--start=To be", "--num_samples=1", "--max_new_tokens=20",
                    "--device=cpu", cwd=runs)
    sample = proc.stdout.split("---------------")[0].strip()
    assert sample.startswith("To be") and len(sample) == len("To be") + 20  # one character per token


@pytest.mark.slow  # torchrun
def test_two_fsdp_processes_train_in_bfloat16_with_float32_weights_close_to_one_process(runs, tmp_path):
    """Mixed precision: the blocks compute in bfloat16, the weights and their optimizer stay float32, and
    gradients are reduced in float32 over gloo."""
    shutil.copytree(runs / "data", tmp_path / "data")
    bf16 = [*FSDP, "--dtype=bfloat16", "--max_iters=10"]
    torchrun(tmp_path, *bf16, "--out_dir=bf16")
    run_main("train.py", *bf16, "--out_dir=bf16_alone", cwd=tmp_path)
    two, one = curve(tmp_path / "bf16"), curve(tmp_path / "bf16_alone")
    assert_close(two, one, tol=0.02)  # two processes round differently in bfloat16
    assert_close(two, curve(runs / "two"), tol=0.05)  # and stay near float32's losses
    assert two[-1][2] < two[0][2]
    ckpt = torch.load(tmp_path / "bf16" / "ckpt.pt", weights_only=True)
    assert all(t.dtype == torch.float32 for t in ckpt["model"].values())
    assert ckpt["config"]["dtype"] == "bfloat16"


@pytest.fixture(scope="module")
def alone(tmp_path_factory, corpus_text):
    """data/tiny, one/ (10 iterations in one process) and sharded/ (the same with parallel=fsdp, a process
    group of one), both run in this process."""
    root = prepare_tiny(tmp_path_factory.mktemp("fsdp_alone"), corpus_text)
    run_main("train.py", *RUN, "--out_dir=one", "--max_iters=10", cwd=root)
    run_main("train.py", *FSDP, "--out_dir=sharded", "--max_iters=10", cwd=root)
    return root


def test_fsdp_in_one_process_logs_the_losses_of_plain_training_and_writes_a_sharded_checkpoint(alone):
    assert_close(curve(alone / "sharded"), curve(alone / "one"))
    ckpt = torch.load(alone / "sharded" / "ckpt.pt", weights_only=True)
    assert ckpt["sharded"] == "ckpt-00000010.dcp" and (alone / "sharded" / "ckpt-00000010.dcp" / ".metadata").exists()


@pytest.mark.parametrize("args, message", [
    (["--parallel=fsdp", "--optimizer=muon"], "optimizer=muon does not work with parallel=fsdp"),
    (["--parallel=fsdp", "--dtype=float16"], "parallel=fsdp trains in bfloat16 or float32"),
    (["--parallel=fsdpp"], "parallel='fsdpp' is not one of ddp, fsdp"),
    (["--out_dir=sharded", "--init_from=resume"], "differs in parallel 'fsdp' -> 'ddp'"),
])
def test_a_refused_combination_ends_with_one_line_and_exit_code_2(alone, tmp_path, args, message):
    shutil.copytree(alone, tmp_path / "w")
    before = (tmp_path / "w" / "sharded" / "ckpt.pt").read_bytes()
    one_line_error(run_main("train.py", *RUN, "--out_dir=out", *args, cwd=tmp_path / "w", check=False), message)
    assert (tmp_path / "w" / "sharded" / "ckpt.pt").read_bytes() == before
