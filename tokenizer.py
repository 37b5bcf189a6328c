"""
Tokenizers: text <-> token ids, for prepare.py, train.py and sample.py.

Kinds, each rebuilt from the "tokenizer" entry of a dataset's meta.json:
- char: one token per distinct character of the corpus (the alphabet is stored in meta.json).
- gpt2: OpenAI's GPT-2 byte-level BPE, 50,257 tokens, through tiktoken.
- bpe: a byte-level BPE trained here by train_bpe() and saved as tokenizer.json next to the
  dataset; encoding and decoding run through tiktoken with the learned ranks.
- hf: the tokenizer of an imported Hugging Face model: a byte-level BPE tokenizer.json, or Meta's
  tokenizer.model for Llama 3 (base64 token and rank per line), read into tiktoken (hf_tokenizer).

Every tokenizer has the same small surface: encode(text) -> list[int], decode(ids) -> str,
vocab_size, meta() -> the JSON-able dict that rebuilds it, and three kinds of special token:
- eot_token: the end-of-text id that prepare.py puts after every document and the instruction
  template after every response (None for char);
- bos_token: the id a prompt starts with when it is empty (GPT-2: end-of-text, which also begins a
  document; Llama 3: <|begin_of_text|>);
- stop_tokens: the ids generation stops at (GPT-2: end-of-text; Llama 3: <|end_of_text|> and the
  end-of-turn <|eot_id|>, or the eos ids the model's config.json names).
Text never produces special tokens: encode() treats "<|endoftext|>" in a document as ordinary
characters, so only prepare.py decides where documents end.
A fourth, mask_token, is what an encoder's masked language modelling hides tokens behind
(prepare.py --mask_token): the id after the tokenizer's last, recorded in meta.json's tokenizer
entry, decoded as "[MASK]", and written only by encode_with_masks (sample.py's cloze prompts).

BPE trainer design choices:
- Byte-level: the 256 byte values are ids 0..255, so any UTF-8 text round-trips exactly.
- Text is first cut into chunks by a regex (GPT-2's or GPT-4's cl100k pattern); merges never
  cross chunk boundaries. Identical chunks are counted once (chunk -> frequency).
- Pair counts are kept incrementally: pair -> count, and pair -> ids of the chunks holding it.
  A merge rewrites only those chunks (subtract their old pairs, add their new ones).
- The next merge comes from a max-heap with lazy invalidation: stale entries are dropped or
  re-filed when popped, instead of scanning every pair each step.
- Ties: the highest count wins, then the smallest (id_a, id_b); ids below 256 are byte
  values, so among single bytes this is byte order, and older tokens win over newer ones.
- Ids are tiktoken ranks (bytes -> rank), so each byte string must have exactly one id. A
  second merge path to bytes that are already a token cannot arise here: merges apply to
  every chunk, left to right, so a run of whole tokens splits the same way on its own as in
  its chunk, and bytes that form one token can never also sit as two adjacent tokens.
  train_bpe still checks: such a pair would be merged into the existing id (an "alias"
  merge, no new token), which is what tiktoken does with any pair whose bytes are a token.
  The same argument is why tiktoken, ranking byte strings, reproduces our merge order.
- Special tokens take the ids after the last learned token; vocab_size counts them. A corpus
  that runs out of pairs gives a smaller vocabulary, never one with holes.
- tokenizer.json is plain JSON (no pickle): the pattern, the merges [id_a, id_b, id] in the
  order learned, the special tokens, and a "vocab" list of pieces that is only for reading.
"""
import base64
import heapq
import json
import os
import re
import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from common import ArgumentParser, UserError, read_meta, run_cli


MASK_TEXT = "[MASK]"


def _split_at(ids, token):
    """ids cut at every `token`: the runs between them, in order (one more run than tokens)."""
    runs, run = [], []
    for i in ids:
        if i == token:
            runs.append(run)
            run = []
        else:
            run.append(i)
    return runs + [run]


class CharTokenizer:
    kind = "char"
    eot_token = bos_token = mask_token = None
    stop_tokens = ()

    def __init__(self, chars):
        self.chars = "".join(chars)
        self.stoi = {ch: i for i, ch in enumerate(self.chars)}
        if len(self.stoi) != len(self.chars):
            raise UserError("char tokenizer: the alphabet has repeated characters")
        self.vocab_size = len(self.chars)

    @classmethod
    def from_text(cls, text):
        return cls(sorted(set(text)))

    def encode(self, text):
        try:
            return [self.stoi[ch] for ch in text]
        except KeyError:
            missing = sorted({ch for ch in text if ch not in self.stoi})
            shown = ", ".join(repr(ch) for ch in missing[:10])
            raise UserError(f"characters not in this char-level vocabulary: {shown}; "
                                 f"use only characters of the training corpus") from None

    def decode(self, ids):
        return "".join(MASK_TEXT if i == self.mask_token else self.chars[i] for i in ids)

    def decode_bytes(self, ids):
        return self.decode(ids).encode("utf-8")

    def meta(self):
        return with_mask_entry(self, {"kind": self.kind, "chars": self.chars})


