"""Shared builders: small corpora, prepared datasets and trained checkpoints, and the repository's scripts
run as a user runs them: in this process (run_main: no interpreter start-up, the same code path from the
command line on), or in a fresh one where a real process matters (run_script: signals, kill -9, torchrun)."""
import contextlib
import importlib
import io
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")  # tiny models: a second thread only waits; subprocesses inherit it

import pytest  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
SHAKESPEARE = SHARED / "data" / "tinyshakespeare" / "input.txt"
sys.path.insert(0, str(REPO))
torch.set_num_threads(1)

from common import run_cli  # noqa: E402

# a model small enough that a run of a few dozen iterations takes about a second; float32 pinned, so that
# runs compare exactly on any CPU (dtype=auto picks bfloat16 on CPUs that have it natively)
TINY_MODEL = ["--dataset=tiny", "--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=32",
              "--batch_size=8", "--dropout=0.0", "--device=cpu", "--dtype=float32", "--eval_iters=4",
              "--log_interval=5", "--learning_rate=3e-3", "--warmup_iters=5", "--min_lr=3e-4"]


# the shape of the models that tests build in memory (lively_gpt), not trained
LIVELY = dict(block_size=24, vocab_size=29, n_layer=2, n_head=4, n_embd=32)


def lively_gpt(**kw):
    """A GPT of the LIVELY shape (kw override it) in eval mode, with weights large enough (N(0, 0.2)) that
    positions and tokens visibly matter; the same weights on every call."""
    from model import GPT, GPTConfig
    torch.manual_seed(0)
    model = GPT(GPTConfig(**{**LIVELY, **kw})).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.2)
    return model


class Result:
    """What a finished script left: its exit code and everything it printed."""

    def __init__(self, returncode, stdout, stderr):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


@contextlib.contextmanager
def environment(cwd, env):
    """cwd as the working folder and env's variables set, both undone on leaving."""
    old_cwd, old_env = os.getcwd(), {k: os.environ.get(k) for k in env}
    os.chdir(cwd)
    os.environ.update({k: str(v) for k, v in env.items()})
    try:
        yield
    finally:
        os.chdir(old_cwd)
        for k, v in old_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def run_main(script, *args, cwd, env=None, check=True, stdin=""):
    """`python script args` in cwd, run in this process: the script's main() behind the same one-line
    error handling as its __main__ (train.py's cli). Returns a Result."""
    module = importlib.import_module(script.removesuffix(".py"))
    entry = module.cli if script == "train.py" else (lambda argv: run_cli(module.main, argv))
    out, err = io.StringIO(), io.StringIO()
    old_stdin = sys.stdin
    sys.stdin = io.StringIO(stdin)
    try:
        with environment(cwd, env or {}), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = entry([str(a) for a in args])
            except SystemExit as e:  # --help
                code = e.code or 0
    finally:
        sys.stdin = old_stdin
    result = Result(code, out.getvalue(), err.getvalue())
    if check and code != 0:
        raise AssertionError(f"{script} {' '.join(map(str, args))} failed ({code}):\n{result.stdout[-3000:]}\n"
                             f"{result.stderr[-3000:]}")
    return result


def run_script(script, *args, cwd, env=None, check=True, timeout=300):
    """Run one of the repository's scripts in a fresh process, as `python script args` in cwd."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_MODE": "offline", **(env or {})}
    proc = subprocess.run([sys.executable, str(REPO / script), *map(str, args)], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} {' '.join(map(str, args))} failed ({proc.returncode}):\n"
                             f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def one_line_error(result, message, code=2):
    """The script failed the way bad input must: exit code 2, one line on stderr naming the problem."""
    lines = result.stderr.strip().splitlines()
    assert result.returncode == code, (result.returncode, result.stderr)
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr
    assert "Traceback" not in result.stderr


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
    rng = random.Random(0)
    lines = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 10))).capitalize() + "." for _ in range(3000)]
    return "\n".join(lines) + "\n"


def prepare_tiny(folder, text, tokenizer="char", name="tiny", **kw):
    """folder/input.txt holding text, and folder/data/NAME prepared from it (in this process)."""
    import prepare
    (folder / "input.txt").write_text(text, encoding="utf-8")
    with contextlib.redirect_stdout(io.StringIO()):
        prepare.prepare(str(folder / "input.txt"), tokenizer, str(folder / "data" / name), workers=1, **kw)
    return folder


@pytest.fixture
def workdir(tmp_path, corpus_text):
    """A folder holding input.txt (the small corpus) and data/tiny, prepared with the char tokenizer."""
    return prepare_tiny(tmp_path, corpus_text)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, corpus_text):
    """A folder with data/tiny and out/, a checkpoint of the tiny model after 30 iterations. Shared:
    copy it (copy_run) before changing anything in it."""
    folder = prepare_tiny(tmp_path_factory.mktemp("tiny_run"), corpus_text)
    run_main("train.py", *TINY_MODEL, "--out_dir=out", "--max_iters=30", "--eval_interval=15", cwd=folder)
    return folder


def copy_run(src, dst):
    shutil.copytree(src, dst, dirs_exist_ok=True)
    return dst


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


def evals(out_dir):
    """The evaluation records of a run's metrics.jsonl."""
    return [r for r in read_metrics(out_dir) if "val/loss" in r]


