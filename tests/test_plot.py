"""plot.py: a PNG of the loss curves of one run or several."""
import pytest

from conftest import TINY_MODEL, run_script

pytest.importorskip("matplotlib")


def test_plot_writes_a_png_for_one_run_and_for_several(workdir):
    for name in ("a", "b"):
        run_script("train.py", *TINY_MODEL, f"--out_dir={name}", "--max_iters=10", "--eval_interval=5", cwd=workdir)
    run_script("plot.py", "a", cwd=workdir)
    run_script("plot.py", "a", "b", "--labels=first,second", "--out=both.png", cwd=workdir)
    for png in (workdir / "a" / "loss.png", workdir / "both.png"):
        data = png.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000


def test_plot_of_a_folder_without_metrics_is_one_line(tmp_path):
    proc = run_script("plot.py", "nothing_here", cwd=tmp_path, check=False)
    assert proc.returncode == 1 and "metrics.jsonl" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
