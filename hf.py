"""
Hugging Face interop: GPT-2 and LLaMA checkpoints in, ours out (a Hugging Face folder, a PEFT adapter,
or a GGUF file for llama.cpp).

  python train.py config/finetune_shakespeare.py --init_from=gpt2   # OpenAI's GPT-2 (gpt2-medium, -large, -xl)
  python train.py ... --init_from=PATH                                # a local GPT2LMHeadModel or LlamaForCausalLM folder
  python sample.py --init_from=PATH --start="Hello"
  python hf.py export --ckpt out/ckpt.pt --out DIR                    # ours -> a folder transformers loads
  python hf.py export --ckpt out-lora --out DIR --adapter ADAPTER_DIR  # the base in DIR, its LoRA as a PEFT adapter
  python hf.py export --ckpt out/ckpt.pt --out model.gguf --format gguf [--gguf_type f32|f16|q8_0]  # llama.cpp, Ollama
  python hf.py import --src PATH_OR_NAME --out DIR                    # a Hugging Face model -> DIR/ckpt.pt

A Hugging Face folder is config.json plus model.safetensors (or shards with model.safetensors.index.json).
Reading and writing need only the safetensors package; downloading gpt2* needs huggingface_hub (which
transformers brings); transformers itself is needed only to use an exported folder.

Weight layouts, theirs -> ours:
- GPT-2: Conv1D stores weights as (in, out), so every matrix is transposed into nn.Linear's (out, in).
  c_attn is q, k, v concatenated in both. HF's GPT-2 always has biases; ours without them export zeros.
- LLaMA: q_proj, k_proj, v_proj stacked by rows -> c_attn; gate_proj, up_proj -> c_fc ([gate; up]);
  o_proj -> attn.c_proj, down_proj -> mlp.c_proj. HF's checkpoints already permute q/k into the
  "rotate half" pairing (i, i + d/2) that model.apply_rope uses, so q and k load unchanged.
Config fields are mapped one by one; a field this file does not know is refused, not ignored.

LoRA: export folds the adapters into the weights, or with --adapter ADAPTER_DIR writes the base without
them into --out and the adapters as a PEFT adapter (adapter_config.json + adapter_model.safetensors),
which peft.PeftModel.from_pretrained(base, ADAPTER_DIR) applies. The fused layers map exactly: for
LLaMA's separate q/k/v_proj and gate/up_proj, lora_B is split by rows like the weight and lora_A is
copied to every part (B A x split by rows is each part's B_i A x); GPT-2's Conv1D c_attn is fused as
ours, and PEFT's fan_in_fan_out=True keeps lora_A (r, in) and lora_B (out, r) as nn.Linear stores them.
GGUF (--format gguf, export_gguf.py): one file for llama.cpp, from the same two families.
"""
import json
import os
import sys
from dataclasses import asdict
from pathlib import Path

import torch

from checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
from common import ArgumentParser, UserError, description, make_folder, run_cli
from export_gguf import GGUF_TYPES, export_gguf
from model import GPTConfig
from quantize import load_model

# Hub names accepted as init_from, and the repositories that hold OpenAI's weights
HUB_MODELS = {"gpt2": "openai-community/gpt2", "gpt2-medium": "openai-community/gpt2-medium",
              "gpt2-large": "openai-community/gpt2-large", "gpt2-xl": "openai-community/gpt2-xl"}

# config.json fields that never change the function a model computes (bookkeeping, generation, dropout)
HARMLESS = {"architectures", "model_type", "transformers_version", "dtype", "torch_dtype", "_name_or_path",
            "bos_token_id", "eos_token_id", "pad_token_id", "sep_token_id", "decoder_start_token_id",
            "initializer_range", "use_cache", "id2label", "label2id", "task_specific_params", "output_past",
            "output_attentions", "output_hidden_states", "return_dict", "tokenizer_class", "prefix",
            "max_length", "min_length", "do_sample", "num_beams", "temperature", "top_k", "top_p",
            "repetition_penalty", "length_penalty", "no_repeat_ngram_size", "bad_words_ids", "use_return_dict",
            "is_encoder_decoder", "is_decoder", "chunk_size_feed_forward", "problem_type", "finetuning_task",
            "pruned_heads", "torchscript", "tie_encoder_decoder", "add_cross_attention"}
GPT2_HARMLESS = {"attn_pdrop", "embd_pdrop", "resid_pdrop", "n_ctx", "summary_activation", "summary_first_dropout",
                 "summary_proj_to_labels", "summary_type", "summary_use_proj", "reorder_and_upcast_attn",
                 "predict_special_tokens", "n_special"}
