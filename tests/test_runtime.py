"""common.py (the one-line error and the command-line wrapper, meta.json) and runtime.py (device, number type)."""
import ast
import json
import os

import pytest
import torch

import runtime
from common import ArgumentParser, UserError, read_meta, run_cli, token_dtype
from conftest import REPO


def test_run_cli_prints_a_user_error_as_one_line_and_returns_2(capsys):
    def main(argv):
        raise UserError("the thing is wrong; do this instead")
    assert run_cli(main, []) == 2
    assert capsys.readouterr().err == "error: the thing is wrong; do this instead\n"


def test_run_cli_with_debug_shows_the_traceback_and_leaves_bugs_alone():
    def bad_input(argv):
        raise UserError("bad input")

    def bug(argv):
        raise KeyError("a bug")
    with pytest.raises(UserError):
        run_cli(bad_input, ["--debug"])
    with pytest.raises(KeyError):  # not the user's mistake: a traceback, whatever the flags
        run_cli(bug, [])


def test_run_cli_returns_130_on_ctrl_c_and_main_s_own_code_otherwise(capsys):
    def interrupted(argv):
        raise KeyboardInterrupt
    assert run_cli(interrupted, [], interrupted="stopped") == 130 and capsys.readouterr().err == "stopped\n"
    assert run_cli(lambda argv: None, []) == 0 and run_cli(lambda argv: 3, []) == 3


def test_an_unknown_option_is_a_user_error_naming_it():
    p = ArgumentParser(prog="x")
    p.add_argument("--size", type=int, default=1, help="a size")
    with pytest.raises(UserError, match="--colour"):
        p.parse_args(["--colour=red"])
    with pytest.raises(UserError, match="invalid int value"):
        p.parse_args(["--size=big"])
    assert p.parse_args(["--debug"]).debug is True


def test_read_meta_says_what_to_do_for_a_missing_or_broken_meta_json(tmp_path):
    with pytest.raises(UserError, match="does not exist; build it with prepare.py"):
        read_meta(str(tmp_path / "nowhere"))
    with pytest.raises(UserError, match="has no meta.json"):
        read_meta(str(tmp_path))
    (tmp_path / "meta.json").write_text("{oops")
    with pytest.raises(UserError, match="not readable JSON"):
        read_meta(str(tmp_path))
    (tmp_path / "meta.json").write_text(json.dumps({"vocab_size": 3}))
    with pytest.raises(UserError, match="no \"tokenizer\" entry"):
        read_meta(str(tmp_path))


def test_token_ids_are_uint16_while_they_fit():
    assert token_dtype(65536).__name__ == "uint16" and token_dtype(65537).__name__ == "uint32"


@pytest.mark.parametrize("native", [False, True])
def test_auto_dtype_on_a_cpu_is_bfloat16_only_where_it_is_native(monkeypatch, native):
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: native)
    assert runtime.pick_dtype("auto", "cpu") == ("bfloat16" if native else "float32")
    assert runtime.pick_dtype("float32", "cpu") == "float32" and runtime.pick_dtype("auto", "mps") == "float32"


def test_an_unknown_dtype_or_a_missing_gpu_is_a_user_error():
    with pytest.raises(UserError, match="dtype='float8'"):
        runtime.pick_dtype("float8", "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="CUDA is not available"):
            runtime.pick_device("cuda")


def test_autocast_computes_in_the_runtime_s_type_and_float32_is_untouched():
    layer = torch.nn.Linear(4, 4)
    x = torch.randn(2, 4)
    for dtype in ("bfloat16", "float16"):
        with runtime.Runtime("cpu", dtype).autocast():
            assert layer(x).dtype == getattr(torch, dtype)
        with runtime.Runtime("cpu", dtype).autocast(enabled=False):  # fsdp casts by its own policy
            assert layer(x).dtype == torch.float32
    with runtime.Runtime("cpu", "float32").autocast():
        assert layer(x).dtype == torch.float32


def test_one_process_needs_no_collectives():
    rt = runtime.local("cpu", "float32")
    assert (rt.rank, rt.world, rt.master) == (0, 1, True) and not torch.distributed.is_initialized()
    assert rt.any(True) and not rt.any(False) and rt.gather("x") == ["x"]
    t = torch.ones(2)
    assert torch.equal(rt.mean(t), torch.ones(2)) and torch.equal(rt.total(t), torch.ones(2))


@pytest.mark.parametrize("env, spin", [({}, "1000"), ({"GOMP_SPINCOUNT": "50"}, "50"),
                                       ({"OMP_WAIT_POLICY": "ACTIVE"}, None)])
def test_idle_openmp_threads_sleep_soon_unless_the_user_chose(monkeypatch, env, spin):
    from common import yield_idle_cores
    for key in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    yield_idle_cores()
    assert os.environ.get("GOMP_SPINCOUNT") == spin


@pytest.mark.parametrize("script", ["train.py", "sample.py"])
def test_the_scripts_ask_for_it_before_torch_is_imported(script):
    """OpenMP reads GOMP_SPINCOUNT once, when torch loads it: a later setting would do nothing."""
    tree = ast.parse((REPO / script).read_text())
    statements = [ast.unparse(node) for node in tree.body]
    assert statements.index("yield_idle_cores()") < statements.index("import torch")


def test_a_busy_cpu_is_named_and_an_idle_one_or_a_gpu_is_not(monkeypatch):
    from common import cpu_cores
    cores = cpu_cores()
    monkeypatch.setattr(os, "getloadavg", lambda: (cores + 0.5, 0.0, 0.0))
    assert runtime.busy_cpu_note("cpu").startswith(f"note: the load average is {cores + 0.5:.1f} on {cores} cores")
    assert runtime.busy_cpu_note("cuda") == ""
    monkeypatch.setattr(os, "getloadavg", lambda: (cores - 0.5, 9.0, 9.0))  # the last minute is what counts
    assert runtime.busy_cpu_note("cpu") == ""


def test_cpu_attention_dtype_times_both_dtypes_and_leaves_the_random_stream_alone():
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    dtype, ms = runtime.cpu_attention_dtype((2, 2, 16, 8), torch.bfloat16)
    assert torch.equal(torch.rand(3), expected)
    assert set(ms) == {torch.bfloat16, torch.float32} and all(t > 0 for t in ms.values())
    assert dtype == min(ms, key=ms.get)
    assert runtime.cpu_attention_dtype((2, 2, 16, 8), torch.float32) == (torch.float32, {})