def curve(out_dir):
    """The training and validation losses of a run, as logged, in order."""
    return [(r["iter"], k, r[k]) for r in read_metrics(out_dir) for k in ("loss", "val/loss") if k in r]


def snapshot(out_dir):
    """Every file of a folder, by name, with its bytes: to show that nothing was touched."""
    return {p.name: p.read_bytes() for p in sorted(Path(out_dir).iterdir()) if p.is_file()}


class CountingForward:
    """Wraps a model's forward to record the length of every input it is given."""

    def __init__(self, model):
        self.lengths, self.forward = [], model.forward
        model.forward = self

    def __call__(self, idx, *args, **kw):
        self.lengths.append(idx.size(1))
        return self.forward(idx, *args, **kw)


def children(pid):
    """Process ids whose parent is pid (Linux /proc): the workers torchrun started."""
    kids = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat") as f:
                if entry.isdigit() and int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                    kids.append(int(entry))
        except (OSError, IndexError, ValueError):
            pass
    return kids


def write_sms(path, n=300, seed=0):
    """A small spam-like TSV with a header: spam mentions prizes, ham talks about the day."""
    rng = random.Random(seed)
    ham = "see you at home later ok i am going to eat now call me when you are free".split()
    spam = "win free prize cash claim now txt urgent award call".split()
    lines = ["Label\tSMS"]
    for i in range(n):
        is_spam = i % 5 == 0
        words = spam if is_spam else ham
        lines.append(("spam" if is_spam else "ham") + "\t" + " ".join(rng.choice(words) for _ in range(rng.randint(3, 12))))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def write_alpaca(path, n=40):
    """n Alpaca-style records a tiny model can learn: repeat a numbered word."""
    records = [{"instruction": f"Repeat the word number {i}.", "input": "" if i % 2 else f"word{i}",
                "output": f"word{i} word{i}"} for i in range(n)]
    path.write_text(json.dumps(records), encoding="utf-8")
    return records


@pytest.fixture(scope="session")
def instruct_run(tmp_path_factory):
    """A folder with data/alp (Alpaca-style records, a 300-token BPE) and out/, a tiny model trained on them.
    Shared: copy it (copy_run) before changing anything in it."""
    folder = tmp_path_factory.mktemp("instruct")
    write_alpaca(folder / "a.json", n=60)
    run_main("prepare.py", "--input", "a.json", "--task", "instruct", "--tokenizer", "bpe", "--vocab_size", "300",
             "--val_fraction", "0.1", "--test_fraction", "0.1", "--out", "data/alp", cwd=folder)
    args = [a for a in TINY_MODEL if not a.startswith(("--dataset", "--block_size"))]
    run_main("train.py", *args, "--dataset=alp", "--block_size=96", "--out_dir=out", "--max_iters=60",
             "--eval_interval=30", "--pack=True", cwd=folder)
    return folder


@pytest.fixture(scope="session")
def pairs_run(tmp_path_factory, instruct_run):
    """instruct_run's folder and model, plus data/pairs.jsonl (the data's answers chosen, the model's own
    rejected; dpo.py) and data/pairs, its preference dataset. Shared: copy it before changing it."""
    folder = copy_run(instruct_run, tmp_path_factory.mktemp("pairs"))
    run_main("dpo.py", "--init_from=out", "--input=a.json", "--dataset=data/alp", "--out=data/pairs.jsonl",
             "--max_new_tokens=24", "--device=cpu", cwd=folder)
    run_main("prepare.py", "--task", "preference", "--input", "data/pairs.jsonl", "--tokenizer_from", "data/alp",
             "--out", "data/pairs", cwd=folder)
    return folder


@pytest.fixture(scope="session")
def arith_run(tmp_path_factory):
    """A folder with data/arithmetic (prepare.py arithmetic, 3,000 problems) and out/, a tiny model
    trained 40 iterations on it. Shared: copy it before changing it."""
    folder = tmp_path_factory.mktemp("arith")
    run_main("prepare.py", "arithmetic", "--problems", "3000", cwd=folder)
    args = [a for a in TINY_MODEL if not a.startswith("--dataset")]
    run_main("train.py", *args, "--dataset=arithmetic", "--out_dir=out", "--max_iters=40", "--eval_interval=40",
             cwd=folder)
    return folder
