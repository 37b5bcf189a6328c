"""
Fine-tuning tasks beside plain language modelling: text classification, instruction following, and
preference pairs (DPO, see dpo.py).

prepare.py --task classify|instruct|preference builds a dataset folder; train.py reads meta.json's
"task" and batches through the classes here. File formats (no pickle anywhere):
  meta.json             task, tokenizer, vocab_size, dtype, splits (examples per split), max_length;
                        classify: label_names (id = position), positive_class; instruct, preference: template
  {split}.bin           the token ids of every example of the split, one after another (dtype)
  {split}.index.npz     offsets (int64, n+1: example i is tokens[offsets[i]:offsets[i+1]]) and
                        classify: labels (int64), full_lengths (int64, tokens before truncation);
                        instruct: mask (uint8, one per token: 1 on the response and end-of-text);
                        preference: the same mask, and pair i is sequences 2i (prompt + chosen) and
                        2i + 1 (prompt + rejected)
Splits are train / val / test; classification splits are stratified (each label keeps its share).
Read with np.load(..., allow_pickle=False).

The instruction template (Alpaca's, as in "Build a Large Language Model from Scratch"):

  Below is an instruction that describes a task. Write a response that appropriately completes the request.

  ### Instruction:
  {instruction}

  ### Input:          <- this section only when input is not empty
  {input}

  ### Response:
  {output}<|endoftext|>

The prompt is everything up to and including "### Response:\\n"; the loss sees only the response
and its end-of-text token.
"""
import csv
import json
import os
import random

import numpy as np
import torch

from common import UserError, first_line, make_folder, token_dtype, write_meta
from decoding import Utf8Mask, generate_batch

INSTRUCT_HEAD = ("Below is an instruction that describes a task. "
                 "Write a response that appropriately completes the request.")
RESPONSE_MARK = "### Response:\n"


# -----------------------------------------------------------------------------------------------
# the instruction template

def instruct_prompt(instruction, input_text=""):
    """The prompt part of the template: everything the model is given before it answers."""
    text = f"{INSTRUCT_HEAD}\n\n### Instruction:\n{instruction}\n\n"
    if input_text:
        text += f"### Input:\n{input_text}\n\n"
    return text + RESPONSE_MARK


# -----------------------------------------------------------------------------------------------
# reading the inputs

def read_labelled(path, label_col=0, text_col=1):
    """[(label, text)] from a TSV (default) or a .csv file. The first row is a header when its
    label occurs nowhere else in the label column (e.g. "Label\\tSMS")."""
    if not os.path.isfile(path):
        raise UserError(f"input {path} not found; pass a TSV or CSV file of label and text")
    delimiter = "," if path.lower().endswith(".csv") else "\t"
    try:
        with open(path, encoding="utf-8", newline="") as f:
            # SMSSpamCollection holds bare quotes inside texts: only CSV uses quoting
            rows = list(csv.reader(f, delimiter=delimiter, quoting=csv.QUOTE_MINIMAL if delimiter == ","
                                   else csv.QUOTE_NONE))
    except UnicodeDecodeError:
        raise UserError(f"{path} is not UTF-8 text") from None
    rows = [r for r in rows if r and any(c.strip() for c in r)]
    need = max(label_col, text_col) + 1
    for i, r in enumerate(rows):
        if len(r) < need:
            raise UserError(f"{path} line {i + 1} has {len(r)} field(s), need {need} (label and text "
                            f"separated by {'a comma' if delimiter == ',' else 'a tab'})")
    pairs = [(r[label_col].strip(), r[text_col] if len(r) == need else delimiter.join(r[text_col:]))
             for r in rows]
    if pairs and sum(1 for lab, _ in pairs if lab == pairs[0][0]) == 1:
        pairs = pairs[1:]  # a header
    if not pairs:
        raise UserError(f"{path} holds no labelled rows")
    return pairs


