"""
Scoring a language model: bits per byte, multiple-choice questions as the lm-evaluation-harness
scores them (HellaSwag's protocol), and a cloze test built from any token stream. Functions of a
model, a tokenizer and the data, with no settings of their own (hellaswag_file alone touches disk: it
downloads HellaSwag once): eval.py (the script), train.py's eval_tasks and lm_eval_adapter.py are
built on them.

Design choices:
- Bits per byte: the summed next-token cross-entropy in bits over the UTF-8 bytes of the predicted
  tokens, each token counted by its own bytes (token_bytes), so models with different tokenizers
  compare. Special tokens (end-of-text) have no bytes, and their losses are left out.
- A text longer than the context is scored in sliding windows (score_stream): each window predicts
  only tokens no earlier window predicted, with at least block_size - stride tokens of context.
- Multiple choice as lm-eval does it: a choice's score is the summed log-probability of " " + choice
  after the context (the context encoded alone, the choice's tokens being the rest of the encoding
  of the two together); acc takes the best sum, acc_norm the best sum per character of the choice.
  The choices of one question go through the model as one right-padded batch.
- The cloze test: a context from the stream, its true continuation and three of the same number of
  tokens from elsewhere in it, all fixed by the seed: two runs see the same questions, and chance
  is 25%.
"""
import json
import math
import os
import re
import sys
from contextlib import nullcontext

import numpy as np
import torch
import torch.nn.functional as F

from common import UserError, download

TRAIN_TASKS = ("cloze", "mc", "hellaswag")  # the benchmarks train.py's eval_tasks runs at each evaluation
HELLASWAG_URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_{split}.jsonl"


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
    (batches, B), each predicting all of its block_size tokens: the windows of train.py's evaluation,
    from which tests/test_eval.py recomputes its val/bpb."""
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


def last_window(ctx, cont, block_size):
    """context + continuation ids cut to the last block_size + 1 (the model reads seq[:-1], predicts
    seq[1:]), and how many of the continuation's tokens are still predicted there: (seq, n)."""
    seq = (ctx + cont)[-(block_size + 1):]
    return seq, min(len(cont), len(seq) - 1)


def choice_tokens(tokenizer, context, choices, block_size):
    """Each choice after the context as one token sequence of at most block_size + 1 (the model reads
    seq[:-1], predicts seq[1:]), and the number of the choice's tokens at its end: (seqs, lengths)."""
    seqs, lengths = [], []
    for choice in choices:
        ctx, cont = encode_pair(tokenizer, context, choice)
        if not ctx:  # nothing to condition on: start after the end-of-text token, as lm-eval does
            if tokenizer.bos_token is None:
                raise UserError("a question with an empty context needs a tokenizer with an end-of-text token")
            ctx = [tokenizer.bos_token]
        if not cont:
            raise UserError(f"the choice {choice!r} encodes to no tokens")
        seq, n = last_window(ctx, cont, block_size)
        seqs.append(seq)
        lengths.append(n)
    return seqs, lengths


@torch.no_grad()
def continuation_logprobs(model, seqs, lengths, autocast=nullcontext):
    """[(summed log-probability of the last n tokens of a sequence, whether each is the model's most
    likely token)] for sequences (at most block_size + 1 long) and their n, in one right-padded batch
    (causal attention: padding after a token changes nothing before it)."""
    device = next(model.parameters()).device
    x = torch.zeros(len(seqs), max(len(s) for s in seqs) - 1, dtype=torch.long)  # (B, T)
    for i, s in enumerate(seqs):
        x[i, :len(s) - 1] = torch.tensor(s[:-1])
    with autocast():
        logits, _ = model(x.to(device))
    out = []
    for i, (s, n) in enumerate(zip(seqs, lengths)):
        logp = F.log_softmax(logits[i, len(s) - 1 - n:len(s) - 1].float(), dim=-1)  # (n, V): where they are predicted
        target = torch.tensor(s[len(s) - n:], dtype=torch.long, device=device)
        out.append((logp.gather(-1, target[:, None]).sum().item(), bool((logp.argmax(-1) == target).all())))
    return out


