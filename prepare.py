"""
Turn text into token binaries for train.py.

  python prepare.py shakespeare_char                  # tiny shakespeare, one token per character
  python prepare.py shakespeare                       # tiny shakespeare, GPT-2 BPE
  python prepare.py --input PATH --tokenizer char|gpt2 --out data/NAME
  python prepare.py --input PATH --tokenizer bpe --vocab_size 4096 --out data/NAME   # train a BPE too
  python prepare.py --input docs.jsonl --text_field text --out data/NAME              # one document a line
  python prepare.py --input PATH --tokenizer_from data/OTHER --out data/NAME          # reuse a vocabulary
  python prepare.py --input PATH --tokenizer char --mask_token --out data/NAME        # for an encoder (MLM)
  python prepare.py openwebtext | fineweb-edu     # streamed from the Hugging Face Hub (pip install datasets)
  python prepare.py arithmetic --problems 200000  # generated: "37+485=522" a line (rewards.py), char tokens

Writes to the output folder:
  train.bin, val.bin  a flat stream of token ids (uint16 when the vocabulary fits, else uint32);
                      with BPE every document ends with the end-of-text token
  meta.json           the tokenizer (and all that rebuilds it), vocab_size, dtype, token counts
  tokenizer.json      with --tokenizer bpe (or a bpe --tokenizer_from): the trained BPE
The split: one document is cut by position (the last val_fraction of its bytes is val); several
documents (files of a folder, lines of .jsonl) go whole to train or val, every
round(1/val_fraction)-th to val (with fewer than 2*round(1/val_fraction) documents each is cut).
Large inputs are read in pieces, so memory stays bounded; pieces are encoded on --workers threads
and written in order, so the same input gives the same bytes.
"""
import codecs
import importlib.util
import itertools
import json
import os
import re
import shutil
import socket
import sys
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from common import ArgumentParser, UserError, cpu_cores, description, download, first_line, make_folder, run_cli, token_dtype, write_meta
from tasks import prepare_task
from tokenizer import (BPE_FILE, PATTERNS, CharTokenizer, add_mask_token, bpe_tokenizer, dataset_tokenizer, gpt2_tokenizer,
                       save_bpe, train_bpe, with_mask_entry)

SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
KNOWN = {  # name -> (tokenizer, canonical download address)
    "shakespeare_char": ("char", SHAKESPEARE_URL),
    "shakespeare": ("gpt2", SHAKESPEARE_URL),
}
HF_DATASETS = {  # name -> (Hugging Face dataset, config), streamed with the optional datasets package
    "openwebtext": ("Skylion007/openwebtext", None),
    "fineweb-edu": ("HuggingFaceFW/fineweb-edu", "sample-10BT"),
}
SYNTHETIC = ("arithmetic",)  # generated here by rewards.py; val holds the task's val problems
PIECE_BYTES = 1 << 20  # read and encode about 1 MB at a time
BPE_MAX_CHUNKS = 1_000_000  # distinct pre-split chunks a BPE trains on (~1 KB each): bounds its memory
MAX_CARRY = 16  # pieces of text without a safe place before one is cut anyway, to bound memory


# -----------------------------------------------------------------------------------------------
# reading text

def list_files(path):
    """The files to read: the file itself, or a folder's .txt files (else its .jsonl files) in sorted order."""
    if os.path.isfile(path):
        return [path]
    if os.path.isdir(path):
        for ext in (".txt", ".jsonl"):
            files = sorted(os.path.join(root, name) for root, _, names in os.walk(path)
                           for name in names if name.endswith(ext))
            if files:
                return files
        raise UserError(f"no .txt or .jsonl files in folder {path}")
    raise UserError(f"input {path} not found; pass a UTF-8 text file, a .jsonl file or a folder of them")