def read_alpaca(path):
    """[(instruction, input, output)] from an Alpaca-style JSON list."""
    if not os.path.isfile(path):
        raise UserError(f"input {path} not found; pass an Alpaca-style JSON file")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid JSON ({type(e).__name__})") from None
    if not isinstance(data, list) or not data:
        raise UserError(f"{path} must hold a non-empty JSON list of records")
    records = []
    for i, r in enumerate(data):
        if not isinstance(r, dict) or not isinstance(r.get("instruction"), str) or not isinstance(r.get("output"), str):
            raise UserError(f"{path} record {i} needs string fields \"instruction\" and \"output\"")
        inp = r.get("input") or ""
        if not isinstance(inp, str):
            raise UserError(f"{path} record {i}: \"input\" must be a string")
        records.append((r["instruction"], inp, r["output"]))
    return records


# -----------------------------------------------------------------------------------------------
# splitting and writing

def split_indices(n, val_fraction, test_fraction, seed, groups=None):
    """{"train", "val", "test": sorted indices}; with groups (a label per item), stratified."""
    if not (0 < val_fraction and 0 < test_fraction and val_fraction + test_fraction < 1):
        raise UserError(f"val_fraction and test_fraction must be > 0 and sum to < 1, "
                        f"got {val_fraction} and {test_fraction}")
    rng = random.Random(seed)
    keys = groups if groups is not None else [0] * n
    out = {"train": [], "val": [], "test": []}
    for g in sorted(set(keys)):
        idx = [i for i in range(n) if keys[i] == g]
        rng.shuffle(idx)
        n_test, n_val = round(len(idx) * test_fraction), round(len(idx) * val_fraction)
        out["test"] += idx[:n_test]
        out["val"] += idx[n_test:n_test + n_val]
        out["train"] += idx[n_test + n_val:]
    for split, idx in out.items():
        if not idx:
            raise UserError(f"the {split} split is empty; use more data or larger fractions")
    return {k: sorted(v) for k, v in out.items()}


def write_examples(out_dir, split, seqs, dtype, **arrays):
    """{split}.bin (tokens back to back) and {split}.index.npz (offsets and per-example arrays),
    each written beside and renamed into place."""
    offsets = np.zeros(len(seqs) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(s) for s in seqs])
    tokens = np.concatenate([np.asarray(s, dtype=dtype) for s in seqs]) if seqs else np.zeros(0, dtype)
    with open(os.path.join(out_dir, f"{split}.bin.tmp"), "wb") as f:
        tokens.tofile(f)
    with open(os.path.join(out_dir, f"{split}.index.npz.tmp"), "wb") as f:
        np.savez(f, offsets=offsets, **arrays)
    return [(os.path.join(out_dir, f"{split}{ext}.tmp"), os.path.join(out_dir, f"{split}{ext}"))
            for ext in (".bin", ".index.npz")]


def read_examples(data_dir, split, dtype):
    """(tokens memmap, {offsets, labels | mask, ...}) of one split of a task dataset."""
    path = os.path.join(data_dir, f"{split}.bin")
    index = os.path.join(data_dir, f"{split}.index.npz")
    if not (os.path.isfile(path) and os.path.isfile(index)):
        raise UserError(f"{path} or its index is missing; re-run prepare.py for this dataset")
    with np.load(index, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    tokens = np.memmap(path, dtype=dtype, mode="r") if os.path.getsize(path) else np.zeros(0, dtype)
    return tokens, arrays


def make_tokenizer(kind, texts, vocab_size):
    """char (alphabet of texts), gpt2, or a byte-level BPE of vocab_size trained on texts."""
    from tokenizer import CharTokenizer, bpe_tokenizer, gpt2_tokenizer, train_bpe
    if kind == "char":
        # "\n" too: train_text.txt puts one example a line, for a language model of the same text
        return CharTokenizer(sorted(set("".join(texts)) | {"\n"}))
    if kind == "gpt2":
        return gpt2_tokenizer()
    if kind == "bpe":
        return bpe_tokenizer(train_bpe(texts, vocab_size))
    raise UserError(f"unknown tokenizer {kind!r}; use char, gpt2 or bpe")


def response_text(value, where, key):
    """A preference record's answer: a string, or a conversation (a list of {"role", "content"}, as in
    UltraFeedback-binarized) whose last message is the answer."""
    if isinstance(value, list) and value and all(isinstance(m, dict) for m in value):
        value = value[-1].get("content")
    if not isinstance(value, str):
        raise UserError(f"{where}: \"{key}\" must be a string or a list of messages")
    if not value.strip():
        raise UserError(f"{where}: \"{key}\" is empty; every pair needs a chosen and a rejected answer")
    return value


def prompt_text(record, where):
    """A preference record's instruction: "prompt" (a string, or messages: the last user message), else
    Alpaca's "instruction" and "input", else the user message before the answer in a "chosen" conversation."""
    prompt = record.get("prompt")
    if prompt is None and "instruction" in record:
        if not isinstance(record["instruction"], str) or not isinstance(record.get("input") or "", str):
            raise UserError(f"{where}: \"instruction\" and \"input\" must be strings")
        return record["instruction"], record.get("input") or ""
    if prompt is None and isinstance(record.get("chosen"), list):
        prompt = record["chosen"][:-1]
    if isinstance(prompt, list):
        users = [m.get("content") for m in prompt if isinstance(m, dict) and m.get("role") == "user"]
        prompt = users[-1] if users else None
    if not isinstance(prompt, str) or not prompt.strip():
        raise UserError(f"{where} needs a non-empty \"prompt\" (or \"instruction\"), \"chosen\" and \"rejected\"")
    return prompt, ""


def read_records(path):
    """The records of a JSON list or a JSONL file (one object a line)."""
    if not os.path.isfile(path):
        raise UserError(f"input {path} not found; pass a JSON or JSONL file of preference pairs")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError:
        raise UserError(f"{path} is not UTF-8 text") from None
    try:
        data = json.loads(text)
    except ValueError:
        data = []
        for i, line in enumerate(text.splitlines()):
            if line.strip():
                try:
                    data.append(json.loads(line))
                except ValueError:
                    raise UserError(f"{path} line {i + 1} is not JSON (a JSON list, or one object a line)") from None
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list) or not data:
        raise UserError(f"{path} must hold a non-empty JSON list of records, or JSONL")
    return data


