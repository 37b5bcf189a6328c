"""configurator.py: defaults <- config file <- command line, with clear errors."""
import pytest

from common import UserError
from configurator import parse_args
from model import GPTConfig
from train import TrainConfig


def parse(*argv):
    return parse_args(list(argv), [TrainConfig, GPTConfig], "train.py", "test")[0]


def test_defaults_come_from_the_dataclasses():
    cfg = parse()
    assert cfg["learning_rate"] == TrainConfig.learning_rate and cfg["n_layer"] == GPTConfig.n_layer


def test_config_file_overrides_defaults_and_command_line_overrides_file(tmp_path):
    f = tmp_path / "c.py"
    f.write_text("import math\nn_layer = 3\nlearning_rate = 2e-3\n_private = 5\n")
    cfg = parse(str(f), "--learning_rate=1e-4", "--compile", "--out_dir", "x")
    assert cfg["n_layer"] == 3 and cfg["learning_rate"] == 1e-4 and cfg["compile"] is True
    assert cfg["out_dir"] == "x"


def test_unknown_key_names_the_nearest_valid_key():
    with pytest.raises(UserError, match=r"unknown config key 'n_layers' \(did you mean 'n_layer'\?\)"):
        parse("--n_layers=2")


def test_unknown_key_in_a_config_file_is_refused(tmp_path):
    f = tmp_path / "c.py"
    f.write_text("learning_rat = 1e-3\n")
    with pytest.raises(UserError, match="learning_rate"):
        parse(str(f))


@pytest.mark.parametrize("arg", ["--n_layer=2.5", "--n_layer=abc", "--compile=maybe", "--learning_rate=fast"])
def test_wrong_type_is_refused_with_the_key_named(arg):
    key = arg[2:].split("=")[0]
    with pytest.raises(UserError, match=key):
        parse(arg)


def test_ints_are_accepted_for_floats_and_strings_stay_as_typed():
    cfg = parse("--learning_rate=1", "--init_from=0123")
    assert cfg["learning_rate"] == 1.0 and isinstance(cfg["learning_rate"], float)
    assert cfg["init_from"] == "0123"


def test_a_config_file_that_raises_or_is_missing_is_one_clear_error(tmp_path):
    f = tmp_path / "bad.py"
    f.write_text("n_layer = 1 / 0\n")
    with pytest.raises(UserError, match="ZeroDivisionError"):
        parse(str(f))
    with pytest.raises(UserError, match="not found"):
        parse(str(tmp_path / "missing.py"))


def test_help_lists_every_key_with_its_default(capsys):
    with pytest.raises(SystemExit) as e:
        parse("--help")
    assert e.value.code == 0
    out = capsys.readouterr().out
    for key in list(TrainConfig.__dataclass_fields__) + GPTConfig.keys():
        line = next((l for l in out.splitlines() if l.strip().startswith(f"--{key} ")), None)
        assert line is not None and "(default: " in line, key
        assert len(line.split("(default:")[0].strip()) > len(key) + 2, f"{key} has no help text"


@pytest.mark.parametrize("command", ["prepare.py", "sample.py", "train.py", "tokenizer.py", "plot.py", "bench.py",
                                     "merge_lora.py", "hf.py export", "hf.py import"])
def test_every_option_of_every_script_shows_its_default_in_help(command, tmp_path):
    import re
    from conftest import run_main
    script, *sub = command.split()
    out = run_main(script, *sub, "--help", cwd=tmp_path).stdout
    entries = re.split(r"\n  (?=-)", out.split("options:" if "options:" in out else "keys:", 1)[1])
    options = [e for e in entries if e.lstrip().startswith("--")]
    assert len(options) >= 2
    for entry in options:
        assert "default" in entry, f"{script}: {entry.split()[0]} has no default in --help"