# Safe cuts: between a letter or digit and a following space or newline, or between a newline
# (after a non-space) and a following letter or digit. No GPT-2 / GPT-4 pre-split chunk spans such
# a place, and neither side's chunks change when the text ends or starts there ([^\W_] = alnum).
SAFE_CUT = re.compile(r"[^\W_](?=[\n ])|(?<=\S)\n(?=[^\W_])")


def safe_cut(text, lo=0):
    """Where a piece may end so that no token spans the cut: the last safe place at or after lo
    (scanning back from the end in growing windows). -1 if none."""
    size = 1 << 12
    while True:
        start = max(lo, len(text) - size)
        last = None
        for last in SAFE_CUT.finditer(text, start):
            pass
        if last is not None:
            return last.end()
        if start == lo:
            return -1
        size <<= 4


def read_pieces(path, start=0, end=None):
    """Text of bytes [start, end) of a UTF-8 file, in pieces of about PIECE_BYTES cut at safe places."""
    decoder = codecs.getincrementaldecoder("utf-8")()  # holds a character split between two reads
    with open(path, "rb") as f:
        f.seek(start)
        remaining = (os.path.getsize(path) if end is None else end) - start
        carry, offset, held = "", start, 0  # held: bytes of text read but not yet given out
        while remaining > 0:
            raw = f.read(min(PIECE_BYTES, remaining))
            remaining -= len(raw)
            try:
                text = carry + decoder.decode(raw, final=remaining == 0)
            except UnicodeDecodeError as e:
                raise UserError(f"{path} is not UTF-8 text (bad byte near offset {offset + e.start}); "
                                   f"convert it to UTF-8 first") from None
            offset += len(raw)
            held += len(raw)
            cut = safe_cut(text, max(0, len(carry) - 2)) if remaining > 0 else len(text)
            if cut <= 0 and held >= MAX_CARRY * PIECE_BYTES:
                cut = len(text)  # no safe place in many MB (no spaces or line breaks): cut anyway
            if cut <= 0:
                carry = text  # no safe place yet: read on
                continue
            yield text[:cut]
            carry = text[cut:]
            held = len(carry.encode("utf-8"))
        if carry:
            yield carry


def split_point(path, val_fraction):
    """Byte offset where a single document's val part starts: at a line start near (1 - val_fraction)."""
    size = os.path.getsize(path)
    target = int(size * (1 - val_fraction))
    with open(path, "rb") as f:
        f.seek(target)
        tail = f.read(1 << 16)
    nl = tail.find(b"\n")
    if nl >= 0:
        return target + nl + 1
    skip = 0  # no line break near: step to the start of the next UTF-8 character
    while skip < len(tail) and tail[skip] & 0xC0 == 0x80:
        skip += 1
    return target + skip


def plan_documents(files, val_fraction):
    """[(split, path, start, end)]: which bytes of which file go to train and to val."""
    every = max(2, round(1 / val_fraction))
    if len(files) < 2 * every:  # too few documents to split by document: cut each file by position
        plan = []
        for path in files:
            cut = split_point(path, val_fraction)
            plan += [("train", path, 0, cut), ("val", path, cut, os.path.getsize(path))]
        return plan
    return [("val" if (i + 1) % every == 0 else "train", path, 0, os.path.getsize(path))
            for i, path in enumerate(files)]


def jsonl_documents(files, text_field):
    """The text_field of every line of .jsonl files, one document a line (blank lines skipped)."""
    for path in files:
        with open(path, "rb") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except ValueError as e:  # UnicodeDecodeError is a ValueError too
                    raise UserError(f"{path} line {lineno} is not a JSON object in UTF-8 ({e})") from None
                text = row.get(text_field) if isinstance(row, dict) else None
                if not isinstance(text, str):
                    raise UserError(f"{path} line {lineno} has no text field {text_field!r}; "
                                       f"name the field that holds the text with --text_field") from None
                yield text


