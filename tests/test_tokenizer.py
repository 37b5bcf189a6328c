"""Tests for tokenizer.py: the byte-level BPE trainer, its tiktoken encoder, and the char tokenizer.

Small corpora only; the whole file runs in a few seconds on one CPU core.
"""
import json
import os
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from anywhere: tokenizer.py lives in the repo root

from tokenizer import (  # noqa: E402
    GPT2_PATTERN, PATTERNS, CharTokenizer, StreamDecoder, _compile, _merge_word,
    bpe_tokenizer, bpe_tokenizer_from_file, gpt2_tokenizer, load_bpe, load_tokenizer, main,
    reference_encode, save_bpe, train_bpe,
)
from common import UserError, run_cli  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared"
SHAKESPEARE = SHARED / "data" / "tinyshakespeare" / "input.txt"
FALLBACK_ENGLISH = ("First Citizen:\nBefore we proceed any further, hear me speak.\n\n"
                    "All:\nSpeak, speak.\n\nFirst Citizen:\nYou are all resolved rather to die "
                    "than to famish?\n\nAll:\nResolved. resolved.\n\n") * 40

# code point ranges for random text: ASCII, Latin, Greek, Cyrillic, CJK, kana, Hangul, emoji
RANGES = [(0x20, 0x7E), (0xA0, 0x24F), (0x370, 0x3FF), (0x400, 0x4FF), (0x4E00, 0x9FFF),
          (0x3040, 0x30FF), (0xAC00, 0xD7A3), (0x1F300, 0x1FAFF), (0x300, 0x36F)]
MIXED = ("Hello 👋🏽 世界! Ça va? 👨‍👩‍👧 日本語のテキスト. Ελληνικά, русский, 한국어.\n"
         "Numbers 1234567 and 'quotes' don't   break\t\ttabs\n\n🙂🙃 終わり")
CHINESE_WORDS = ["我们", "今天", "天气", "很好", "学习", "中文", "的", "是", "一个", "人工智能",
                 "模型", "训练", "数据", "语言", "世界", "你好", "朋友", "时间", "问题", "我"]


def english():
    return SHAKESPEARE.read_text(encoding="utf-8") if SHAKESPEARE.exists() else FALLBACK_ENGLISH


def random_text(rng, n_chars):
    out = []
    for _ in range(n_chars):
        if rng.random() < 0.15:
            out.append(rng.choice(" \n\t"))
        else:
            lo, hi = rng.choice(RANGES)
            out.append(chr(rng.randint(lo, hi)))
    return "".join(out)


def chinese_text(rng, n_words):
    out = []
    for _ in range(n_words):
        out.append(rng.choice(CHINESE_WORDS))
        if rng.random() < 0.2:
            out.append(rng.choice("，。\n"))
    return "".join(out)


def naive_train(texts, vocab_size, pattern="gpt4"):
    """The textbook trainer: recount every pair each step, take the best (count, then ids)."""
    chunks = Counter()
    for text in texts:
        chunks.update(_compile(PATTERNS[pattern]).findall(text))
    words = [list(c.encode("utf-8")) for c in chunks]
    freqs = list(chunks.values())
    merges = []
    while 256 + len(merges) < vocab_size - 1:  # one special token
        counts = Counter()
        for word, freq in zip(words, freqs):
            for pair in zip(word, word[1:]):
                counts[pair] += freq
        if not counts:
            break
        a, b = min(counts, key=lambda p: (-counts[p], p))
        new = 256 + len(merges)
        merges.append((a, b, new))
        words = [_merge_word(w, a, b, new) for w in words]
    return merges


@pytest.fixture(scope="module")
def mixed_bpe():
    """A small BPE trained on English plus random mixed-script text."""
    rng = random.Random(0)
    texts = [english()[:100_000], random_text(rng, 3000), MIXED]
    return train_bpe(texts, 700)


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    tool = SHARED / "tools" / "tiktoken_offline_cache.py"
    if not tool.exists():
        pytest.skip(f"no offline GPT-2 vocabulary ({tool} is absent)")
    cache = tmp_path_factory.mktemp("tiktoken_cache")
    subprocess.run([sys.executable, str(tool), str(cache)], check=True, capture_output=True)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TIKTOKEN_CACHE_DIR", str(cache))
        yield gpt2_tokenizer()


