"""plot.py: a PNG of the loss curves of one run or several."""
import json

import pytest

from conftest import TINY_MODEL, one_line_error, run_main

pytest.importorskip("matplotlib")


def write_metrics(folder, scale, bpb=False, acc=False):
    """A metrics.jsonl as train.py writes it: a log line every 10 iterations, an evaluation every 50."""
    folder.mkdir()
    with open(folder / "metrics.jsonl", "w") as f:
        for it in range(0, 201, 10):
            f.write(json.dumps({"iter": it, "tokens": it * 256, "loss": scale * 4 / (1 + it / 50), "lr": 1e-3}) + "\n")
            if it % 50 == 0:
                f.write(json.dumps({"iter": it, "tokens": it * 256, "train/loss": scale * 4 / (1 + it / 50),
                                    "val/loss": scale * 4.1 / (1 + it / 50), "elapsed_s": it / 10,
                                    **({"val/bpb": scale * 5.9 / (1 + it / 50)} if bpb else {}),
                                    **({"cloze/acc": 0.25 + it / 1000} if acc else {})}) + "\n")


def is_png(path):
    data = path.read_bytes()
    return data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000


def test_plot_writes_a_png_for_one_run_and_for_several(tmp_path):
    write_metrics(tmp_path / "a", 1.0)
    write_metrics(tmp_path / "b", 0.8)
    run_main("plot.py", "a", cwd=tmp_path)
    run_main("plot.py", "a", "b", "--labels=first,second", "--out=both.png", cwd=tmp_path)
    assert is_png(tmp_path / "a" / "loss.png") and is_png(tmp_path / "both.png")


def png_width(path):
    return int.from_bytes(path.read_bytes()[16:20], "big")  # the IHDR chunk's width


def test_runs_that_logged_bits_per_byte_get_a_fourth_panel_for_it(tmp_path):
    write_metrics(tmp_path / "plain", 1.0)
    write_metrics(tmp_path / "char", 1.0, bpb=True)
    write_metrics(tmp_path / "bpe", 0.8, bpb=True)
    run_main("plot.py", "plain", cwd=tmp_path)
    run_main("plot.py", "char", "bpe", "--out=bpb.png", cwd=tmp_path)
    assert png_width(tmp_path / "bpb.png") > 1.2 * png_width(tmp_path / "plain" / "loss.png")


def test_runs_that_logged_benchmark_accuracies_get_a_panel_for_them(tmp_path):
    write_metrics(tmp_path / "bpb", 1.0, bpb=True)
    write_metrics(tmp_path / "cloze", 1.0, bpb=True, acc=True)
    run_main("plot.py", "bpb", cwd=tmp_path)
    run_main("plot.py", "cloze", "bpb", "--out=acc.png", cwd=tmp_path)
    assert png_width(tmp_path / "acc.png") > 1.15 * png_width(tmp_path / "bpb" / "loss.png")


def test_a_grpo_run_that_logged_only_its_rollout_reward_gets_the_accuracy_panel(tmp_path):
    write_metrics(tmp_path / "plain", 1.0)
    lines = (tmp_path / "plain" / "metrics.jsonl").read_text().splitlines()
    (tmp_path / "rl").mkdir()
    (tmp_path / "rl" / "metrics.jsonl").write_text("".join(
        json.dumps({**r, "rollout/reward": 0.3}) + "\n" if "lr" in r else json.dumps(r) + "\n"
        for r in map(json.loads, lines)))
    run_main("plot.py", "plain", cwd=tmp_path)
    run_main("plot.py", "rl", cwd=tmp_path)
    assert png_width(tmp_path / "rl" / "loss.png") > 1.2 * png_width(tmp_path / "plain" / "loss.png")


@pytest.mark.slow
def test_plot_draws_two_trained_runs(workdir):
    for name in ("a", "b"):
        run_main("train.py", *TINY_MODEL, f"--out_dir={name}", "--max_iters=10", "--eval_interval=5", cwd=workdir)
    run_main("plot.py", "a", "b", "--labels=first,second", "--out=both.png", cwd=workdir)
    assert is_png(workdir / "both.png")


def test_plot_of_a_folder_without_metrics_is_one_line(tmp_path):
    one_line_error(run_main("plot.py", "nothing_here", cwd=tmp_path, check=False), "metrics.jsonl")


def test_plot_with_a_label_per_run_missing_is_one_line(tmp_path):
    write_metrics(tmp_path / "a", 1.0)
    one_line_error(run_main("plot.py", "a", "--labels=x,y", cwd=tmp_path, check=False), "2 labels for 1 runs")