def hf_documents(name, text_field):
    """The documents of a known Hugging Face dataset, streamed (never downloaded whole)."""
    if importlib.util.find_spec("datasets") is None:  # optional: only these corpora need it
        raise UserError(f"{name} is streamed from the Hugging Face Hub with the datasets package: "
                           f"pip install datasets")
    path, config = HF_DATASETS[name]
    if not hub_reachable():  # fail at once: offline, the datasets library retries for half a minute
        raise hf_error(path, OSError("huggingface.co cannot be reached"))
    import datasets  # slow to import, so only once the hub is known to answer
    try:
        rows = iter(datasets.load_dataset(path, config, split="train", streaming=True))
    except Exception as e:  # offline, the hub, fsspec and requests raise many kinds; all mean "cannot read"
        raise hf_error(path, e) from None
    while True:
        try:
            row = next(rows)
        except StopIteration:
            return
        except Exception as e:
            raise hf_error(path, e) from None
        if not isinstance(row.get(text_field), str):
            raise UserError(f"{path} has no text field {text_field!r}; name it with --text_field")
        yield row[text_field]


def hf_rows(name):
    """Every row of a Hugging Face dataset NAME[:SPLIT] (split train by default), downloaded."""
    path, _, split = name.partition(":")
    if importlib.util.find_spec("datasets") is None:
        raise UserError(f"{path} is read from the Hugging Face Hub with the datasets package: pip install datasets")
    if not hub_reachable():
        raise hf_error(path, OSError("huggingface.co cannot be reached"))
    import datasets
    try:
        return list(datasets.load_dataset(path, split=split or "train"))
    except Exception as e:  # offline, a missing split or dataset: all mean "cannot read"
        raise hf_error(path, e) from None


def hub_reachable():
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0", "false", "False"):
        return False
    if any(os.environ.get(v) for v in ("https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY")):
        return True  # only the proxy knows; let the datasets library try
    try:
        socket.create_connection(("huggingface.co", 443), timeout=10).close()
        return True
    except OSError:
        return False


def hf_error(path, e):
    reason = first_line(e)[:200]
    return UserError(f"could not stream {path} from the Hugging Face Hub ({reason}); it needs the network; "
                        f"offline, pass a local copy with --input PATH (.txt or .jsonl)")


def text_split_point(text, val_fraction):
    """Where a document held in memory is cut into train and val: at a line start near (1 - val_fraction)."""
    target = int(len(text) * (1 - val_fraction))
    nl = text.find("\n", target, target + (1 << 16))
    return nl + 1 if nl >= 0 else target


def split_documents(docs, val_fraction):
    """(split, text) for each document: every round(1/val_fraction)-th to val; with too few documents
    to split by document, each is cut by position instead (as plan_documents does with files)."""
    every = max(2, round(1 / val_fraction))
    head = list(itertools.islice(docs, 2 * every))
    if len(head) < 2 * every:
        for text in head:
            cut = text_split_point(text, val_fraction)
            yield "train", text[:cut]
            yield "val", text[cut:]
        return
    for i, text in enumerate(itertools.chain(head, docs)):
        yield ("val" if (i + 1) % every == 0 else "train"), text


def corpus(input_path, hf_name, text_field, val_fraction):
    """The corpus as a re-readable stream: (items, total_bytes, counts). items() yields
    (split, text, document_end) in order; total_bytes is None when unknown (streamed datasets);
    counts["documents"] is filled in as documents are read."""
    counts = {"documents": 0}

    def counted(docs):
        for text in docs:
            counts["documents"] += 1
            yield text

    def doc_items(docs):
        counts["documents"] = 0  # counted afresh on every pass
        for split, text in split_documents(counted(docs), val_fraction):
            yield split, text, True

    if hf_name is not None:
        return lambda: doc_items(hf_documents(hf_name, text_field)), None, counts
    files = list_files(input_path)
    if sum(os.path.getsize(f) for f in files) == 0:
        raise UserError(f"input {input_path} is empty")
    if files[0].endswith(".jsonl"):
        return lambda: doc_items(jsonl_documents(files, text_field)), None, counts
    plan = plan_documents(files, val_fraction)
    counts["documents"] = len(files)

    def txt_items():
        for split, path, start, end in plan:
            for piece in read_pieces(path, start, end):
                yield split, piece, False
            yield split, "", True
    return txt_items, sum(os.path.getsize(f) for f in files), counts