LLAMA_HARMLESS = {"attention_dropout", "pretraining_tp"}  # pretraining_tp splits matmuls, same result

GPT2_ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
                    "gelu_fast": "gelu_tanh", "relu2": "relu2"}


# ----------------------------------------------------------------------------------------------
# config.json <-> GPTConfig fields

def _check_fields(hf, known, where):
    unknown = sorted(set(hf) - known - HARMLESS)
    if unknown:
        raise UserError(f"{where}: config field {unknown[0]!r} is not supported by hf.py (it may change the model); "
                      f"remove it from config.json if it does not")


def _require(hf, key, where):
    if hf.get(key) is None:
        raise UserError(f"{where}: config.json lacks {key!r}")
    return hf[key]


def _rope_fields(hf, where):
    """RoPE settings from the older (rope_theta + rope_scaling) or the newer (rope_parameters) form."""
    params = dict(hf.get("rope_parameters") or {})
    scaling = dict(hf.get("rope_scaling") or {})
    theta = params.pop("rope_theta", hf.get("rope_theta", 10000.0))
    params = {**scaling, **params}
    kind = params.pop("rope_type", params.pop("type", "default"))
    out = dict(rope_theta=float(theta), rope_scaling="")
    if params.pop("partial_rotary_factor", 1.0) != 1.0:
        raise UserError(f"{where}: partial_rotary_factor other than 1 is not supported")
    if kind == "llama3":
        try:
            out.update(rope_scaling="llama3", rope_factor=float(params.pop("factor")),
                       rope_low_freq_factor=float(params.pop("low_freq_factor")),
                       rope_high_freq_factor=float(params.pop("high_freq_factor")),
                       rope_original_context=int(params.pop("original_max_position_embeddings")))
        except KeyError as e:
            raise UserError(f"{where}: llama3 rope scaling lacks {e.args[0]!r}") from None
    elif kind != "default":
        raise UserError(f"{where}: rope type {kind!r} is not supported (only default and llama3)")
    if params:
        raise UserError(f"{where}: rope field {sorted(params)[0]!r} is not supported")
    return out


def config_from_hf(hf, where="config.json"):
    """GPTConfig keyword arguments for a GPT2LMHeadModel's or LlamaForCausalLM's config.json."""
    arch = (hf.get("architectures") or [None])[0]
    mtype = hf.get("model_type")
    if mtype == "gpt2" and arch in (None, "GPT2LMHeadModel", "GPT2Model"):
        _check_fields(hf, GPT2_HARMLESS | {"vocab_size", "n_positions", "n_layer", "n_head", "n_embd", "n_inner",
                                           "activation_function", "layer_norm_epsilon", "tie_word_embeddings",
                                           "scale_attn_weights", "scale_attn_by_inverse_layer_idx"}, where)
        if not hf.get("scale_attn_weights", True) or hf.get("scale_attn_by_inverse_layer_idx", False) \
                or hf.get("add_cross_attention", False) or hf.get("n_special", 0):
            raise UserError(f"{where}: GPT-2 variants with scale_attn_weights=false, scale_attn_by_inverse_layer_idx, "
                          f"cross-attention or n_special tokens are not supported")
        act = hf.get("activation_function", "gelu_new")
        if act not in GPT2_ACTIVATIONS:
            raise UserError(f"{where}: activation_function {act!r} is not supported "
                          f"(one of {', '.join(GPT2_ACTIVATIONS)})")
        n_embd = _require(hf, "n_embd", where)
        return dict(vocab_size=_require(hf, "vocab_size", where), block_size=_require(hf, "n_positions", where),
                    n_layer=_require(hf, "n_layer", where), n_head=_require(hf, "n_head", where), n_embd=n_embd,
                    mlp_hidden=hf.get("n_inner") or 4 * n_embd, mlp=GPT2_ACTIVATIONS[act], bias=True,
                    norm="layernorm", norm_eps=hf.get("layer_norm_epsilon", 1e-5), positions="learned",
                    tie_embeddings=hf.get("tie_word_embeddings", True))
    if mtype == "llama" and arch in (None, "LlamaForCausalLM", "LlamaModel"):
        _check_fields(hf, LLAMA_HARMLESS | {"vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                            "num_attention_heads", "num_key_value_heads", "head_dim", "hidden_act",
                                            "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings",
                                            "attention_bias", "mlp_bias", "rope_theta", "rope_scaling",
                                            "rope_parameters"}, where)
        if hf.get("hidden_act", "silu") != "silu":
            raise UserError(f"{where}: hidden_act {hf['hidden_act']!r} is not supported (LLaMA uses silu)")
        if bool(hf.get("attention_bias", False)) != bool(hf.get("mlp_bias", False)):
            raise UserError(f"{where}: attention_bias and mlp_bias differ; our bias switch covers both")
        n_head = _require(hf, "num_attention_heads", where)
        n_embd = _require(hf, "hidden_size", where)
        return dict(vocab_size=_require(hf, "vocab_size", where),
                    block_size=_require(hf, "max_position_embeddings", where),
                    n_layer=_require(hf, "num_hidden_layers", where), n_head=n_head, n_embd=n_embd,
                    n_kv_head=hf.get("num_key_value_heads") or n_head, head_dim=hf.get("head_dim") or n_embd // n_head,
                    mlp="swiglu", mlp_hidden=_require(hf, "intermediate_size", where),
                    bias=bool(hf.get("attention_bias", False)), norm="rmsnorm",
                    norm_eps=hf.get("rms_norm_eps", 1e-6), positions="rope",
                    tie_embeddings=hf.get("tie_word_embeddings", False), **_rope_fields(hf, where))
    raise UserError(f"{where}: architecture {arch or mtype!r} is not supported; "
                  f"hf.py reads GPT2LMHeadModel and LlamaForCausalLM")


