"""parallel=fsdp: weights, gradients and optimizer state sharded over the processes, the same losses as
one process, sharded checkpoints that resume exactly, and a gathered ckpt.pt for sample.py."""
import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

from conftest import REPO, TINY_MODEL, read_metrics, run_script

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="needs torch.distributed with the gloo backend")

ONE_THREAD = {"OMP_NUM_THREADS": "1"}  # tiny models on a shared machine: a second thread only spins
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
                          timeout=300, env={**os.environ, "PYTHONUNBUFFERED": "1", **ONE_THREAD})
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
    root = tmp_path_factory.mktemp("fsdp")
    (root / "input.txt").write_text(corpus_text, encoding="utf-8")
    run_script("prepare.py", "--input", "input.txt", "--tokenizer", "char", "--out", "data/tiny", cwd=root)
    run_script("train.py", *RUN, "--out_dir=one", cwd=root, env=ONE_THREAD)
    torchrun(root, *FSDP, "--out_dir=two", "--max_iters=10")
    torchrun(root, *FSDP, "--dropout=0.1", "--keep_checkpoints=2", "--out_dir=full")
    torchrun(root, *FSDP, "--dropout=0.1", "--keep_checkpoints=2", "--out_dir=part", "--max_iters=10")
    return root


def test_two_fsdp_processes_log_the_losses_of_one_process(runs):
    one, two = curve(runs / "one"), curve(runs / "two")
    assert len(two) == 10 + 3 * 2  # a loss per iteration, train and val at 0, 5, 10
    assert_close(two, one[:len(two)])


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


def test_keep_checkpoints_keeps_the_shard_folders_of_the_kept_checkpoints_only(runs):
    names = sorted(p.name for p in (runs / "full").iterdir() if p.name.startswith("ckpt"))
    assert names == ["ckpt-00000015.dcp", "ckpt-00000015.pt", "ckpt-00000020.dcp", "ckpt-00000020.pt",
                     "ckpt.json", "ckpt.pt"]
    assert torch.load(runs / "full" / "ckpt-00000015.pt", weights_only=True)["sharded"] == "ckpt-00000015.dcp"
    assert [p.name for p in (runs / "two").glob("ckpt*.dcp*")] == ["ckpt-00000010.dcp"]  # keep_checkpoints=0


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


def test_a_sharded_checkpoint_resumes_in_one_process_too(runs, tmp_path):
    shutil.copytree(runs / "data", tmp_path / "data")
    shutil.copytree(runs / "two", tmp_path / "two")
    run_script("train.py", *FSDP, "--out_dir=two", "--init_from=resume", cwd=tmp_path, env=ONE_THREAD)
    assert_close(curve(tmp_path / "two"), curve(runs / "one"))  # the shards of 2 processes, read by 1


def test_sample_reads_the_gathered_checkpoint(runs):
    proc = run_script("sample.py", "--out_dir=two", "--start=To be", "--num_samples=1", "--max_new_tokens=20",
                      "--device=cpu", cwd=runs, env=ONE_THREAD)
    sample = proc.stdout.split("---------------")[0].strip()
    assert sample.startswith("To be") and len(sample) == len("To be") + 20  # one character per token


@pytest.mark.parametrize("args, message", [
    (["--parallel=fsdp", "--optimizer=muon"], "optimizer=muon does not work with parallel=fsdp"),
    (["--parallel=fsdp", "--dtype=float16"], "parallel=fsdp trains in bfloat16 or float32"),
    (["--parallel=fsdpp"], "parallel='fsdpp' is not one of ddp, fsdp"),
    (["--out_dir=two", "--init_from=resume"], "differs in parallel 'fsdp' -> 'ddp'"),
])
def test_a_refused_combination_ends_with_one_line_and_a_nonzero_exit(runs, tmp_path, args, message):
    shutil.copytree(runs / "data", tmp_path / "data")
    shutil.copytree(runs / "two", tmp_path / "two")
    before = (tmp_path / "two" / "ckpt.pt").read_bytes()
    proc = run_script("train.py", *RUN, "--out_dir=out", *args, cwd=tmp_path, env=ONE_THREAD, check=False)
    assert proc.returncode == 2 and message in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    assert (tmp_path / "two" / "ckpt.pt").read_bytes() == before