class TiktokenTokenizer:
    """A tiktoken.Encoding behind the common surface (GPT-2's BPE, one trained here, or a Hugging
    Face model's). Without bos or stop given, end-of-text is both."""
    mask_token = None

    def __init__(self, enc, kind, meta_extra=None, eot=None, bos=None, stop=None):
        self.enc = enc
        self.kind = kind
        self.vocab_size = enc.n_vocab
        if eot is None and "<|endoftext|>" in enc.special_tokens_set:  # enc.eot_token raises KeyError without it
            eot = enc.eot_token
        self.eot_token = eot
        self.bos_token = eot if bos is None else bos
        self.stop_tokens = tuple(stop) if stop else () if eot is None else (eot,)
        self._meta_extra = meta_extra or {}

    def encode(self, text):
        return self.enc.encode_ordinary(text)

    def encode_batch(self, texts, num_threads=8):
        return self.enc.encode_ordinary_batch(texts, num_threads=num_threads)

    def decode(self, ids):
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def decode_bytes(self, ids):
        if self.mask_token is None:
            return self.enc.decode_bytes(list(ids))
        return MASK_TEXT.encode().join(self.enc.decode_bytes(run) for run in _split_at(ids, self.mask_token))

    def meta(self):
        return with_mask_entry(self, {"kind": self.kind, **self._meta_extra})


def add_mask_token(tok):
    """Give tok a mask token (masked language modelling): the id after its last one, which no text
    encodes to. A tokenizer that has one keeps it."""
    if tok.mask_token is None:
        tok.mask_token = tok.vocab_size
        tok.vocab_size += 1
    return tok


def with_mask_entry(tok, meta):
    """A tokenizer's meta() entry, with its mask token's id when it has one."""
    return meta if tok.mask_token is None else {**meta, "mask_token": tok.mask_token}


def encode_with_masks(tok, text):
    """encode(text) with every "[MASK]" in it turned into the mask token: a cloze prompt."""
    if tok.mask_token is None:
        raise UserError("this tokenizer has no mask token; an encoder's dataset is prepared with --mask_token")
    pieces = text.split(MASK_TEXT)
    ids = tok.encode(pieces[0])
    for piece in pieces[1:]:
        ids += [tok.mask_token] + tok.encode(piece)
    return ids


def gpt2_tokenizer():
    import tiktoken
    try:
        enc = tiktoken.get_encoding("gpt2")
    except Exception as e:  # tiktoken downloads the vocabulary once; offline it fails here
        raise UserError(
            f"could not load GPT-2's vocabulary ({type(e).__name__}); offline, point "
            f"TIKTOKEN_CACHE_DIR at a directory holding tiktoken's cached gpt2 files") from None
    return TiktokenTokenizer(enc, "gpt2")


def load_tokenizer(meta, data_dir=None):
    """Rebuild the tokenizer described by meta.json's "tokenizer" entry."""
    tok = _load_base_tokenizer(meta, data_dir)
    if meta.get("mask_token") is not None:
        add_mask_token(tok)
        if tok.mask_token != meta["mask_token"]:
            raise UserError(f"meta.json's mask_token is {meta['mask_token']}, but the tokenizer's next free id is "
                            f"{tok.mask_token}; re-run prepare.py")
    return tok


def _load_base_tokenizer(meta, data_dir):
    kind = meta.get("kind")
    if kind == "char":
        return CharTokenizer(meta["chars"])
    if kind == "gpt2":
        return gpt2_tokenizer()
    if kind == "bpe":
        if data_dir is None:
            raise UserError("a bpe tokenizer is loaded from its dataset folder; pass data_dir")
        return bpe_tokenizer_from_file(Path(data_dir) / meta.get("file", BPE_FILE))
    if kind == "hf":  # the tokenizer of an imported Hugging Face model
        return hf_tokenizer(meta)
    raise UserError(f"unknown tokenizer kind {kind!r} in meta.json; "
                         f"re-run prepare.py to rebuild the dataset")


GPT2_VOCAB_SIZE = 50257


def vocab_size_of(meta, data_dir=None):
    """The number of token ids the tokenizer that meta.json's "tokenizer" entry describes has, read off
    without loading it where that can be done (GPT-2's needs no download for this)."""
    kind, mask = meta.get("kind"), int(meta.get("mask_token") is not None)
    if kind == "char":
        return len(meta.get("chars", "")) + mask
    if kind == "gpt2":
        return GPT2_VOCAB_SIZE + mask
    if kind == "bpe" and data_dir is not None:
        return load_bpe(Path(data_dir) / meta.get("file", BPE_FILE)).n_vocab + mask
    return load_tokenizer(meta, data_dir).vocab_size


def dataset_tokenizer(data_dir):
    """The tokenizer of a prepared dataset folder, e.g. to prepare more text with the same ids."""
    return load_tokenizer(read_meta(data_dir)["tokenizer"], data_dir)