def read_preference(records, where):
    """[(instruction, input, chosen, rejected, split or None)] of preference records: {"prompt", "chosen",
    "rejected"} or Alpaca's {"instruction", "input", "chosen", "rejected"}, with an optional "split"
    (train | val | test, as make_pairs writes). Pairs whose two answers are equal teach nothing: dropped."""
    pairs, same = [], 0
    for i, r in enumerate(records):
        at = f"{where} record {i}"
        if not isinstance(r, dict):
            raise UserError(f"{at} is not a JSON object")
        for key in ("chosen", "rejected"):
            if key not in r:
                raise UserError(f"{at} has no \"{key}\"; a pair needs \"prompt\" (or \"instruction\"), "
                                f"\"chosen\" and \"rejected\"")
        chosen, rejected = response_text(r["chosen"], at, "chosen"), response_text(r["rejected"], at, "rejected")
        instruction, input_text = prompt_text(r, at)
        split = r.get("split")
        if split is not None and split not in ("train", "val", "test"):
            raise UserError(f"{at}: \"split\" must be train, val or test, got {split!r}")
        if chosen.strip() == rejected.strip():
            same += 1
            continue
        pairs.append((instruction, input_text, chosen, rejected, split))
    if not pairs:
        raise UserError(f"{where} holds no pair whose chosen and rejected answers differ")
    if same:
        print(f"note: dropped {same} pair(s) of {where} whose chosen and rejected answers are the same")
    return pairs


def given_splits(labels):
    """The records' own split labels as read_task's splits, when every record has one."""
    if any(s is None for s in labels):
        return None
    out = {k: [i for i, s in enumerate(labels) if s == k] for k in ("train", "val", "test")}
    for split, idx in out.items():
        if not idx:
            raise UserError(f"the records' \"split\" fields leave the {split} split empty")
    return out


