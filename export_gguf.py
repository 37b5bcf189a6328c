"""
GGUF export: one of our checkpoints as the single file that llama.cpp (llama-cli, llama-server), Ollama
and LM Studio run.

  python hf.py export --ckpt out/ckpt.pt --out model.gguf --format gguf                  # f16 matrices
  python hf.py export --ckpt out/ckpt.pt --out model.gguf --format gguf --gguf_type q8_0
  llama-cli -m model.gguf -p "ROMEO:" -n 64

A GGUF file is a header of typed key/value metadata (the architecture's hyperparameters and the
tokenizer) followed by named tensors; it needs only the `gguf` package (pip install gguf) to write.

Design choices:
- Two of llama.cpp's architectures, the two families hf.py writes for transformers, chosen and refused by
  the same rules (hf.family): learned positions + LayerNorm + GELU as "gpt2", RoPE + RMSNorm + SwiGLU
  (grouped-query attention, optional biases, Llama 3.1's rope scaling) as "llama". What neither can
  express (ALiBi, qk_norm, NormHead, logit soft-capping, sliding windows, value embeddings, an encoder, a
  classifier) is refused in one line, and so are relu2 (llama.cpp's gpt2 has GELU only) and an int8
  checkpoint of quantize.py (export the float one; --gguf_type q8_0 is GGUF's own 8 bits).
  LoRA adapters are folded in, as for transformers.
- Names, shapes and metadata keys are those llama.cpp's convert_hf_to_gguf.py writes. A GGUF shape lists
  the fastest dimension first, so a numpy (out, in) matrix, our nn.Linear layout, is what it expects.
- llama: q and k are permuted per head from the "rotate half" pairing (i, i + d/2) that model.apply_rope
  (and Hugging Face) use to the interleaved pairs (2i, 2i + 1) of Meta's original weights, which
  llama.cpp's rope rotates; the converter undoes HF's permutation the same way. c_attn splits into
  attn_q/k/v, c_fc ([gate; up]) into ffn_gate/ffn_up. Llama 3.1 scaling becomes rope_freqs.weight,
  the divisor of each pair's frequency.
- gpt2: c_attn stays fused (attn_qkv: q, k, v rows, as ours); the architecture requires every bias,
  so a bias=False model gets zeros. llama.cpp computes GELU as the tanh approximation (through an f16
  table): mlp=gelu (erf) runs as that, within 5e-4 of ours per activation.
- Tensor types (--gguf_type), as the converter chooses them: f32 everything; f16 the matrices, with
  1-D tensors (norms, biases, rope_freqs) and the position table kept f32; q8_0 (blocks of 32 weights,
  one f16 scale each: 8.5 bits a weight) the matrices whose rows are a multiple of 32 long, f16 the other
  matrices. Quantizing here, not in llama.cpp, keeps the export one step.
- The tokenizer goes in the file as llama.cpp reads a GPT-2-style BPE: model "gpt2", tokens as GPT-2's
  byte-to-unicode strings (the pieces tokenizer.json has), merges "a b" in rank order, token types
  (special tokens CONTROL), bos/eos ids and no bos added, and a pre-tokenizer named for our split regex:
  GPT-2's is llama.cpp's "gpt-2", GPT-4's (cl100k) is its "dbrx" (DBRX's tokenizer is cl100k). Model rows
  past the tokenizer's last id (a padded vocabulary) are UNUSED tokens [PAD<id>]. A char tokenizer has no
  GGUF form and is refused; so is an imported model's own tokenizer (kind hf): write the Hugging Face
  folder (which carries it) and convert that with llama.cpp's convert_hf_to_gguf.py.
- Written whole or not at all: a temporary file beside --out, renamed into place.
"""
import os
from dataclasses import replace
from pathlib import Path

import torch

from checkpoint import load_checkpoint, model_from_checkpoint
from common import UserError, fsync_dir, make_folder, remove_quietly
from model import GPTConfig, rope_inv_freq

GGUF_TYPES = ("f32", "f16", "q8_0")
ARCHITECTURES = {"gpt2": "gpt2", "llama": "llama"}  # hf.family -> llama.cpp's architecture
PRE_TOKENIZERS = {"gpt2": "gpt-2", "gpt4": "dbrx"}  # our split regex -> llama.cpp's pre-tokenizer of that regex


