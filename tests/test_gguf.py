"""hf.py export --format gguf (export_gguf.py): our LLaMA- and GPT-2-family checkpoints as the one file
llama.cpp runs. The file's contents are checked with the gguf package's reader here; the slow tests
load it in llama.cpp itself (llama-cpp-python, compiled from source by .ci/run) and compare its
logits, its greedy continuation of the same token ids and, for Q8_0, its bits per byte with ours."""
import math

import numpy as np
import pytest
import torch

from conftest import TINY_MODEL, one_line_error, prepare_tiny, run_main

gguf = pytest.importorskip("gguf")

LLAMA = ["--positions=rope", "--norm=rmsnorm", "--mlp=swiglu", "--n_head=4", "--n_kv_head=2", "--bias=False",
         "--tie_embeddings=False"]
GPT2 = ["--mlp=gelu_tanh"]  # llama.cpp's gpt2 computes the tanh GELU; ours then matches it to rounding
FAMILIES = {"llama": LLAMA, "gpt2": GPT2}


@pytest.fixture(scope="module")
def bpe_folder(tmp_path_factory, corpus_text):
    """data/tiny prepared with a byte-level BPE of 320 tokens (GPT-4's split regex), with a model of each
    family trained on it for 200 iterations in out-llama/ and out-gpt2/."""
    text = corpus_text[:60_000] + "Café déjà vu, naïve cœur; 日本語 🙂\n" * 50
    folder = prepare_tiny(tmp_path_factory.mktemp("gguf"), text, "bpe", vocab_size=320)
    for name, arch in FAMILIES.items():
        run_main("train.py", *TINY_MODEL, *arch, "--n_embd=64", f"--out_dir=out-{name}", "--max_iters=200",
                 "--eval_interval=200", cwd=folder)
    return folder


def export(folder, family, gguf_type):
    path = folder / f"{family}-{gguf_type}.gguf"
    if not path.exists():
        run_main("hf.py", "export", "--ckpt", f"out-{family}", "--out", path.name, "--format", "gguf",
                 "--gguf_type", gguf_type, cwd=folder)
    return path


def ours(folder, family):
    from checkpoint import load_checkpoint, model_from_checkpoint
    from tokenizer import load_tokenizer
    ckpt = load_checkpoint(str(folder / f"out-{family}"))
    return model_from_checkpoint(ckpt).eval(), load_tokenizer(ckpt["tokenizer"], ckpt.get("dataset_dir"))


def field(reader, key):
    f = reader.fields[key]
    value = f.parts[f.data[0]]
    return bytes(value).decode() if f.types[0] == gguf.GGUFValueType.STRING else value.tolist()[0]


@pytest.mark.parametrize("family", FAMILIES)
def test_the_file_holds_the_architecture_the_tokenizer_and_our_weights(bpe_folder, family):
    model, tok = ours(bpe_folder, family)
    reader = gguf.GGUFReader(str(export(bpe_folder, family, "f32")))
    assert field(reader, "general.architecture") == family
    assert field(reader, f"{family}.block_count") == 2 and field(reader, f"{family}.context_length") == 32
    assert field(reader, f"{family}.embedding_length") == 64
    assert field(reader, "tokenizer.ggml.model") == "gpt2" and field(reader, "tokenizer.ggml.pre") == "dbrx"
    assert len(reader.fields["tokenizer.ggml.tokens"].data) == model.config.vocab_size
    tensors = {t.name: torch.from_numpy(np.array(t.data)) for t in reader.tensors}
    sd = model.state_dict()
    assert torch.equal(tensors["token_embd.weight"], sd["transformer.wte.weight"])
    if family == "llama":
        from export_gguf import interleave_rope
        assert {"blk.1.attn_q.weight", "blk.1.attn_k.weight", "blk.1.ffn_gate.weight", "output.weight"} <= set(tensors)
        q = sd["transformer.h.0.attn.c_attn.weight"][:64]
        assert torch.equal(tensors["blk.0.attn_q.weight"], interleave_rope(q, 4))
        assert not torch.equal(tensors["blk.0.attn_q.weight"], q)  # rows really moved
    else:
        assert torch.equal(tensors["blk.0.attn_qkv.weight"], sd["transformer.h.0.attn.c_attn.weight"])
        assert torch.equal(tensors["position_embd.weight"], sd["transformer.wpe.weight"])


