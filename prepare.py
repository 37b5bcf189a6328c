"""
Turn text into token binaries for train.py.

  python prepare.py shakespeare_char                  # tiny shakespeare, one token per character
  python prepare.py shakespeare                       # tiny shakespeare, GPT-2 BPE
  python prepare.py --input PATH --tokenizer char|gpt2 --out data/NAME

Writes to the output folder:
  train.bin, val.bin  a flat stream of token ids (uint16 when the vocabulary fits, else uint32);
                      with BPE every document ends with the end-of-text token
  meta.json           the tokenizer (and all that rebuilds it), vocab_size, dtype, token counts
The split: one document is cut by position (the last val_fraction of its bytes is val); several
documents (files of a folder) go whole to train or val, every round(1/val_fraction)-th to val.
Large inputs are read in pieces, so memory stays bounded; the same input gives the same bytes.
"""
import argparse
import codecs
import json
import os
import sys
import urllib.request

import numpy as np

from tasks import TaskError, prepare_task, save_tokenizer_file, tokenizer_of_dataset
from tokenizer import CharTokenizer, TokenizerError, gpt2_tokenizer

SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
KNOWN = {  # name -> (tokenizer, canonical download address)
    "shakespeare_char": ("char", SHAKESPEARE_URL),
    "shakespeare": ("gpt2", SHAKESPEARE_URL),
}
PIECE_BYTES = 1 << 20  # read and encode about 1 MB at a time


class PrepareError(RuntimeError):
    """Bad input; printed as one line."""


# -----------------------------------------------------------------------------------------------
# reading text

def download(url, path):
    """Fetch url into path (via a temporary file, so a broken download leaves nothing behind)."""
    print(f"downloading {url}")
    tmp = path + ".tmp"
    try:
        with urllib.request.urlopen(url, timeout=30) as r, open(tmp, "wb") as f:
            f.write(r.read())
    except OSError as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise PrepareError(f"could not download {url} ({getattr(e, 'reason', e)}); offline, pass a local copy "
                           f"with --input PATH") from None
    os.replace(tmp, path)


def list_files(path):
    """The .txt files to read: the file itself, or a folder's .txt files in sorted order."""
    if os.path.isfile(path):
        return [path]
    if os.path.isdir(path):
        files = sorted(os.path.join(root, name) for root, _, names in os.walk(path)
                       for name in names if name.endswith(".txt"))
        if not files:
            raise PrepareError(f"no .txt files in folder {path}")
        return files
    raise PrepareError(f"input {path} not found; pass a UTF-8 text file or a folder of .txt files")


def safe_cut(text):
    """Where a piece may end so that no token spans the cut: after the last newline that follows
    a letter or digit (no GPT-2 / GPT-4 pre-split pattern joins such a pair). -1 if none."""
    i = text.rfind("\n")
    while i > 0 and not text[i - 1].isalnum():
        i = text.rfind("\n", 0, i)
    return i


def read_pieces(path, start=0, end=None):
    """Text of bytes [start, end) of a UTF-8 file, in pieces of about PIECE_BYTES cut at safe places."""
    decoder = codecs.getincrementaldecoder("utf-8")()  # holds a character split between two reads
    with open(path, "rb") as f:
        f.seek(start)
        remaining = (os.path.getsize(path) if end is None else end) - start
        carry, offset = "", start
        while remaining > 0:
            raw = f.read(min(PIECE_BYTES, remaining))
            remaining -= len(raw)
            try:
                text = carry + decoder.decode(raw, final=remaining == 0)
            except UnicodeDecodeError as e:
                raise PrepareError(f"{path} is not UTF-8 text (bad byte near offset {offset + e.start}); "
                                   f"convert it to UTF-8 first") from None
            offset += len(raw)
            cut = safe_cut(text) if remaining > 0 else len(text)
            if cut <= 0:
                carry = text  # no safe place yet: read on
                continue
            yield text[:cut]
            carry = text[cut:]
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


# -----------------------------------------------------------------------------------------------
# encoding and writing

def char_alphabet(plan):
    chars = set()
    for _, path, start, end in plan:
        for piece in read_pieces(path, start, end):
            chars.update(piece)
    return CharTokenizer(sorted(chars))


def encode_char(tok, piece):
    """Vectorised char encoding: code points looked up in the sorted alphabet."""
    codes = np.frombuffer(piece.encode("utf-32-le"), dtype=np.uint32)
    alphabet = np.frombuffer(tok.chars.encode("utf-32-le"), dtype=np.uint32)
    return np.searchsorted(alphabet, codes)


def write_split(plan, split, tok, path, dtype):
    """Encode every document of one split into path; returns the number of tokens written."""
    n = 0
    with open(path, "wb") as f:
        for s, src, start, end in plan:
            if s != split:
                continue
            for piece in read_pieces(src, start, end):
                ids = encode_char(tok, piece) if tok.kind == "char" else np.array(tok.encode(piece))
                ids.astype(dtype).tofile(f)
                n += len(ids)
            if tok.eot_token is not None:  # BPE: mark where the document ends
                np.array([tok.eot_token], dtype=dtype).tofile(f)
                n += 1
    return n