# ----------------------------------------------------------------------------- trainer

def test_first_merges_on_word_frequency_corpus_match_hand_computed():
    # low x5, lower x2, newest x6, widest x3 (each word a document, so one chunk each)
    texts = ["low"] * 5 + ["lower"] * 2 + ["newest"] * 6 + ["widest"] * 3
    bpe = train_bpe(texts, 256 + 4 + 1)
    # e-s and s-t both occur 9 times: the tie goes to the smaller ids, (101, 115) = "es";
    # then "es"+"t" 9 times; then l-o and o-w tie at 7, (108, 111) = "lo"; then "lo"+"w" 7 times
    pieces = [bpe.vocab[new] for _, _, new in bpe.merges]
    assert pieces == [b"es", b"est", b"lo", b"low"]
    assert bpe.merges[:2] == [(ord("e"), ord("s"), 256), (256, ord("t"), 257)]


def test_overlapping_pairs_merge_left_to_right_as_hand_computed():
    # "aaabdaaabac": a-a occurs 4 times (overlapping), so it is first; "aaab" -> "aa" "a" "b";
    # then aa-a and a-b tie at 2, and (97, 98) < (256, 97); then aa-ab occurs twice
    bpe = train_bpe(["aaabdaaabac"], 256 + 3 + 1)
    assert bpe.merges == [(97, 97, 256), (97, 98, 257), (256, 257, 258)]
    assert reference_encode(bpe, "aaabdaaabac") == [258, ord("d"), 258, ord("a"), ord("c")]


def test_incremental_pair_counts_give_the_same_merges_as_recounting_every_step():
    rng = random.Random(1)
    for _ in range(30):
        alphabet = rng.choice(["ab", "abc", "aab", "ab c", "xyz\n"])
        texts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 40)))
                 for _ in range(rng.randint(1, 6))]
        vocab_size = rng.randint(258, 300)
        assert train_bpe(texts, vocab_size).merges == naive_train(texts, vocab_size), texts
    texts = [english()[:5000], random_text(rng, 300)]
    assert train_bpe(texts, 320).merges == naive_train(texts, 320)


def test_training_is_deterministic_across_runs_and_hash_seeds(tmp_path):
    texts = [english()[:20_000], MIXED]
    assert train_bpe(texts, 400).merges == train_bpe(texts, 400).merges
    # set iteration order changes with the hash seed; the merges must not
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import tokenizer as t; "
            "print(t.train_bpe([open(sys.argv[2], encoding='utf-8').read()], 400).merges)")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(english()[:20_000] + MIXED, encoding="utf-8")
    outputs = {subprocess.run([sys.executable, "-c", code, str(REPO), str(corpus)],
                              env={**os.environ, "PYTHONHASHSEED": seed},
                              capture_output=True, text=True, check=True).stdout
               for seed in ("0", "1")}
    assert len(outputs) == 1


def test_merges_never_cross_pre_split_chunks():
    bpe = train_bpe(["hello world, hello there. " * 50], 400)
    for piece in bpe.vocab[256:]:
        # with GPT-4's split, a space can only open a chunk, never sit inside or end one
        assert b" " not in piece[1:], piece
        assert b"," not in piece[:-1] and b"." not in piece[:-1], piece


def test_every_token_has_distinct_bytes_and_ids_follow_merge_order(mixed_bpe):
    assert len(set(mixed_bpe.vocab)) == len(mixed_bpe.vocab)
    assert [new for _, _, new in mixed_bpe.merges] == list(range(256, len(mixed_bpe.vocab)))


def test_small_corpus_gives_a_smaller_vocabulary_without_holes():
    bpe = train_bpe(["abab"], 1000)  # a-b, then ab-ab; then every chunk is one token
    assert bpe.vocab[256:] == [b"ab", b"abab"]
    assert bpe.special_tokens == {"<|endoftext|>": 258}
    assert bpe_tokenizer(bpe).vocab_size == 259