def _gguf():
    try:
        import gguf
    except ImportError:
        raise UserError("--format gguf writes with the gguf package: pip install gguf") from None
    return gguf


# ----------------------------------------------------------------------------------------------
# what can be written

def check_config(c, family, ckpt_path="the checkpoint"):
    """'gpt2' or 'llama' for our config c (a dict of GPTConfig fields), or a UserError naming what
    llama.cpp cannot run. family: hf.family, the rules of the Hugging Face classes (hf.py passes it in,
    as this file is imported by hf.py)."""
    if c.get("n_classes"):
        raise UserError(f"{ckpt_path} is a classifier; GGUF holds language models (llama.cpp has no "
                        f"classification head)")
    try:
        fam = family(c)
    except UserError as e:
        raise UserError(f"{e}, nor as llama.cpp's llama or gpt2 (GGUF)") from None
    if fam == "gpt2" and c["mlp"] == "relu2":
        raise UserError("mlp=relu2 cannot be written as GGUF: llama.cpp's gpt2 architecture has GELU only")
    return fam


def vocabulary(tok, n_vocab):
    """(tokens, token types, merges) of tok (gpt2 or bpe) as llama.cpp's gpt2-style BPE reads them,
    padded with UNUSED tokens to the model's n_vocab rows."""
    from tokenizer import hf_tokenizer_json
    gguf = _gguf()
    data = hf_tokenizer_json(tok)  # the byte-level pieces and merges that transformers reads, encoding as ours
    by_id = {i: piece for piece, i in data["model"]["vocab"].items()}
    types = {i: gguf.TokenType.NORMAL for i in by_id}
    for t in data["added_tokens"]:  # special tokens: never produced from text
        by_id[t["id"]], types[t["id"]] = t["content"], gguf.TokenType.CONTROL
    if sorted(by_id) != list(range(tok.vocab_size)):
        raise UserError("the tokenizer's ids have holes; GGUF lists one token per id")
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(n_vocab)]
    kinds = [types.get(i, gguf.TokenType.UNUSED) for i in range(n_vocab)]
    return tokens, kinds, [f"{a} {b}" for a, b in data["model"]["merges"]]


def gguf_tokenizer(ckpt, n_vocab):
    """The checkpoint's tokenizer and llama.cpp's pre-tokenizer name for it, or a UserError."""
    from tokenizer import load_tokenizer
    meta = ckpt.get("tokenizer") or {}
    kind = meta.get("kind")
    if not meta:
        raise UserError("the checkpoint records no tokenizer, and a GGUF file must hold one; fine-tune it on a "
                        "prepared dataset first (the run records the dataset's tokenizer)")
    if kind == "char":
        raise UserError("a char tokenizer cannot be written as GGUF (llama.cpp's tokenizers are BPE, SentencePiece "
                        "and WordPiece); train on a dataset prepared with --tokenizer bpe or gpt2")
    if kind == "hf":
        raise UserError(f"the tokenizer came with an imported model ({Path(meta.get('file', '?')).name}); export the "
                        f"Hugging Face folder, which carries it (hf.py export --format hf), and convert that with "
                        f"llama.cpp's convert_hf_to_gguf.py, which knows that tokenizer's pre-tokenizer")
    if kind not in ("gpt2", "bpe") or meta.get("mask_token") is not None:
        raise UserError(f"a {kind} tokenizer{' with a mask token' if kind in ('gpt2', 'bpe') else ''} cannot be "
                        f"written as GGUF")
    tok = load_tokenizer(meta, ckpt.get("dataset_dir"))
    pattern = "gpt2" if kind == "gpt2" else tok.bpe.pattern_name
    if pattern not in PRE_TOKENIZERS:
        raise UserError(f"the BPE's split regex {pattern!r} has no pre-tokenizer in llama.cpp "
                        f"(gpt2 and gpt4 do)")
    if tok.vocab_size > n_vocab:
        raise UserError(f"the tokenizer has {tok.vocab_size} tokens and the model only {n_vocab} rows; "
                        f"they do not belong together")
    return tok, PRE_TOKENIZERS[pattern]


# ----------------------------------------------------------------------------------------------
# weights: ours -> llama.cpp's

