"""One run per out_dir: a run holds its folder, a second one is refused, a killed one never blocks the next,
and a new run does not replace a checkpoint without being told to."""
import errno
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys

import pytest

import common
from conftest import REPO, TINY_MODEL, evals, one_line_error, read_metrics, run_main

RUN = [*TINY_MODEL, "--eval_interval=10", "--always_save_checkpoint=True"]


def sha256s(folder):
    """The digest of every file of a run's folder that holds data (the checkpoint, its summary, the log)."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())
            if p.is_file() and p.name != common.LOCK_FILE}


@pytest.fixture
def trained(tiny_run, tmp_path):
    shutil.copytree(tiny_run, tmp_path / "w")
    return tmp_path / "w"


def test_a_run_into_a_folder_another_run_holds_is_refused_naming_that_run(trained):
    before = sha256s(trained / "out")
    holder = common.hold_folder(str(trained / "out"), "pid 4242, started today: python train.py --the-first-run")
    try:
        result = run_main("train.py", *RUN, "--out_dir=out", "--init_from=resume", "--max_iters=40", cwd=trained,
                          check=False)
    finally:
        holder.close()
    one_line_error(result, "is in use by another run (pid 4242, started today: python train.py --the-first-run)")
    assert sha256s(trained / "out") == before


def test_a_lock_left_by_a_killed_process_does_not_block_the_next_run(trained):
    hold = (f"import sys, time; sys.path.insert(0, {str(REPO)!r}); import common; "
            f"f = common.hold_folder({str(trained / 'out')!r}, 'pid, a run about to be killed'); print('held', flush=True); "
            f"time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", hold], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    proc.kill()  # kill -9: the kernel drops its lock, the lock file stays
    proc.wait()
    assert (trained / "out" / common.LOCK_FILE).exists()
    run_main("train.py", *RUN, "--out_dir=out", "--init_from=resume", "--max_iters=40", cwd=trained)
    assert evals(trained / "out")[-1]["iter"] == 40


def test_a_new_run_into_a_folder_with_a_checkpoint_is_refused_unless_told_to_overwrite_it(trained):
    before = sha256s(trained / "out")
    result = run_main("train.py", *RUN, "--out_dir=out", "--max_iters=5", cwd=trained, check=False)
    one_line_error(result, "out/ckpt.pt already holds a checkpoint (iteration 30, val loss ")
    assert "--init_from=resume" in result.stderr and "--overwrite=True" in result.stderr
    assert sha256s(trained / "out") == before
    fine_tune = run_main("train.py", *RUN, "--out_dir=out", "--init_from=out", "--max_iters=5", cwd=trained,
                         check=False)  # starting from its own checkpoint would replace it too
    one_line_error(fine_tune, "already holds a checkpoint")
    run_main("train.py", *RUN, "--out_dir=out", "--max_iters=5", "--eval_interval=5", "--overwrite=True", cwd=trained)
    assert [r["iter"] for r in evals(trained / "out")] == [0, 5]  # a new log for the new run


def test_a_resume_says_where_it_continues_and_when_there_is_nothing_left_to_train(trained):
    result = run_main("train.py", *RUN, "--out_dir=out", "--init_from=resume", "--max_iters=40", cwd=trained)
    assert "resuming out/ckpt.pt from iteration 30 (best val loss " in result.stdout
    before = sha256s(trained / "out")
    done = run_main("train.py", *RUN, "--out_dir=out", "--init_from=resume", "--max_iters=40", cwd=trained)
    assert "is already at iteration 40 and max_iters is 40: nothing to train; to go on, raise --max_iters" \
        in done.stdout
    assert sha256s(trained / "out") == before


@pytest.mark.parametrize("where", ["a file", "under a file"])
def test_an_out_dir_that_cannot_be_a_folder_is_one_line(workdir, where):
    (workdir / "taken").write_text("not a folder")
    out = "taken" if where == "a file" else "taken/out"
    one_line_error(run_main("train.py", *RUN, f"--out_dir={out}", "--max_iters=5", cwd=workdir, check=False),
                   f"cannot write into out_dir {out}")
    assert (workdir / "taken").read_text() == "not a folder"


def test_a_read_only_out_dir_is_one_line(workdir, monkeypatch):
    # the tests run as root, whom a chmod does not stop: the refusal the system would give is simulated
    def refuse(path, holder):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), path)
    monkeypatch.setattr("train.hold_folder", refuse)
    one_line_error(run_main("train.py", *RUN, "--out_dir=ro", "--max_iters=5", cwd=workdir, check=False),
                   "cannot write into out_dir ro (Permission denied)")


@pytest.mark.slow  # three training processes
def test_two_runs_started_into_one_folder_the_second_is_refused_and_the_first_ends_with_a_clean_log(workdir):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    first = subprocess.Popen([sys.executable, str(REPO / "train.py"), *RUN, "--out_dir=out", "--max_iters=400",
                              "--log_interval=1"], cwd=workdir, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, env=env)
    for line in first.stdout:
        if line.startswith("iter 20:"):
            break
    first.send_signal(signal.SIGSTOP)  # a paused run still holds its folder, and cannot finish before the second asks
    try:
        second = subprocess.run([sys.executable, str(REPO / "train.py"), *RUN, "--out_dir=out", "--max_iters=400"],
                                cwd=workdir, capture_output=True, text=True, env=env, timeout=120)
    finally:
        first.send_signal(signal.SIGCONT)
    assert second.returncode == 2 and "is in use by another run (pid " in second.stderr
    assert len(second.stderr.strip().splitlines()) == 1
    first.communicate(timeout=300)
    assert first.returncode == 0
    raw = (workdir / "out" / "metrics.jsonl").read_bytes()
    assert b"\0" not in raw
    records = read_metrics(workdir / "out")
    assert [r["iter"] for r in records if "loss" in r] == list(range(1, 401))  # one run, in order, whole
    # a run killed with kill -9 leaves its lock file; the next run is not blocked by it
    third = subprocess.Popen([sys.executable, str(REPO / "train.py"), *RUN, "--out_dir=out", "--init_from=resume",
                              "--max_iters=4000", "--log_interval=1"], cwd=workdir, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=env)
    for line in third.stdout:
        if line.startswith("iter 410:"):
            break
    third.send_signal(signal.SIGKILL)
    third.wait()
    killed_at = json.loads((workdir / "out" / "ckpt.json").read_text())["iter_num"]
    fourth = run_main("train.py", *RUN, "--out_dir=out", "--init_from=resume", f"--max_iters={killed_at + 10}",
                      cwd=workdir)
    assert f"resuming out/ckpt.pt from iteration {killed_at}" in fourth.stdout
    assert json.loads((workdir / "out" / "ckpt.json").read_text())["iter_num"] == killed_at + 10
