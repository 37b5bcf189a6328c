"""
Measure what a model knows: bits per byte on a dataset split or any text, multiple-choice benchmarks
scored as the lm-evaluation-harness scores them (HellaSwag's protocol), and a cloze test built from
any prepared dataset.

  python eval.py --out_dir=out-shakespeare-char-cpu                  # bpb of its dataset's val split, and the cloze test
  python eval.py --out_dir=out --tasks=bpb --text=FILE:book.txt       # bpb of a text file, in sliding windows
  python eval.py --out_dir=out --tasks=mc --mc_file=questions.jsonl   # {"context", "choices", "label"} per line
  python eval.py --init_from=gpt2 --tasks=hellaswag --limit=500       # HellaSwag's val split (downloaded once)
  python eval.py --bench                                              # scoring speed: questions/s, tokens/s

Writes eval.json beside the checkpoint (or --out) and prints a table: one line per task with its
metric, value, standard error and number of examples. A later run on the same checkpoint adds its
tasks to eval.json (and replaces those it ran again).

Design choices:
- Bits per byte: the summed next-token cross-entropy in bits over the UTF-8 bytes of the predicted
  tokens, each token counted by its own bytes (token_bytes), so models with different tokenizers
  compare. Special tokens (end-of-text) have no bytes, and their losses are left out.
- A text longer than the context is scored in sliding windows (score_stream): each window predicts
  only tokens no earlier window predicted, with at least block_size - stride tokens of context.
- Multiple choice as lm-eval does it: a choice's score is the summed log-probability of " " + choice
  after the context (the context encoded alone, the choice's tokens being the rest of the encoding
  of the two together); acc takes the best sum, acc_norm the best sum per character of the choice. The choices of one
  question go through the model as one right-padded batch.
- The cloze test: a context from the split, its true continuation and three of the same number of
  tokens from elsewhere in the split, all fixed by the seed: two runs see the same questions, and
  chance is 25%.
"""
import json
import math
import os
import re
import sys
from contextlib import nullcontext
from dataclasses import dataclass

from common import yield_idle_cores
yield_idle_cores()  # before torch loads OpenMP

import numpy as np
import torch
import torch.nn.functional as F

import runtime
from common import UserError, description, download, read_meta, read_text_file, run_cli, write_json_atomic
from configurator import parse_args
from hf import load_for_inference

TASKS = ("bpb", "cloze", "mc", "hellaswag")
HELLASWAG_URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_{split}.jsonl"


@dataclass
class EvalConfig:
    out_dir: str = "out"           # folder of the checkpoint to evaluate (its ckpt.pt); eval.json goes there
    init_from: str = "resume"      # resume (out_dir/ckpt.pt) | PATH of a checkpoint file or folder, or a Hugging Face folder | gpt2*
    tasks: str = "bpb,cloze"       # comma-separated: bpb | cloze | mc (--mc_file) | hellaswag
    split: str = "val"             # the dataset split that bpb and cloze read (train | val)
    dataset: str = ""              # a prepared dataset folder; "" is the one the checkpoint was trained on
    text: str = ""                 # bpb of this text instead of a split (FILE:path reads a file)
    stride: int = 0                # sliding window: tokens newly predicted per window (0: half of block_size)
    max_tokens: int = 0            # bpb reads at most this many tokens of the split (0: all of it)
    mc_file: str = ""              # JSONL of {"context", "choices", "label"} for the mc task
    hellaswag_split: str = "val"   # val | train: HellaSwag's file, downloaded once into data/hellaswag/
    limit: int = 0                 # at most this many questions per multiple-choice task (0: all)
    cloze_questions: int = 1000    # questions in the cloze test
    cloze_tokens: int = 16         # tokens in each continuation of the cloze test
    batch_size: int = 16           # windows per forward pass for bpb
    seed: int = 1337               # fixes the cloze test's questions
    out: str = ""                  # where eval.json goes ("" : beside the checkpoint)
    device: str = "auto"           # auto | cpu | cuda | cuda:N | mps
    dtype: str = "auto"            # auto | float32 | bfloat16 | float16 (as train.py's)
    bench: bool = False            # scoring speed on two random models (the CPU config's shape and 6x384); no checkpoint


# -----------------------------------------------------------------------------------------------
# bits per byte