class Progress:
    """One line on stderr with MB read and MB/s, shown only once a step takes more than a couple of seconds."""

    def __init__(self, what, total=None, delay=2.0):
        self.what, self.total, self.delay = what, total, delay
        self.every = 0.5 if sys.stderr.isatty() else 10.0  # a log file gets a line every 10 s
        self.done, self.start, self.last, self.shown = 0, time.perf_counter(), 0.0, False

    def add(self, nbytes):
        self.done += nbytes
        now = time.perf_counter()
        if now - self.start >= self.delay and now - self.last >= self.every:
            self.show(now)

    def rate(self, now=None):
        return self.done / 1e6 / max((now or time.perf_counter()) - self.start, 1e-9)

    def show(self, now):
        self.last, self.shown = now, True
        line = f"{self.what}: {self.done / 1e6:,.1f} MB"
        if self.total:
            line += f" of {self.total / 1e6:,.1f} MB ({100 * self.done / self.total:.0f}%)"
        line += f", {self.rate(now):.1f} MB/s"
        if sys.stderr.isatty():
            print("\r" + line, end="", file=sys.stderr, flush=True)
        else:
            print(line, file=sys.stderr, flush=True)

    def close(self):
        if self.shown:
            self.show(time.perf_counter())
            if sys.stderr.isatty():
                print(file=sys.stderr, flush=True)
        return time.perf_counter() - self.start


# -----------------------------------------------------------------------------------------------
# encoding and writing

def char_alphabet(items, total=None):
    chars = set()
    progress = Progress("reading the alphabet", total)
    try:
        for _, piece, _ in items:
            chars.update(piece)
            progress.add(len(piece))
    finally:
        progress.close()
    return CharTokenizer(sorted(chars))


def encode_char(tok, piece):
    """Vectorised char encoding: code points looked up in the sorted alphabet."""
    codes = np.frombuffer(piece.encode("utf-32-le"), dtype=np.uint32)
    alphabet = np.frombuffer(tok.chars.encode("utf-32-le"), dtype=np.uint32)
    ids = np.searchsorted(alphabet, codes)
    missing = alphabet[np.minimum(ids, len(alphabet) - 1)] != codes
    if missing.any():  # only with a reused alphabet (--tokenizer_from)
        shown = ", ".join(repr(chr(c)) for c in np.unique(codes[missing])[:10])
        raise UserError(f"characters not in the char-level vocabulary: {shown}; a reused char "
                           f"tokenizer only encodes characters of the corpus it was built on")
    return ids


def train_bpe_tokenizer(items, vocab_size, pattern, max_bytes, total=None):
    """Train a byte-level BPE on the train split's pieces (the first max_bytes of it, if given);
    train_bpe keeps only the counts of the BPE_MAX_CHUNKS most frequent pre-split chunks, so
    memory stays bounded however large the corpus."""
    known = [n for n in (max_bytes, total) if n]
    progress = Progress(f"training a {vocab_size}-token BPE", min(known) if known else None)

    def texts():
        for split, piece, _ in items:
            if split != "train" or not piece:
                continue
            yield piece
            progress.add(len(piece.encode("utf-8")))
            if max_bytes and progress.done >= max_bytes:
                return
    try:
        bpe = train_bpe(texts(), vocab_size, pattern=pattern, max_chunks=BPE_MAX_CHUNKS)
    finally:
        seconds = progress.close()
    print(f"trained a {bpe.n_vocab}-token BPE ({pattern} split) on {progress.done / 1e6:,.1f} MB "
          f"in {seconds:.1f} s")
    return bpe