def interleave_rope(w, n_heads):
    """Rows of q or k (n_heads * d, ...) from the rotate-half pairing (i, i + d/2) to interleaved pairs
    (2i, 2i + 1) within each head: row 2j + h of a head is row h * d/2 + j."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def rope_freq_factors(c):
    """(head_dim / 2,) the divisor llama.cpp applies to each pair's frequency under Llama 3.1 scaling."""
    config = GPTConfig.from_dict(c)
    return (rope_inv_freq(replace(config, rope_scaling="")) / rope_inv_freq(config)).float()


def gguf_tensors(c, sd, fam):
    """[(GGUF name, float32 tensor)] for our state dict sd (LoRA folded in) of config c, in the order
    llama.cpp's converter writes them."""
    sd = {k: v.detach().float().cpu() for k, v in sd.items()}
    H, Hkv, d = c["n_head"], c["n_kv_head"], c["head_dim"]
    out = [("token_embd.weight", sd["transformer.wte.weight"])]
    if fam == "gpt2":
        out.append(("position_embd.weight", sd["transformer.wpe.weight"]))
    elif c["rope_scaling"] == "llama3":
        out.insert(0, ("rope_freqs.weight", rope_freq_factors(c)))

    def bias_or_zeros(name):  # gpt2 requires every bias; a bias=False model has none
        return sd[name] if name in sd else torch.zeros(sd[name.replace(".bias", ".weight")].shape[0])

    for i in range(c["n_layer"]):
        p, q = f"transformer.h.{i}.", f"blk.{i}."
        kinds = ("weight", "bias") if fam == "gpt2" or c["bias"] else ("weight",)
        if fam == "gpt2":
            for kind in kinds:
                get = (lambda n: sd[n]) if kind == "weight" else bias_or_zeros
                out += [(q + f"attn_norm.{kind}", get(p + f"ln_1.{kind}")),
                        (q + f"attn_qkv.{kind}", get(p + f"attn.c_attn.{kind}")),
                        (q + f"attn_output.{kind}", get(p + f"attn.c_proj.{kind}")),
                        (q + f"ffn_norm.{kind}", get(p + f"ln_2.{kind}")),
                        (q + f"ffn_up.{kind}", get(p + f"mlp.c_fc.{kind}")),
                        (q + f"ffn_down.{kind}", get(p + f"mlp.c_proj.{kind}"))]
            continue
        out.append((q + "attn_norm.weight", sd[p + "ln_1.weight"]))
        for kind in kinds:
            wq, wk, wv = sd[p + f"attn.c_attn.{kind}"].split([H * d, Hkv * d, Hkv * d], 0)
            gate, up = sd[p + f"mlp.c_fc.{kind}"].chunk(2, 0)
            out += [(q + f"attn_q.{kind}", interleave_rope(wq, H)), (q + f"attn_k.{kind}", interleave_rope(wk, Hkv)),
                    (q + f"attn_v.{kind}", wv), (q + f"attn_output.{kind}", sd[p + f"attn.c_proj.{kind}"]),
                    (q + f"ffn_gate.{kind}", gate), (q + f"ffn_up.{kind}", up),
                    (q + f"ffn_down.{kind}", sd[p + f"mlp.c_proj.{kind}"])]
        out.append((q + "ffn_norm.weight", sd[p + "ln_2.weight"]))
    out.append(("output_norm.weight", sd["transformer.ln_f.weight"]))
    if fam == "gpt2":
        out.append(("output_norm.bias", bias_or_zeros("transformer.ln_f.bias")))
    if not c["tie_embeddings"]:  # tied: llama.cpp reads token_embd for the output too
        out.append(("output.weight", sd["lm_head.weight"]))
    return out


def tensor_type(name, t, gguf_type):
    """The GGML type a tensor is stored in under --gguf_type (the converter's rules, module docstring)."""
    gguf = _gguf()
    T = gguf.GGMLQuantizationType
    if gguf_type == "f32" or t.dim() < 2 or name.endswith("_norm.weight") or name == "position_embd.weight":
        return T.F32
    if gguf_type == "q8_0" and t.dim() == 2 and t.shape[-1] % 32 == 0:  # Q8_0 blocks run along a row
        return T.Q8_0
    return T.F16


# ----------------------------------------------------------------------------------------------
# the file

