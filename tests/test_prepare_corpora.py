"""prepare.py at scale: BPE trained here, .jsonl documents, reused tokenizers, parallel and streamed
encoding that writes the same bytes as one-shot encoding, Chinese text, and bounded pieces."""
import importlib.machinery
import json
import random
import subprocess
import sys
import types

import pytest

import prepare
import tokenizer
from common import run_cli
from conftest import REPO, TINY_MODEL, decode_splits, read_split, run_main
from tokenizer import GPT2_PATTERN, GPT4_PATTERN, _compile, _count_chunks, load_bpe, load_tokenizer

HAN = [chr(c) for c in range(0x4E00, 0x4E00 + 3000)]


def chinese_lines(rng, n_lines):
    """Lines of CJK text with Zipf-like character frequencies, each ending in punctuation (no spaces)."""
    weights = [1 / (i + 1) for i in range(len(HAN))]
    return "".join("".join(rng.choices(HAN, weights, k=rng.randint(5, 30))) + rng.choice("。，！？")
                   + "\n" for _ in range(n_lines))


def write_jsonl(path, docs, field="text"):
    path.write_text("".join(json.dumps({field: d, "id": i}, ensure_ascii=False) + "\n"
                            for i, d in enumerate(docs)), encoding="utf-8")


def same_outputs(a, b, files=("train.bin", "val.bin", "meta.json")):
    return all((a / f).read_bytes() == (b / f).read_bytes() for f in files)


# ----------------------------------------------------------------------------- safe cuts

@pytest.mark.parametrize("pattern", [GPT2_PATTERN, GPT4_PATTERN], ids=["gpt2", "gpt4"])
def test_cutting_at_any_safe_place_leaves_the_pre_split_chunks_unchanged(pattern):
    rng = random.Random(0)
    alphabet = list("ab Z9 \n\n  \t.,'!?-") + ["'s", "'ll", "don't", "1234", "é", "東京", "。", "\r\n", "🙂",
                                                "²", "Ⅻ", "e\u0301", "\u00a0", "\u2028", "\x1c", "_"]
    text = "".join(rng.choice(alphabet) for _ in range(2000))
    split = _compile(pattern).findall
    cuts = [m.end() for m in prepare.SAFE_CUT.finditer(text)]
    assert len(cuts) > 150
    whole = split(text)
    for i in cuts:
        assert split(text[:i]) + split(text[i:]) == whole, (i, text[i - 5:i + 5])


def test_text_with_no_line_ending_in_a_letter_is_still_read_in_bounded_pieces(tmp_path, monkeypatch):
    text = chinese_lines(random.Random(1), 400)  # every line ends in punctuation, and no spaces
    (tmp_path / "in.txt").write_text(text, encoding="utf-8")
    monkeypatch.setattr(prepare, "PIECE_BYTES", 1000)
    pieces = list(prepare.read_pieces(str(tmp_path / "in.txt")))
    assert "".join(pieces) == text and len(pieces) > 10
    assert max(len(p.encode("utf-8")) for p in pieces) < 2000


def test_text_with_no_safe_place_at_all_is_cut_after_max_carry_pieces(tmp_path, monkeypatch):
    text = "".join(HAN[:500]) * 40  # one long run of letters: no space, no line break
    (tmp_path / "in.txt").write_text(text, encoding="utf-8")
    monkeypatch.setattr(prepare, "PIECE_BYTES", 1000)
    pieces = list(prepare.read_pieces(str(tmp_path / "in.txt")))
    assert "".join(pieces) == text
    assert max(len(p.encode("utf-8")) for p in pieces) <= (prepare.MAX_CARRY + 1) * 1000


# ----------------------------------------------------------------------------- same bytes, however encoded