def test_interleaving_the_rope_rows_turns_rotate_half_into_adjacent_pairs():
    """llama.cpp rotates adjacent pairs (2i, 2i + 1); ours rotates (i, i + d/2). With q's rows interleaved,
    its rotated q is ours with each head's dimensions in the interleaved order, so q . k is unchanged."""
    from export_gguf import interleave_rope
    from model import GPTConfig, apply_rope, rope_cos_sin
    torch.manual_seed(0)
    H, d, T = 2, 8, 5
    w, x = torch.randn(H * d, 16), torch.randn(T, 16)
    cos, sin = (t.float() for t in rope_cos_sin(GPTConfig(n_head=H, n_embd=H * d, positions="rope"), T))  # (T, d/2)
    ours = apply_rope((x @ w.T).view(T, H, d).transpose(0, 1)[None], cos, sin)[0]  # (H, T, d)
    y = (x @ interleave_rope(w, H).T).view(T, H, d).transpose(0, 1)  # (H, T, d), pairs adjacent
    a, b = y[..., 0::2], y[..., 1::2]
    theirs = torch.stack((a * cos - b * sin, a * sin + b * cos), dim=-1).flatten(-2)
    in_their_order = ours.reshape(H, T, 2, d // 2).transpose(-1, -2).reshape(H, T, d)
    torch.testing.assert_close(theirs, in_their_order)
    torch.testing.assert_close(theirs @ theirs.transpose(-1, -2), ours @ ours.transpose(-1, -2))


@pytest.mark.parametrize("gguf_type, types", [("f16", {"F16", "F32"}), ("q8_0", {"Q8_0", "F32"})])
def test_the_matrices_take_the_chosen_type_and_norms_stay_f32(bpe_folder, gguf_type, types):
    reader = gguf.GGUFReader(str(export(bpe_folder, "llama", gguf_type)))
    kinds = {t.name: t.tensor_type.name for t in reader.tensors}
    assert set(kinds.values()) == types
    assert kinds["blk.0.attn_norm.weight"] == "F32" and kinds["blk.0.ffn_down.weight"] == gguf_type.upper()


def test_a_char_checkpoint_is_refused_in_one_line_and_nothing_is_written(tiny_run, tmp_path):
    result = run_main("hf.py", "export", "--ckpt", str(tiny_run / "out"), "--out", "m.gguf", "--format", "gguf",
                      cwd=tmp_path, check=False)
    one_line_error(result, "char tokenizer cannot be written as GGUF")
    assert list(tmp_path.iterdir()) == []


def test_an_int8_checkpoint_is_refused_in_one_line(bpe_folder, tmp_path):
    run_main("quantize.py", f"--out_dir={bpe_folder / 'out-llama'}", f"--out={tmp_path / 'q'}", cwd=tmp_path)
    result = run_main("hf.py", "export", "--ckpt", str(tmp_path / "q"), "--out", "m.gguf", "--format", "gguf",
                      cwd=tmp_path, check=False)
    one_line_error(result, "int8")
    assert not (tmp_path / "m.gguf").exists()
    result = run_main("hf.py", "export", "--ckpt", str(tmp_path / "q"), "--out", "hf", cwd=tmp_path, check=False)
    one_line_error(result, "int8")  # nor as a Hugging Face folder: transformers reads float weights
    assert not (tmp_path / "hf").exists()


# ----------------------------------------------------------------------------------------------
# llama.cpp itself

def llama(path):
    llama_cpp = pytest.importorskip("llama_cpp")
    return llama_cpp.Llama(model_path=str(path), n_ctx=32, logits_all=True, n_threads=1, n_batch=32, verbose=False)


def their_logits(llm, ids):
    llm.reset()
    llm.eval(ids)
    return torch.tensor(np.array(llm.scores[:len(ids)]), dtype=torch.float32)  # (T, V)


def their_greedy(llm, ids, n):
    llm.reset()
    llm.eval(ids)
    out = []
    for _ in range(n):
        out.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval(out[-1:])
    return out


@pytest.mark.slow
@pytest.mark.parametrize("gguf_type, atol", [("f32", 2e-3), ("f16", 5e-2)])
@pytest.mark.parametrize("family", FAMILIES)
def test_llama_cpp_continues_the_prompt_ids_as_sample_py_does(bpe_folder, family, gguf_type, atol):
    from decoding import generate_batch
    model, tok = ours(bpe_folder, family)
    llm = llama(export(bpe_folder, family, gguf_type))
    prompts = [tok.encode(text) for text in ("ROMEO:\n", "First Citizen:\nWe are", "Café déjà", "KING RICHARD")]
    for ids in prompts:
        with torch.no_grad():
            torch.testing.assert_close(their_logits(llm, ids), model(torch.tensor([ids]))[0][0], atol=atol, rtol=0)
        n = 32 - len(ids)  # one window: llama.cpp's context is block_size
        assert their_greedy(llm, ids, n) == generate_batch(model, [ids], n, temperature=0)[0]


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_q8_0_costs_little_in_bits_per_byte(bpe_folder, family):
    model, tok = ours(bpe_folder, family)
    text = (bpe_folder / "input.txt").read_text(encoding="utf-8")[:6000]  # text it was trained on: its bpb is low
    ids = tok.encode(text)
    chunks = [ids[i:i + 32] for i in range(0, len(ids) - 32, 32)]
    llm = llama(export(bpe_folder, family, "q8_0"))
    nll = {"ours": 0.0, "q8_0": 0.0}
    for chunk in chunks:
        x, y = chunk[:-1], torch.tensor(chunk[1:])
        with torch.no_grad():
            nll["ours"] += torch.nn.functional.cross_entropy(model(torch.tensor([x]))[0][0], y, reduction="sum").item()
        nll["q8_0"] += torch.nn.functional.cross_entropy(their_logits(llm, x), y, reduction="sum").item()
    n_bytes = sum(len(tok.decode(c[1:]).encode("utf-8")) for c in chunks)
    bpb = {k: v / math.log(2) / n_bytes for k, v in nll.items()}
    uniform = math.log2(model.config.vocab_size) * sum(len(c) - 1 for c in chunks) / n_bytes
    assert bpb["ours"] < 0.75 * uniform  # a model that learned something, so that the comparison means something
    print(f"{family}: bits per byte {bpb}")
    assert abs(bpb["q8_0"] - bpb["ours"]) / bpb["ours"] < 0.01, bpb