def family(c):
    """'gpt2' or 'llama': the Hugging Face class that can hold config c (a dict of GPTConfig fields),
    or an UserError naming what neither can express."""
    def refuse(what):
        return UserError(f"{what} cannot be written as a Hugging Face "
                       f"{'LlamaForCausalLM' if c['positions'] == 'rope' else 'GPT2LMHeadModel'}")
    if c["positions"] == "alibi":
        raise UserError("positions=alibi cannot be written as a Hugging Face GPT2LMHeadModel or LlamaForCausalLM "
                        "(neither has ALiBi)")
    if c["qk_norm"]:
        raise refuse("qk_norm")
    for key, off in (("causal", True), ("value_embeds", False), ("norm_head", False), ("logit_softcap", 0.0),
                     ("attn_window", 0)):
        if c.get(key, off) != off:  # older checkpoints lack these keys
            raise refuse(f"{key}={c[key]}")
    if c["positions"] == "learned":
        if c["norm"] != "layernorm":
            raise refuse(f"norm={c['norm']} with learned positions")
        if c["mlp"] not in ("gelu", "gelu_tanh", "relu2"):
            raise refuse(f"mlp={c['mlp']} with learned positions")
        if c["n_kv_head"] != c["n_head"] or c["head_dim"] * c["n_head"] != c["n_embd"]:
            raise refuse("grouped-query attention or a head_dim other than n_embd/n_head")
        return "gpt2"
    if c["norm"] != "rmsnorm" or c["mlp"] != "swiglu":
        raise refuse(f"norm={c['norm']}, mlp={c['mlp']} with rope (LLaMA needs rmsnorm and swiglu)")
    return "llama"


def config_to_hf(c, bos_token_id=None, eos_token_id=None):
    """config.json for our config c; the older rope_theta/rope_scaling keys, which transformers 4 and 5 read."""
    common = {"vocab_size": c["vocab_size"], "tie_word_embeddings": c["tie_embeddings"], "torch_dtype": "float32",
              "bos_token_id": bos_token_id, "eos_token_id": eos_token_id}
    if family(c) == "gpt2":
        act = {"gelu": "gelu", "gelu_tanh": "gelu_new", "relu2": "relu2"}[c["mlp"]]
        return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", **common,
                "n_positions": c["block_size"], "n_ctx": c["block_size"], "n_layer": c["n_layer"],
                "n_head": c["n_head"], "n_embd": c["n_embd"], "n_inner": c["mlp_hidden"],
                "activation_function": act, "layer_norm_epsilon": c["norm_eps"], "scale_attn_weights": True,
                "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False,
                "attn_pdrop": 0.0, "embd_pdrop": 0.0, "resid_pdrop": 0.0}
    scaling = None
    if c["rope_scaling"] == "llama3":
        scaling = {"rope_type": "llama3", "factor": c["rope_factor"], "low_freq_factor": c["rope_low_freq_factor"],
                   "high_freq_factor": c["rope_high_freq_factor"],
                   "original_max_position_embeddings": c["rope_original_context"]}
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", **common,
            "hidden_size": c["n_embd"], "intermediate_size": c["mlp_hidden"], "num_hidden_layers": c["n_layer"],
            "num_attention_heads": c["n_head"], "num_key_value_heads": c["n_kv_head"], "head_dim": c["head_dim"],
            "hidden_act": "silu", "max_position_embeddings": c["block_size"], "rms_norm_eps": c["norm_eps"],
            "attention_bias": c["bias"], "mlp_bias": c["bias"], "attention_dropout": 0.0,
            "rope_theta": c["rope_theta"], "rope_scaling": scaling}