class StreamDecoder:
    """Turns token ids into text as they arrive, holding back an incomplete UTF-8 character.

    A byte-level BPE token can end in the middle of a multi-byte character; decoding each
    token alone would print replacement characters. feed() returns only complete text.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.pending = b""

    def feed(self, ids):
        data = self.pending + self.tokenizer.decode_bytes(ids)
        cut = _complete_utf8_prefix(data)
        self.pending = data[cut:]
        return data[:cut].decode("utf-8", errors="replace")

    def flush(self):
        text, self.pending = self.pending.decode("utf-8", errors="replace"), b""
        return text


class StopText:
    """Text of one sample as its tokens arrive: cut at the first of the stop strings, releasing only
    text that cannot turn out to be the start of one, so streamed output never shows a stop string."""

    def __init__(self, tokenizer, stops=(), drop_incomplete=False):
        self.decoder, self.stops = StreamDecoder(tokenizer), [s for s in stops if s]
        self.drop_incomplete = drop_incomplete  # finish() drops a character cut short instead of showing U+FFFD
        self.hold = max((len(s) for s in self.stops), default=0)  # text that may yet begin a stop string
        self.text, self.released, self.done = "", 0, False

    def _release(self, safe):
        out = self.text[self.released:safe] if safe > self.released else ""
        self.released = max(self.released, safe)
        return out

    def _first_stop(self, start):
        found = [at for at in (self.text.find(s, start) for s in self.stops) if at >= 0]
        return min(found) if found else -1

    def add(self, token):
        """Feed one token; returns the text now safe to show."""
        self.text += self.decoder.feed([token])
        if not self.stops:
            return self._release(len(self.text))
        # an earlier match would have been complete at the previous step, so look from here
        at = self._first_stop(max(0, self.released - self.hold))
        if at >= 0:
            self.text, self.done = self.text[:at], True
            return self._release(at)
        return self._release(len(self.text) - self.hold + 1)

    def finish(self):
        """The rest: held-back text and any incomplete character."""
        if not self.done:
            self.text += "" if self.drop_incomplete else self.decoder.flush()
            at = self._first_stop(0)
            if at >= 0:
                self.text, self.done = self.text[:at], True
        return self._release(len(self.text))


def _complete_utf8_prefix(data):
    """Length of the longest prefix of data that does not end inside a UTF-8 character."""
    # look back at most 3 bytes for the lead byte of an unfinished character
    for back in range(1, min(4, len(data)) + 1):
        b = data[-back]
        if b & 0xC0 == 0x80:  # continuation byte: keep looking for the lead byte
            continue
        need = 1 if b < 0x80 else 2 if b >> 5 == 0b110 else 3 if b >> 4 == 0b1110 else 4 if b >> 3 == 0b11110 else 1
        return len(data) - back if need > back else len(data)
    return len(data)


# ----------------------------------------------------------------------------- valid UTF-8 output
# A byte-level token may hold part of a character, so a sampled sequence of them may not be UTF-8.
# UTF-8 needs only a handful of decoder states (how many continuation bytes are due, and the range
# the next must lie in); for each state, the tokens whose bytes can follow without breaking it are
# computed once here, and decoding masks the others at each step (decoding.Utf8Mask).

UTF8_STATES = 8  # 0: between characters; 1-3: that many continuation bytes due; 4-7: the first of them restricted
_CONTINUE = {1: (0x80, 0xBF, 0), 2: (0x80, 0xBF, 1), 3: (0x80, 0xBF, 2),
             4: (0xA0, 0xBF, 1), 5: (0x80, 0x9F, 1), 6: (0x90, 0xBF, 2), 7: (0x80, 0x8F, 2)}  # E0, ED, F0, F4


def utf8_step(state, byte):
    """The UTF-8 decoder's state after byte, or None where byte cannot come next (RFC 3629)."""
    if state:
        low, high, after = _CONTINUE[state]
        return after if low <= byte <= high else None
    if byte < 0x80:
        return 0
    if 0xC2 <= byte <= 0xDF:
        return 1
    if byte in (0xE0, 0xED, 0xF0, 0xF4):
        return {0xE0: 4, 0xED: 5, 0xF0: 6, 0xF4: 7}[byte]
    if 0xE1 <= byte <= 0xEF:
        return 2
    if 0xF1 <= byte <= 0xF3:
        return 3
    return None  # 0x80-0xC1 and 0xF5-0xFF never start a character


def utf8_tables(tok, vocab_size):
    """For a byte-level tokenizer: (allowed, next_state), lists of UTF8_STATES rows of vocab_size,
    allowed[s][t] whether token t's bytes can follow state s, next_state[s][t] the state after them.
    Special tokens may come only between characters; ids the tokenizer lacks (a padded vocabulary)
    never. None for a tokenizer whose tokens are whole characters (char)."""
    if tok.kind == "char":
        return None
    allowed = [[False] * vocab_size for _ in range(UTF8_STATES)]
    after = [[0] * vocab_size for _ in range(UTF8_STATES)]
    special = {tok.enc.encode_single_token(name) for name in tok.enc.special_tokens_set}
    if tok.mask_token is not None:
        special.add(tok.mask_token)
    for t in range(min(vocab_size, tok.vocab_size)):
        if t in special:
            allowed[0][t] = True
            continue
        try:
            data = tok.enc.decode_single_token_bytes(t)
        except KeyError:  # a hole in the ranks: no bytes, never sampled
            continue
        if data.isascii():  # the common case: fits between characters only
            allowed[0][t] = True
            continue
        for s in range(UTF8_STATES):
            state = s
            for byte in data:
                state = utf8_step(state, byte)
                if state is None:
                    break
            if state is not None:
                allowed[s][t], after[s][t] = True, state
    return allowed, after