def test_bad_settings_raise_tokenizer_error():
    with pytest.raises(UserError):
        train_bpe(["abc"], 256)  # no room for the special token
    with pytest.raises(UserError):
        train_bpe(["abc"], 300, pattern="gpt3")


# ----------------------------------------------------------------------------- encoding

def test_random_unicode_round_trips_byte_level(mixed_bpe):
    tok = bpe_tokenizer(mixed_bpe)
    rng = random.Random(2)
    for _ in range(50):
        text = random_text(rng, rng.randint(0, 200))
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        ref_ids = reference_encode(mixed_bpe, text)
        assert b"".join(mixed_bpe.vocab[i] for i in ref_ids) == text.encode()


def test_tiktoken_with_our_ranks_equals_reference_encoder(mixed_bpe):
    tok = bpe_tokenizer(mixed_bpe)
    rng = random.Random(3)
    samples = [english()[100_000:130_000], MIXED, chinese_text(rng, 300)]
    samples += [random_text(rng, 300) for _ in range(20)]
    for text in samples:
        assert tok.encode(text) == reference_encode(mixed_bpe, text)


def test_tiktoken_equals_reference_encoder_with_gpt2_split_too():
    bpe = train_bpe([english()[:50_000], MIXED], 500, pattern="gpt2")
    tok = bpe_tokenizer(bpe)
    for text in [english()[50_000:70_000], MIXED]:
        assert tok.encode(text) == reference_encode(bpe, text)


def test_special_tokens_take_the_last_ids_and_are_never_split_or_produced_by_encode():
    bpe = train_bpe([english()[:20_000]], 300, special_tokens=("<|endoftext|>", "<|pad|>"))
    assert bpe.special_tokens == {"<|endoftext|>": 298, "<|pad|>": 299}
    tok = bpe_tokenizer(bpe)
    assert (tok.vocab_size, tok.eot_token) == (300, 298)
    text = "The end.<|endoftext|>A new start<|pad|>"
    ids = tok.encode(text)  # ordinary text: the special strings are just characters here
    assert 298 not in ids and 299 not in ids
    assert tok.decode(ids) == text and ids == reference_encode(bpe, text)
    special = tok.enc.encode(text, allowed_special="all")  # when asked for, each is one id
    assert special == tok.encode("The end.") + [298] + tok.encode("A new start") + [299]
    assert tok.decode([298]) == "<|endoftext|>"


def test_chinese_corpus_trains_and_encodes_exactly():
    rng = random.Random(4)
    corpus = chinese_text(rng, 1500)  # about 10 KB of UTF-8
    bpe = train_bpe([corpus], 256 + 200 + 1)
    tok = bpe_tokenizer(bpe)
    for text in [corpus, chinese_text(rng, 200), "没见过的字：龘靐齉。"]:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert ids == reference_encode(bpe, text)
    assert len(tok.encode(corpus)) < len(corpus)  # tokens hold whole characters and words
    assert "人工智能".encode() in bpe.vocab


# ----------------------------------------------------------------------------- files

def test_save_load_round_trip_and_load_tokenizer_from_meta(mixed_bpe, tmp_path):
    path = tmp_path / "tokenizer.json"
    save_bpe(path, mixed_bpe)
    assert load_bpe(path) == mixed_bpe
    data = json.loads(path.read_text(encoding="utf-8"))  # plain, readable JSON
    assert data["pattern"] == {"name": "gpt4", "regex": PATTERNS["gpt4"]}
    assert data["merges"][0] == list(mixed_bpe.merges[0])
    assert data["vocab"][-1] == [699, "<|endoftext|>"]
    tok = bpe_tokenizer_from_file(path)
    assert tok.meta() == {"kind": "bpe", "file": "tokenizer.json"}
    again = load_tokenizer(json.loads(json.dumps(tok.meta())), tmp_path)
    assert again.encode(MIXED) == bpe_tokenizer(mixed_bpe).encode(MIXED)