# ----------------------------------------------------------------------------------------------
# weights: one table drives both directions

def layout(c):
    """[(our name, [HF names], how)] for every tensor of config c; how is 'same', 'T' (GPT-2's Conv1D,
    stored transposed) or 'rows' (our tensor is the HF tensors stacked along dim 0)."""
    out = []
    if family(c) == "gpt2":
        out += [("transformer.wte.weight", ["transformer.wte.weight"], "same"),
                ("transformer.wpe.weight", ["transformer.wpe.weight"], "same")]
        for i in range(c["n_layer"]):
            p = f"transformer.h.{i}."
            for name in ("ln_1", "ln_2"):
                out += [(p + name + ".weight", [p + name + ".weight"], "same"),
                        (p + name + ".bias", [p + name + ".bias"], "same")]
            for name in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"):
                out += [(p + name + ".weight", [p + name + ".weight"], "T"),
                        (p + name + ".bias", [p + name + ".bias"], "same")]
        out += [("transformer.ln_f.weight", ["transformer.ln_f.weight"], "same"),
                ("transformer.ln_f.bias", ["transformer.ln_f.bias"], "same")]
    else:
        out.append(("transformer.wte.weight", ["model.embed_tokens.weight"], "same"))
        for i in range(c["n_layer"]):
            p, q = f"transformer.h.{i}.", f"model.layers.{i}."
            out += [(p + "ln_1.weight", [q + "input_layernorm.weight"], "same"),
                    (p + "ln_2.weight", [q + "post_attention_layernorm.weight"], "same")]
            for kind in ("weight", "bias") if c["bias"] else ("weight",):
                out += [(p + f"attn.c_attn.{kind}", [q + f"self_attn.{x}_proj.{kind}" for x in "qkv"], "rows"),
                        (p + f"attn.c_proj.{kind}", [q + f"self_attn.o_proj.{kind}"], "same"),
                        (p + f"mlp.c_fc.{kind}", [q + f"mlp.{x}_proj.{kind}" for x in ("gate", "up")], "rows"),
                        (p + f"mlp.c_proj.{kind}", [q + f"mlp.down_proj.{kind}"], "same")]
        out.append(("transformer.ln_f.weight", ["model.norm.weight"], "same"))
    if not c["tie_embeddings"]:
        out.append(("lm_head.weight", ["lm_head.weight"], "same"))
    return out


def _normalize_hf_names(tensors, fam):
    """HF names as a *ForCausalLM saves them: files saved from the base model lack the prefix, and old
    GPT-2 files carry the causal-mask buffers attn.bias / attn.masked_bias, which are not weights."""
    prefix = "transformer." if fam == "gpt2" else "model."
    out = {}
    for name, t in tensors.items():
        if name.endswith((".attn.bias", ".attn.masked_bias", ".rotary_emb.inv_freq")):
            continue
        if name != "lm_head.weight" and not name.startswith(prefix):
            name = prefix + name
        out[name] = t
    return out


def state_dict_from_hf(c, tensors, where="weights"):
    """Our state dict (float32) from HF tensors, for our config c; checks names and shapes both ways."""
    fam = family(c)
    tensors = _normalize_hf_names(tensors, fam)
    if c["tie_embeddings"]:  # a tied lm_head is saved by some versions; it is the embedding
        tensors.pop("lm_head.weight", None)
    sd, used = {}, set()
    for ours, theirs, how in layout(c):
        missing = [n for n in theirs if n not in tensors]
        if missing:
            raise UserError(f"{where}: tensor {missing[0]!r} is missing")
        parts = [tensors[n].float() for n in theirs]
        sd[ours] = parts[0].t().contiguous() if how == "T" else torch.cat(parts, 0) if how == "rows" else parts[0]
        used.update(theirs)
    if c["tie_embeddings"]:  # one matrix under both names, as GPT.state_dict() lists it
        sd["lm_head.weight"] = sd["transformer.wte.weight"]
    extra = sorted(set(tensors) - used)
    if extra:
        raise UserError(f"{where}: tensor {extra[0]!r} has no place in a {fam} model of this config; "
                      f"the config and the weights disagree")
    return sd


