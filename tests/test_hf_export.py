"""hf.py export -> transformers -> hf.py import: the weights and the tokenizer make the round trip. The
exported tokenizer.json is read by transformers' AutoTokenizer, which must encode as ours does."""
import json
import random

import pytest
import torch

from conftest import SHAKESPEARE, TINY_MODEL, one_line_error, prepare_tiny, run_main

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")
import hf  # noqa: E402
from tokenizer import (CharTokenizer, bpe_tokenizer, gpt2_tokenizer, hf_tokenizer_json,  # noqa: E402
                       load_tokenizer, train_bpe)

RANGES = [(0x20, 0x7E), (0xA0, 0x24F), (0x370, 0x3FF), (0x4E00, 0x9FFF), (0x1F300, 0x1FAFF), (0x09, 0x0A)]


def random_text(rng, n):
    """Letters, digits, spaces, tabs and newlines of several scripts and emoji, in runs."""
    out = []
    while len(out) < n:
        lo, hi = rng.choice(RANGES)
        out += [chr(rng.randint(lo, hi)) for _ in range(rng.randint(1, 6))]
        out += rng.choice(["", " ", "  ", "\n", "\n\n", " \n", "123456", "'s ", "\t"])
    return "".join(out)


def shakespeare_lines(corpus_text, n=1000):
    return (SHAKESPEARE.read_text(encoding="utf-8") if SHAKESPEARE.exists() else corpus_text).splitlines()[:n]


def auto_tokenizer(tok, folder):
    """transformers' AutoTokenizer over the tokenizer.json and tokenizer_config.json hf.py writes for tok."""
    folder.mkdir()
    hf.write_tokenizer(tok, folder, 256)
    return transformers.AutoTokenizer.from_pretrained(str(folder))


def same_encoding(ours, theirs, texts):
    for text in texts:
        ids = ours.encode(text)
        assert theirs(text, add_special_tokens=False)["input_ids"] == ids, repr(text)
        assert theirs.decode(ids) == text, repr(text)


@pytest.fixture(scope="module")
def shakespeare_bpe(corpus_text):
    return {pattern: bpe_tokenizer(train_bpe([corpus_text], 600, pattern=pattern)) for pattern in ("gpt2", "gpt4")}


@pytest.mark.parametrize("pattern", ["gpt2", "gpt4"])
def test_our_bpe_exported_encodes_as_ours_in_transformers(shakespeare_bpe, corpus_text, tmp_path, pattern):
    ours = shakespeare_bpe[pattern]
    theirs = auto_tokenizer(ours, tmp_path / "tok")
    rng = random.Random(5)
    same_encoding(ours, theirs, shakespeare_lines(corpus_text) + [random_text(rng, 300) for _ in range(30)])
    assert theirs.eos_token == "<|endoftext|>" and theirs.convert_tokens_to_ids("<|endoftext|>") == ours.eot_token


@pytest.mark.slow  # GPT-2's 50,000 merges, derived and read by transformers: about 5 s
def test_gpt2s_bpe_exported_has_gpt2s_merges_and_encodes_as_tiktoken(corpus_text, tiktoken_cache, tmp_path):
    ours = gpt2_tokenizer()
    exported = hf_tokenizer_json(ours)
    merges_file = SHAKESPEARE.parents[1] / "gpt2" / "vocab.bpe"
    if merges_file.exists():  # the merges derived from tiktoken's ranks are OpenAI's, in order
        reference = [line.split() for line in merges_file.read_text(encoding="utf-8").splitlines()[1:] if line]
        assert exported["model"]["merges"] == reference
    theirs = auto_tokenizer(ours, tmp_path / "tok")
    rng = random.Random(6)
    same_encoding(ours, theirs, shakespeare_lines(corpus_text) + [random_text(rng, 300) for _ in range(30)])


def test_a_char_tokenizer_exports_as_one_token_per_character(corpus_text, tmp_path):
    ours = CharTokenizer(sorted(set(corpus_text)))
    theirs = auto_tokenizer(ours, tmp_path / "tok")
    same_encoding(ours, theirs, shakespeare_lines(corpus_text, 300) + ["a\nb\n\n  c", "To be,\n or not"])
    assert hf.find_tokenizer(tmp_path / "tok", {}) == {"kind": "char", "chars": ours.chars}  # and back in


LLAMA = ["--positions=rope", "--norm=rmsnorm", "--mlp=swiglu", "--bias=False", "--n_kv_head=1",
         "--tie_embeddings=False"]