# ----------------------------------------------------------------------------- byte-level BPE

# The pre-split patterns, exactly as tiktoken defines GPT-2's (r50k) and GPT-4's (cl100k).
GPT2_PATTERN = (r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++"""
                r"""|\s++$|\s+(?!\S)|\s""")
GPT4_PATTERN = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+"""
                r"""| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s""")
PATTERNS = {"gpt2": GPT2_PATTERN, "gpt4": GPT4_PATTERN}
BPE_FILE = "tokenizer.json"  # the file name a dataset's meta.json points at


@dataclass
class BPE:
    """A trained byte-level BPE: what encoding, decoding and saving need."""
    pattern_name: str     # "gpt2" or "gpt4"
    pattern: str          # the pre-split regex itself
    vocab: list           # id -> bytes for every ordinary token; ids 0..255 are single bytes
    merges: list          # (id_a, id_b, id) in the order learned; id is the new token
    special_tokens: dict  # str -> id, after the last ordinary id

    @property
    def n_vocab(self):
        return len(self.vocab) + len(self.special_tokens)


@lru_cache(maxsize=None)
def _compile(pattern):
    """The pre-split regex for the trainer (tiktoken compiles its own copy in Rust)."""
    try:
        import regex  # re lacks \p{L} and possessive quantifiers; regex comes with tiktoken
    except ImportError:
        raise UserError("the BPE trainer needs the 'regex' package: "
                             "pip install regex") from None
    return regex.compile(pattern)


def _pattern_by_name(name):
    if name not in PATTERNS:
        raise UserError(f"unknown split pattern {name!r}; choose one of {sorted(PATTERNS)}")
    return PATTERNS[name]


def _count_chunks(texts, pattern, max_chunks=None):
    """Cut every document into pre-split chunks and count each distinct chunk.

    With max_chunks, memory is bounded: whenever twice that many distinct chunks are held, only
    the max_chunks most frequent are kept (ties: first seen), and again at the end. A dropped
    chunk that comes back starts counting afresh; only rare chunks are lost this way.
    """
    if isinstance(texts, str):  # one string is one document, not an iterable of characters
        texts = [texts]
    split = _compile(pattern).findall
    counts = Counter()
    for text in texts:
        counts.update(split(text))
        if max_chunks and len(counts) > 2 * max_chunks:
            counts = Counter(dict(counts.most_common(max_chunks)))
    if max_chunks and len(counts) > max_chunks:
        counts = Counter(dict(counts.most_common(max_chunks)))
    return counts


def _count_pairs(words, freqs):
    """Count adjacent pairs over all chunks, and note which chunks hold each pair."""
    counts = defaultdict(int)
    where = defaultdict(set)
    for wid, (word, freq) in enumerate(zip(words, freqs)):
        for pair in zip(word, word[1:]):
            counts[pair] += freq
            where[pair].add(wid)
    return counts, where


def _merge_word(word, a, b, new):
    """Replace each (a, b) in word by new, scanning left to right ("aaa" -> "aa" "a")."""
    out = []
    i = 0
    while i < len(word):
        if word[i] == a and i + 1 < len(word) and word[i + 1] == b:
            out.append(new)
            i += 2
        else:
            out.append(word[i])
            i += 1
    return out


def _apply_merge(pair, new, words, freqs, counts, where):
    """Merge pair into new in the chunks that hold it; return the pairs whose counts grew."""
    a, b = pair
    grown = set()
    for wid in where.pop(pair):
        word = words[wid]
        merged = _merge_word(word, a, b, new)
        if len(merged) == len(word):  # stale entry: an earlier merge already took this pair
            continue
        freq = freqs[wid]
        for p in zip(word, word[1:]):
            counts[p] -= freq
        for p in zip(merged, merged[1:]):
            counts[p] += freq
            where[p].add(wid)
            if new in p:  # only pairs holding the new token can grow; the rest only shrink
                grown.add(p)
        words[wid] = merged
    del counts[pair]  # every occurrence is merged, so its count is now 0
    return grown


def _pop_best(heap, counts):
    """Pop the pair with the highest count (then the smallest ids); None when no pair is left.

    Heap entries are (-count, pair), the count when pushed. A pair's count only shrinks after
    a push, or else the merge loop pushes it again, so every live pair has an entry at least
    as high as its count: an entry whose count is still right is the true maximum, and a
    stale one is re-filed under its current count (or dropped at zero).
    """
    while heap:
        neg_count, pair = heapq.heappop(heap)
        count = counts.get(pair, 0)
        if count == -neg_count:
            return pair, count
        if count > 0:
            heapq.heappush(heap, (-count, pair))
    return None, 0


