"""hf.py: Hugging Face GPT-2 and LLaMA folders in and out, checked against transformers itself.

Shapes are drawn with a seeded RNG (any vocabulary, head count, kv-head count dividing it, head size,
rope theta, tied or not); weights are random, norms and biases included, so a misplaced tensor shows.
"""
import json
import random

import pytest
import torch

from conftest import REPO, TINY_MODEL, one_line_error, prepare_tiny, run_main

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")
import hf  # noqa: E402
from common import UserError  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402
from tokenizer import hf_tokenizer  # noqa: E402


def draw_gpt2(rng):
    n_head = rng.choice([1, 2, 3, 4])
    return transformers.GPT2Config(
        vocab_size=rng.randint(20, 300), n_positions=rng.choice([16, 24, 32]), n_layer=rng.randint(1, 3),
        n_head=n_head, n_embd=n_head * rng.choice([4, 8, 12]), n_inner=rng.choice([None, rng.randint(8, 80)]),
        activation_function=rng.choice(["gelu_new", "gelu"]), layer_norm_epsilon=rng.choice([1e-5, 1e-6]),
        tie_word_embeddings=rng.random() < 0.5, bos_token_id=0, eos_token_id=0)


def draw_llama(rng):
    n_head = rng.choice([2, 3, 4, 6, 8])
    scaling = None
    if rng.random() < 0.4:
        scaling = {"rope_type": "llama3", "factor": rng.choice([4.0, 8.0]), "low_freq_factor": 1.0,
                   "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
    bias = rng.random() < 0.3
    return transformers.LlamaConfig(
        vocab_size=rng.randint(20, 300), hidden_size=n_head * rng.choice([4, 6, 8]), num_attention_heads=n_head,
        num_key_value_heads=rng.choice([k for k in range(1, n_head + 1) if n_head % k == 0]),
        head_dim=rng.choice([4, 8, 12]), intermediate_size=rng.randint(8, 100), num_hidden_layers=rng.randint(1, 3),
        max_position_embeddings=32, rms_norm_eps=rng.choice([1e-5, 1e-6]),
        rope_theta=rng.choice([10000.0, 500000.0, round(10 ** rng.uniform(2, 6), 1)]),
        rope_scaling=scaling, tie_word_embeddings=rng.random() < 0.5, attention_bias=bias, mlp_bias=bias,
        bos_token_id=0, eos_token_id=0)


RNG = random.Random(20261122)
GPT2_SHAPES = [draw_gpt2(RNG) for _ in range(4)]
LLAMA_SHAPES = [draw_llama(RNG) for _ in range(5)]
GPT2_SHAPES.append(transformers.GPT2Config(vocab_size=50, n_positions=16, n_layer=1, n_head=2, n_embd=16,
                                           tie_word_embeddings=False, bos_token_id=0, eos_token_id=0))
LLAMA_SHAPES.append(transformers.LlamaConfig(vocab_size=70, hidden_size=24, num_attention_heads=6,
                                             num_key_value_heads=2, intermediate_size=40, num_hidden_layers=2,
                                             max_position_embeddings=32, rope_theta=500000.0,
                                             tie_word_embeddings=False, bos_token_id=0, eos_token_id=0))


def randomize(model, seed=0):
    """Every parameter random: gains near 1, everything else N(0, 0.2^2)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g) * 0.2
            p.copy_(1 + noise if p.dim() == 1 and name.endswith("weight") else noise)
    return model.eval()


def hf_folder(config, path, seed=0):
    model = randomize(transformers.AutoModelForCausalLM.from_config(config), seed)
    model.save_pretrained(path)
    return model


def load_ours(source):
    ckpt = hf.load_hf_checkpoint(str(source))
    model = GPT(GPTConfig(**ckpt["model_config"]))
    model.load_state_dict(ckpt["model"])
    return model.eval()


def same_logits(ours, theirs, vocab_size, T=20):
    T = min(T, ours.config.block_size)
    idx = torch.randint(0, vocab_size, (2, T), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = ours(idx)[0], theirs(idx).logits
    assert a.abs().max() > 0.1  # not trivially equal
    torch.testing.assert_close(a, b, atol=1e-4, rtol=0)


@pytest.mark.parametrize("config", GPT2_SHAPES, ids=lambda c: f"v{c.vocab_size}-h{c.n_head}-c{c.n_embd}-"
                         f"{c.activation_function}-{'tied' if c.tie_word_embeddings else 'untied'}")
def test_gpt2_folder_loads_with_the_logits_of_transformers(config, tmp_path):
    theirs = hf_folder(config, tmp_path)
    same_logits(load_ours(tmp_path), theirs, config.vocab_size)


@pytest.mark.parametrize("config", LLAMA_SHAPES, ids=lambda c: f"v{c.vocab_size}-h{c.num_attention_heads}"
                         f"-kv{c.num_key_value_heads}-d{c.head_dim}-{'tied' if c.tie_word_embeddings else 'untied'}")
def test_llama_folder_loads_with_the_logits_of_transformers(config, tmp_path):
    theirs = hf_folder(config, tmp_path)
    ours = load_ours(tmp_path)
    assert ours.config.n_kv_head == config.num_key_value_heads and ours.config.head_dim == config.head_dim
    same_logits(ours, theirs, config.vocab_size, T=32)


def test_older_rope_theta_and_newer_rope_parameters_forms_read_the_same():
    newer = {"model_type": "llama", "vocab_size": 10, "hidden_size": 8, "intermediate_size": 16,
             "num_hidden_layers": 1, "num_attention_heads": 2, "max_position_embeddings": 64,
             "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0,
                                 "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                 "original_max_position_embeddings": 8192}}
    older = {**{k: v for k, v in newer.items() if k != "rope_parameters"}, "rope_theta": 500000.0,
             "rope_scaling": {"type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                              "original_max_position_embeddings": 8192}}
    a, b = hf.config_from_hf(newer), hf.config_from_hf(older)
    assert a == b
    assert a["rope_theta"] == 500000.0 and a["rope_scaling"] == "llama3" and a["rope_factor"] == 32.0


@pytest.mark.parametrize("change, message", [
    ({"architectures": ["MistralForCausalLM"], "model_type": "mistral"}, "architecture 'MistralForCausalLM'"),
    ({"sliding_window": 4096}, "config field 'sliding_window'"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope type 'yarn'"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
    ({"attention_bias": True}, "attention_bias and mlp_bias differ"),
])
def test_unsupported_architectures_and_config_fields_are_refused(change, message):
    base = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 10, "hidden_size": 8,
            "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2, "max_position_embeddings": 64}
    hf.config_from_hf(base)  # the base is fine
    with pytest.raises(UserError, match=message):
        hf.config_from_hf({**base, **change})


OURS = {  # our architectures that transformers can hold
    "gpt2-bias-tied": dict(),
    "gpt2-nobias-untied-tanh": dict(bias=False, tie_embeddings=False, mlp="gelu_tanh", n_head=2),
    "gpt2-relu2": dict(mlp="relu2", mlp_hidden=40),
    "llama-gqa-untied": dict(positions="rope", norm="rmsnorm", mlp="swiglu", bias=False, n_head=4, n_kv_head=2,
                             tie_embeddings=False, rope_theta=500000.0, mlp_hidden=48),
    "llama-mqa-tied-bias-headdim": dict(positions="rope", norm="rmsnorm", mlp="swiglu", n_head=4, n_kv_head=1,
                                        head_dim=6, rope_theta=777.0, norm_eps=1e-6),
    "llama3-scaled": dict(positions="rope", norm="rmsnorm", mlp="swiglu", bias=False, n_head=2, rope_scaling="llama3",
                          rope_factor=8.0, rope_original_context=16, tie_embeddings=False),
}


def save_ours(arch, path, vocab_size=57):
    torch.manual_seed(0)
    model = randomize(GPT(GPTConfig(**{**dict(block_size=24, vocab_size=vocab_size, n_layer=2, n_embd=32, n_head=4), **arch})))
    from dataclasses import asdict
    torch.save({"model": model.state_dict(), "model_config": asdict(model.config),
                "tokenizer": {"kind": "char", "chars": "x" * 0}}, path)
    return model


@pytest.mark.parametrize("name", OURS)
def test_export_then_transformers_gives_the_same_logits(name, tmp_path):
    ours = save_ours(OURS[name], tmp_path / "ckpt.pt")
    hf.export(tmp_path / "ckpt.pt", tmp_path / "hf")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    expected = "LlamaForCausalLM" if ours.config.positions == "rope" else "GPT2LMHeadModel"
    assert type(theirs).__name__ == expected
    same_logits(ours, theirs, 57, T=24)
    back = load_ours(tmp_path / "hf")  # and back in: the same numbers again
    same_logits(back, theirs, 57, T=24)


def test_export_command_writes_a_folder_and_refuses_what_hf_cannot_hold(tmp_path):
    save_ours(OURS["llama-gqa-untied"], tmp_path / "ckpt.pt")
    proc = run_main("hf.py", "export", "--ckpt", tmp_path / "ckpt.pt", "--out", tmp_path / "hf", cwd=tmp_path)
    assert "LlamaForCausalLM" in proc.stdout
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["num_key_value_heads"] == 2
    for arch, message in [(dict(norm="rmsnorm"), "norm=rmsnorm with learned positions"),
                          (dict(OURS["llama-gqa-untied"], qk_norm=True), "qk_norm cannot be written"),
                          (dict(positions="rope"), "LLaMA needs rmsnorm and swiglu"),
                          (dict(positions="alibi"), "positions=alibi cannot be written"),
                          (dict(norm_head=True), "norm_head=True cannot be written"),
                          (dict(OURS["llama-gqa-untied"], logit_softcap=30.0), "logit_softcap=30.0 cannot be written"),
                          (dict(OURS["llama-gqa-untied"], attn_window=4), "attn_window=4 cannot be written"),
                          (dict(value_embeds=True), "value_embeds=True cannot be written"),
                          (dict(causal=False), "causal=False cannot be written")]:
        save_ours(arch, tmp_path / "bad.pt")
        one_line_error(run_main("hf.py", "export", "--ckpt", tmp_path / "bad.pt", "--out", tmp_path / "bad",
                                cwd=tmp_path, check=False), message)
        assert not (tmp_path / "bad").exists()


def test_gpt2_from_the_hub_offline_fails_with_one_line(workdir, tmp_path, monkeypatch):
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf_cache"))
    for script, args in [("train.py", ["--dataset=tiny", "--max_iters=1"]), ("sample.py", [])]:
        result = run_main(script, "--init_from=gpt2", "--device=cpu", *args, cwd=workdir, check=False)
        one_line_error(result, "could not download openai-community/gpt2")
        assert "init_from=PATH" in result.stderr


def gpt2_tokenizer_json(path, specials=("<|endoftext|>",)):
    """GPT-2's vocabulary written as a Hugging Face tokenizer.json (byte-level BPE), from the local files,
    with these special tokens (a new one takes the id after the vocabulary)."""
    tokenizers = pytest.importorskip("tokenizers")
    gpt2 = REPO.parent / "shared" / "data" / "gpt2"
    if not gpt2.exists():
        pytest.skip("GPT-2's vocabulary files are not available offline")
    tok = tokenizers.Tokenizer(tokenizers.models.BPE.from_file(str(gpt2 / "encoder.json"), str(gpt2 / "vocab.bpe")))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    tok.add_special_tokens(list(specials))
    path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(path))
    return tok


def test_a_byte_level_tokenizer_json_encodes_as_the_tokenizers_library_does(tmp_path, tiktoken_cache, corpus_text):
    theirs = gpt2_tokenizer_json(tmp_path / "tokenizer.json")
    ours = hf_tokenizer({"file": str(tmp_path / "tokenizer.json")})
    text = corpus_text[:5000] + " naïve café 日本語 1234567 \n\n  x"
    assert ours.encode(text) == theirs.encode(text).ids
    assert ours.decode(ours.encode(text)) == text and ours.vocab_size == 50257
    assert ours.eot_token == ours.bos_token == 50256 and ours.stop_tokens == (50256,)


def test_a_tiktoken_tokenizer_model_file_reads_with_llama3_specials(tmp_path, tiktoken_cache):
    import base64
    import tiktoken
    enc = tiktoken.get_encoding("gpt2")
    lines = [f"{base64.b64encode(enc.decode_single_token_bytes(i)).decode()} {i}" for i in range(50256)]
    (tmp_path / "tokenizer.model").write_text("\n".join(lines) + "\n")
    tok = hf_tokenizer({"file": str(tmp_path / "tokenizer.model")})
    text = "To be, or not to be: that is the question.\n"
    assert tok.decode(tok.encode(text)) == text
    assert tok.vocab_size == 50256 + 256
    # the specials follow the ranks: <|begin_of_text|> starts a prompt; generation stops at <|end_of_text|>
    # and at the end of a turn, <|eot_id|>
    assert tok.bos_token == 50256 and tok.stop_tokens == (50257, 50256 + 9) and tok.eot_token == 50257
    (tmp_path / "sp.model").write_bytes(b"\x0a\x0b\x00binary sentencepiece")
    with pytest.raises(UserError, match="not a tiktoken BPE file"):
        hf_tokenizer({"file": str(tmp_path / "sp.model")})


@pytest.fixture
def gpt2_data(tmp_path, corpus_text, tiktoken_cache):
    """data/g: the corpus tokenized with GPT-2's BPE (50,257 tokens)."""
    return prepare_tiny(tmp_path, corpus_text[:30000], "gpt2", name="g")


FINETUNE = ["--dataset=g", "--block_size=32", "--batch_size=4", "--device=cpu", "--eval_iters=2",
            "--eval_interval=8", "--max_iters=8", "--log_interval=4", "--learning_rate=3e-3", "--warmup_iters=0",
            "--dropout=0.0"]


@pytest.mark.slow
def test_train_fine_tunes_an_hf_llama_folder_and_sample_reads_both(gpt2_data):
    work = gpt2_data
    config = transformers.LlamaConfig(vocab_size=50257, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                                      intermediate_size=64, num_hidden_layers=2, max_position_embeddings=64,
                                      rope_theta=500000.0, tie_word_embeddings=False, bos_token_id=0, eos_token_id=0)
    hf_folder(config, work / "llama")
    run_main("train.py", "--init_from=llama", "--out_dir=tuned", *FINETUNE, cwd=work)
    evals = [json.loads(line) for line in open(work / "tuned" / "metrics.jsonl") if "val/loss" in line]
    assert evals[-1]["val/loss"] < evals[0]["val/loss"]  # fine-tuning moved the imported weights
    ckpt = torch.load(work / "tuned" / "ckpt.pt", weights_only=True)
    assert ckpt["model_config"]["n_kv_head"] == 2 and ckpt["model_config"]["block_size"] == 32
    proc = run_main("sample.py", "--out_dir=tuned", "--start=ROMEO:", "--num_samples=1", "--max_new_tokens=5",
                    cwd=work)
    assert proc.stdout.startswith("ROMEO:")
    # straight from the folder: its tokenizer is needed, and missing it is one clear line
    one_line_error(run_main("sample.py", "--init_from=llama", "--num_samples=1", "--max_new_tokens=5", cwd=work,
                            check=False), "no tokenizer.json or tokenizer.model")
    gpt2_tokenizer_json(work / "llama" / "tokenizer.json")
    proc = run_main("sample.py", "--init_from=llama", "--start=ROMEO:", "--num_samples=1", "--max_new_tokens=5",
                    cwd=work)
    assert proc.stdout.startswith("ROMEO:")


@pytest.mark.slow
def test_train_fine_tunes_an_hf_gpt2_folder_and_sample_reads_it_with_gpt2s_tokenizer(gpt2_data):
    work = gpt2_data
    config = transformers.GPT2Config(vocab_size=50257, n_positions=64, n_layer=1, n_head=2, n_embd=32)
    hf_folder(config, work / "gpt2-tiny")
    run_main("train.py", "--init_from=gpt2-tiny", "--out_dir=tuned", *FINETUNE, cwd=work)
    evals = [json.loads(line) for line in open(work / "tuned" / "metrics.jsonl") if "val/loss" in line]
    assert evals[-1]["val/loss"] < evals[0]["val/loss"]
    # a GPT-2-sized vocabulary without tokenizer files samples with GPT-2's tokenizer
    proc = run_main("sample.py", "--init_from=gpt2-tiny", "--start=KING", "--num_samples=1", "--max_new_tokens=5",
                    cwd=work)
    assert proc.stdout.startswith("KING")


def test_fine_tuning_an_hf_folder_on_another_vocabulary_is_refused_in_one_line(workdir):
    hf_folder(transformers.GPT2Config(vocab_size=50, n_positions=32, n_layer=1, n_head=2, n_embd=16), workdir / "hf")
    one_line_error(run_main("train.py", *TINY_MODEL, "--init_from=hf", "--max_iters=1", cwd=workdir, check=False),
                   "the checkpoint's vocabulary has 50 tokens but dataset 'tiny' has")


def test_import_command_writes_a_checkpoint_that_sample_reads(tmp_path, tiktoken_cache):
    config = transformers.GPT2Config(vocab_size=50257, n_positions=32, n_layer=1, n_head=2, n_embd=16)
    hf_folder(config, tmp_path / "hf")
    run_main("hf.py", "import", "--src", tmp_path / "hf", "--out", tmp_path / "out", cwd=tmp_path)
    ckpt = torch.load(tmp_path / "out" / "ckpt.pt", weights_only=True)
    assert ckpt["tokenizer"] == {"kind": "gpt2"} and ckpt["model_config"]["mlp"] == "gelu_tanh"
    proc = run_main("sample.py", "--out_dir=out", "--start=KING", "--num_samples=1", "--max_new_tokens=3",
                    cwd=tmp_path)
    assert proc.stdout.startswith("KING")
    one_line_error(run_main("hf.py", "import", "--src", tmp_path / "nowhere", "--out", tmp_path / "x", cwd=tmp_path,
                            check=False), "neither a folder with config.json")


def llama3_style_folder(path):
    """A tiny LlamaForCausalLM with a Llama-3-style tokenizer.json (GPT-2's byte-level BPE, then the specials
    <|begin_of_text|> and <|end_of_text|> after the vocabulary, named bos and eos in config.json), whose
    greedy text reaches <|end_of_text|> within a few tokens: the head scores three tokens, the rest 0."""
    tok = gpt2_tokenizer_json(path / "tokenizer.json", specials=["<|begin_of_text|>", "<|end_of_text|>"])
    bos, eos = tok.token_to_id("<|begin_of_text|>"), tok.token_to_id("<|end_of_text|>")
    config = transformers.LlamaConfig(vocab_size=tok.get_vocab_size(), hidden_size=32, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=64, num_hidden_layers=2,
                                      max_position_embeddings=64, tie_word_embeddings=False, bos_token_id=bos,
                                      eos_token_id=eos)
    model = randomize(transformers.AutoModelForCausalLM.from_config(config), seed=3)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        model.lm_head.weight.zero_()
        for t in (eos, tok.token_to_id("Ġthe"), tok.token_to_id("Ġking")):
            model.lm_head.weight[t] = torch.randn(32, generator=g)
    model.save_pretrained(path)
    return model, tok, eos


def test_an_imported_llama_samples_until_end_of_text_as_transformers_generates(tmp_path, tiktoken_cache):
    model, tok, eos = llama3_style_folder(tmp_path / "llama")
    prompt = "ROMEO: the king"
    ids = tok.encode(prompt).ids
    theirs = model.generate(torch.tensor([ids]), max_new_tokens=30, do_sample=False,
                            attention_mask=torch.ones(1, len(ids), dtype=torch.long))[0, len(ids):].tolist()
    assert eos in theirs and theirs.index(eos) < 29  # transformers stopped at <|end_of_text|>
    result = run_main("sample.py", "--init_from=llama", f"--start={prompt}", "--temperature=0", "--num_samples=1",
                      "--max_new_tokens=30", "--device=cpu", "--dtype=float32", cwd=tmp_path)
    assert result.stdout.split("---------------")[0] == prompt + tok.decode(theirs[:theirs.index(eos)]) + "\n"
    assert result.stderr.startswith(f"{theirs.index(eos)} tokens in ")
    ours = hf_tokenizer(hf.find_tokenizer(tmp_path / "llama", {}))
    assert ours.bos_token == tok.token_to_id("<|begin_of_text|>") and ours.stop_tokens == (eos,)