def id_encoder(tok):
    """text -> numpy array of token ids."""
    if tok.kind == "char":
        return lambda text: encode_char(tok, text)
    if hasattr(tok.enc, "encode_to_numpy"):  # tiktoken >= 0.8: no list of Python ints in between
        # no allowed or disallowed specials: "<|endoftext|>" in a text is ordinary text, as in encode_ordinary
        return lambda text: tok.enc.encode_to_numpy(text, disallowed_special=())
    return lambda text: np.array(tok.encode(text), dtype=np.uint32)


def batches(items, size):
    """Consecutive items grouped into lists of about size characters."""
    batch, n = [], 0
    for item in items:
        batch.append(item)
        n += len(item[1])
        if n >= size:
            yield batch
            batch, n = [], 0
    if batch:
        yield batch


def ordered_map(fn, iterable, workers):
    """fn over iterable on worker threads, results in input order, at most 2 * workers in flight
    (so a stream larger than memory flows through)."""
    if workers <= 1:
        yield from map(fn, iterable)
        return
    with ThreadPoolExecutor(workers) as pool:
        pending = deque()
        for x in iterable:
            pending.append(pool.submit(fn, x))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def write_splits(items, tok, paths, dtype, workers, total=None):
    """Encode the items (in parallel: tiktoken and numpy release the GIL) and append each
    batch's ids to its split's file in input order; returns the token counts and the progress."""
    encode = id_encoder(tok)
    eot = None if tok.eot_token is None else np.array([tok.eot_token], dtype=dtype)

    def encode_batch(batch):
        parts, nbytes = {"train": [], "val": []}, 0
        for split, text, document_end in batch:
            if text:
                parts[split].append(encode(text).astype(dtype, copy=False))
                nbytes += len(text.encode("utf-8"))
            if document_end and eot is not None:  # BPE: mark where the document ends
                parts[split].append(eot)
        return {s: np.concatenate(p) for s, p in parts.items() if p}, nbytes

    counts = {"train": 0, "val": 0}
    progress = Progress(f"encoding ({tok.kind})", total)
    try:
        with open(paths["train"], "wb") as ftrain, open(paths["val"], "wb") as fval:
            files = {"train": ftrain, "val": fval}
            for arrays, nbytes in ordered_map(encode_batch, batches(items, PIECE_BYTES), workers):
                for split, ids in arrays.items():
                    ids.tofile(files[split])
                    counts[split] += len(ids)
                progress.add(nbytes)
    finally:
        progress.close()
    return counts, progress


def choose_tokenizer(tokenizer, tokenizer_dir, items, total, val_fraction, vocab_size, bpe_pattern, bpe_train_bytes):
    """The tokenizer to encode with: an existing dataset's, a char alphabet read from the corpus, GPT-2's,
    or a BPE trained on the train split."""
    if tokenizer_dir is not None:
        return dataset_tokenizer(tokenizer_dir)
    if tokenizer == "char":
        return char_alphabet(items(), total)
    if tokenizer == "gpt2":
        return gpt2_tokenizer()
    if tokenizer == "bpe":
        train_total = total and int(total * (1 - val_fraction))  # about the train split's size
        return bpe_tokenizer(train_bpe_tokenizer(items(), vocab_size or 4096, bpe_pattern, bpe_train_bytes, train_total))
    raise UserError(f"unknown tokenizer {tokenizer!r}; use char, gpt2 or bpe")