def token_bytes(tokenizer, vocab_size):
    """(vocab_size,) the UTF-8 bytes each token id stands for: 0 for special tokens and for ids past the
    tokenizer's vocabulary (a model's vocabulary is often padded)."""
    special = set()
    enc = getattr(tokenizer, "enc", None)
    if enc is not None:
        special = {enc.encode_single_token(t) for t in enc.special_tokens_set}
    special |= {t for t in (tokenizer.eot_token, tokenizer.bos_token, *tokenizer.stop_tokens) if t is not None}
    counts = torch.zeros(vocab_size, dtype=torch.long)
    for i in range(min(vocab_size, tokenizer.vocab_size)):
        if i not in special:
            try:
                counts[i] = len(tokenizer.decode_bytes([i]))
            except (KeyError, ValueError):  # a hole in a tiktoken vocabulary
                pass
    return counts


def totals_on(device):
    """A zero (nats, bytes, tokens) accumulator: float64, except on Apple's MPS, which has none."""
    device = torch.device(device)
    return torch.zeros(3, dtype=torch.float32 if device.type == "mps" else torch.float64, device=device)


def nats_and_bytes(logits, targets, nbytes):
    """logits (B, T, V), targets (B, T) with -1 where nothing is predicted, nbytes (V,) -> (3,): the summed
    cross-entropy in nats of the targets that have bytes, their bytes, their count (totals_on's type)."""
    nll = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-1, reduction="none")
    b = torch.where(targets.flatten() >= 0, nbytes.to(targets.device)[targets.flatten().clamp(min=0)], 0)
    counted = b > 0
    dtype = totals_on(logits.device).dtype
    return torch.stack([(nll.to(dtype) * counted).sum(), b.sum().to(dtype), counted.sum().to(dtype)])


def bits_per_byte(totals):
    """From summed (nats, bytes, tokens): bits per byte."""
    nats, nbytes, _ = (float(v) for v in totals)
    return nats / math.log(2) / nbytes if nbytes else float("nan")


def stream_windows(n, block_size, stride):
    """Sliding windows over a stream of n tokens: (start, length, first) per window, where the window
    reads tokens [start, start + length) and predicts the next token of each, of which those from
    position `first` on are new. Every token after the first is predicted exactly once."""
    windows, done = [], 1  # done: the first token (index) not yet predicted
    while done < n:
        end = min(n, block_size + 1 if done == 1 else done + stride)  # predict tokens [done, end)
        start = max(0, end - 1 - block_size)
        windows.append((start, end - 1 - start, done - 1 - start))
        done = end
    return windows


@torch.no_grad()
def score_stream(model, ids, nbytes, block_size, stride, batch_size, autocast=nullcontext):
    """Summed (nats, bytes, tokens) of a token stream ids (1-D numpy, a memmap too, or a list), in sliding
    windows."""
    ids = np.asarray(ids)
    device = next(model.parameters()).device
    totals = totals_on(device)
    windows = stream_windows(len(ids), block_size, stride)
    for i in range(0, len(windows), batch_size):
        group = windows[i:i + batch_size]
        width = max(length for _, length, _ in group)
        x = torch.zeros(len(group), width, dtype=torch.long)
        y = torch.full((len(group), width), -1, dtype=torch.long)
        for row, (start, length, first) in enumerate(group):
            window = torch.from_numpy(ids[start:start + length + 1].astype(np.int64))  # read from disk only now
            x[row, :length] = window[:-1]
            y[row, first:length] = window[first + 1:]
        with autocast():
            logits, _ = model(x.to(device))
        totals += nats_and_bytes(logits, y.to(device), nbytes)
    return totals.cpu()


@torch.no_grad()
def score_windows(model, tokens, starts, block_size, nbytes, autocast=nullcontext):
    """Summed (nats, bytes, tokens) of the windows tokens[s : s + block_size + 1], s in each row of starts
    (batches, B), each predicting all of its block_size tokens: train.py's evaluation batches."""
    device = next(model.parameters()).device
    totals = totals_on(device)
    offsets = np.arange(block_size + 1)
    for row in np.asarray(starts):
        xy = torch.from_numpy(np.asarray(tokens)[row[:, None] + offsets].astype(np.int64)).to(device)
        with autocast():
            logits, _ = model(xy[:, :-1])
        totals += nats_and_bytes(logits, xy[:, 1:], nbytes)
    return totals.cpu()


# -----------------------------------------------------------------------------------------------
# multiple choice