def prepare(input_path, tokenizer, out_dir, val_fraction=0.1, tok=None):
    if not 0 < val_fraction < 1:
        raise PrepareError(f"val_fraction must be between 0 and 1, got {val_fraction}")
    files = list_files(input_path)
    if sum(os.path.getsize(p) for p in files) == 0:
        raise PrepareError(f"input {input_path} is empty")
    plan = plan_documents(files, val_fraction)
    if tok is not None:  # another dataset's tokenizer (--tokenizer_from)
        pass
    elif tokenizer == "char":
        tok = char_alphabet(plan)
    elif tokenizer == "gpt2":
        tok = gpt2_tokenizer()
    else:
        raise PrepareError(f"unknown tokenizer {tokenizer!r}; use char or gpt2")
    dtype = np.uint16 if tok.vocab_size <= 1 << 16 else np.uint32
    os.makedirs(out_dir, exist_ok=True)
    counts = {}
    for split in ("train", "val"):  # written beside the old files, renamed into place when all is done
        counts[split] = write_split(plan, split, tok, os.path.join(out_dir, f"{split}.bin.tmp"), dtype)
        if counts[split] == 0:
            raise PrepareError(f"the {split} split is empty; use a larger input or another val_fraction")
    meta = {"tokenizer": tok.meta(), "vocab_size": tok.vocab_size, "dtype": np.dtype(dtype).name,
            "train_tokens": counts["train"], "val_tokens": counts["val"], "val_fraction": val_fraction,
            "documents": len(files)}
    for split in ("train", "val"):
        os.replace(os.path.join(out_dir, f"{split}.bin.tmp"), os.path.join(out_dir, f"{split}.bin"))
    save_tokenizer_file(tok, out_dir)  # a BPE's tokenizer.json travels with the data
    with open(os.path.join(out_dir, "meta.json.tmp"), "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=1, ensure_ascii=False)
    os.replace(os.path.join(out_dir, "meta.json.tmp"), os.path.join(out_dir, "meta.json"))
    print(f"{out_dir}: {counts['train']:,} train and {counts['val']:,} val tokens, "
          f"vocab {tok.vocab_size:,} ({tok.kind}), {meta['dtype']}")
    return meta


def main(argv):
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("name", nargs="?", help=f"a known corpus: {', '.join(KNOWN)}")
    p.add_argument("--input", help="a UTF-8 text file or a folder of .txt files (for a known corpus: its local copy)")
    p.add_argument("--tokenizer", choices=["char", "gpt2", "bpe"],
                   help="char or gpt2 (default: the known corpus's, else char); bpe: --task datasets only")
    p.add_argument("--out", help="output folder (default: data/NAME)")
    p.add_argument("--val_fraction", type=float, default=0.1, help="share of the text held out for validation")
    p.add_argument("--task", choices=["lm", "classify", "instruct"], default="lm",
                   help="lm: a token stream; classify: a TSV/CSV of label and text; instruct: Alpaca JSON "
                        "(see tasks.py for the files written)")
    p.add_argument("--test_fraction", type=float, default=0.2, help="classify/instruct: share held out for test")
    p.add_argument("--max_length", type=int, default=0, help="classify/instruct: keep at most this many tokens "
                   "per example (0: all)")
    p.add_argument("--vocab_size", type=int, default=2048, help="--tokenizer bpe: tokens in all, trained on "
                   "the train split")
    p.add_argument("--positive", help="classify: the positive class for precision/recall/F1 (default: the rarer)")
    p.add_argument("--seed", type=int, default=1337, help="classify/instruct: seed of the split")
    p.add_argument("--tokenizer_from", metavar="DIR", help="use the tokenizer of this prepared dataset folder")
    args = p.parse_args(argv)
    if args.name is None and args.input is None:
        p.error("name a known corpus or pass --input PATH")
    if args.name is not None and args.name not in KNOWN:
        raise PrepareError(f"unknown corpus {args.name!r}; known: {', '.join(KNOWN)}; "
                           f"for your own text use --input PATH --out data/NAME")
    tokenizer = args.tokenizer or (KNOWN[args.name][0] if args.name else "char")
    tok = tokenizer_of_dataset(args.tokenizer_from) if args.tokenizer_from else None
    if args.task != "lm":
        if args.input is None:
            raise PrepareError(f"--task {args.task} needs --input PATH")
        out_dir = args.out or os.path.join("data", os.path.splitext(os.path.basename(os.path.normpath(args.input)))[0])
        prepare_task(args.task, args.input, tokenizer, out_dir, args.val_fraction, args.test_fraction,
                     args.max_length, args.vocab_size, args.positive, args.seed, tok=tok)
        return
    out_dir = args.out or os.path.join("data", args.name or os.path.splitext(os.path.basename(
        os.path.normpath(args.input)))[0])
    input_path = args.input
    if input_path is None:  # a known corpus, downloaded once into its folder
        input_path = os.path.join(out_dir, "input.txt")
        if not os.path.exists(input_path):
            os.makedirs(out_dir, exist_ok=True)
            download(KNOWN[args.name][1], input_path)
    prepare(input_path, tokenizer, out_dir, args.val_fraction, tok=tok)


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except (PrepareError, TokenizerError, TaskError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
