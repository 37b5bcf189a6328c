"""Never lose a run: atomic checkpoints, exact resume, preemption, the NaN guard, safe loading, and
one clear line (and an untouched checkpoint) for every bad input."""
import errno
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import checkpoint
import train
from common import UserError
from conftest import REPO, TINY_MODEL, children, curve, prepare_tiny, run_main, run_script, snapshot

# lr_decay_iters is fixed because 0 means max_iters: a run stopped early with max_iters=k would
# otherwise follow a different schedule than the run it is compared with
RUN = [*TINY_MODEL, "--dropout=0.1", "--lr_decay_iters=20", "--eval_interval=5", "--log_interval=1",
       "--always_save_checkpoint=True"]


def cli(cwd, *args, monkeypatch):
    """train.py's command line, in this process (no interpreter start-up): its exit code."""
    monkeypatch.chdir(cwd)
    return train.cli([*TINY_MODEL, *map(str, args)])


@pytest.fixture(scope="module")
def trained(tmp_path_factory, corpus_text):
    """A folder with data/tiny and out/: a checkpoint after 10 iterations, and the uninterrupted
    20-iteration run in full/."""
    root = prepare_tiny(tmp_path_factory.mktemp("ckpt"), corpus_text)
    run_main("train.py", *RUN, "--out_dir=full", "--max_iters=20", cwd=root)
    run_main("train.py", *RUN, "--out_dir=out", "--max_iters=10", cwd=root)
    return root


# -----------------------------------------------------------------------------------------------
# exact resume, preemption

def test_a_run_stopped_at_k_and_resumed_logs_the_uninterrupted_runs_losses_bit_for_bit(trained, tmp_path):
    shutil.copytree(trained / "out", tmp_path / "out")
    shutil.copytree(trained / "data", tmp_path / "data")
    result = run_main("train.py", *RUN, "--out_dir=out", "--max_iters=20", "--init_from=resume", cwd=tmp_path)
    assert "resuming with changed settings: max_iters 10 -> 20" in result.stdout
    full = curve(trained / "full")
    assert len(full) == 25 and curve(tmp_path / "out") == full  # dropout is on: the RNG states resume too


def check_stopped_and_resumed(out, folder, sig, full):
    """The run printed one stop line with the command that resumes, saved its iteration, and its resume
    logs the uninterrupted run's losses."""
    stopped = [line for line in out.splitlines() if line.startswith(f"stopped by {sig.name}")]
    assert len(stopped) == 1 and "resume with: python train.py" in stopped[0] and "--init_from=resume" in stopped[0]
    k = int(stopped[0].split("at iteration ")[1].split(";")[0])
    assert 7 <= k < 20 and torch.load(folder / "out" / "ckpt.pt", weights_only=True)["iter_num"] == k
    run_main("train.py", *RUN, "--out_dir=out", "--max_iters=20", "--init_from=resume", cwd=folder)
    assert curve(folder / "out") == curve(full)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_stop_signal_finishes_the_step_saves_exits_0_says_how_to_resume_and_resumes_exactly(trained, tmp_path, sig,
                                                                                            monkeypatch):
    shutil.copytree(trained / "data", tmp_path / "data")
    report = train.Run.report_step

    def signal_at_7(run, *args):  # the signal arrives mid-run, between two evaluations
        report(run, *args)
        if run.iter_num == 7:
            os.kill(os.getpid(), sig)

    monkeypatch.setattr(train.Run, "report_step", signal_at_7)
    result = run_main("train.py", *RUN, "--out_dir=out", "--max_iters=20", cwd=tmp_path)
    assert result.returncode == 0
    check_stopped_and_resumed(result.stdout, tmp_path, sig, trained / "full")


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_stop_signal_to_a_training_process_stops_it_saved_and_resumable(trained, tmp_path, sig):
    shutil.copytree(trained / "data", tmp_path / "data")
    args = [sys.executable, str(REPO / "train.py"), *RUN, "--out_dir=out", "--max_iters=20"]
    proc = subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    for line in proc.stdout:  # stop it mid-run, between two evaluations
        if line.startswith("iter 7:"):
            proc.send_signal(sig)
            break
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    check_stopped_and_resumed(out, tmp_path, sig, trained / "full")