def encode_pair(tokenizer, context, continuation):
    """Token ids of context and of continuation as lm-eval splits them: the whole string encoded once,
    the continuation being what follows the context's own encoding (trailing whitespace of the context
    moves to the continuation first)."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer.encode(context + continuation)
    ctx = tokenizer.encode(context) if context else []
    return ctx, whole[len(ctx):]


@torch.no_grad()
def choice_logprobs(model, tokenizer, context, choices, block_size, autocast=nullcontext):
    """The summed log-probability of each choice's tokens after the context, from one padded batch."""
    seqs, lengths = [], []
    for choice in choices:
        ctx, cont = encode_pair(tokenizer, context, choice)
        if not ctx:  # nothing to condition on: start after the end-of-text token, as lm-eval does
            if tokenizer.bos_token is None:
                raise UserError("a question with an empty context needs a tokenizer with an end-of-text token")
            ctx = [tokenizer.bos_token]
        if not cont:
            raise UserError(f"the choice {choice!r} encodes to no tokens")
        seqs.append((ctx + cont)[-(block_size + 1):])  # the model reads seq[:-1] and predicts seq[1:]
        lengths.append(min(len(cont), len(seqs[-1]) - 1))
    width = max(len(s) for s in seqs) - 1
    x = torch.zeros(len(seqs), width, dtype=torch.long)
    for i, s in enumerate(seqs):
        x[i, :len(s) - 1] = torch.tensor(s[:-1])
    with autocast():
        logits, _ = model(x.to(next(model.parameters()).device))
    logp = F.log_softmax(logits.float(), dim=-1).cpu()  # (choices, width, V)
    sums = []
    for i, (s, n) in enumerate(zip(seqs, lengths)):
        positions = torch.arange(len(s) - 1 - n, len(s) - 1)  # where the choice's n tokens are predicted
        sums.append(logp[i, positions, torch.tensor(s[-n:])].sum().item())
    return sums


def score_choices(model, tokenizer, questions, block_size, autocast=nullcontext):
    """acc and acc_norm over questions [(context, choices, label)]: lists of 0/1, one per question."""
    acc, acc_norm = [], []
    for context, choices, label in questions:
        sums = choice_logprobs(model, tokenizer, context, [" " + c for c in choices], block_size, autocast)
        acc.append(int(max(range(len(sums)), key=lambda i: sums[i]) == label))
        per_char = [v / max(len(c), 1) for v, c in zip(sums, choices)]
        acc_norm.append(int(max(range(len(sums)), key=lambda i: per_char[i]) == label))
    return acc, acc_norm


def read_mc_file(path, limit=0):
    """Questions [(context, choices, label)] from a JSONL of {"context", "choices", "label"}."""
    questions = []
    for n, record in read_jsonl(path):
        missing = [k for k in ("context", "choices", "label") if k not in record]
        if missing:
            raise UserError(f"{path} line {n} has no {', '.join(repr(k) for k in missing)}; each line needs "
                            f'"context", "choices" and "label"')
        choices, label = record["choices"], record["label"]
        if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
            raise UserError(f"{path} line {n}: choices must be a list of two or more strings")
        if not isinstance(label, int) or isinstance(label, bool) or not 0 <= label < len(choices):
            raise UserError(f"{path} line {n}: label {label!r} is not the index of one of its {len(choices)} choices")
        questions.append((str(record["context"]), choices, label))
        if limit and len(questions) == limit:
            break
    return questions


def read_jsonl(path):
    """(line number, JSON object) for every non-empty line of a JSONL file; one line for each problem."""
    if not os.path.isfile(path):
        raise UserError(f"{path} not found" + (" (it is a folder)" if os.path.isdir(path) else ""))
    records = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path} line {n} is not JSON ({e.msg})") from None
            if not isinstance(record, dict):
                raise UserError(f"{path} line {n} is not a JSON object")
            records.append((n, record))
    if not records:
        raise UserError(f"{path} has no questions")
    return records


def hellaswag_text(text):
    """HellaSwag's WikiHow markup cleaned as lm-eval's task does."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def hellaswag_questions(path, limit=0):
    """HellaSwag's own JSONL as questions: "activity: ctx_a Ctx_b" and its four endings."""
    questions = []
    for n, r in read_jsonl(path):
        try:
            context = hellaswag_text(r["activity_label"] + ": " + r["ctx_a"] + " " + r["ctx_b"].capitalize())
            questions.append((context, [hellaswag_text(e) for e in r["endings"]], int(r["label"])))
        except (KeyError, TypeError, ValueError, AttributeError):
            raise UserError(f"{path} line {n} is not a HellaSwag record (activity_label, ctx_a, ctx_b, endings, "
                            f"label)") from None
        if limit and len(questions) == limit:
            break
    return questions