def choice_logprobs(model, tokenizer, context, choices, block_size, autocast=nullcontext):
    """The summed log-probability of each choice's tokens after the context, from one padded batch."""
    return [lp for lp, _ in continuation_logprobs(model, *choice_tokens(tokenizer, context, choices, block_size),
                                                  autocast)]


def encode_choices(tokenizer, questions, block_size):
    """Questions [(context, choices, label)] as lm-eval scores them, " " + choice after the context:
    [(seqs, lengths, label, characters of each choice)]. Text the tokenizer cannot encode fails here,
    before any scoring."""
    return [(*choice_tokens(tokenizer, context, [" " + c for c in choices], block_size), label,
             [len(c) for c in choices]) for context, choices, label in questions]


def best_choices(sums, chars):
    """(the choice with the best summed log-probability: acc's pick, the best per character: acc_norm's)."""
    per_char = [v / max(n, 1) for v, n in zip(sums, chars)]
    return max(range(len(sums)), key=lambda i: sums[i]), max(range(len(sums)), key=lambda i: per_char[i])


def score_choices(model, encoded, autocast=nullcontext):
    """acc and acc_norm over encode_choices' questions: lists of 1 or 0, one per question."""
    acc, acc_norm = [], []
    for seqs, lengths, label, chars in encoded:
        sums = [lp for lp, _ in continuation_logprobs(model, seqs, lengths, autocast)]
        pick, pick_norm = best_choices(sums, chars)
        acc.append(int(pick == label))
        acc_norm.append(int(pick_norm == label))
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
                 f"data/hellaswag/, or score a multiple-choice file of your own (the mc task)", log=sys.stderr)
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
        raise UserError(f"the split has {len(tokens)} tokens, too few for cloze questions of {span} tokens "
                        f"(a context and a continuation); use a larger split")
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
    correct = []
    for context, choices, label in questions:
        scored = continuation_logprobs(model, [context + c for c in choices], [len(c) for c in choices], autocast)
        sums = [lp for lp, _ in scored]
        correct.append(int(max(range(len(sums)), key=sums.__getitem__) == label))
    return correct


# -----------------------------------------------------------------------------------------------
# results and task names

def mean_and_stderr(values):
    """The mean of 0/1 (or any) scores and its standard error (sample standard deviation / sqrt(n))."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, float("nan")
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


def check_task_names(names, valid, setting):
    """A comma-separated list of task names as a list; an unknown one is named with the nearest valid one."""
    import difflib
    tasks = [t.strip() for t in names.split(",") if t.strip()]
    for t in tasks:
        if t not in valid:
            near = difflib.get_close_matches(t, valid, n=1)
            raise UserError(f"unknown task {t!r} in {setting}" + (f"; did you mean {near[0]!r}?" if near else "") +
                            f" (tasks: {', '.join(valid)})")
    return tasks


# -----------------------------------------------------------------------------------------------
# a benchmark task: its questions and their scores (eval.py, and train.py's eval_tasks)

def benchmark_questions(task, block_size, n, seed, tokens=None, tokenizer=None, mc_file="", hellaswag_split="val",
                        cloze_tokens=16):
    """A benchmark task's questions, ready to score (bad text fails here): cloze, n drawn from tokens;
    mc and hellaswag, the file's first n (0: all) encoded by tokenizer."""
    if task == "cloze":
        if cloze_tokens >= block_size:
            raise UserError(f"cloze continuations of {cloze_tokens} tokens need a block_size above {cloze_tokens}, "
                            f"not {block_size}")
        return cloze_questions(tokens, n, block_size - cloze_tokens, cloze_tokens, seed)
    questions = read_mc_file(mc_file, n) if task == "mc" else hellaswag_questions(hellaswag_file(hellaswag_split), n)
    return encode_choices(tokenizer, questions, block_size)


def benchmark_scores(task, model, questions, autocast=nullcontext):
    """{metric: [1 or 0 per question]}: acc for cloze; acc and acc_norm for multiple choice."""
    if task == "cloze":
        return {"acc": score_cloze(model, questions, autocast)}
    acc, acc_norm = score_choices(model, questions, autocast)
    return {"acc": acc, "acc_norm": acc_norm}