def read_task(task, input_path, val_fraction, test_fraction, seed, positive=None, rows=None):
    """The examples of a classify or instruct input and their split: {"texts", "splits"} and, to
    classify, "labels" (ids), "names", "counts", "positive"; for instructions, "prompts", "responses"."""
    if task == "classify":
        pairs = read_labelled(input_path)
        names = sorted({lab for lab, _ in pairs})
        if len(names) < 2:
            raise UserError(f"{input_path} has a single label {names[0]!r}; classification needs two or more")
        counts = {n: sum(1 for lab, _ in pairs if lab == n) for n in names}
        if positive is None:  # the rarer class is usually the one to find (spam, fraud, ...)
            positive = min(names, key=lambda n: (counts[n], n))
        if positive not in names:
            raise UserError(f"positive class {positive!r} is not a label; labels: {', '.join(names)}")
        labels = [names.index(lab) for lab, _ in pairs]
        return {"texts": [t for _, t in pairs], "labels": labels, "names": names, "counts": counts,
                "positive": positive, "splits": split_indices(len(pairs), val_fraction, test_fraction, seed, labels)}
    if task == "instruct":
        records = read_alpaca(input_path)
        prompts = [instruct_prompt(ins, inp) for ins, inp, _ in records]
        responses = [out for _, _, out in records]
        return {"texts": [p + r for p, r in zip(prompts, responses)], "prompts": prompts, "responses": responses,
                "splits": split_indices(len(records), val_fraction, test_fraction, seed)}
    if task == "preference":  # rows: records read elsewhere (a Hugging Face dataset)
        pairs = read_preference(read_records(input_path) if rows is None else rows, input_path)
        prompts = [instruct_prompt(ins, inp) for ins, inp, *_ in pairs]
        splits = given_splits([p[4] for p in pairs]) or split_indices(len(pairs), val_fraction, test_fraction, seed)
        return {"texts": [p + c for p, (*_, c, _, _) in zip(prompts, pairs)], "prompts": prompts,
                "chosen": [p[2] for p in pairs], "rejected": [p[3] for p in pairs], "splits": splits}
    raise UserError(f"unknown task {task!r}; use classify, instruct or preference")


def response_example(prompt, response, max_length):
    """prompt + response ids and the mask of the response, cut to max_length: (ids, mask, whether cut)."""
    s, m = prompt + response, [0] * len(prompt) + [1] * len(response)
    if max_length and len(s) > max_length:
        return s[:max_length], m[:max_length], True
    return s, m, False


def encode_split(task, data, idx, tok, max_length):
    """The examples idx of one split as token ids: (seqs, the arrays of its index file, how many were cut)."""
    if task == "classify":
        full = [tok.encode(data["texts"][i]) or [0] for i in idx]  # an empty text still needs a last token
        seqs = [s[:max_length] if max_length else s for s in full]
        arrays = dict(labels=np.array([data["labels"][i] for i in idx], np.int64),
                      full_lengths=np.array([len(f) for f in full], np.int64))
        return seqs, arrays, sum(len(s) < len(f) for s, f in zip(seqs, full))
    seqs, masks, truncated = [], [], 0
    answers = [data["responses"]] if task == "instruct" else [data["chosen"], data["rejected"]]
    for i in idx:  # a preference pair is two sequences in a row: prompt + chosen, prompt + rejected
        p = tok.encode(data["prompts"][i])
        for texts in answers:
            s, m, cut = response_example(p, tok.encode(texts[i]) + [tok.eot_token], max_length)
            if 1 not in m:
                raise UserError(f"example {i}'s prompt alone fills max_length {max_length}: nothing of its answer "
                                f"would be trained on; raise --max_length")
            seqs.append(s)
            masks.append(m)
            truncated += cut
    return seqs, dict(mask=np.concatenate([np.asarray(m, np.uint8) for m in masks])), truncated