def kill_once(cwd, args, delay):
    """Start a training run and kill -9 it `delay` seconds after it has started training, or right
    when it is writing a checkpoint (delay=None). Returns whether it was caught saving."""
    log = cwd / "kill.log"
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, str(REPO / "train.py"), *args], cwd=cwd, stdout=f,
                                stderr=subprocess.STDOUT, env=dict(os.environ))
    tmp = cwd / "out" / f"ckpt.pt.{proc.pid}.tmp"
    started, saving, deadline = None, False, time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if delay is None and tmp.exists():
            saving = True
            break
        if started is None and "tokens per iteration" in log.read_text():
            started = time.time()
        if delay is not None and started is not None and time.time() > started + delay:
            break
        time.sleep(0.0005 if delay is None else 0.01)
    proc.kill()
    proc.wait()
    return saving


@pytest.mark.slow
def test_kill_9_at_random_moments_20_times_always_leaves_a_loadable_checkpoint_and_an_exact_resume(trained, tmp_path):
    """Done-when #1 of issue 7: 20 kills (half of them timed to land while a checkpoint is being
    written), each followed by a load; then the resumed run ends with the uninterrupted run's losses."""
    shutil.copytree(trained / "data", tmp_path / "data")
    common = [*RUN, "--out_dir=out", "--eval_interval=2", "--eval_iters=1", "--lr_decay_iters=1000", "--max_iters=1000"]
    run_script("train.py", *common, "--out_dir=full", cwd=tmp_path)
    run_script("train.py", *common, "--max_iters=2", cwd=tmp_path)  # the first checkpoint
    rng, iters, caught_saving = random.Random(7), [], 0
    for trial in range(20):
        caught_saving += kill_once(tmp_path, [*common, "--init_from=resume"],
                                   None if trial % 2 else rng.uniform(0.0, 1.0))
        ckpt = checkpoint.load_checkpoint(str(tmp_path / "out"))  # raises on a damaged file
        assert len(ckpt["rng"]) == 1 and ckpt["model"]["transformer.wte.weight"].isfinite().all()
        iters.append(ckpt["iter_num"])
    print(f"20 of 20 kills left a loadable checkpoint; {caught_saving} landed during a save; iterations {iters}")
    assert iters == sorted(iters) and 2 < iters[-1] < 1000  # never back; the kills landed mid-run
    run_script("train.py", *common, "--init_from=resume", cwd=tmp_path)
    got, want = curve(tmp_path / "out"), curve(tmp_path / "full")
    assert got[-1] == want[-1] and got == want


# -----------------------------------------------------------------------------------------------
# what a checkpoint holds, and how it is written and read

def test_a_checkpoint_loads_weights_only_and_has_a_json_summary_beside_it(trained):
    ckpt = torch.load(trained / "out" / "ckpt.pt", weights_only=True)
    for key in ("model", "optimizer", "scaler", "iter_num", "best_val_loss", "config", "rng", "train_generator"):
        assert key in ckpt, key
    assert set(ckpt["rng"][0]) >= {"python", "numpy", "torch"}
    assert json.loads(json.dumps(ckpt["config"])) == ckpt["config"]  # settings are plain JSON values
    summary = json.loads((trained / "out" / "ckpt.json").read_text())
    assert summary["iter_num"] == ckpt["iter_num"] == 10
    assert summary["bytes"] == (trained / "out" / "ckpt.pt").stat().st_size


def test_every_checkpoint_records_its_format_version(trained):
    assert torch.load(trained / "out" / "ckpt.pt", weights_only=True)["format"] == checkpoint.FORMAT_VERSION
    assert json.loads((trained / "out" / "ckpt.json").read_text())["format"] == checkpoint.FORMAT_VERSION


