"""Preemption under torchrun, for real: two gloo processes, one of them killed with kill -9 at a random
moment, the group stopped by SIGTERM at another, and the run resumed to the losses of a run that was
never interrupted, with DDP and with FSDP. Slow: every launch starts two interpreters."""
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch.distributed as dist

import checkpoint
from conftest import REPO, TINY_MODEL, children, curve, prepare_tiny

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available() and sys.platform == "linux"),
                                 reason="torchrun with gloo, and /proc to find its workers")]

# dropout on: the random states of both processes must resume too; a checkpoint at every evaluation
RUN = [*TINY_MODEL, "--dropout=0.1", "--max_iters=60", "--lr_decay_iters=60", "--eval_interval=4", "--eval_iters=2",
       "--log_interval=1", "--gradient_accumulation_steps=2", "--always_save_checkpoint=True"]


def torchrun(cwd, *args):
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             str(REPO / "train.py"), *map(str, args)], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def until_iteration(proc, k):
    """Read the run's output up to its log line of iteration k (or its end); returns the lines."""
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith(f"iter {k}:"):
            break
    return lines


def loadable(out_dir, parallel):
    """The folder holds a checkpoint that loads (weights_only), and with fsdp the shard folder it names."""
    ckpt = checkpoint.load_checkpoint(str(out_dir))
    assert len(ckpt["rng"]) == 2 and ckpt["world_size"] == 2
    if parallel == "fsdp":
        assert (out_dir / ckpt["sharded"] / ".metadata").is_file()
    return ckpt["iter_num"]


@pytest.fixture(scope="module")
def data(tmp_path_factory, corpus_text):
    return prepare_tiny(tmp_path_factory.mktemp("preempt"), corpus_text)


@pytest.fixture(scope="module")
def uninterrupted(data):
    for parallel in ("ddp", "fsdp"):
        proc = torchrun(data, *RUN, f"--parallel={parallel}", f"--out_dir=full_{parallel}")
        out, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, out[-3000:]
    return data


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
@pytest.mark.parametrize("seed", range(2))
def test_kill_9_of_one_process_then_sigterm_of_the_group_then_resume_ends_at_the_uninterrupted_losses(
        uninterrupted, tmp_path, parallel, seed):
    rng = random.Random(1000 * seed + (parallel == "fsdp"))
    (tmp_path / "data").symlink_to(uninterrupted / "data")
    args = [*RUN, f"--parallel={parallel}", "--out_dir=out"]
    # 1. kill -9 one of the two processes at a random moment, as a lost node would be
    proc = torchrun(tmp_path, *args)
    until_iteration(proc, rng.randint(6, 20))
    time.sleep(rng.uniform(0, 0.3))
    workers = children(proc.pid)
    assert len(workers) == 2
    os.kill(rng.choice(workers), signal.SIGKILL)
    proc.communicate(timeout=120)
    assert proc.returncode != 0  # torchrun ends the other process and reports the failure
    first = loadable(tmp_path / "out", parallel)
    # 2. resume, and stop the whole job with SIGTERM at another moment, as a scheduler does: to the launcher
    # and its workers (torchrun passes it on too, and then exits 1 by its own convention)
    proc = torchrun(tmp_path, *args, "--init_from=resume")
    until_iteration(proc, first + rng.randint(3, 20))
    time.sleep(rng.uniform(0, 0.3))
    for pid in [proc.pid, *children(proc.pid)]:
        os.kill(pid, signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    stopped = [line for line in out.splitlines() if line.startswith("stopped by")]
    assert len(stopped) == 1 and "resume with: torchrun --standalone --nproc_per_node=2" in stopped[0], out[-2000:]
    second = loadable(tmp_path / "out", parallel)
    assert first < second < 60 and f"at iteration {second};" in stopped[0]
    # 3. resume to the end: the losses of the run that was never interrupted, bit for bit
    proc = torchrun(tmp_path, *args, "--init_from=resume")
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:]
    assert curve(tmp_path / "out") == curve(uninterrupted / f"full_{parallel}")