def prepare_task(task, input_path, tokenizer, out_dir, val_fraction=0.1, test_fraction=0.2, max_length=0,
                 vocab_size=2048, positive=None, seed=1337, tok=None, rows=None, mask_token=False):
    """Build a classify, instruct or preference dataset folder (see the module docstring); returns meta and
    the tokenizer. tok: an already built tokenizer to use instead of making one (e.g. another dataset's);
    rows: preference records already read (input_path then only names them); mask_token: give the
    tokenizer a [MASK] token (an encoder pretrained by masked language modelling reads this data)."""
    if max_length < 0:
        raise UserError(f"max_length must be >= 0 (0: no truncation), got {max_length}")
    data = read_task(task, input_path, val_fraction, test_fraction, seed, positive, rows)
    texts, splits = data["texts"], data["splits"]
    if tok is None:
        # a BPE learns from train only; a char alphabet must cover every split to encode it at all
        tok = make_tokenizer(tokenizer, texts if tokenizer == "char" else [texts[i] for i in splits["train"]],
                             vocab_size)
    if mask_token:
        from tokenizer import add_mask_token
        add_mask_token(tok)
    if task != "classify" and tok.eot_token is None:
        raise UserError(f"{task} data needs a tokenizer with an end-of-text token: gpt2 or bpe")
    dtype = token_dtype(tok.vocab_size)
    make_folder(out_dir, "--out")
    renames, sizes, truncated = [], {}, 0
    try:
        for split, idx in splits.items():
            seqs, arrays, cut = encode_split(task, data, idx, tok, max_length)
            renames += write_examples(out_dir, split, seqs, dtype, **arrays)
            sizes[split], truncated = len(idx), truncated + cut
        if tok.kind == "bpe":  # char and gpt2 live in meta.json; a BPE goes beside the data
            from tokenizer import save_bpe
            path = os.path.join(out_dir, tok.meta()["file"])
            save_bpe(path + ".tmp", tok.bpe)
            renames.append((path + ".tmp", path))
    except BaseException as e:
        for name in os.listdir(out_dir):  # this run's temporary files, renamed only when all are written
            if name.endswith(".tmp"):
                os.remove(os.path.join(out_dir, name))
        if not isinstance(e, OSError):
            raise
        raise UserError(f"cannot write the dataset into {out_dir} ({e.strerror or first_line(e)}); pass an "
                        f"--out you can write to") from None
    meta = {"task": task, "tokenizer": tok.meta(), "vocab_size": tok.vocab_size, "dtype": np.dtype(dtype).name,
            "splits": sizes, "max_length": max_length, "truncated": truncated, "seed": seed,
            "val_fraction": val_fraction, "test_fraction": test_fraction}
    if task == "classify":
        meta.update(label_names=data["names"], positive_class=data["positive"], label_counts=data["counts"])
    else:
        meta.update(template="alpaca")
    for tmp, final in renames:
        os.replace(tmp, final)
    write_meta(out_dir, meta)
    # the train split as plain text (one example per line for classify, blank-line separated for
    # instruct), for pretraining a base language model with --tokenizer_from on no held-out text
    with open(os.path.join(out_dir, "train_text.txt"), "w", encoding="utf-8") as f:
        sep = "\n" if task == "classify" else "\n\n"
        f.write(sep.join(" ".join(texts[i].split()) if task == "classify" else texts[i] for i in splits["train"]) + "\n")
    print(f"{out_dir}: {task}, {sizes['train']} train / {sizes['val']} val / {sizes['test']} test examples, "
          f"vocab {tok.vocab_size:,} ({tok.kind}), {truncated} truncated to max_length {max_length}")
    return meta, tok


# -----------------------------------------------------------------------------------------------
# batching for train.py

