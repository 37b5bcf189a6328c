"""prepare.py: text -> token binaries -> the same text; deterministic; bounded pieces."""

import pytest

import prepare
from conftest import decode_splits, read_split, run_main
from tokenizer import load_tokenizer


def decode_all(out):
    train_text, val_text, meta = decode_splits(out)
    return train_text + val_text, meta


def test_char_round_trip(tmp_path, corpus_text):
    (tmp_path / "in.txt").write_text(corpus_text, encoding="utf-8")
    meta = prepare.prepare(str(tmp_path / "in.txt"), "char", str(tmp_path / "out"))
    text, meta = decode_all(tmp_path / "out")
    assert text == corpus_text
    assert meta["vocab_size"] == len(set(corpus_text)) and meta["dtype"] == "uint16"
    assert meta["train_tokens"] + meta["val_tokens"] == len(corpus_text)
    assert abs(meta["val_tokens"] / len(corpus_text) - 0.1) < 0.01


def test_gpt2_round_trip_ends_documents_with_end_of_text(tmp_path, corpus_text, tiktoken_cache):
    (tmp_path / "in.txt").write_text(corpus_text, encoding="utf-8")
    prepare.prepare(str(tmp_path / "in.txt"), "gpt2", str(tmp_path / "out"))
    train, meta = read_split(tmp_path / "out", "train")
    assert meta["vocab_size"] == 50257 and train[-1] == 50256
    text, _ = decode_all(tmp_path / "out")
    assert text.replace("<|endoftext|>", "") == corpus_text


def test_same_input_gives_the_same_bytes(tmp_path, corpus_text):
    (tmp_path / "in.txt").write_text(corpus_text, encoding="utf-8")
    for name in ("a", "b"):
        prepare.prepare(str(tmp_path / "in.txt"), "char", str(tmp_path / name))
    for f in ("train.bin", "val.bin", "meta.json"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()


@pytest.mark.parametrize("tokenizer", ["char", "gpt2"])
def test_reading_in_small_pieces_gives_the_bytes_of_one_piece(tmp_path, corpus_text, tiktoken_cache, monkeypatch, tokenizer):
    text = corpus_text[:30_000] + "naïve café — 東京 🙂\n" * 50
    (tmp_path / "in.txt").write_text(text, encoding="utf-8")
    prepare.prepare(str(tmp_path / "in.txt"), tokenizer, str(tmp_path / "whole"))
    monkeypatch.setattr(prepare, "PIECE_BYTES", 997)
    prepare.prepare(str(tmp_path / "in.txt"), tokenizer, str(tmp_path / "pieces"))
    for f in ("train.bin", "val.bin"):
        assert (tmp_path / "whole" / f).read_bytes() == (tmp_path / "pieces" / f).read_bytes()


def test_a_folder_is_split_by_whole_documents(tmp_path):
    folder = tmp_path / "docs"
    folder.mkdir()
    for i in range(40):
        (folder / f"{i:02d}.txt").write_text(f"document number {i}\n" * 20, encoding="utf-8")
    meta = prepare.prepare(str(folder), "char", str(tmp_path / "out"))
    val, _ = read_split(tmp_path / "out", "val")
    tok = load_tokenizer(meta["tokenizer"])
    val_text = tok.decode(val.tolist())
    assert meta["documents"] == 40
    assert val_text == "".join(f"document number {i}\n" * 20 for i in range(9, 40, 10))


def test_a_vocabulary_over_65536_symbols_is_stored_as_uint32(tmp_path):
    chars = [chr(c) for r in ((0x4E00, 0x9FFF), (0xAC00, 0xD7A3), (0x20000, 0x2A6DF)) for c in range(*r)]
    text = "".join(chars) * 2
    (tmp_path / "in.txt").write_text(text, encoding="utf-8")
    meta = prepare.prepare(str(tmp_path / "in.txt"), "char", str(tmp_path / "out"))
    assert meta["vocab_size"] == len(chars) > 65536 and meta["dtype"] == "uint32"
    assert decode_all(tmp_path / "out")[0] == text


@pytest.mark.parametrize("content, message", [
    (None, "not found"),
    (b"", "empty"),
    (b"caf\xe9 latin-1\n" * 10, "not UTF-8"),
])
def test_bad_input_is_one_line_and_a_nonzero_exit(tmp_path, content, message):
    if content is not None:
        (tmp_path / "in.txt").write_bytes(content)
    proc = run_main("prepare.py", "--input", "in.txt", "--out", "data/x", cwd=tmp_path, check=False)
    assert proc.returncode != 0
    assert message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "data" / "x" / "meta.json").exists()


def test_known_corpus_offline_names_the_input_flag(tmp_path):
    proc = run_main("prepare.py", "shakespeare_char", cwd=tmp_path, check=False,
                      env={"http_proxy": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9"})
    if proc.returncode == 0:
        pytest.skip("the network is reachable here")
    assert "--input" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