@pytest.mark.parametrize("tokenizer", ["char", "gpt2", "bpe"])
def test_parallel_encoding_writes_the_bytes_of_serial_encoding(tmp_path, corpus_text, tiktoken_cache,
                                                                monkeypatch, tokenizer):
    text = corpus_text[:40_000] + chinese_lines(random.Random(2), 200)
    (tmp_path / "in.txt").write_text(text, encoding="utf-8")
    kw = {"vocab_size": 400} if tokenizer == "bpe" else {}
    prepare.prepare(str(tmp_path / "in.txt"), tokenizer, str(tmp_path / "serial"), workers=1, **kw)
    monkeypatch.setattr(prepare, "PIECE_BYTES", 997)  # many small batches in flight at once
    prepare.prepare(str(tmp_path / "in.txt"), tokenizer, str(tmp_path / "parallel"), workers=4, **kw)
    assert same_outputs(tmp_path / "serial", tmp_path / "parallel")
    if tokenizer == "bpe":
        assert (tmp_path / "serial" / "tokenizer.json").read_bytes() == \
            (tmp_path / "parallel" / "tokenizer.json").read_bytes()


def peak_rss_mb(*args, cwd):
    """Peak resident memory of `python prepare.py args`, measured by a fresh parent that runs only it."""
    probe = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, capture_output=True); "
             "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    out = subprocess.run([sys.executable, "-c", probe, sys.executable, str(REPO / "prepare.py"), *args],
                         cwd=cwd, capture_output=True, text=True, check=True).stdout
    return int(out) / 1024