def hellaswag_file(split):
    """data/hellaswag/hellaswag_SPLIT.jsonl, downloaded from HellaSwag's repository the first time."""
    path = os.path.join("data", "hellaswag", f"hellaswag_{split}.jsonl")
    if not os.path.isfile(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        download(HELLASWAG_URL.format(split=split), path, f"put HellaSwag's hellaswag_{split}.jsonl in "
                 f"data/hellaswag/, or use --tasks=mc --mc_file=FILE", log=sys.stderr)
    return path


# -----------------------------------------------------------------------------------------------
# the cloze test

def cloze_questions(tokens, n, context_tokens, answer_tokens, seed):
    """n questions from a token stream: (context ids, [4 continuations of answer_tokens ids], label).
    The true continuation follows the context; the other three start at random places elsewhere in
    the stream, away from it; the true one's place among the four is drawn too."""
    rng = np.random.default_rng(seed)
    span = context_tokens + answer_tokens
    if len(tokens) < 4 * span:
        raise UserError(f"the split has {len(tokens)} tokens, too few for cloze questions of {span} tokens; "
                        f"lower --cloze_tokens or use a larger split")
    questions = []
    for _ in range(n):
        start = int(rng.integers(0, len(tokens) - span + 1))
        answer = start + context_tokens
        others = []
        while len(others) < 3:
            o = int(rng.integers(0, len(tokens) - answer_tokens + 1))
            if abs(o - answer) >= answer_tokens and all(abs(o - p) >= answer_tokens for p in others):
                others.append(o)
        label = int(rng.integers(0, 4))
        starts = others[:label] + [answer] + others[label:]
        choices = [[int(t) for t in tokens[s:s + answer_tokens]] for s in starts]
        questions.append(([int(t) for t in tokens[start:answer]], choices, label))
    return questions


@torch.no_grad()
def score_cloze(model, questions, autocast=nullcontext):
    """1/0 per question: whether the true continuation has the highest summed log-probability (all
    four have the same number of tokens, so per-token and summed rankings agree)."""
    device = next(model.parameters()).device
    correct = []
    for context, choices, label in questions:
        x = torch.tensor([context + c[:-1] for c in choices], device=device)  # (4, T)
        with autocast():
            logits, _ = model(x)
        logp = F.log_softmax(logits[:, len(context) - 1:].float(), dim=-1)  # predicts each choice's tokens
        targets = torch.tensor(choices, device=device)
        sums = logp.gather(-1, targets[..., None]).squeeze(-1).sum(-1)
        correct.append(int(sums.argmax().item() == label))
    return correct


def mean_and_stderr(values):
    """The mean of 0/1 (or any) scores and its standard error (sample standard deviation / sqrt(n))."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, float("nan")
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


# -----------------------------------------------------------------------------------------------
# the script

def check_settings(cfg):
    """The task names, checked: an unknown one is named with the nearest valid one."""
    import difflib
    tasks = [t.strip() for t in cfg["tasks"].split(",") if t.strip()]
    if not tasks:
        raise UserError(f"--tasks is empty; choose from {', '.join(TASKS)}")
    for t in tasks:
        if t not in TASKS:
            near = difflib.get_close_matches(t, TASKS, n=1)
            raise UserError(f"unknown task {t!r}" + (f"; did you mean {near[0]!r}?" if near else "") +
                            f" (tasks: {', '.join(TASKS)})")
    if "mc" in tasks and not cfg["mc_file"]:
        raise UserError("--tasks=mc needs --mc_file=FILE, a JSONL of {\"context\", \"choices\", \"label\"}")
    for key in ("stride", "max_tokens", "limit", "cloze_questions", "batch_size", "cloze_tokens"):
        low = 0 if key in ("stride", "max_tokens", "limit") else 1
        if cfg[key] < low:
            raise UserError(f"{key} must be >= {low}, got {cfg[key]}")
    if cfg["split"] not in ("train", "val"):
        raise UserError(f"split must be train or val, got {cfg['split']!r}")
    if cfg["hellaswag_split"] not in ("train", "val"):
        raise UserError(f"hellaswag_split must be train or val, got {cfg['hellaswag_split']!r}")
    return tasks


def split_tokens(cfg, ckpt, tokenizer):
    """The tokens of the dataset split bpb and cloze read (memory-mapped), checked against the tokenizer."""
    data_dir = cfg["dataset"] or ckpt.get("dataset_dir") or ""
    if not os.path.isfile(os.path.join(data_dir, "meta.json")):
        raise UserError(f"no dataset to read: {data_dir or 'the checkpoint names none'}; pass --dataset=FOLDER "
                        f"(a prepared dataset) or --text=FILE:path")
    meta = read_meta(data_dir)
    if meta.get("task", "lm") != "lm":
        raise UserError(f"{data_dir} is a {meta['task']} dataset; bpb and cloze read a language-model dataset")
    if meta.get("tokenizer", {}).get("kind") != tokenizer.kind or meta["vocab_size"] != tokenizer.vocab_size:
        raise UserError(f"{data_dir} was tokenized with another tokenizer than the model's; pass --text=FILE:path "
                        f"to measure any text with the model's own")
    path = os.path.join(data_dir, f"{cfg['split']}.bin")
    if not os.path.isfile(path):
        raise UserError(f"{path} is missing; re-run prepare.py for this dataset")
    tokens = np.memmap(path, dtype=np.dtype(meta["dtype"]), mode="r")
    return tokens[:cfg["max_tokens"]] if cfg["max_tokens"] else tokens


def text_tokens(cfg, tokenizer):
    """The --text (or FILE:) encoded, after the end-of-text token where there is one so that its first
    token is predicted too."""
    text = read_text_file(cfg["text"][5:], "--text file") if cfg["text"].startswith("FILE:") else cfg["text"]
    ids = tokenizer.encode(text)
    if tokenizer.bos_token is not None:
        ids = [tokenizer.bos_token] + ids
    if len(ids) < 2:
        raise UserError("--text is too short to measure: it needs at least two tokens")
    return ids


def run_task(task, cfg, model, tokenizer, ckpt, autocast):
    """Result lines of one task: [{"task", "metric", "value", "stderr", "examples"}]."""
    block = model.config.block_size
    if task == "bpb":
        ids = text_tokens(cfg, tokenizer) if cfg["text"] else split_tokens(cfg, ckpt, tokenizer)
        nbytes = token_bytes(tokenizer, model.config.vocab_size)
        stride = min(cfg["stride"] or max(1, block // 2), block)
        totals = score_stream(model, ids, nbytes, block, stride, cfg["batch_size"], autocast)
        name = "text" if cfg["text"] else cfg["split"]
        return [dict(task=f"bpb ({name})", metric="bits/byte", value=bits_per_byte(totals), stderr=None,
                     examples=int(totals[2])),
                dict(task=f"bpb ({name})", metric="loss/token", value=float(totals[0] / totals[2]), stderr=None,
                     examples=int(totals[2]))]
    if task == "cloze":
        answer = cfg["cloze_tokens"]
        if answer >= block:
            raise UserError(f"cloze_tokens ({answer}) must be below the model's block_size ({block})")
        questions = cloze_questions(split_tokens(cfg, ckpt, tokenizer), cfg["cloze_questions"], block - answer,
                                    answer, cfg["seed"])
        acc, se = mean_and_stderr(score_cloze(model, questions, autocast))
        return [dict(task="cloze", metric="acc", value=acc, stderr=se, examples=len(questions))]
    questions = (read_mc_file(cfg["mc_file"], cfg["limit"]) if task == "mc" else
                 hellaswag_questions(hellaswag_file(cfg["hellaswag_split"]), cfg["limit"]))
    acc, acc_norm = score_choices(model, tokenizer, questions, block, autocast)
    return [dict(task=task, metric=m, value=v, stderr=se, examples=len(questions))
            for m, (v, se) in (("acc", mean_and_stderr(acc)), ("acc_norm", mean_and_stderr(acc_norm)))]


def results_path(cfg):
    if cfg["out"]:
        return cfg["out"]
    source = cfg["init_from"]
    if source == "resume":
        return os.path.join(cfg["out_dir"], "eval.json")
    if os.path.isdir(source) or os.path.isfile(source):
        return os.path.join(source if os.path.isdir(source) else os.path.dirname(source) or ".", "eval.json")
    return f"eval-{source}.json"


def print_table(rows):
    print(f"{'task':<16} {'metric':<10} {'value':>8} {'stderr':>8} {'examples':>9}")
    for r in rows:
        se = "" if r["stderr"] is None or math.isnan(r["stderr"]) else f"{r['stderr']:.4f}"
        print(f"{r['task']:<16} {r['metric']:<10} {r['value']:>8.4f} {se:>8} {r['examples']:>9,}")


def bench(cfg, rt):
    """Questions per second (cloze; multiple choice of 4 choices of about 30 characters after about 100)
    and bpb tokens per second, on randomly initialised char-vocabulary models (speed ignores the weights)."""
    import time
    from model import GPT, GPTConfig
    from tokenizer import CharTokenizer
    rng = np.random.default_rng(cfg["seed"])
    tok = CharTokenizer("".join(chr(c) for c in range(32, 97)))  # 65 characters, as shakespeare_char's
    tokens = rng.integers(0, tok.vocab_size, 100_000)
    text = lambda n: tok.decode(rng.integers(0, tok.vocab_size, n).tolist())  # noqa: E731
    mc = [(text(100), [text(int(rng.integers(20, 40))) for _ in range(4)], 0) for _ in range(40)]
    # (name, shape, cloze questions, multiple-choice questions, bpb tokens): about as long for each
    shapes = [("4x128, block 64 (the CPU config)", dict(n_layer=4, n_head=4, n_embd=128, block_size=64, bias=False),
               100, 40, 20_000),
              ("6x384, block 256", dict(n_layer=6, n_head=6, n_embd=384, block_size=256), 10, 10, 4_000)]
    print(f"on {rt.device}, {rt.dtype}, {torch.get_num_threads()} threads")
    for name, shape, n_cloze, n_mc, n_tokens in shapes:
        torch.manual_seed(cfg["seed"])
        model = GPT(GPTConfig(vocab_size=tok.vocab_size, dropout=0.0, **shape)).to(rt.device).eval()
        block = shape["block_size"]
        cloze = cloze_questions(tokens, n_cloze, block - cfg["cloze_tokens"], cfg["cloze_tokens"], cfg["seed"])
        rates = []
        for run, n in ((lambda: score_cloze(model, cloze, rt.autocast), n_cloze),
                       (lambda: score_choices(model, tok, mc[:n_mc], block, rt.autocast), n_mc),
                       (lambda: score_stream(model, tokens[:n_tokens], token_bytes(tok, tok.vocab_size), block,
                                             block // 2, cfg["batch_size"], rt.autocast), n_tokens)):
            run()  # warm-up
            t0 = time.perf_counter()
            run()
            rates.append(n / (time.perf_counter() - t0))
        print(f"{name}: cloze {rates[0]:,.1f} questions/s, multiple choice {rates[1]:,.1f} questions/s, "
              f"bpb {rates[2]:,.0f} tokens/s (stride {block // 2})")


def main(argv):
    cfg, _ = parse_args(argv, [EvalConfig], "eval.py", description(__doc__))
    tasks = check_settings(cfg)
    rt = runtime.local(cfg["device"], cfg["dtype"])
    if cfg["bench"]:
        return bench(cfg, rt)
    ckpt, model, tokenizer = load_for_inference(cfg["init_from"], cfg["out_dir"], rt.device)
    if model.config.n_classes:
        raise UserError("this checkpoint is a classifier: eval.py measures language models (a classifier's "
                        "accuracy is train.py's val/acc)")
    rows = []
    for task in tasks:
        rows += run_task(task, cfg, model, tokenizer, ckpt, rt.autocast)
    print_table(rows)
    path = results_path(cfg)
    source = cfg["out_dir"] if cfg["init_from"] == "resume" else cfg["init_from"]
    write_json_atomic(path, merged_results(path, source, ckpt.get("iter_num"), rows))
    print(f"wrote {path}")


def merged_results(path, source, iter_num, rows):
    """eval.json's content: these rows, and the earlier rows of other tasks if that file measured the same
    checkpoint at the same iteration (a rerun of a task replaces its rows)."""
    try:
        with open(path) as f:
            old = json.load(f)
        same = old.get("checkpoint") == source and old.get("iter_num") == iter_num
        kept = [r for r in old.get("results", []) if same and r["task"] not in {n["task"] for n in rows}]
    except (OSError, ValueError, AttributeError, KeyError, TypeError):
        kept = []
    return {"checkpoint": source, "iter_num": iter_num, "results": kept + rows}


if __name__ == "__main__":
    sys.exit(run_cli(main))
