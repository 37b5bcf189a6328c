"""Shared fixtures: the repository's scripts run as a user would run them, on small local data."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
SHAKESPEARE = SHARED / "data" / "tinyshakespeare" / "input.txt"
sys.path.insert(0, str(REPO))


@pytest.fixture(scope="session")
def tiktoken_cache(tmp_path_factory):
    """GPT-2's vocabulary laid out as tiktoken's cache, so get_encoding('gpt2') works offline."""
    if os.environ.get("TIKTOKEN_CACHE_DIR"):
        return os.environ["TIKTOKEN_CACHE_DIR"]
    tool = SHARED / "tools" / "tiktoken_offline_cache.py"
    if not tool.exists():
        pytest.skip("GPT-2's vocabulary is not available offline (../shared/tools missing)")
    cache = tmp_path_factory.mktemp("tiktoken_cache")
    subprocess.run([sys.executable, str(tool), str(cache)], check=True, capture_output=True)
    os.environ["TIKTOKEN_CACHE_DIR"] = str(cache)
    return str(cache)


@pytest.fixture(scope="session")
def corpus_text():
    """About 100 KB of Shakespeare (or, without ../shared, a generated text of the same flavour)."""
    if SHAKESPEARE.exists():
        return SHAKESPEARE.read_text(encoding="utf-8")[:100_000]
    words = "the king shall speak of love and war to thee my lord good night sweet prince".split()
    import random
    rng = random.Random(0)
    lines = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 10))).capitalize() + "." for _ in range(3000)]
    return "\n".join(lines) + "\n"


def run_script(script, *args, cwd, env=None, check=True, timeout=300):
    """Run one of the repository's scripts in cwd, as `python script args`; returns the process."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_MODE": "offline", **(env or {})}
    proc = subprocess.run([sys.executable, str(REPO / script), *map(str, args)], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} {' '.join(map(str, args))} failed ({proc.returncode}):\n"
                             f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture
def workdir(tmp_path, corpus_text):
    """A folder holding input.txt (the small corpus) and data/tiny, prepared with the char tokenizer."""
    (tmp_path / "input.txt").write_text(corpus_text, encoding="utf-8")
    run_script("prepare.py", "--input", "input.txt", "--tokenizer", "char", "--out", "data/tiny", cwd=tmp_path)
    return tmp_path


TINY_MODEL = ["--dataset=tiny", "--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=32",
              "--batch_size=8", "--dropout=0.0", "--device=cpu", "--eval_iters=4", "--log_interval=5",
              "--learning_rate=3e-3", "--warmup_iters=5", "--min_lr=3e-4"]


def read_split(out, split):
    """The token ids of one split of a prepared dataset folder, and its meta.json."""
    import numpy as np
    meta = json.loads((Path(out) / "meta.json").read_text())
    return np.fromfile(Path(out) / f"{split}.bin", dtype=meta["dtype"]), meta


def decode_splits(out):
    """(train text, val text, meta) of a prepared dataset folder, decoded with its own tokenizer."""
    from tokenizer import load_tokenizer
    train, meta = read_split(out, "train")
    val, _ = read_split(out, "val")
    tok = load_tokenizer(meta["tokenizer"], str(out))
    return tok.decode(train.tolist()), tok.decode(val.tolist()), meta


def read_metrics(out_dir):
    with open(Path(out_dir) / "metrics.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for line in f]