def write_dataset(out_dir, items, tok, dtype, workers, total):
    """train.bin, val.bin (and a BPE's tokenizer.json), each written beside the old files and renamed into
    place once all are done; on any failure nothing is left behind. Returns the token counts and progress."""
    created = not os.path.isdir(out_dir)
    make_folder(out_dir, "--out")
    tmp = {name: os.path.join(out_dir, name + ".tmp") for name in ("train.bin", "val.bin", BPE_FILE)}
    try:
        if tok.kind == "bpe":
            save_bpe(tmp[BPE_FILE], tok.bpe)
        counts, progress = write_splits(items(), tok, {"train": tmp["train.bin"], "val": tmp["val.bin"]},
                                        dtype, workers, total)
        for split in ("train", "val"):
            if counts[split] == 0:
                raise UserError(f"the {split} split is empty; use a larger input or another val_fraction")
    except BaseException as e:
        for path in tmp.values():
            if os.path.exists(path):
                os.remove(path)
        if created and not os.listdir(out_dir):
            os.rmdir(out_dir)
        if isinstance(e, OSError):  # the input was read; so writing failed
            raise UserError(f"cannot write the dataset into {out_dir} ({e.strerror or first_line(e)}); pass an "
                            f"--out you can write to") from None
        raise
    if tok.kind == "bpe":
        os.replace(tmp[BPE_FILE], os.path.join(out_dir, BPE_FILE))
    for split in ("train", "val"):
        os.replace(tmp[f"{split}.bin"], os.path.join(out_dir, f"{split}.bin"))
    return counts, progress


def prepare(input_path, tokenizer, out_dir, val_fraction=0.1, *, vocab_size=None, bpe_pattern="gpt4",
            bpe_train_bytes=None, tokenizer_dir=None, text_field="text", workers=None, hf_name=None, mask_token=False):
    """Encode a corpus into out_dir (see the module docstring); returns its meta.json."""
    if not 0 < val_fraction < 1:
        raise UserError(f"val_fraction must be between 0 and 1, got {val_fraction}")
    if workers is None:
        workers = cpu_cores()
    items, total, counts_docs = corpus(input_path, hf_name, text_field, val_fraction)
    tok = choose_tokenizer(tokenizer, tokenizer_dir, items, total, val_fraction, vocab_size, bpe_pattern,
                           bpe_train_bytes)
    if mask_token:
        add_mask_token(tok)
    dtype = token_dtype(tok.vocab_size)
    counts, progress = write_dataset(out_dir, items, tok, dtype, workers, total)
    meta = {"tokenizer": tok.meta(), "vocab_size": tok.vocab_size, "dtype": np.dtype(dtype).name,
            "train_tokens": counts["train"], "val_tokens": counts["val"], "val_fraction": val_fraction,
            "documents": counts_docs["documents"]}
    if tok.kind == "bpe":
        meta["tokenizer"] = with_mask_entry(tok, {"kind": "bpe", "file": BPE_FILE})
    write_meta(out_dir, meta)  # last: a folder with meta.json is a whole dataset
    seconds = time.perf_counter() - progress.start
    print(f"{out_dir}: {counts['train']:,} train and {counts['val']:,} val tokens, "
          f"vocab {tok.vocab_size:,} ({tok.kind}), {meta['dtype']}; encoded {progress.done / 1e6:,.1f} MB "
          f"in {seconds:.1f} s ({progress.done / 1e6 / seconds:.1f} MB/s, {workers} threads)")
    return meta