class ExampleBatches:
    """Micro-batches of whole examples of one split, padded on the right to the longest in the batch.

    classify: get() -> (x (B, T), lengths (B,), labels (B,)); padding is token 0, which the
      classifier never reads (it reads position length-1 and attention is causal).
    instruct: get() -> (x (B, T), y (B, T)), y = the next token where the mask is 1, else -1, so
      the prompt and the padding add nothing to the loss. With pack, each row holds several whole
      examples back to back (attention then also sees the earlier examples of the row).
    preference: get() -> (x (2B, T), y (2B, T)) as for instruct, the B chosen sequences of the drawn
      pairs first, then their B rejected ones.
    Like train.py's Batches, a seeded torch.Generator draws the examples.
    """

    def __init__(self, data_dir, split, meta, block_size, batch_size, device, seed, balanced=False, pack=False):
        self.task, self.block_size, self.batch_size, self.device = meta["task"], block_size, batch_size, device
        self.tokens, arrays = read_examples(data_dir, split, meta["dtype"])
        self.offsets = arrays["offsets"]
        self.n = (len(self.offsets) - 1) // (2 if self.task == "preference" else 1)  # examples (pairs)
        self.labels = arrays.get("labels")
        self.mask = arrays.get("mask")
        self.pack = pack
        self.generator = torch.Generator().manual_seed(seed)
        self.weights = None
        if balanced and self.labels is not None:  # every class equally likely, whatever its size
            counts = np.bincount(self.labels)
            self.weights = torch.from_numpy(1.0 / counts[self.labels])

    def draw(self, n):
        """Example ids for n micro-batches: (n, batch_size), or (n, 8 * batch_size) candidates to pack."""
        k = self.batch_size * (8 if self.pack else 1)
        if self.weights is not None:
            return torch.multinomial(self.weights, n * k, replacement=True, generator=self.generator).view(n, k).numpy()
        return torch.randint(self.n, (n, k), generator=self.generator).numpy()

    def example(self, i):
        a, b = self.offsets[i], self.offsets[i + 1]
        return np.asarray(self.tokens[a:b], dtype=np.int64), (self.mask[a:b] if self.mask is not None else None)

    def rows(self, ids):
        """The examples of one micro-batch: [(tokens, mask)], packed into rows when pack is on."""
        if self.task == "preference":
            return [self.example(2 * i) for i in ids] + [self.example(2 * i + 1) for i in ids]
        if not self.pack:
            return [self.example(i) for i in ids]
        rows, used = [], 0
        for _ in range(self.batch_size):
            toks, masks, room = [], [], self.block_size + 1
            while used < len(ids):
                t, m = self.example(ids[used])
                if toks and len(t) > room:
                    break
                toks.append(t[:room]), masks.append(m[:room])
                room -= len(toks[-1])
                used += 1
            if toks:
                rows.append((np.concatenate(toks), np.concatenate(masks)))
        return rows

    def get(self, ids):
        rows = self.rows(ids)
        if self.task == "classify":
            seqs = [t[:self.block_size] for t, _ in rows]
            x = np.zeros((len(seqs), max(map(len, seqs))), dtype=np.int64)  # (B, T)
            for r, s in enumerate(seqs):
                x[r, :len(s)] = s
            batch = (x, np.array([len(s) for s in seqs]), self.labels[np.asarray(ids)])
        else:
            T = min(self.block_size, max(len(t) for t, _ in rows) - 1)
            x = np.zeros((len(rows), T), dtype=np.int64)
            y = np.full((len(rows), T), -1, dtype=np.int64)
            for r, (t, m) in enumerate(rows):
                t, m = t[:T + 1], m[:T + 1]
                x[r, :len(t) - 1] = t[:-1]
                y[r, :len(t) - 1] = np.where(m[1:] == 1, t[1:], -1)  # predict only response tokens
            batch = (x, y)
        return tuple(torch.from_numpy(a).to(self.device) for a in batch)


def binary_metrics(preds, labels, positive):
    """Accuracy, and precision, recall and F1 of the positive class (0 where undefined)."""
    preds, labels = np.asarray(preds), np.asarray(labels)
    tp = int(((preds == positive) & (labels == positive)).sum())
    fp = int(((preds == positive) & (labels != positive)).sum())
    fn = int(((preds != positive) & (labels == positive)).sum())
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"acc": float((preds == labels).mean()), "precision": precision, "recall": recall, "f1": f1}


@torch.no_grad()
def evaluate_split(model, batches, autocast, positive=None, limit=None):
    """Loss over a split's examples in order (all, or the first limit): per example for classify
    (plus the metrics), per response token for instruct. The model is left in the mode it came in."""
    was_training = model.training
    model.eval()
    n = batches.n if limit is None else min(limit, batches.n)
    total, count, preds, labels = 0.0, 0, [], []
    for start in range(0, n, batches.batch_size):
        ids = np.arange(start, min(n, start + batches.batch_size))
        if batches.task == "classify":
            x, lengths, y = batches.get(ids)
            with autocast:
                logits, loss = model.classify(x, lengths, y)
            total += loss.item() * len(ids)
            count += len(ids)
            preds.append(logits.argmax(-1).cpu().numpy())
            labels.append(y.cpu().numpy())
        else:
            packed, batches.pack = batches.pack, False  # evaluate each example on its own
            x, y = batches.get(ids)
            batches.pack = packed
            with autocast:
                _, loss = model(x, y)
            k = int((y != -1).sum())
            total += loss.item() * k
            count += k
    model.train(was_training)
    out = {"loss": total / max(count, 1)}
    if batches.task == "classify":
        out.update(binary_metrics(np.concatenate(preds), np.concatenate(labels), positive))
    return out


# -----------------------------------------------------------------------------------------------
# using a fine-tuned model (sample.py): decoded on the KV cache by decoding.generate_batch