def state_dict_to_hf(c, sd):
    """HF tensors for our state dict sd of config c (GPT-2 biases we lack are written as zeros)."""
    out = {}
    sizes = {"attn.c_attn": [c["n_head"] * c["head_dim"]] + [c["n_kv_head"] * c["head_dim"]] * 2,
             "mlp.c_fc": [c["mlp_hidden"]] * 2}
    for ours, theirs, how in layout(c):
        if ours not in sd:  # a bias=False GPT-2 model: its missing biases and norm shifts are zeros
            width = sd[ours.replace(".bias", ".weight")].shape[0]
            out[theirs[0]] = torch.zeros(width)
            continue
        t = sd[ours].detach().float().cpu()
        if how == "T":
            out[theirs[0]] = t.t().contiguous()
        elif how == "rows":
            key = next(k for k in sizes if k in ours)
            for name, part in zip(theirs, t.split(sizes[key], 0)):
                out[name] = part.contiguous()
        else:
            out[theirs[0]] = t.contiguous()
    return out


# ----------------------------------------------------------------------------------------------
# folders

def is_hf_source(init_from):
    """Whether init_from names a Hugging Face model: a folder with config.json, or a GPT-2 Hub name."""
    if os.path.isdir(init_from):
        return os.path.isfile(os.path.join(init_from, "config.json")) \
            and not os.path.isfile(os.path.join(init_from, "ckpt.pt"))
    return init_from in HUB_MODELS and not os.path.exists(init_from)