def parser():
    p = ArgumentParser(prog="prepare.py", description=description(__doc__))
    p.add_argument("name", nargs="?", help=f"a known corpus: {', '.join([*KNOWN, *HF_DATASETS])}")
    p.add_argument("--input", help="a UTF-8 .txt file, a .jsonl file (one document a line) or a folder of "
                                   "either (for a known corpus: its local copy)")
    p.add_argument("--tokenizer", choices=["char", "gpt2", "bpe"],
                   help="char, gpt2, or bpe (trained here) (default: the known corpus's, else char)")
    p.add_argument("--out", help="output folder (default: data/NAME)")
    p.add_argument("--val_fraction", type=float, default=0.1, help="share of the text held out for validation")
    p.add_argument("--tokenizer_from", metavar="DIR",
                   help="reuse the tokenizer of this prepared dataset (e.g. to match a checkpoint's vocabulary)")
    p.add_argument("--vocab_size", type=int, help="with --tokenizer bpe: tokens in all, <|endoftext|> "
                                                  "included (default 4096)")
    p.add_argument("--bpe_pattern", choices=sorted(PATTERNS), default="gpt4",
                   help="with --tokenizer bpe: the pre-split regex (GPT-2's or GPT-4's)")
    p.add_argument("--bpe_train_bytes", type=float, default=None,
                   help="with --tokenizer bpe: train it on only the first this many bytes of the train split "
                        "(e.g. 1e9; default: all of it)")
    p.add_argument("--mask_token", action="store_true",
                   help="add a [MASK] token after the vocabulary (an encoder's masked language modelling needs "
                        "one); a --tokenizer_from dataset's mask token is kept without it")
    p.add_argument("--text_field", default="text", help="the field of each .jsonl line (or dataset row) "
                                                        "that holds the text")
    p.add_argument("--workers", type=int, default=None, help="encoding threads (default: one per CPU core)")
    p.add_argument("--task", choices=["lm", "classify", "instruct", "preference"], default="lm",
                   help="lm: a token stream; classify: a TSV/CSV of label and text; instruct: Alpaca JSON; "
                        "preference: JSON or JSONL of {prompt, chosen, rejected}, or a Hugging Face dataset "
                        "NAME[:SPLIT] (online) (see tasks.py for the files written)")
    p.add_argument("--test_fraction", type=float, default=0.2, help="classify/instruct/preference: share held out for test")
    p.add_argument("--max_length", type=int, default=0, help="classify/instruct/preference: keep at most this many tokens "
                   "per example (0: all)")
    p.add_argument("--positive", help="classify: the positive class for precision/recall/F1 (default: the rarer)")
    p.add_argument("--seed", type=int, default=1337, help="classify/instruct/preference: seed of the split")
    p.add_argument("--problems", type=int, default=200000, help="arithmetic: training problems written to train.bin")
    return p


def check_args(args):
    """The tokenizer asked for (by name or the known corpus's), after refusing options that do not fit."""
    if args.name is None and args.input is None:
        raise UserError("name a known corpus or pass --input PATH")
    if args.name is not None and args.name not in (*KNOWN, *HF_DATASETS, *SYNTHETIC):
        raise UserError(f"unknown corpus {args.name!r}; known: {', '.join([*KNOWN, *HF_DATASETS, *SYNTHETIC])}; "
                        f"for your own text use --input PATH --out data/NAME")
    if args.tokenizer_from is not None and args.tokenizer is not None:
        raise UserError("pass either --tokenizer or --tokenizer_from, not both")
    tokenizer = args.tokenizer or (KNOWN[args.name][0] if args.name in KNOWN else "char" if args.name in SYNTHETIC
                                   else "gpt2" if args.name else "char")
    if tokenizer != "bpe" or args.tokenizer_from:
        given = [f"--{k}" for k in ("vocab_size", "bpe_train_bytes") if getattr(args, k) is not None]
        if given:
            raise UserError(f"{' and '.join(given)} only apply to --tokenizer bpe")
    if args.vocab_size is not None and args.vocab_size < 257:
        raise UserError(f"--vocab_size must be at least 257 (256 bytes and <|endoftext|>), got {args.vocab_size}")
    if args.bpe_train_bytes is not None and args.bpe_train_bytes <= 0:
        raise UserError(f"--bpe_train_bytes must be positive, got {args.bpe_train_bytes}")
    if args.workers is not None and args.workers < 1:
        raise UserError(f"--workers must be at least 1, got {args.workers}")
    if args.problems < 1:
        raise UserError(f"--problems must be at least 1, got {args.problems}")
    if args.name in SYNTHETIC and (args.input or args.tokenizer or args.tokenizer_from or args.mask_token):
        raise UserError(f"{args.name} is generated, with its own char tokenizer: pass no --input, --tokenizer, "
                        f"--tokenizer_from or --mask_token")
    if args.task != "lm" and args.input is None:
        raise UserError(f"--task {args.task} needs --input PATH")
    return tokenizer