def train_bpe(texts, vocab_size, pattern="gpt4", special_tokens=("<|endoftext|>",), verbose=False,
              max_chunks=None):
    """Learn a byte-level BPE of vocab_size tokens (special tokens included) from texts.

    texts: an iterable of documents (str); pattern: "gpt2" or "gpt4", the pre-split regex;
    max_chunks: train on at most this many distinct chunks, the most frequent (bounds memory:
    about 1 KB each); None keeps all.
    """
    pattern_str = _pattern_by_name(pattern)
    if isinstance(special_tokens, str):  # one token, not a list of its characters
        special_tokens = [special_tokens]
    special_tokens = list(dict.fromkeys(special_tokens))  # drop repeats, keep order
    n_ordinary = vocab_size - len(special_tokens)
    if n_ordinary < 256:
        raise UserError(f"vocab_size {vocab_size} is too small: a byte-level BPE needs 256 "
                             f"byte tokens plus {len(special_tokens)} special tokens")

    chunk_counts = _count_chunks(texts, pattern_str, max_chunks)
    words = [list(chunk.encode("utf-8")) for chunk in chunk_counts]  # each chunk as byte ids
    freqs = list(chunk_counts.values())
    counts, where = _count_pairs(words, freqs)
    heap = [(-count, pair) for pair, count in counts.items()]
    heapq.heapify(heap)

    vocab = [bytes([i]) for i in range(256)]
    id_of = {piece: i for i, piece in enumerate(vocab)}
    merges = []
    while len(vocab) < n_ordinary:
        pair, count = _pop_best(heap, counts)
        if pair is None:  # every chunk is a single token: nothing left to merge
            break
        piece = vocab[pair[0]] + vocab[pair[1]]
        new = id_of.get(piece)
        if new is None:  # the usual case: new bytes, new token
            new = len(vocab)
            vocab.append(piece)
            id_of[piece] = new
        merges.append((pair[0], pair[1], new))
        for p in _apply_merge(pair, new, words, freqs, counts, where):
            heapq.heappush(heap, (-counts[p], p))
        if verbose and (len(merges) % 256 == 0 or len(vocab) == n_ordinary):
            print(f"merge {len(merges)}: {pair} -> {new} {piece!r} ({count} times)")

    if verbose and len(vocab) < n_ordinary:
        print(f"the corpus ran out of pairs: {len(vocab) + len(special_tokens)} tokens, "
              f"not {vocab_size}")
    specials = {s: len(vocab) + i for i, s in enumerate(special_tokens)}
    return BPE(pattern, pattern_str, vocab, merges, specials)


def reference_encode(bpe, text):
    """Encode text the slow, plain way: in each chunk, apply the learned merges in order.

    For tests: tiktoken with our ranks must give the same ids. Special tokens are ordinary text.
    """
    merge_index = {(a, b): i for i, (a, b, _) in enumerate(bpe.merges)}
    ids = []
    for chunk in _compile(bpe.pattern).findall(text):
        word = list(chunk.encode("utf-8"))
        while True:
            # the earliest-learned merge that applies to this chunk now, if any
            found = [merge_index[p] for p in zip(word, word[1:]) if p in merge_index]
            if not found:
                break
            a, b, new = bpe.merges[min(found)]
            word = _merge_word(word, a, b, new)
        ids.extend(word)
    return ids


def _piece_text(piece):
    """Bytes as readable text: UTF-8 where valid, \\xNN escapes elsewhere."""
    return piece.decode("utf-8", errors="backslashreplace")


def _json_list(items):
    """A JSON list with one item per line, so the file reads top to bottom."""
    return "[\n" + ",\n".join("  " + json.dumps(x, ensure_ascii=False) for x in items) + "\n ]"


def save_bpe(path, bpe):
    """Write bpe as readable JSON; the "vocab" list is for people and is ignored on loading."""
    fields = {
        "kind": "bpe",
        "pattern": {"name": bpe.pattern_name, "regex": bpe.pattern},
        "vocab_size": bpe.n_vocab,
        "special_tokens": bpe.special_tokens,
    }
    pieces = [[i, _piece_text(piece)] for i, piece in enumerate(bpe.vocab)]
    pieces += [[i, s] for s, i in bpe.special_tokens.items()]
    parts = [f" {json.dumps(k)}: {json.dumps(v, ensure_ascii=False)}" for k, v in fields.items()]
    parts.append(f' "merges": {_json_list([list(m) for m in bpe.merges])}')
    parts.append(f' "vocab": {_json_list(pieces)}')
    Path(path).write_text("{\n" + ",\n".join(parts) + "\n}\n", encoding="utf-8")