def download(name):
    """A local folder holding the Hub's copy of a GPT-2 model (config.json + model.safetensors)."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise UserError(f"init_from={name} downloads from the Hugging Face Hub and needs huggingface_hub; "
                      f"pip install transformers") from None
    try:
        return snapshot_download(HUB_MODELS[name], allow_patterns=["config.json", "model.safetensors"])
    except Exception as e:  # no network, no cache, a proxy: all end here
        raise UserError(f"could not download {HUB_MODELS[name]} from the Hugging Face Hub ({type(e).__name__}); "
                        f"when offline, name a local copy (a folder with config.json and model.safetensors) instead: "
                        f"--init_from=PATH for train.py and sample.py, --src PATH for hf.py import") from None


def read_tensors(path):
    """All tensors of a folder: model.safetensors, its shards, or pytorch_model.bin."""
    path = Path(path)
    index = path / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (path / "model.safetensors").is_file():
        files = ["model.safetensors"]
    elif (path / "pytorch_model.bin").is_file():
        try:
            return torch.load(path / "pytorch_model.bin", map_location="cpu", weights_only=True)
        except Exception as e:
            raise UserError(f"could not read {path / 'pytorch_model.bin'} ({type(e).__name__})") from None
    else:
        raise UserError(f"{path} has config.json but no model.safetensors (or shards with an index); "
                      f"save the model with save_pretrained")
    try:
        from safetensors.torch import load_file
    except ImportError:
        raise UserError("reading a Hugging Face folder needs the safetensors package; pip install safetensors") from None
    tensors = {}
    for f in files:
        try:
            tensors.update(load_file(path / f))
        except Exception as e:
            raise UserError(f"could not read {path / f} ({type(e).__name__}); it may be truncated") from None
    return tensors


def read_config(path):
    try:
        return json.loads((Path(path) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"could not read {Path(path) / 'config.json'} ({type(e).__name__})") from None


def special_ids(path):
    """(bos id or None, [eos ids]) as the folder's generation_config.json or config.json names them."""
    bos, eos = None, []
    for name in ("config.json", "generation_config.json"):  # the generation config wins for generation
        try:
            data = json.loads((Path(path) / name).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        bos = data.get("bos_token_id", bos) if isinstance(data.get("bos_token_id"), int) else bos
        ids = data.get("eos_token_id")
        ids = [ids] if isinstance(ids, int) else ids
        if isinstance(ids, list) and ids and all(isinstance(i, int) for i in ids):
            eos = ids
    return bos, eos


def find_tokenizer(path, model_config):
    """tokenizer meta for load_tokenizer: the folder's own tokenizer (with the bos and eos ids its config
    names), else GPT-2's for GPT-2-sized vocabularies."""
    from tokenizer import hf_file_meta
    path = Path(path).resolve()
    for f in ("tokenizer.json", "tokenizer.model", "original/tokenizer.model"):
        if (path / f).is_file():
            bos, eos = special_ids(path)
            return hf_file_meta(path / f, bos, eos)  # refuses, now, a file that cannot be read
    if model_config["positions"] == "learned" and model_config["vocab_size"] == 50257:
        return {"kind": "gpt2"}
    raise UserError(f"{path} has no tokenizer.json or tokenizer.model; copy the model's tokenizer files "
                    f"into it (tiktoken reads tokenizer.model and byte-level BPE tokenizer.json)")


def load_hf_checkpoint(source, with_tokenizer=False):
    """A Hugging Face model as one of our checkpoints: {"model", "model_config", "tokenizer", "dataset_dir"}.
    source is a folder or a GPT-2 Hub name; the tokenizer is looked up only when asked for."""
    path = download(source) if source in HUB_MODELS and not os.path.exists(source) else source
    where = str(Path(path) / "config.json") if source not in HUB_MODELS else source
    fields = config_from_hf(read_config(path), where)
    try:
        config = asdict(GPTConfig(**fields))
    except (TypeError, ValueError) as e:  # shapes our model cannot take, e.g. an odd head_dim with rope
        raise UserError(f"{where}: {e}") from None
    return {"model": state_dict_from_hf(config, read_tensors(path), str(path)), "model_config": config,
            "tokenizer": find_tokenizer(path, config) if with_tokenizer else None, "dataset_dir": None}


def load_source(init_from, out_dir=None, with_tokenizer=False):
    """The checkpoint a script starts from: out_dir's ckpt.pt for init_from=resume, a Hugging Face folder
    or GPT-2 Hub name, or a checkpoint of ours (a file, or the folder holding ckpt.pt)."""
    if init_from == "resume":
        return load_checkpoint(out_dir)
    if is_hf_source(init_from):
        return load_hf_checkpoint(init_from, with_tokenizer)
    return load_checkpoint(init_from)


def load_for_inference(init_from, out_dir, device, decoder_for=""):
    """The checkpoint (load_source's), its model on the device in eval mode, and its tokenizer.
    decoder_for: the program that reads next-token probabilities, which refuses an encoder."""
    from tokenizer import load_tokenizer
    ckpt = load_source(init_from, out_dir, with_tokenizer=True)
    if decoder_for and not ckpt["model_config"].get("causal", True):
        raise UserError(f"{decoder_for} reads a decoder's next-token probabilities, and this checkpoint is an encoder "
                        f"(causal=False): fill its masks with sample.py, or fine-tune it on a classify dataset")
    if not ckpt.get("tokenizer"):
        raise UserError("the checkpoint records no tokenizer, so its token ids cannot be turned into text; "
                        "fine-tune it on a prepared dataset first (the run records the dataset's tokenizer)")
    model = load_model(ckpt).to(device).eval()  # float, or int8 saved by quantize.py
    return ckpt, model, load_tokenizer(ckpt["tokenizer"], ckpt.get("dataset_dir"))


def export(ckpt_path, out_dir, adapter_dir=None):
    """Write checkpoint ckpt_path as a Hugging Face folder out_dir: config.json, model.safetensors (LoRA
    adapters folded in, or with adapter_dir left out and written there as a PEFT adapter), and the
    tokenizer (tokenizer.json + tokenizer_config.json) where it can be written. Returns (the config
    written, a note on the tokenizer)."""
    try:
        from safetensors.torch import save_file
    except ImportError:
        raise UserError("export writes safetensors: pip install safetensors") from None
    ckpt = load_checkpoint(ckpt_path)
    c = dict(ckpt["model_config"])
    if c.get("n_classes"):
        raise UserError(f"{ckpt_path} is a classifier: its head (with a bias) has no place in transformers' "
                        f"*ForSequenceClassification (a head without one); hf.py exports language models only")
    if ckpt.get("quantization"):
        raise UserError(f"{ckpt_path} holds quantize.py's int8 weights; export the float checkpoint it was made from")
    if adapter_dir is not None and not c.get("lora_rank"):
        raise UserError(f"{ckpt_path} has no LoRA adapters (lora_rank=0), so --adapter has nothing to write; "
                        f"export it without --adapter")
    if adapter_dir is not None and Path(adapter_dir).resolve() == Path(out_dir).resolve():
        raise UserError("--adapter must name another folder than --out (transformers reads a folder holding "
                        "adapter_config.json as an adapter, not as the base)")
    tok, note = export_tokenizer(ckpt)  # before anything is written: loading it may fail
    config = config_to_hf(c, getattr(tok, "bos_token", None), getattr(tok, "eot_token", None))
    weights, adapters = ckpt["model"], None
    if c.get("lora_rank") and adapter_dir is not None:
        adapters = peft_tensors(c, weights)
        weights = {k: v for k, v in weights.items() if ".lora_" not in k}  # the base: LoRALinear keeps its names
        c["lora_rank"] = 0
    elif c.get("lora_rank"):
        weights, c["lora_rank"] = model_from_checkpoint(ckpt).merge_lora().state_dict(), 0
    tensors = state_dict_to_hf(c, weights)
    make_folder(str(out_dir), "--out")
    out = Path(out_dir)
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    if (ckpt.get("tokenizer") or {}).get("kind") == "hf":  # the tokenizer came with an imported model: pass it on
        src = Path(ckpt["tokenizer"]["file"])
        (out / src.name).write_bytes(src.read_bytes())
    elif tok is not None:
        write_tokenizer(tok, out, c["block_size"])
    ordinary_permissions(out)
    if adapters is not None:
        make_folder(str(adapter_dir), "--adapter")
        save_file(adapters, Path(adapter_dir) / "adapter_model.safetensors", metadata={"format": "pt"})
        (Path(adapter_dir) / "adapter_config.json").write_text(
            json.dumps(peft_config(dict(ckpt["model_config"]), out), indent=2) + "\n", encoding="utf-8")
        ordinary_permissions(adapter_dir)
    return config, note


# ----------------------------------------------------------------------------------------------
# LoRA adapters as PEFT's

def lora_layout(c):
    """[(our LoRA module, [HF modules], row sizes or None)] for the adapted layers of config c: row sizes
    split our fused lora_B between HF's separate modules (LLaMA's q/k/v_proj, gate/up_proj)."""
    targets = {t.strip() for t in c["lora_targets"].split(",") if t.strip()}
    sizes = {"attn.c_attn": [c["n_head"] * c["head_dim"]] + [c["n_kv_head"] * c["head_dim"]] * 2,
             "mlp.c_fc": [c["mlp_hidden"]] * 2}
    out = []
    for ours, theirs, how in layout(c):
        module = ours.removesuffix(".weight")
        target = ".".join(module.split(".")[-2:])  # transformer.h.0.attn.c_attn -> attn.c_attn
        if ours.endswith(".weight") and ".h." in ours and target in targets:
            out.append((module, [t.removesuffix(".weight") for t in theirs], sizes[target] if how == "rows" else None))
    return out


def peft_tensors(c, sd):
    """adapter_model.safetensors for the LoRA tensors in our state dict sd: PEFT's names
    (base_model.model.<module>.lora_A.weight), A (r, in) and B (out, r) as ours."""
    out = {}
    for ours, theirs, sizes in lora_layout(c):
        a, b = sd[ours + ".lora_A"].detach().float().cpu(), sd[ours + ".lora_B"].detach().float().cpu()
        parts = b.split(sizes, 0) if sizes else [b]  # B A x split by rows: every part shares A
        for name, part in zip(theirs, parts):
            out[f"base_model.model.{name}.lora_A.weight"] = a.clone()
            out[f"base_model.model.{name}.lora_B.weight"] = part.contiguous()
    return out


def peft_config(c, base_dir):
    """adapter_config.json for the adapters of config c over the base folder base_dir."""
    modules = sorted({".".join(name.split(".")[-2:]) for _, theirs, _ in lora_layout(c) for name in theirs})
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": str(Path(base_dir).resolve()),
            "r": c["lora_rank"], "lora_alpha": c["lora_alpha"], "lora_dropout": c["lora_dropout"],
            "target_modules": modules,  # qualified (attn.c_proj, mlp.c_proj): PEFT matches name suffixes
            "fan_in_fan_out": family(c) == "gpt2",  # GPT-2's Conv1D stores its weight (in, out)
            "bias": "none", "use_rslora": False, "use_dora": False, "modules_to_save": None,
            "init_lora_weights": True, "inference_mode": True}