def instruct_prompt_ids(tokenizer, instruction, input_text, block_size):
    """The template's prompt for an instruction, as token ids that fit the context."""
    return tokenizer.encode(instruct_prompt(instruction, input_text))[-block_size:]


def utf8_mask(model, tokenizer):
    """A decoding.Utf8Mask that keeps a byte-level tokenizer's output valid UTF-8; None for char. Built
    once per tokenizer, vocabulary size and device (a loop over the vocabulary), then reused."""
    from tokenizer import utf8_tables
    device = next(model.parameters()).device
    masks = tokenizer.__dict__.setdefault("_utf8_masks", {})
    key = (model.config.vocab_size, str(device))
    if key not in masks:
        tables = utf8_tables(tokenizer, model.config.vocab_size)
        masks[key] = None if tables is None else Utf8Mask(tables, device)
    return masks[key]


def answer(model, tokenizer, prompts, max_new_tokens, temperature=0.0, top_k=None, generator=None, utf8=True):
    """Answers to prompts (lists of ids), decoded together, each up to its end-of-text, in valid UTF-8
    (utf8=False: the bytes as sampled): [(ids, stopped)], stopped False when max_new_tokens ran out first."""
    made = [0] * len(prompts)  # tokens each row generated, a tail cut inside a character included

    def count(row, token):
        made[row] += 1
        return False
    out = generate_batch(model, prompts, max_new_tokens, temperature=temperature, top_k=top_k, on_token=count,
                         stop_tokens=tokenizer.stop_tokens, generator=generator,
                         utf8=utf8_mask(model, tokenizer) if utf8 else None)
    return [(ids, n < max_new_tokens) for ids, n in zip(out, made)]


def respond(model, tokenizer, instruction, max_new_tokens=200, temperature=0.0, top_k=None, input_text="",
            generator=None, utf8=True):
    """The model's answer to an instruction wrapped in the template: (text, its token ids, whether it
    ended with end-of-text)."""
    prompt = instruct_prompt_ids(tokenizer, instruction, input_text, model.config.block_size)
    (ids, stopped), = answer(model, tokenizer, [prompt], max_new_tokens, temperature, top_k, generator, utf8)
    return tokenizer.decode(ids), ids, stopped


@torch.no_grad()
def label_texts(model, tokenizer, texts, label_names, device):
    """[(label, probability of that label)] for each text, read at its last token."""
    out = []
    for text in texts:
        ids = (tokenizer.encode(text) or [0])[:model.config.block_size]
        x = torch.tensor(ids, dtype=torch.long, device=device)[None, :]
        logits, _ = model.classify(x, torch.tensor([len(ids)], device=device))
        probs = torch.softmax(logits.float(), dim=-1)[0]  # (n_classes,)
        k = int(probs.argmax())
        out.append((label_names[k] if k < len(label_names) else str(k), float(probs[k])))
    return out


def instruct_report(model, tokenizer, data_dir, meta, split, max_new_tokens=100, show=3, batch_size=16):
    """Greedy answers to every prompt of a split of an instruct dataset, batch_size at a time: 1 or 0 per
    answer, whether it stays in the template (no new "### " section) and ends with end-of-text by
    itself; a few examples as (prompt, answer, reference, stopped); the number of tokens generated."""
    tokens, arrays = read_examples(data_dir, split, meta["dtype"])
    offsets, mask = arrays["offsets"], arrays["mask"]
    examples = []
    for i in range(len(offsets) - 1):
        seq, m = np.asarray(tokens[offsets[i]:offsets[i + 1]], dtype=np.int64), mask[offsets[i]:offsets[i + 1]]
        examples.append((seq[m == 0][-model.config.block_size:].tolist(), seq[m == 1].tolist()))
    stays, shown, n = [], [], 0
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        for (prompt, response), (ids, stopped) in zip(chunk, answer(model, tokenizer, [p for p, _ in chunk],
                                                                     max_new_tokens)):
            text = tokenizer.decode(ids)
            n += len(ids)
            stays.append(int(stopped and "### " not in text and text.strip() != ""))
            if len(shown) < show:
                reference = tokenizer.decode([t for t in response if t not in tokenizer.stop_tokens])
                shown.append((tokenizer.decode(prompt), text, reference, stopped))
    return stays, shown, n