def write_gguf(path, arch, c, tensors, tokenizer, gguf_type, name):
    """Write the GGUF file path: metadata for config c, the tokenizer (tok, pre-tokenizer name), and the
    tensors [(name, float32 tensor)] in their --gguf_type types; whole or not at all."""
    gguf = _gguf()
    tok, pre = tokenizer
    tokens, kinds, merges = vocabulary(tok, c["vocab_size"])
    tmp = f"{path}.{os.getpid()}.tmp"
    w = gguf.GGUFWriter(tmp, arch)
    try:
        w.add_name(name)
        w.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                         "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[gguf_type])
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        w.add_context_length(c["block_size"])
        w.add_embedding_length(c["n_embd"])
        w.add_block_count(c["n_layer"])
        w.add_feed_forward_length(c["mlp_hidden"])
        w.add_head_count(c["n_head"])
        w.add_head_count_kv(c["n_kv_head"])
        w.add_vocab_size(c["vocab_size"])
        if arch == "gpt2":
            w.add_layer_norm_eps(c["norm_eps"])
        else:
            w.add_layer_norm_rms_eps(c["norm_eps"])
            w.add_rope_freq_base(c["rope_theta"])
            w.add_rope_dimension_count(c["head_dim"])
            if c["head_dim"] * c["n_head"] != c["n_embd"]:  # llama.cpp assumes n_embd / n_head otherwise
                w.add_key_length(c["head_dim"])
                w.add_value_length(c["head_dim"])
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(pre)
        w.add_token_list(tokens)
        w.add_token_types(kinds)
        w.add_token_merges(merges)
        if tok.bos_token is not None:
            w.add_bos_token_id(tok.bos_token)
        if tok.eot_token is not None:
            w.add_eos_token_id(tok.eot_token)
        w.add_add_bos_token(False)  # our prompts start with their own tokens; the bos is for empty ones
        w.add_add_eos_token(False)
        for tname, t in tensors:
            qtype = tensor_type(tname, t, gguf_type)
            w.add_tensor(tname, gguf.quants.quantize(t.contiguous().numpy(), qtype), raw_dtype=qtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        w.close()
        remove_quietly(tmp)
        raise
    fsync_dir(os.path.dirname(os.path.abspath(path)))


def export_gguf(ckpt_path, out_path, gguf_type, family):
    """Write checkpoint ckpt_path as the GGUF file out_path. Returns (llama.cpp's architecture, a note)."""
    if gguf_type not in GGUF_TYPES:
        raise UserError(f"--gguf_type {gguf_type!r} is not one of {', '.join(GGUF_TYPES)}")
    if os.path.isdir(out_path):
        raise UserError(f"--out {out_path} is a folder; with --format gguf, --out names the file to write "
                        f"(e.g. {os.path.join(out_path, 'model.gguf')})")
    _gguf()
    ckpt = load_checkpoint(ckpt_path)
    if ckpt.get("quantization"):
        raise UserError(f"{ckpt_path} holds quantize.py's int8 weights; export the float checkpoint it was made "
                        f"from (--gguf_type q8_0 quantizes to GGUF's own 8 bits)")
    c = dict(ckpt["model_config"])
    fam = check_config(c, family, ckpt_path)
    arch = ARCHITECTURES[fam]
    tokenizer = gguf_tokenizer(ckpt, c["vocab_size"])  # before anything is written: it may be refused
    weights = ckpt["model"]
    if c.get("lora_rank"):
        weights, c["lora_rank"] = model_from_checkpoint(ckpt).merge_lora().state_dict(), 0
    tensors = gguf_tensors(c, weights, fam)
    folder = os.path.dirname(os.path.abspath(out_path))
    make_folder(folder, "the folder of --out")
    name = Path(ckpt_path).resolve().parent.name if Path(ckpt_path).is_file() else Path(ckpt_path).resolve().name
    write_gguf(out_path, arch, c, tensors, tokenizer, gguf_type, name)
    tok, pre = tokenizer
    note = f"{gguf_type}, tokenizer {tok.kind} ({tok.vocab_size} tokens, pre-tokenizer {pre})"
    if arch == "gpt2" and c["mlp"] == "gelu":
        note += "; mlp=gelu runs as llama.cpp's tanh-approximated GELU"
    return arch, note