def write_tokenizer(tok, folder, max_length):
    """tok as transformers reads it: folder/tokenizer.json and folder/tokenizer_config.json."""
    from tokenizer import hf_tokenizer_config, hf_tokenizer_json
    folder = Path(folder)
    (folder / "tokenizer.json").write_text(json.dumps(hf_tokenizer_json(tok), ensure_ascii=False), encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(json.dumps(hf_tokenizer_config(tok, max_length), indent=2) + "\n",
                                                  encoding="utf-8")


def export_tokenizer(ckpt):
    """The checkpoint's tokenizer, if it can be written beside the weights; else None and why not."""
    from tokenizer import load_tokenizer
    meta = ckpt.get("tokenizer") or {}
    if not meta:
        return None, "no tokenizer written: the checkpoint records none"
    try:
        tok = load_tokenizer(meta, ckpt.get("dataset_dir"))
    except UserError as e:
        return None, f"no tokenizer written: {e}"
    if tok.vocab_size != ckpt["model_config"]["vocab_size"]:
        return None, (f"no tokenizer written: its {tok.vocab_size} tokens are not the model's "
                      f"{ckpt['model_config']['vocab_size']}")
    if meta.get("kind") == "hf":
        return tok, f"tokenizer: {Path(meta['file']).name}, the imported model's own"
    return tok, f"tokenizer: tokenizer.json and tokenizer_config.json ({meta.get('kind')}, {tok.vocab_size} tokens)"


def ordinary_permissions(folder):
    """Files as any other program writes them (safetensors makes its files readable by the owner only)."""
    mask = os.umask(0)
    os.umask(mask)
    for p in Path(folder).iterdir():
        if p.is_file():
            p.chmod(0o666 & ~mask)


# ----------------------------------------------------------------------------------------------
# command line

def main(argv):
    parser = ArgumentParser(prog="hf.py", description=description(__doc__))
    sub = parser.add_subparsers(dest="command", required=True)
    ex = sub.add_parser("export", help="write one of our checkpoints as a Hugging Face folder (or a GGUF file)")
    ex.add_argument("--ckpt", required=True, help="ckpt.pt, or the out_dir holding it")
    ex.add_argument("--out", required=True, help="folder to write config.json and model.safetensors into "
                                                 "(--format gguf: the .gguf file to write)")
    ex.add_argument("--format", choices=("hf", "gguf"), default="hf",
                    help="hf: a folder transformers loads; gguf: one file llama.cpp and Ollama run (export_gguf.py)")
    ex.add_argument("--gguf_type", choices=GGUF_TYPES, default=None,
                    help="--format gguf: the matrices' type (norms and biases stay f32); default f16")
    ex.add_argument("--adapter", metavar="ADAPTER_DIR", default=None,
                    help="a LoRA checkpoint's adapters as a PEFT adapter folder; --out then gets the base "
                         "without them (default: folded into the weights)")
    im = sub.add_parser("import", help="convert a Hugging Face model into out/ckpt.pt")
    im.add_argument("--src", required=True, help="a Hugging Face folder, or gpt2 | gpt2-medium | gpt2-large | gpt2-xl")
    im.add_argument("--out", required=True, help="folder to write ckpt.pt into")
    args = parser.parse_args(argv)
    if args.command == "export" and args.format == "gguf":
        if args.adapter is not None:
            raise UserError("--adapter writes a PEFT adapter beside a Hugging Face folder; a GGUF file holds the "
                            "model with its LoRA adapters folded in (leave --adapter out)")
        arch, note = export_gguf(args.ckpt, args.out, args.gguf_type or "f16", family)
        print(f"wrote GGUF ({arch}) to {args.out}; {note}")
        return
    if args.command == "export":
        if args.gguf_type is not None:
            raise UserError("--gguf_type is for --format gguf")
        config, note = export(args.ckpt, args.out, args.adapter)
        extra = f"; LoRA adapters as a PEFT adapter in {args.adapter}" if args.adapter else ""
        print(f"wrote {config['architectures'][0]} to {args.out}; {note}{extra}")
        return
    if not is_hf_source(args.src):
        raise UserError(f"{args.src} is neither a folder with config.json nor one of {', '.join(HUB_MODELS)}")
    ckpt = load_hf_checkpoint(args.src, with_tokenizer=True)
    make_folder(args.out, "--out")
    save_checkpoint({**ckpt, "config": {}, "iter_num": 0, "best_val_loss": float("inf")}, args.out)
    print(f"wrote {os.path.join(args.out, 'ckpt.pt')}")


if __name__ == "__main__":
    sys.exit(run_cli(main))