@pytest.mark.slow
def test_peak_memory_does_not_grow_with_the_input(tmp_path, corpus_text, tiktoken_cache):
    for mb in (8, 32):
        with open(tmp_path / f"{mb}.txt", "w", encoding="utf-8") as f:
            for _ in range(mb * 1_000_000 // len(corpus_text)):
                f.write(corpus_text)
    small, large = (peak_rss_mb("--input", f"{mb}.txt", "--tokenizer", "gpt2", "--out", f"out{mb}", cwd=tmp_path)
                    for mb in (8, 32))
    assert large < small + 16 and large < 300, (small, large)


def test_jsonl_in_small_batches_writes_the_bytes_of_encoding_each_document_alone(tmp_path, tiktoken_cache,
                                                                                 monkeypatch):
    rng = random.Random(3)
    docs = [f"Document {i}: " + " ".join(rng.choice(["to", "be", "東京", "naïve", "<|endoftext|>"])
                                        for _ in range(rng.randint(0, 60))) for i in range(50)]
    write_jsonl(tmp_path / "docs.jsonl", docs)
    monkeypatch.setattr(prepare, "PIECE_BYTES", 100)
    meta = prepare.prepare(str(tmp_path / "docs.jsonl"), "gpt2", str(tmp_path / "out"), workers=3)
    tok = load_tokenizer(meta["tokenizer"])
    expected = {"train": [], "val": []}
    for i, doc in enumerate(docs):  # "<|endoftext|>" inside a document is text, not the separator
        expected["val" if (i + 1) % 10 == 0 else "train"] += tok.encode(doc) + [tok.eot_token]
    for split in ("train", "val"):
        assert read_split(tmp_path / "out", split)[0].tolist() == expected[split]
    assert meta["documents"] == 50


def test_jsonl_documents_go_whole_to_train_or_val(tmp_path):
    docs = [f"document number {i}\n" * 3 for i in range(40)]
    write_jsonl(tmp_path / "docs.jsonl", docs)
    train, val, meta = decode_splits_of(tmp_path, "docs.jsonl", "char")
    assert val == "".join(docs[9::10]) and train == "".join(d for i, d in enumerate(docs) if (i + 1) % 10)
    assert meta["documents"] == 40


def decode_splits_of(tmp_path, name, tokenizer, *args):
    run_main("prepare.py", "--input", name, "--tokenizer", tokenizer, "--out", "out", *args, cwd=tmp_path)
    return decode_splits(tmp_path / "out")


def test_a_jsonl_field_is_chosen_with_text_field_and_a_missing_one_is_one_line(tmp_path):
    write_jsonl(tmp_path / "docs.jsonl", [f"doc {i}\n" for i in range(30)], field="content")
    train, val, _ = decode_splits_of(tmp_path, "docs.jsonl", "char", "--text_field", "content")
    assert val == "doc 9\ndoc 19\ndoc 29\n"
    proc = run_main("prepare.py", "--input", "docs.jsonl", "--out", "x", cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "line 1 has no text field 'text'" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and not (tmp_path / "x").exists()


def test_a_broken_jsonl_line_names_the_file_and_line(tmp_path):
    (tmp_path / "docs.jsonl").write_text('{"text": "a"}\n\n{"text": "b"\n', encoding="utf-8")
    proc = run_main("prepare.py", "--input", "docs.jsonl", "--out", "x", cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "docs.jsonl line 3 is not a JSON object" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_a_folder_of_jsonl_files_reads_them_in_name_order(tmp_path):
    (tmp_path / "docs").mkdir()
    write_jsonl(tmp_path / "docs" / "b.jsonl", [f"b{i}\n" for i in range(20)])
    write_jsonl(tmp_path / "docs" / "a.jsonl", [f"a{i}\n" for i in range(20)])
    train, val, meta = decode_splits_of(tmp_path, "docs", "char")
    assert val == "a9\na19\nb9\nb19\n" and meta["documents"] == 40


# ----------------------------------------------------------------------------- BPE trained here, reused tokenizers

def test_bpe_prepare_then_train_then_sample_end_to_end(tmp_path, corpus_text):
    (tmp_path / "input.txt").write_text(corpus_text, encoding="utf-8")
    proc = run_main("prepare.py", "--input", "input.txt", "--tokenizer", "bpe", "--vocab_size", "512",
                      "--out", "data/tiny", cwd=tmp_path)
    assert "trained a 512-token BPE" in proc.stdout
    meta = json.loads((tmp_path / "data" / "tiny" / "meta.json").read_text())
    assert meta["tokenizer"] == {"kind": "bpe", "file": "tokenizer.json"} and meta["vocab_size"] == 512
    assert load_bpe(tmp_path / "data" / "tiny" / "tokenizer.json").n_vocab == 512
    train, val, _ = decode_splits(tmp_path / "data" / "tiny")
    assert (train + val).replace("<|endoftext|>", "") == corpus_text
    run_main("train.py", *TINY_MODEL, "--out_dir=out", "--max_iters=5", "--eval_interval=5", cwd=tmp_path)
    (tmp_path / "elsewhere").mkdir()  # sample.py finds the tokenizer through the checkpoint, from anywhere
    proc = run_main("sample.py", f"--out_dir={tmp_path / 'out'}", "--start=ROMEO:", "--num_samples=1",
                      "--max_new_tokens=10", "--device=cpu", cwd=tmp_path / "elsewhere")
    assert proc.stdout.startswith("ROMEO:") and len(proc.stdout) > len("ROMEO:\n---------------\n")
    proc = run_main("tokenizer.py", "--data", "data/tiny", "--text", "To be, or not", cwd=tmp_path)
    tok = load_tokenizer(meta["tokenizer"], str(tmp_path / "data" / "tiny"))
    printed = [int(line.split()[0]) for line in proc.stdout.splitlines()[:-1]]
    assert printed == tok.encode("To be, or not") and len(printed) < len("To be, or not")


def test_bpe_prepare_writes_the_tokenizer_beside_the_dataset_and_decodes_exactly(tmp_path, corpus_text):
    (tmp_path / "in.txt").write_text(corpus_text[:50_000], encoding="utf-8")
    meta = prepare.prepare(str(tmp_path / "in.txt"), "bpe", str(tmp_path / "out"), vocab_size=300)
    assert meta["tokenizer"] == {"kind": "bpe", "file": "tokenizer.json"} and meta["vocab_size"] == 300
    train, val, _ = decode_splits(tmp_path / "out")
    assert train.endswith("<|endoftext|>") and (train + val).replace("<|endoftext|>", "") == corpus_text[:50_000]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["meta.json", "tokenizer.json", "train.bin",
                                                                   "val.bin"]


def test_tokenizer_cli_shows_the_tokens_of_a_prepared_bpe_folder(tmp_path, corpus_text, capsys):
    (tmp_path / "in.txt").write_text(corpus_text[:30_000], encoding="utf-8")
    meta = prepare.prepare(str(tmp_path / "in.txt"), "bpe", str(tmp_path / "out"), vocab_size=300)
    capsys.readouterr()
    assert run_cli(tokenizer.main, ["--data", str(tmp_path / "out"), "--text", "the king"]) == 0
    printed = [int(line.split()[0]) for line in capsys.readouterr().out.splitlines()[:-1]]
    assert printed == load_tokenizer(meta["tokenizer"], str(tmp_path / "out")).encode("the king")
    assert len(printed) < len("the king")


def test_bpe_train_bytes_trains_the_tokenizer_on_the_start_of_the_train_split_only(tmp_path, corpus_text,
                                                                                     monkeypatch):
    english, chinese = corpus_text[:20_000], chinese_lines(random.Random(4), 1500)
    (tmp_path / "in.txt").write_text(english + chinese, encoding="utf-8")
    monkeypatch.setattr(prepare, "PIECE_BYTES", 2000)
    for name, cap in (("all", None), ("capped", 15_000)):
        prepare.prepare(str(tmp_path / "in.txt"), "bpe", str(tmp_path / name), vocab_size=400, bpe_train_bytes=cap)
    cjk_tokens = {name: sum(1 for piece in load_bpe(tmp_path / name / "tokenizer.json").vocab[256:]
                            if 0xE4 <= piece[0] <= 0xE9) for name in ("all", "capped")}
    assert cjk_tokens["all"] > 50 and cjk_tokens["capped"] == 0


def test_bpe_training_keeps_only_the_most_frequent_chunks_when_capped():
    rare = [" q" + chr(97 + i % 26) + chr(97 + i // 26) for i in range(100)]  # 100 distinct, once each
    texts = ["the the the cat cat dog"] * 3 + rare
    counts = _count_chunks(texts, GPT4_PATTERN, max_chunks=3)
    assert counts == {" the": 6, " cat": 6, "the": 3}  # "the" ties " dog" at 3 and was seen first
    assert len(_count_chunks(texts, GPT4_PATTERN)) == 104


def test_tokenizer_from_reuses_a_bpe_vocabulary(tmp_path, corpus_text):
    (tmp_path / "base.txt").write_text(corpus_text[:30_000], encoding="utf-8")
    (tmp_path / "new.txt").write_text(corpus_text[30_000:40_000], encoding="utf-8")
    run_main("prepare.py", "--input", "base.txt", "--tokenizer", "bpe", "--vocab_size", "300", "--out", "base",
               cwd=tmp_path)
    run_main("prepare.py", "--input", "new.txt", "--tokenizer_from", "base", "--out", "new", cwd=tmp_path)
    assert (tmp_path / "new" / "tokenizer.json").read_bytes() == (tmp_path / "base" / "tokenizer.json").read_bytes()
    base_meta, new_meta = (json.loads((tmp_path / d / "meta.json").read_text()) for d in ("base", "new"))
    assert new_meta["tokenizer"] == base_meta["tokenizer"] and new_meta["vocab_size"] == 300
    tok = load_tokenizer(base_meta["tokenizer"], str(tmp_path / "base"))
    train, _ = read_split(tmp_path / "new", "train")
    cut = prepare.split_point(str(tmp_path / "new.txt"), 0.1)
    assert train.tolist() == tok.encode(corpus_text[30_000:30_000 + cut]) + [tok.eot_token]


def test_tokenizer_from_a_char_dataset_keeps_its_alphabet_and_names_unknown_characters(tmp_path):
    (tmp_path / "base.txt").write_text("abc abc\n" * 50, encoding="utf-8")
    (tmp_path / "ok.txt").write_text("cab\n" * 50, encoding="utf-8")
    (tmp_path / "bad.txt").write_text("cab\n" * 50 + "xyz\n", encoding="utf-8")
    run_main("prepare.py", "--input", "base.txt", "--out", "base", cwd=tmp_path)
    run_main("prepare.py", "--input", "ok.txt", "--tokenizer_from", "base", "--out", "ok", cwd=tmp_path)
    assert json.loads((tmp_path / "ok" / "meta.json").read_text())["tokenizer"]["chars"] == "\n abc"
    proc = run_main("prepare.py", "--input", "bad.txt", "--tokenizer_from", "base", "--out", "bad",
                      cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "'x', 'y', 'z'" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and not (tmp_path / "bad").exists()


def test_tokenizer_from_a_folder_without_a_dataset_is_one_line(tmp_path):
    (tmp_path / "in.txt").write_text("abc\n" * 50, encoding="utf-8")
    proc = run_main("prepare.py", "--input", "in.txt", "--tokenizer_from", "nowhere", cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "nowhere" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


# ----------------------------------------------------------------------------- Chinese

def test_chinese_corpus_trains_encodes_and_decodes_exactly_with_bpe(tmp_path):
    text = chinese_lines(random.Random(5), 1500)
    (tmp_path / "zh.txt").write_text(text, encoding="utf-8")
    train, val, meta = decode_splits_of(tmp_path, "zh.txt", "bpe", "--vocab_size", "600")
    assert meta["vocab_size"] == 600 and (train + val).replace("<|endoftext|>", "") == text
    bytes_per_token = len(text.encode("utf-8")) / (meta["train_tokens"] + meta["val_tokens"])
    assert bytes_per_token > 2.0  # the frequent 3-byte characters became single tokens


def test_chinese_char_prepare_has_an_alphabet_of_thousands_of_symbols(tmp_path):
    text = chinese_lines(random.Random(6), 3000)
    (tmp_path / "zh.txt").write_text(text, encoding="utf-8")
    train, val, meta = decode_splits_of(tmp_path, "zh.txt", "char")
    assert meta["vocab_size"] == len(set(text)) > 2500 and train + val == text


# ----------------------------------------------------------------------------- progress and known corpora

def test_progress_reports_megabytes_per_second_on_stderr(capsys):
    progress = prepare.Progress("encoding", total=4_000_000, delay=0)
    progress.add(2_000_000)
    progress.close()
    err = capsys.readouterr().err
    assert "encoding: 2.0 MB of 4.0 MB (50%)" in err and "MB/s" in err


def test_a_short_run_prints_no_progress(tmp_path):
    (tmp_path / "in.txt").write_text("abc\n" * 50, encoding="utf-8")
    proc = run_main("prepare.py", "--input", "in.txt", "--out", "out", cwd=tmp_path)
    assert proc.stderr == "" and "MB/s" in proc.stdout


def test_a_hugging_face_corpus_is_streamed_and_split_by_document(tmp_path, monkeypatch):
    calls = []

    def load_dataset(path, config, split, streaming):
        calls.append((path, config, split, streaming))
        return iter([{"text": f"row {i}\n", "url": "x"} for i in range(30)])
    fake = types.ModuleType("datasets")
    fake.__spec__, fake.load_dataset = importlib.machinery.ModuleSpec("datasets", None), load_dataset
    monkeypatch.setitem(sys.modules, "datasets", fake)
    monkeypatch.setattr(prepare, "hub_reachable", lambda: True)
    meta = prepare.prepare(None, "char", str(tmp_path / "out"), hf_name="fineweb-edu")
    assert calls == [("HuggingFaceFW/fineweb-edu", "sample-10BT", "train", True)] * 2  # alphabet, then encoding
    train, val, _ = decode_splits(tmp_path / "out")
    assert val == "row 9\nrow 19\nrow 29\n" and meta["documents"] == 30


@pytest.mark.parametrize("name", ["openwebtext", "fineweb-edu"])
def test_a_hugging_face_corpus_offline_is_one_line(tmp_path, tiktoken_cache, name):
    proc = run_main("prepare.py", name, cwd=tmp_path, check=False, env={"HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert "pip install datasets" in proc.stderr or "--input" in proc.stderr
    assert not (tmp_path / "data" / name).exists()


@pytest.mark.parametrize("args, message", [
    (["--tokenizer", "char", "--vocab_size", "300"], "only apply to --tokenizer bpe"),
    (["--tokenizer", "bpe", "--vocab_size", "100"], "at least 257"),
    (["--tokenizer", "gpt2", "--tokenizer_from", "x"], "either --tokenizer or --tokenizer_from"),
    (["--workers", "0"], "--workers"),
])
def test_bad_options_are_one_line(tmp_path, args, message):
    (tmp_path / "in.txt").write_text("abc\n" * 50, encoding="utf-8")
    proc = run_main("prepare.py", "--input", "in.txt", *args, cwd=tmp_path, check=False)
    assert proc.returncode == 2 and message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