def load_bpe(path):
    """Read a tokenizer.json written by save_bpe; the token bytes are rebuilt from the merges."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        pattern_name, pattern = data["pattern"]["name"], data["pattern"]["regex"]
        merges = [(int(a), int(b), int(new)) for a, b, new in data["merges"]]
        specials = {str(s): int(i) for s, i in data["special_tokens"].items()}
    except OSError as e:
        raise UserError(f"cannot read BPE tokenizer {path}: {e.strerror}") from None
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise UserError(f"{path} is not a BPE tokenizer.json "
                             f"({type(e).__name__}: {e})") from None
    vocab = [bytes([i]) for i in range(256)]
    for a, b, new in merges:
        if not (0 <= a < len(vocab) and 0 <= b < len(vocab) and 0 <= new <= len(vocab)):
            raise UserError(f"{path}: merge {[a, b, new]} uses an id not defined before it")
        if new == len(vocab):
            vocab.append(vocab[a] + vocab[b])
        elif vocab[new] != vocab[a] + vocab[b]:
            raise UserError(f"{path}: merge {[a, b, new]} does not give token {new}'s bytes")
    if sorted(specials.values()) != list(range(len(vocab), len(vocab) + len(specials))):
        raise UserError(f"{path}: special token ids must follow the last merged token")
    return BPE(pattern_name, pattern, vocab, merges, specials)


def bpe_tokenizer(bpe, file=BPE_FILE):
    """Wrap a trained BPE in tiktoken; file is the name meta() records for load_tokenizer. The BPE
    itself stays on the tokenizer (.bpe), for save_bpe to write beside a new dataset."""
    import tiktoken
    enc = tiktoken.Encoding(
        name=f"bpe-{bpe.pattern_name}-{bpe.n_vocab}",
        pat_str=bpe.pattern,
        mergeable_ranks={piece: i for i, piece in enumerate(bpe.vocab)},  # rank = id
        special_tokens=dict(bpe.special_tokens),
        explicit_n_vocab=bpe.n_vocab,  # checks that ids run 0..n_vocab-1 without holes
    )
    tok = TiktokenTokenizer(enc, "bpe", {"file": file})
    tok.bpe = bpe
    return tok


def bpe_tokenizer_from_file(path):
    return bpe_tokenizer(load_bpe(path), Path(path).name)


# ----------------------------------------------------------------------------- Hugging Face tokenizers

# Llama 3's pre-split regex and special tokens (Meta's llama3 tokenizer.py)
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                   "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|step_id|>",
                   "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"]
BOS_NAMES = ("<|begin_of_text|>", "<|endoftext|>")  # what a prompt starts with, by name, when config.json is silent
STOP_NAMES = ("<|end_of_text|>", "<|eot_id|>", "<|endoftext|>")  # where generation stops, likewise


def _byte_decoder():
    """GPT-2's byte-level alphabet inverted: the printable character standing for each byte -> the byte."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def _json_pattern(path, pre):
    """The pre-split regex of a tokenizer.json's pre_tokenizer (a Split with a Regex, or ByteLevel's own)."""
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    pattern = None
    for step in steps:
        if step.get("type") == "Split" and "Regex" in step.get("pattern", {}):
            pattern = step["pattern"]["Regex"]
        elif step.get("type") == "ByteLevel":
            if step.get("add_prefix_space"):
                raise UserError(f"{path}: add_prefix_space is not supported")
            if step.get("use_regex", True):
                pattern = GPT2_PATTERN
        else:
            raise UserError(f"{path}: pre-tokenizer {step.get('type')!r} is not supported")
    if pattern is None:
        raise UserError(f"{path}: no byte-level pre-tokenizer found")
    return pattern


def _from_tokenizer_json(path):
    """(pattern, ranks, specials) of a byte-level BPE tokenizer.json, if tiktoken can reproduce it."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"could not read {path} ({type(e).__name__})") from None
    model = data.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback") or data.get("normalizer") \
            or model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
        raise UserError(f"{path}: only byte-level BPE without a normalizer can be read through tiktoken")
    pattern = _json_pattern(path, data.get("pre_tokenizer") or {})
    decode = _byte_decoder()
    try:
        ranks = {bytes(decode[ch] for ch in piece): i for piece, i in model["vocab"].items()}
    except KeyError:
        raise UserError(f"{path}: the vocabulary is not byte-level (a piece uses a character outside "
                        f"GPT-2's byte alphabet)") from None
    last = -1
    for m in model.get("merges", []):  # tiktoken merges by rank: the merge order must be the id order
        a, b = m.split(" ", 1) if isinstance(m, str) else m
        rank = ranks.get(bytes(decode[ch] for ch in a + b))
        if rank is None or rank < last:  # equal: two splits of one token (tokenizers converted from tiktoken)
            raise UserError(f"{path}: merges are not in the order of token ids; tiktoken cannot reproduce them")
        last = rank
    if any(bytes([b]) not in ranks for b in range(256)):
        raise UserError(f"{path}: the vocabulary lacks some of the 256 single bytes")
    specials = {}
    for t in data.get("added_tokens", []):  # special tokens are never produced from text (encode_ordinary)
        ranks.pop(t["content"].encode("utf-8"), None)
        specials[t["content"]] = t["id"]
    return pattern, ranks, specials


def _from_tiktoken_file(path):
    """(pattern, ranks, specials) of Meta's tokenizer.model for Llama 3: base64 token and rank per line."""
    ranks = {}
    try:
        for line in Path(path).read_text(encoding="utf-8").splitlines():
            if line:
                token, rank = line.split()
                ranks[base64.b64decode(token)] = int(rank)
    except (ValueError, UnicodeDecodeError):
        raise UserError(f"{path} is not a tiktoken BPE file (a SentencePiece model, as Llama 1 and 2 use, "
                        f"is not supported); provide tokenizer.json") from None
    n = len(ranks)
    names = LLAMA3_SPECIALS + [f"<|reserved_special_token_{i}|>" for i in range(2, 256 - len(LLAMA3_SPECIALS) + 2)]
    return LLAMA3_PATTERN, ranks, {name: n + i for i, name in enumerate(names[:256])}