def test_broken_tokenizer_file_raises_tokenizer_error(tmp_path):
    path = tmp_path / "tokenizer.json"
    path.write_text("{}")
    with pytest.raises(UserError):
        load_bpe(path)
    save_bpe(path, train_bpe(["abab"], 300))
    data = json.loads(path.read_text())
    data["merges"][1] = [999, 97, 257]
    path.write_text(json.dumps(data))
    with pytest.raises(UserError):
        load_bpe(path)
    with pytest.raises(UserError):
        load_bpe(tmp_path / "missing.json")


# ----------------------------------------------------------------------------- char and gpt2

def test_char_tokenizer_handles_thousands_of_cjk_symbols():
    chars = [chr(0x4E00 + i) for i in range(5000)]
    random.Random(5).shuffle(chars)
    text = "".join(chars) * 2
    tok = CharTokenizer.from_text(text)
    assert tok.vocab_size == 5000
    assert tok.decode(tok.encode(text)) == text
    rebuilt = load_tokenizer(json.loads(json.dumps(tok.meta(), ensure_ascii=False)))
    assert rebuilt.encode(text) == tok.encode(text)


def test_char_tokenizer_raises_tokenizer_error_on_unknown_characters():
    tok = CharTokenizer.from_text("hello")
    with pytest.raises(UserError, match="'z'"):
        tok.encode("hazel")


def test_gpt2_works_offline_and_shares_our_gpt2_pattern(gpt2):
    assert gpt2.encode("Hello world") == [15496, 995]
    assert gpt2.eot_token == 50256
    assert gpt2.enc._pat_str == GPT2_PATTERN


# ----------------------------------------------------------------------------- streaming

def stream(tokenizer, ids):
    decoder = StreamDecoder(tokenizer)
    parts = [decoder.feed([i]) for i in ids] + [decoder.flush()]
    assert not any("\ufffd" in part for part in parts)
    return "".join(parts)


def test_stream_decoder_one_token_at_a_time_gives_the_exact_text_for_bpe_and_char(mixed_bpe):
    tok = bpe_tokenizer(mixed_bpe)
    ids = tok.encode(MIXED)
    # the test only means something if some token ends inside a multi-byte character
    assert any(not _is_utf8(tok.decode_bytes([i])) for i in ids)
    assert stream(tok, ids) == MIXED
    char = CharTokenizer.from_text(MIXED)
    assert stream(char, char.encode(MIXED)) == MIXED


def test_stream_decoder_one_token_at_a_time_gives_the_exact_text_for_gpt2(gpt2):
    assert stream(gpt2, gpt2.encode(MIXED)) == MIXED


def _is_utf8(data):
    try:
        data.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


# ----------------------------------------------------------------------------- command line

def test_cli_prints_each_piece_and_id(mixed_bpe, tmp_path, capsys):
    save_bpe(tmp_path / "tokenizer.json", mixed_bpe)
    meta = {"tokenizer": {"kind": "bpe", "file": "tokenizer.json"}}
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    assert run_cli(main, ["--data", str(tmp_path), "--text", "To be"]) == 0
    out = capsys.readouterr().out
    ids = bpe_tokenizer(mixed_bpe).encode("To be")
    for token in ids:
        assert f"{token:>7}  " in out
    assert f"{len(ids)} tokens, 5 bytes" in out
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(MIXED, encoding="utf-8")
    assert run_cli(main, ["--file", str(tmp_path / "tokenizer.json"), "--corpus", str(corpus)]) == 0
    assert "bytes/token" in capsys.readouterr().out


def test_cli_errors_are_one_line_with_exit_code_2(tmp_path, capsys):
    (tmp_path / "meta.json").write_text(json.dumps({"tokenizer": {"kind": "char", "chars": "ab"}}))
    assert run_cli(main, ["--data", str(tmp_path), "--text", "abc"]) == 2  # 'c' is not in the alphabet
    assert run_cli(main, ["--data", str(tmp_path / "missing"), "--text", "a"]) == 2
    assert run_cli(main, ["--tokenizer", "bpe", "--data", str(tmp_path), "--text", "a"]) == 2  # not char
    assert run_cli(main, ["--no_such_option"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 4 and all(line.startswith("error: ") for line in err)