def known_corpus_copy(name, input_path, out_dir):
    """A known corpus lives in its folder: downloaded once, or copied there from --input."""
    corpus_copy = os.path.join(out_dir, "input.txt")
    if input_path is not None and os.path.isfile(input_path) and not (
            os.path.exists(corpus_copy) and os.path.samefile(input_path, corpus_copy)):
        make_folder(out_dir, "--out")
        shutil.copyfile(input_path, corpus_copy)
    elif input_path is None and not os.path.exists(corpus_copy):
        make_folder(out_dir, "--out")
        download(KNOWN[name][1], corpus_copy, "pass a local copy with --input PATH")
    return corpus_copy


def main(argv):
    args = parser().parse_args(argv)
    tokenizer = check_args(args)
    out_dir = args.out or os.path.join("data", args.name or os.path.splitext(os.path.basename(
        os.path.normpath(args.input)))[0])
    created = not os.path.exists(out_dir)
    try:
        prepare_from_args(args, tokenizer, out_dir)
    except BaseException:
        if created and os.path.isdir(out_dir):  # a failed prepare leaves no half-made folder behind
            shutil.rmtree(out_dir, ignore_errors=True)
        raise


def prepare_synthetic(name, out_dir, problems):
    """A generated task's language-model dataset: train.bin of `problems` training problems with their
    answers, val.bin of the task's val problems (held out of training), one character a token."""
    from rewards import corpus, make_task
    task = make_task(name)
    tok = CharTokenizer(sorted(task.alphabet))
    texts = {"train": corpus(task, problems), "val": "".join(p + a for p, a in task.val) + task.stop}
    dtype = token_dtype(tok.vocab_size)
    make_folder(out_dir, "--out")
    for split, text in texts.items():
        path = os.path.join(out_dir, f"{split}.bin")
        np.asarray(tok.encode(text), dtype=dtype).tofile(path + ".tmp")
        os.replace(path + ".tmp", path)
    meta = {"tokenizer": tok.meta(), "vocab_size": tok.vocab_size, "dtype": np.dtype(dtype).name,
            "train_tokens": len(texts["train"]), "val_tokens": len(texts["val"]), "corpus": name,
            "problems": problems, "rl_task": name}
    write_meta(out_dir, meta)
    print(f"{out_dir}: {problems:,} {name} problems ({len(texts['train']):,} train tokens), {len(task.val)} val "
          f"problems ({len(texts['val']):,} tokens), vocab {tok.vocab_size} (char)")
    return meta


def prepare_from_args(args, tokenizer, out_dir):
    if args.name in SYNTHETIC:
        prepare_synthetic(args.name, out_dir, args.problems)
        return
    if args.task != "lm":
        tok = dataset_tokenizer(args.tokenizer_from) if args.tokenizer_from else None
        rows = None
        if args.task == "preference" and not os.path.exists(args.input) and "/" in args.input.split(":")[0]:
            rows = hf_rows(args.input)  # a dataset of the Hugging Face Hub, e.g. trl-lib/ultrafeedback_binarized
        prepare_task(args.task, args.input, tokenizer, out_dir, args.val_fraction, args.test_fraction,
                     args.max_length, args.vocab_size or 4096, args.positive, args.seed, tok=tok, rows=rows,
                     mask_token=args.mask_token)
        return
    input_path, hf_name = args.input, None
    if input_path is None and args.name in HF_DATASETS:
        hf_name = args.name
    elif args.name in KNOWN:
        input_path = known_corpus_copy(args.name, input_path, out_dir)
    prepare(input_path, tokenizer, out_dir, args.val_fraction, vocab_size=args.vocab_size,
            bpe_pattern=args.bpe_pattern, bpe_train_bytes=args.bpe_train_bytes and int(args.bpe_train_bytes),
            tokenizer_dir=args.tokenizer_from, text_field=args.text_field, workers=args.workers, hf_name=hf_name,
            mask_token=args.mask_token)


if __name__ == "__main__":
    sys.exit(run_cli(main))