def hf_tokenizer(meta):
    """A TiktokenTokenizer for a Hugging Face folder's tokenizer.json or tokenizer.model (meta["file"]).
    meta["bos"] and meta["eos"] (a list), when the model's config.json named them, say where a prompt
    starts and where generation stops; otherwise the special tokens are found by name."""
    import tiktoken
    path = meta.get("file", "")
    if not os.path.isfile(path):
        raise UserError(f"tokenizer file {path!r} not found; it was recorded when the model was imported")
    pattern, ranks, specials = (_from_tokenizer_json if path.endswith(".json") else _from_tiktoken_file)(path)
    enc = tiktoken.Encoding(name=f"hf-{Path(path).parent.name}", pat_str=pattern, mergeable_ranks=ranks,
                            special_tokens=specials)
    bos = meta.get("bos")
    if bos is None:
        bos = next((specials[n] for n in BOS_NAMES if n in specials), None)
    stop = list(meta.get("eos") or [specials[n] for n in STOP_NAMES if n in specials])
    eot = specials.get("<|endoftext|>", stop[0] if stop else None)
    return TiktokenTokenizer(enc, "hf", {k: v for k, v in meta.items() if k != "kind"}, eot=eot, bos=bos, stop=stop)


def hf_file_meta(path, bos=None, eos=()):
    """The tokenizer entry for a Hugging Face folder's tokenizer file: a character-level tokenizer.json
    (WordLevel, one character per token, as hf_tokenizer_json writes for char) becomes kind char, any
    other kind hf. Built once here, so that a file tiktoken cannot reproduce is refused now, not later."""
    if str(path).endswith(".json"):
        chars = _char_level_vocab(path)
        if chars is not None:
            return {"kind": "char", "chars": chars}
    meta = {"kind": "hf", "file": str(path), "bos": bos, "eos": list(eos)}
    hf_tokenizer(meta)
    return meta


def _char_level_vocab(path):
    """The alphabet of a character-level tokenizer.json (ids 0..n-1, one character each), or None."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    model, pre = data.get("model") or {}, data.get("pre_tokenizer") or {}
    vocab = model.get("vocab")
    if model.get("type") != "WordLevel" or not isinstance(vocab, dict) or pre.get("type") != "Split":
        return None
    by_id = sorted(vocab.items(), key=lambda kv: kv[1])
    if [i for _, i in by_id] != list(range(len(by_id))) or any(len(ch) != 1 for ch, _ in by_id):
        return None
    return "".join(ch for ch, _ in by_id)


# --- writing tokenizer.json, the format transformers' AutoTokenizer reads (hf.py export)

def _oniguruma(pattern):
    r"""The pre-split regex as the tokenizers library's engine (Oniguruma) reads it the way tiktoken does:
    no possessive quantifiers (it takes \p{N}{1,3}+ as a repeated group; for these patterns the matches are
    the same without them), and \z for $ (its $ also matches before every newline)."""
    pattern = re.sub(r"(?<!\\)([+*?}])\+", r"\1", pattern)
    return re.sub(r"(?<!\\)\$", r"\\z", pattern)


def _merges_from_ranks(ranks):
    """The merges that rebuild tiktoken ranks (bytes -> rank) in order: each token's bytes merged with only
    the tokens ranked before it end as exactly two pieces, its merge."""
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) < 2:
            continue
        parts = [bytes([b]) for b in token]
        while len(parts) > 2:
            scored = [(ranks.get(a + b, rank), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))]
            best, i = min(scored)
            if best >= rank:
                break
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        if len(parts) != 2 or ranks.get(parts[0], rank) >= rank or ranks.get(parts[1], rank) >= rank:
            raise UserError(f"token {token!r} cannot be written as a merge of two earlier tokens")
        merges.append((parts[0], parts[1]))
    return merges


def _specials(tok):
    """{name: id} of a tokenizer's special tokens (none for char)."""
    enc = getattr(tok, "enc", None)
    return {} if enc is None else {s: enc.encode_single_token(s) for s in sorted(enc.special_tokens_set)}


def hf_tokenizer_json(tok):
    """tokenizer.json for tok (char, gpt2 or bpe), encoding as tok does: byte-level BPE with tok's pre-split
    regex, or a character-level WordLevel model. None for a kind this cannot write."""
    added = [{"id": i, "content": s, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
              "special": True} for s, i in _specials(tok).items()]
    base = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
            "post_processor": None}
    if tok.kind == "char":
        return {**base, "pre_tokenizer": {"type": "Split", "pattern": {"Regex": r"[\s\S]"}, "behavior": "Isolated",
                                          "invert": False},
                "decoder": {"type": "Fuse"},
                "model": {"type": "WordLevel", "vocab": {ch: i for i, ch in enumerate(tok.chars)}, "unk_token": "<unk>"}}
    if tok.kind not in ("gpt2", "bpe"):
        return None
    special_ids = set(_specials(tok).values())
    ranks = {tok.enc.decode_single_token_bytes(i): i for i in range(tok.vocab_size) if i not in special_ids}
    if tok.kind == "bpe":
        merges = [(tok.bpe.vocab[a], tok.bpe.vocab[b]) for a, b, _ in tok.bpe.merges]
        pattern = tok.bpe.pattern
    else:
        merges, pattern = _merges_from_ranks(ranks), GPT2_PATTERN
    to_text = {b: c for c, b in _byte_decoder().items()}
    piece = lambda bs: "".join(to_text[b] for b in bs)  # noqa: E731
    return {**base,
            "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": _oniguruma(pattern)}, "behavior": "Isolated",
                 "invert": False},
                {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]},
            "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
            "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                      "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                      "vocab": {piece(bs): i for bs, i in ranks.items()},
                      "merges": [[piece(a), piece(b)] for a, b in merges]}}