def test_a_checkpoint_from_before_the_format_field_still_resumes_exactly(trained, tmp_path):
    shutil.copytree(trained / "out", tmp_path / "out")
    shutil.copytree(trained / "data", tmp_path / "data")
    old = torch.load(tmp_path / "out" / "ckpt.pt", weights_only=True)
    del old["format"]
    torch.save(old, tmp_path / "out" / "ckpt.pt")
    run_main("train.py", *RUN, "--out_dir=out", "--max_iters=20", "--init_from=resume", cwd=tmp_path)
    assert curve(tmp_path / "out") == curve(trained / "full")


def test_a_checkpoint_of_a_newer_format_is_refused_in_one_line(trained, tmp_path):
    shutil.copytree(trained / "out", tmp_path / "out")
    newer = torch.load(tmp_path / "out" / "ckpt.pt", weights_only=True)
    torch.save({**newer, "format": checkpoint.FORMAT_VERSION + 1}, tmp_path / "out" / "ckpt.pt")
    with pytest.raises(UserError, match="newer than this code's"):
        checkpoint.load_checkpoint(str(tmp_path / "out"))


def test_out_of_disk_space_while_saving_keeps_the_previous_checkpoint_and_says_so(tmp_path, monkeypatch):
    checkpoint.save_checkpoint({"iter_num": 1, "w": torch.ones(3)}, str(tmp_path))
    before = (tmp_path / "ckpt.pt").read_bytes()

    def full_disk(obj, f):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(UserError, match="No space left on device.*previous checkpoint .* is intact"):
        checkpoint.save_checkpoint({"iter_num": 2, "w": torch.zeros(3)}, str(tmp_path))
    assert (tmp_path / "ckpt.pt").read_bytes() == before
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_keep_checkpoints_keeps_the_newest_n_as_ckpt_iter_files(tmp_path):
    for it in range(1, 5):
        checkpoint.save_checkpoint({"iter_num": it, "w": torch.full((2,), float(it))}, str(tmp_path), keep=2)
        time.sleep(0.01)  # distinct modification times
    assert sorted(p for p in os.listdir(tmp_path) if p.startswith("ckpt-")) == ["ckpt-00000003.pt", "ckpt-00000004.pt"]
    assert torch.load(tmp_path / "ckpt-00000003.pt", weights_only=True)["iter_num"] == 3


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_a_truncated_or_corrupted_checkpoint_is_a_clear_error(trained, tmp_path, damage):
    data = (trained / "out" / "ckpt.pt").read_bytes()
    bad = {"truncate": data[:len(data) // 2], "garbage": os.urandom(4096), "empty": b""}[damage]
    (tmp_path / "ckpt.pt").write_bytes(bad)
    with pytest.raises(UserError, match="truncated or corrupted"):
        checkpoint.load_checkpoint(str(tmp_path))


# -----------------------------------------------------------------------------------------------
# non-finite losses

def test_a_nan_loss_stops_naming_the_iteration_and_lr_and_keeps_the_checkpoint(trained, tmp_path, monkeypatch, capsys):
    shutil.copytree(trained, tmp_path / "w")
    before = snapshot(tmp_path / "w" / "out")
    code = cli(tmp_path / "w", "--out_dir=out", "--init_from=resume", "--max_iters=20", "--learning_rate=1e30",
               "--eval_interval=100", monkeypatch=monkeypatch)
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert re.search(r"loss is (nan|inf) at iteration 12 \(lr \d\.\d\de\+29\); stopped", err), err
    assert snapshot(tmp_path / "w" / "out")["ckpt.pt"] == before["ckpt.pt"]


def test_a_non_finite_model_is_never_saved_over_a_good_checkpoint(trained, tmp_path, monkeypatch, capsys):
    shutil.copytree(trained, tmp_path / "w")
    before = (tmp_path / "w" / "out" / "ckpt.pt").read_bytes()
    code = cli(tmp_path / "w", "--out_dir=out", "--init_from=resume", "--max_iters=20", "--learning_rate=1e999",
               "--eval_interval=1", "--always_save_checkpoint=True", monkeypatch=monkeypatch)  # 1e999 is inf
    err = capsys.readouterr().err
    assert code == 2 and "not finite at iteration 11; not saving over" in err, err
    assert (tmp_path / "w" / "out" / "ckpt.pt").read_bytes() == before


def test_nan_policy_skip_drops_bad_steps_and_gives_up_after_ten_in_a_row(trained, tmp_path, monkeypatch, capsys):
    shutil.copytree(trained, tmp_path / "w")
    code = cli(tmp_path / "w", "--out_dir=out", "--init_from=resume", "--max_iters=40", "--learning_rate=1e30",
               "--eval_interval=100", "--nan_policy=skip", monkeypatch=monkeypatch)
    out, err = capsys.readouterr()
    assert out.count("skipped that step (nan_policy=skip)") == 10
    assert code == 2 and "for 10 steps in a row" in err


# -----------------------------------------------------------------------------------------------
# bad input: one line, non-zero exit, the previous checkpoint byte for byte

def make_dataset(root, name, change):
    """A copy of data/tiny under data/NAME, damaged by change(folder)."""
    folder = root / "data" / name
    shutil.copytree(root / "data" / "tiny", folder)
    change(folder)
    return f"--dataset={name}"


def set_meta(folder, **kw):
    meta = json.loads((folder / "meta.json").read_text())
    meta.update(kw)
    (folder / "meta.json").write_text(json.dumps(meta))


def resize_chars(folder, n):
    """A char alphabet of n characters (cut, or grown by characters the text never uses), vocab_size with it."""
    chars = json.loads((folder / "meta.json").read_text())["tokenizer"]["chars"]
    chars = chars[:n] + "".join(chr(0x4E00 + i) for i in range(max(0, n - len(chars))))
    set_meta(folder, tokenizer={"kind": "char", "chars": chars}, vocab_size=n)


def shuffled_chars(folder):
    meta = json.loads((folder / "meta.json").read_text())
    set_meta(folder, tokenizer={**meta["tokenizer"], "chars": meta["tokenizer"]["chars"][::-1]})


BAD_DATA = {
    "no bins": (lambda d: (d / "train.bin").unlink(), "train.bin is missing"),
    "no meta": (lambda d: (d / "meta.json").unlink(), "has no meta.json"),
    "meta not json": (lambda d: (d / "meta.json").write_text("{oops"), "not readable JSON"),
    "odd byte size": (lambda d: (d / "val.bin").open("ab").write(b"\0"), "not a whole number of uint16 tokens"),
    "ids over vocab": (lambda d: resize_chars(d, 20), "holds token id"),
    "other vocab size": (lambda d: resize_chars(d, 62), "the checkpoint's vocabulary has 61 tokens but dataset 'bad' has 62"),
    "vocab over tokenizer": (lambda d: set_meta(d, vocab_size=200), "says vocab_size 200 but its tokenizer has 61"),
    "other tokenizer": (shuffled_chars, "cannot resume: the checkpoint differs in tokenizer"),
}


@pytest.mark.parametrize("case", list(BAD_DATA))
def test_bad_data_is_one_line_a_nonzero_exit_and_an_untouched_checkpoint(trained, tmp_path, monkeypatch, capsys, case):
    shutil.copytree(trained, tmp_path / "w")
    before = snapshot(tmp_path / "w" / "out")
    change, message = BAD_DATA[case]
    dataset = make_dataset(tmp_path / "w", "bad", change)
    code = cli(tmp_path / "w", "--out_dir=out", "--init_from=resume", "--max_iters=20", dataset,
               monkeypatch=monkeypatch)
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert snapshot(tmp_path / "w" / "out") == before


BAD_SETTINGS = [
    (["--init_from=resume", "--n_layer=3"], "cannot resume: the checkpoint differs in n_layer 2 -> 3"),
    (["--init_from=resume", "--optimizer=muon"], "the checkpoint differs in optimizer 'adamw' -> 'muon'"),
    (["--init_from=resume", "--block_size=100000"], "fewer than block_size+1"),
    (["--init_from=resume", "--n_layr=3"], "did you mean 'n_layer'"),
    (["--init_from=resume", "--max_iters=lots"], "max_iters must be int"),
    (["--init_from=resume", "config/missing.py"], "config file config/missing.py not found"),
    (["--init_from=resume", "raises.py"], "config file raises.py failed: ZeroDivisionError"),
    (["--init_from=resume", "--nan_policy=ignore"], "nan_policy='ignore' is not one of stop, skip"),
    (["--init_from=resume", "--learning_rate=0"], "learning_rate must be > 0, got 0.0"),
    (["--init_from=resume", "--eval_iters=0"], "eval_iters must be >= 1, got 0"),
    (["--init_from=resume", "--batch_size=0"], "batch_size must be >= 1, got 0"),
    (["--init_from=resume", "--lr_schedule=linear"], "lr_schedule='linear' is not one of cosine, wsd"),
    (["--n_head=5", "--n_embd=128", "--overwrite=True"], "n_embd=128 is not divisible by n_head=5"),
    (["--init_from=resume", "--gradient_accumulation_steps=3", "WORLD_SIZE=2"], "not divisible by the 2 processes"),
    (["--init_from=nothing/here"], "no checkpoint at nothing/here"),
    (["--init_from=half.pt"], "truncated or corrupted"),
    (["--init_from=out", "--dataset=other"], "tokenizer"),
]


@pytest.mark.parametrize("args, message", BAD_SETTINGS, ids=[m for _, m in BAD_SETTINGS])
def test_bad_settings_are_one_line_a_nonzero_exit_and_an_untouched_checkpoint(trained, tmp_path, monkeypatch, capsys,
                                                                              args, message):
    shutil.copytree(trained, tmp_path / "w")
    w = tmp_path / "w"
    (w / "raises.py").write_text("max_iters = 1 // 0\n")
    (w / "half.pt").write_bytes((w / "out" / "ckpt.pt").read_bytes()[:5000])
    make_dataset(w, "other", shuffled_chars)
    for a in [a for a in args if a.startswith("WORLD_SIZE=")]:
        monkeypatch.setenv("WORLD_SIZE", a.split("=")[1])
    before = snapshot(w / "out")
    code = cli(w, "--out_dir=out", "--max_iters=20", *[a for a in args if "=" not in a or a.startswith("-")],
               monkeypatch=monkeypatch)
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert snapshot(w / "out") == before


def test_debug_shows_the_traceback_instead(trained, monkeypatch):
    with pytest.raises(UserError, match="not found"):
        cli(trained, "--out_dir=out", "--dataset=missing", "--debug", monkeypatch=monkeypatch)


@pytest.mark.slow
def test_under_torchrun_a_sigterm_to_one_process_stops_every_process_at_the_same_step(trained, tmp_path):
    shutil.copytree(trained / "data", tmp_path / "data")
    args = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
            str(REPO / "train.py"), *RUN, "--out_dir=out", "--max_iters=5000", "--gradient_accumulation_steps=2"]
    proc = subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    for line in proc.stdout:
        if line.startswith("iter 5:"):
            break
    workers = children(proc.pid)
    assert len(workers) == 2
    os.kill(workers[1], signal.SIGTERM)  # only one of them hears it, as when a node is preempted
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    stopped = [l for l in out.splitlines() if l.startswith("stopped by")]  # rank 0 may not be the one signalled
    assert len(stopped) == 1 and "torchrun --standalone --nproc_per_node=2" in stopped[0]
    ckpt = torch.load(tmp_path / "out" / "ckpt.pt", weights_only=True)
    assert str(ckpt["iter_num"]) in stopped[0] and len(ckpt["rng"]) == 2