@pytest.fixture(scope="module")
def bpe_data(tmp_path_factory, corpus_text):
    return prepare_tiny(tmp_path_factory.mktemp("hf_round_trip"), corpus_text[:60_000], "bpe", vocab_size=400)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_export_then_import_samples_the_same_greedy_tokens(bpe_data, family, tmp_path):
    folder = bpe_data
    arch = LLAMA if family == "llama" else []
    run_main("train.py", *TINY_MODEL, *arch, f"--out_dir=ours_{family}", "--max_iters=20", "--eval_interval=20",
             cwd=folder)
    run_main("hf.py", "export", "--ckpt", f"ours_{family}", "--out", tmp_path / "hf", cwd=folder)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    run_main("hf.py", "import", "--src", tmp_path / "hf", "--out", tmp_path / "back", cwd=folder)
    sample = ["--start=ROMEO: To be", "--temperature=0", "--num_samples=1", "--max_new_tokens=16", "--device=cpu",
              "--dtype=float32"]  # within block_size 32: past it ours slides its window, GPT-2's has no positions
    before = run_main("sample.py", f"--out_dir=ours_{family}", *sample, cwd=folder).stdout
    after = run_main("sample.py", f"--out_dir={tmp_path / 'back'}", *sample, cwd=folder).stdout
    assert after == before
    from checkpoint import load_checkpoint, model_from_checkpoint
    original, back = (model_from_checkpoint(load_checkpoint(str(p))).eval()
                      for p in (folder / f"ours_{family}", tmp_path / "back"))
    idx = torch.randint(0, 400, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(back(idx)[0], original(idx)[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(theirs(idx).logits, original(idx)[0], atol=1e-4, rtol=0)
    ours = load_tokenizer(torch.load(folder / f"ours_{family}" / "ckpt.pt", weights_only=True)["tokenizer"],
                          str(folder / "data" / "tiny"))
    ids = tok("ROMEO: To be", add_special_tokens=False)["input_ids"]
    assert ids == ours.encode("ROMEO: To be")
    generated = theirs.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False,
                                attention_mask=torch.ones(1, len(ids), dtype=torch.long))[0].tolist()
    # transformers stops at the eos token, which our sample.py leaves out
    text = tok.decode([i for i in generated if i != ours.eot_token])
    assert before.split("---------------")[0] == text + "\n"


def test_a_classifier_is_refused_in_one_line(tmp_path):
    from dataclasses import asdict
    from model import GPT, GPTConfig
    model = GPT(GPTConfig(block_size=16, vocab_size=20, n_layer=1, n_head=2, n_embd=16, n_classes=2))
    torch.save({"model": model.state_dict(), "model_config": asdict(model.config),
                "tokenizer": {"kind": "char", "chars": "abcdefghijklmnopqrst"}}, tmp_path / "cls.pt")
    one_line_error(run_main("hf.py", "export", "--ckpt", "cls.pt", "--out", "hf", cwd=tmp_path, check=False),
                   "is a classifier")
    assert not (tmp_path / "hf").exists()


def test_lora_adapters_are_folded_into_the_exported_weights(tmp_path):
    from dataclasses import asdict
    from model import GPT, GPTConfig
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=20, n_layer=1, n_head=2, n_embd=16, lora_rank=2)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(0, 0.5)
    torch.save({"model": model.state_dict(), "model_config": asdict(model.config),
                "tokenizer": {"kind": "char", "chars": "abcdefghijklmnopqrst"}}, tmp_path / "lora.pt")
    run_main("hf.py", "export", "--ckpt", "lora.pt", "--out", "hf", cwd=tmp_path)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    idx = torch.randint(0, 20, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(theirs(idx).logits, model(idx)[0], atol=1e-4, rtol=0)


def test_an_import_whose_tokenizer_cannot_be_read_is_refused_at_import(tmp_path):
    config = transformers.GPT2Config(vocab_size=30, n_positions=16, n_layer=1, n_head=2, n_embd=16)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "hf")
    (tmp_path / "hf" / "tokenizer.json").write_text(json.dumps({"model": {"type": "WordPiece", "vocab": {}}}))
    one_line_error(run_main("hf.py", "import", "--src", "hf", "--out", "out", cwd=tmp_path, check=False),
                   "only byte-level BPE")
    assert not (tmp_path / "out").exists()
