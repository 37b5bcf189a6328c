"""bench.py: the figures behind the README's speed claims, from fresh train.py processes."""
import re

import pytest

from conftest import TINY_MODEL, run_main


FIGURES = ("train ms/iter", "train tokens/s", "train mfu", "peak memory", "page faults per step", "sample tokens/s",
           "sample mbu")


def test_bench_reads_every_figure_that_train_py_bench_prints(workdir, monkeypatch):
    import bench
    printed = run_main("train.py", *TINY_MODEL, "--bench=3", "--out_dir=b", cwd=workdir).stdout.splitlines()
    runs = []

    def run_lines(cmd, cwd, until=None):  # the lines a fresh train.py process would have printed
        runs.append(cmd)
        return [(0.1 * i, line) for i, line in enumerate(printed)], 1.0

    monkeypatch.setattr(bench, "run_lines", run_lines)
    figures = bench.speed(["python", "train.py"], str(workdir), 7, nanogpt_row=False)
    assert runs == [["python", "train.py", "--bench=7"]] and set(figures) == set(FIGURES)
    assert float(figures["train ms/iter"]) > 0 and figures["train mfu"] == "n/a"


@pytest.mark.slow
def test_bench_prints_each_speed_figure_of_a_config_and_writes_nothing(workdir):
    before = sorted(p.name for p in workdir.iterdir())
    proc = run_main("bench.py", *TINY_MODEL, "--steps=3", cwd=workdir)
    for figure in FIGURES:
        assert re.search(rf"^{figure}: \S", proc.stdout, re.M), figure
    assert float(re.search(r"^train ms/iter: ([\d.]+)", proc.stdout, re.M)[1]) > 0
    assert sorted(p.name for p in workdir.iterdir()) == before


@pytest.mark.slow
def test_bench_stops_a_run_at_the_first_evaluation_that_reaches_the_target(workdir):
    # a char model starts near ln(vocab) ~ 4; 3.5 is reached within a few dozen iterations, long before 500
    proc = run_main("bench.py", *TINY_MODEL, "--max_iters=500", "--eval_interval=10", "--target=3.5",
                      cwd=workdir)
    seconds = float(re.search(r"^time to target: ([\d.]+) s", proc.stdout, re.M)[1])
    iteration = int(re.search(r"^iteration: (\d+)", proc.stdout, re.M)[1])
    val = float(re.search(r"^val loss: ([\d.]+)", proc.stdout, re.M)[1])
    assert 0 < seconds and 0 < iteration < 500 and iteration % 10 == 0 and val <= 3.5


@pytest.mark.slow
def test_bench_says_when_a_run_ends_above_the_target(workdir):
    proc = run_main("bench.py", *TINY_MODEL, "--max_iters=10", "--eval_interval=5", "--target=0.01",
                      cwd=workdir)
    assert re.search(r"^time to target: not reached \([\d.]+ s in all\)", proc.stdout, re.M)
    assert re.search(r"^iteration: 10$", proc.stdout, re.M)


def test_bench_bad_input_ends_with_one_line_and_exit_code_2(workdir):
    for args, what in [(["--suite=nope"], "unknown suite"), ([], "give a config file"),
                       ([*TINY_MODEL, "--steps=0"], "--steps and --repeat must be >= 1"),
                       ([*TINY_MODEL, "--n_layr=2"], "n_layr")]:
        proc = run_main("bench.py", *args, cwd=workdir, check=False)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and what in lines[0], (args, proc.stderr)