def hf_tokenizer_config(tok, max_length):
    """tokenizer_config.json beside it: the fast tokenizer class, and which special token is which."""
    names = {i: s for s, i in _specials(tok).items()}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": max_length,
              "clean_up_tokenization_spaces": False}
    if tok.bos_token in names:
        config["bos_token"] = names[tok.bos_token]
    if tok.eot_token in names:
        config["eos_token"] = names[tok.eot_token]
    return config


# ----------------------------------------------------------------------------- command line

def _read_text(path):
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{path} is not UTF-8 text") from None
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror}") from None


def _cli_tokenizer(kind, data_dir, file):
    """The tokenizer the options name; with no --tokenizer, the one --data or --file implies."""
    if kind is None and file:
        kind = "bpe"
    elif kind is None:
        kind = read_meta(data_dir)["tokenizer"].get("kind") if data_dir else "gpt2"
    if kind == "gpt2":
        return gpt2_tokenizer()
    if kind == "bpe" and file:
        return bpe_tokenizer_from_file(file)
    if data_dir is None:
        extra = " or --file tokenizer.json" if kind == "bpe" else ""
        raise UserError(f"--tokenizer {kind} needs --data DIR, a prepared dataset folder{extra}")
    meta = read_meta(data_dir)["tokenizer"]
    if meta.get("kind") != kind:
        raise UserError(f"{data_dir}/meta.json holds a {meta.get('kind')!r} tokenizer, not {kind!r}")
    return load_tokenizer(meta, data_dir)


def _piece_repr(tokenizer, token):
    piece = tokenizer.decode_bytes([token])
    try:
        return repr(piece.decode("utf-8"))
    except UnicodeDecodeError:  # part of a multi-byte character: show the raw bytes
        return repr(piece)


def show_tokens(tokenizer, text):
    """Print each token of text: its id and its piece."""
    ids = tokenizer.encode(text)
    for token in ids:
        print(f"{token:>7}  {_piece_repr(tokenizer, token)}")
    n_bytes = len(text.encode("utf-8"))
    print(f"{len(ids)} tokens, {n_bytes} bytes, {n_bytes / max(len(ids), 1):.2f} bytes/token")


def bytes_per_token(tokenizer, text):
    return len(text.encode("utf-8")) / max(len(tokenizer.encode(text)), 1)


def bench_train(path, vocab_size, pattern, out=None):
    """Time train_bpe on the file (as one document), then measure bytes/token on it."""
    text = _read_text(path)
    start = time.perf_counter()
    bpe = train_bpe([text], vocab_size, pattern=pattern)
    seconds = time.perf_counter() - start
    print(f"trained {bpe.n_vocab} tokens ({pattern} split) on {len(text.encode('utf-8')):,} bytes "
          f"in {seconds:.2f} s")
    print(f"bytes/token on the same text: {bytes_per_token(bpe_tokenizer(bpe), text):.3f}")
    if out:
        try:
            save_bpe(out, bpe)
        except OSError as e:
            raise UserError(f"cannot write {out}: {e.strerror}") from None
        print(f"saved {out}")


def main(argv):
    p = ArgumentParser(prog="tokenizer.py", description="Look at tokens, measure bytes/token, or time the BPE trainer.")
    p.add_argument("--tokenizer", choices=["char", "gpt2", "bpe"], default=None,
                   help="which tokenizer; by default the one in --data's meta.json, "
                        "bpe with --file, else gpt2")
    p.add_argument("--data", default=None, help="a prepared dataset folder holding meta.json")
    p.add_argument("--file", default=None, help="a BPE tokenizer.json (instead of --data)")
    p.add_argument("--text", default=None, help="print each token of this text: id and piece")
    p.add_argument("--corpus", default=None, help="print bytes/token of this UTF-8 file")
    p.add_argument("--bench_train", default=None, metavar="FILE",
                   help="time training a BPE on FILE and print its bytes/token on FILE")
    p.add_argument("--vocab_size", type=int, default=4096,
                   help="with --bench_train: tokens in all, special tokens included")
    p.add_argument("--pattern", choices=sorted(PATTERNS), default="gpt4",
                   help="with --bench_train: the pre-split regex")
    p.add_argument("--out", default=None, help="with --bench_train: also save the tokenizer here")
    args = p.parse_args(argv)
    if args.text is None and args.corpus is None and args.bench_train is None:
        p.error("nothing to do: give --text, --corpus or --bench_train")
    if args.bench_train is not None:
        bench_train(args.bench_train, args.vocab_size, args.pattern, args.out)
    if args.text is not None or args.corpus is not None:
        tokenizer = _cli_tokenizer(args.tokenizer, args.data, args.file)
        if args.text is not None:
            show_tokens(tokenizer, args.text)
        if args.corpus is not None:
            print(f"{args.corpus}: {bytes_per_token(tokenizer, _read_text(args.corpus)):.3f} "
                  f"bytes/token ({tokenizer.kind}, {tokenizer.vocab_size} tokens)")


if __name__ == "__main__":
    sys.exit(run_cli(main))
