"""The small things a new user trips on, each one line (exit code 2) saying what to do, or simply working."""
import os
import stat

import pytest

from common import UserError
from configurator import parse_args
from conftest import REPO, TINY_MODEL, one_line_error, run_main
from model import GPTConfig
from train import TrainConfig


def parse(*argv):
    return parse_args(list(argv), [TrainConfig, GPTConfig], "train.py", "test")[0]


def test_a_key_with_no_value_does_not_swallow_the_next_flag():
    with pytest.raises(UserError, match="--max_iters needs a value: --max_iters=VALUE"):
        parse("--max_iters", "--out_dir=x")
    assert parse("--max_iters", "7", "--compile", "--out_dir=x")["max_iters"] == 7  # a value and a bare flag


def test_a_whole_number_written_as_a_float_is_an_int():
    cfg = parse("--max_iters=1e3", "--batch_size=16.0")
    assert cfg["max_iters"] == 1000 and isinstance(cfg["max_iters"], int) and cfg["batch_size"] == 16
    with pytest.raises(UserError, match="max_iters must be int"):
        parse("--max_iters=2.5")


def test_a_setting_written_without_dashes_is_pointed_out():
    with pytest.raises(UserError, match="config file max_iters=5 not found; to set max_iters, write --max_iters=5"):
        parse("max_iters=5")


def test_a_dataset_that_is_a_file_is_named_as_such(workdir):
    (workdir / "notes.txt").write_text("hello")
    one_line_error(run_main("train.py", *TINY_MODEL, "--dataset=notes.txt", cwd=workdir, check=False),
                   "dataset 'notes.txt' is a file; name a folder made by prepare.py")


def test_a_fine_tuning_config_without_its_base_names_the_config_that_trains_it(tmp_path):
    from test_finetune import write_sms
    write_sms(tmp_path / "sms.tsv", n=100)
    run_main("prepare.py", "--input", "sms.tsv", "--task", "classify", "--tokenizer", "bpe", "--vocab_size", "300",
             "--out", "data/spam", cwd=tmp_path)
    one_line_error(run_main("train.py", REPO / "config" / "finetune_spam_lora.py", "--device=cpu", cwd=tmp_path,
                            check=False),
                   "no checkpoint at out-spam-lm; train it first: python train.py config/pretrain_spam_lm.py")


def test_help_shows_each_script_s_whole_description():
    for script, ending in [("plot.py", "one colour each."), ("train.py", "one GPU, or many with torchrun.")]:
        out = run_main(script, "--help", cwd=REPO).stdout
        assert ending in " ".join(out.split()), script


def test_prepare_into_a_file_or_under_one_is_one_line_and_leaves_nothing(tmp_path):
    (tmp_path / "in.txt").write_text("abc def\n" * 100, encoding="utf-8")
    (tmp_path / "taken").write_text("a file")
    for out in ("taken", "taken/data"):
        one_line_error(run_main("prepare.py", "--input", "in.txt", "--out", out, cwd=tmp_path, check=False),
                       f"cannot make --out {out}")
    assert (tmp_path / "taken").read_text() == "a file"


def test_prepare_into_a_read_only_folder_is_one_line_and_keeps_the_old_dataset(tmp_path, monkeypatch):
    import prepare
    (tmp_path / "in.txt").write_text("abc def\n" * 100, encoding="utf-8")
    run_main("prepare.py", "--input", "in.txt", "--out", "ro", cwd=tmp_path)
    before = {p.name: p.read_bytes() for p in (tmp_path / "ro").iterdir()}
    real_open = open

    def read_only(path, mode="r", *args, **kw):  # what the system says to a write there (the tests run as root)
        if "ro" in os.fspath(path) and any(c in mode for c in "wax"):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_open(path, mode, *args, **kw)

    monkeypatch.setattr(prepare, "open", read_only, raising=False)
    one_line_error(run_main("prepare.py", "--input", "in.txt", "--out", "ro", cwd=tmp_path, check=False),
                   "cannot write the dataset into ro (Permission denied)")
    assert {p.name: p.read_bytes() for p in (tmp_path / "ro").iterdir()} == before


def test_a_failed_prepare_leaves_no_half_made_folder(tmp_path):
    (tmp_path / "in.txt").write_text("x", encoding="utf-8")  # too short for a val split
    one_line_error(run_main("prepare.py", "--input", "in.txt", "--out", "data/new", cwd=tmp_path, check=False),
                   "split is empty")
    assert not (tmp_path / "data" / "new").exists()
    (tmp_path / "bad.json").write_text("[{\"instruction\": 1}]", encoding="utf-8")
    one_line_error(run_main("prepare.py", "--input", "bad.json", "--task", "instruct", "--tokenizer", "bpe",
                            "--out", "data/inst", cwd=tmp_path, check=False), "needs string fields")
    assert not (tmp_path / "data" / "inst").exists()


def test_hf_export_into_a_file_is_one_line(tiny_run, tmp_path):
    pytest.importorskip("safetensors")
    (tmp_path / "taken").write_text("a file")
    one_line_error(run_main("hf.py", "export", "--ckpt", tiny_run / "out", "--out", tmp_path / "taken", cwd=tmp_path,
                            check=False), "cannot make --out")
    assert (tmp_path / "taken").read_text() == "a file"


def test_hf_export_writes_files_with_ordinary_permissions(tiny_run, tmp_path):
    pytest.importorskip("safetensors")
    run_main("hf.py", "export", "--ckpt", tiny_run / "out", "--out", tmp_path / "hf", cwd=tmp_path)
    mask = os.umask(0)
    os.umask(mask)
    for p in (tmp_path / "hf").iterdir():
        assert stat.S_IMODE(p.stat().st_mode) == 0o666 & ~mask, p.name


def test_hf_import_offline_names_its_own_flag(tmp_path, monkeypatch):
    constants = pytest.importorskip("huggingface_hub.constants")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    result = run_main("hf.py", "import", "--src", "gpt2", "--out", "x", cwd=tmp_path, check=False)
    one_line_error(result, "could not download openai-community/gpt2")
    assert "--src PATH for hf.py import" in result.stderr and not (tmp_path / "x").exists()
