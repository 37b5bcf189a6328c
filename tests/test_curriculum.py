"""The README's "whole path, stage by stage" block, run command by command as written, at a tiny
size: small slices of the corpora, a few iterations of a tiny model, a few generated tokens."""
import json
import shlex
import subprocess

import pytest

from conftest import REPO, SHARED, run_script

pytest.importorskip("matplotlib")  # stage 2 plots

SHRINK = {  # appended to every command of the script, later flags winning
    "train.py": ["--max_iters=4", "--eval_interval=2", "--eval_iters=1", "--log_interval=1", "--device=cpu",
                 "--n_layer=1", "--n_head=2", "--n_embd=32", "--batch_size=4", "--warmup_iters=1"],
    "sample.py": ["--max_new_tokens=4", "--device=cpu"],
}


def readme_stage_commands():
    text = (REPO / "README.md").read_text(encoding="utf-8")
    block = text.split("## The whole path, stage by stage", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    return [line.strip() for line in block.splitlines() if line.strip() and not line.startswith("#")]


def small_copies(root):
    """Slices of the shared corpora, laid out as ../shared/data is."""
    data = root / "small"
    (data / "tinyshakespeare").mkdir(parents=True)
    (data / "tinyshakespeare" / "input.txt").write_text(
        (SHARED / "data" / "tinyshakespeare" / "input.txt").read_text(encoding="utf-8")[:60_000], encoding="utf-8")
    (data / "sms_spam").mkdir()
    lines = (SHARED / "data" / "sms_spam" / "SMSSpamCollection").read_text(encoding="utf-8").splitlines()
    (data / "sms_spam" / "SMSSpamCollection").write_text("\n".join(lines[:500]) + "\n", encoding="utf-8")
    (data / "instruct").mkdir()
    records = json.loads((SHARED / "data" / "instruct" / "instruction-data.json").read_text(encoding="utf-8"))
    (data / "instruct" / "instruction-data.json").write_text(json.dumps(records[:150]), encoding="utf-8")
    return data


@pytest.mark.slow
def test_every_readme_stage_command_runs_at_a_tiny_size(tmp_path):
    if not (SHARED / "data").exists():
        pytest.skip("needs ../shared/data")
    small = small_copies(tmp_path)
    (tmp_path / "config").symlink_to(REPO / "config")  # the commands run from a checkout's root
    commands = readme_stage_commands()
    assert len(commands) >= 12
    for command in commands:
        command = command.replace("../shared/data", str(small))
        if not command.startswith("python "):  # shell glue (mkdir, cp)
            subprocess.run(command, shell=True, cwd=tmp_path, check=True)
            continue
        args = shlex.split(command)[1:]
        script = args[0]
        if script == "prepare.py" and "--input" not in args:  # a known corpus: use the local slice
            args += ["--input", str(small / "tinyshakespeare" / "input.txt")]
        proc = run_script(script, *args[1:], *SHRINK.get(script, []), cwd=tmp_path, timeout=600)
        if script == "sample.py":
            assert proc.stdout.strip(), command
    assert (tmp_path / "out-shakespeare-char-cpu" / "loss.png").exists()
    assert (tmp_path / "data" / "shakespeare_bpe" / "tokenizer.json").exists()
    assert (tmp_path / "out-instruct" / "ckpt.pt").exists()
