"""hf.py export --adapter: a LoRA fine-tune as its base (a Hugging Face folder without the adapters) and a
PEFT adapter folder, which peft.PeftModel.from_pretrained applies to that base to compute our adapted
model's logits: exactly, though our fused c_attn and c_fc are LLaMA's separate q/k/v and gate/up modules."""
from dataclasses import asdict

import pytest
import torch

from conftest import one_line_error, run_main

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
pytest.importorskip("safetensors")

CHARS = "abcdefghijklmnopqrstuvwxyz .,;!?"
ALL = "attn.c_attn,attn.c_proj,mlp.c_fc,mlp.c_proj"
LLAMA = dict(positions="rope", norm="rmsnorm", mlp="swiglu", bias=False, n_kv_head=2, tie_embeddings=False)


def lora_checkpoint(path, lora_targets=ALL, **arch):
    """A tiny model with LoRA adapters of rank 4 and alpha 12 (scale 3) on lora_targets, every lora_B
    random so that the adapters matter, saved at path with a char tokenizer. Returns it, in eval mode."""
    from model import GPT, GPTConfig
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=len(CHARS), n_layer=2, n_head=4, n_embd=32, lora_rank=4,
                          lora_alpha=12.0, lora_targets=lora_targets, **arch)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(0, 0.3)
    torch.save({"model": model.state_dict(), "model_config": asdict(model.config),
                "tokenizer": {"kind": "char", "chars": CHARS}}, path)
    return model


@pytest.mark.parametrize("arch,targets", [(LLAMA, ALL), (dict(LLAMA, bias=True), "attn.c_attn,mlp.c_fc"),
                                          ({}, ALL), ({}, "attn.c_attn,mlp.c_proj")],
                         ids=["llama", "llama-bias-fused-only", "gpt2", "gpt2-one-c_proj"])
def test_peft_applies_our_adapters_to_the_exported_base(tmp_path, arch, targets):
    ours = lora_checkpoint(tmp_path / "lora.pt", targets, **arch)
    run_main("hf.py", "export", "--ckpt", "lora.pt", "--out", "base", "--adapter", "adapter", cwd=tmp_path)
    base = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "base")).eval()
    idx = torch.randint(0, len(CHARS), (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), ours.adapters_disabled():  # the base folder holds the weights without the adapters
        torch.testing.assert_close(base(idx).logits, ours(idx)[0], atol=1e-4, rtol=0)
        without = ours(idx)[0]
    theirs = peft.PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        adapted = ours(idx)[0]
        assert (adapted - without).abs().max() > 0.1  # the adapters change the model: the test can fail
        torch.testing.assert_close(theirs(idx).logits, adapted, atol=1e-4, rtol=0)


def test_the_adapter_folder_is_peft_s_lora_format(tmp_path):
    import json
    from safetensors.torch import load_file
    lora_checkpoint(tmp_path / "lora.pt", **LLAMA)
    run_main("hf.py", "export", "--ckpt", "lora.pt", "--out", "base", "--adapter", "adapter", cwd=tmp_path)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"], config["fan_in_fan_out"]) == ("LORA", 4, 12.0, False)
    assert sorted(config["target_modules"]) == ["mlp.down_proj", "mlp.gate_proj", "mlp.up_proj", "self_attn.k_proj",
                                                "self_attn.o_proj", "self_attn.q_proj", "self_attn.v_proj"]
    tensors = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    q = "base_model.model.model.layers.0.self_attn."
    assert tensors[q + "q_proj.lora_B.weight"].shape == (32, 4) and tensors[q + "k_proj.lora_B.weight"].shape == (16, 4)
    assert torch.equal(tensors[q + "q_proj.lora_A.weight"], tensors[q + "v_proj.lora_A.weight"])  # one A, shared
    base = load_file(tmp_path / "base" / "model.safetensors")
    assert not [k for k in base if "lora" in k]


def test_adapter_export_of_a_checkpoint_without_adapters_is_refused_in_one_line(tmp_path):
    from model import GPT, GPTConfig
    model = GPT(GPTConfig(block_size=16, vocab_size=len(CHARS), n_layer=1, n_head=2, n_embd=16))
    torch.save({"model": model.state_dict(), "model_config": asdict(model.config),
                "tokenizer": {"kind": "char", "chars": CHARS}}, tmp_path / "plain.pt")
    result = run_main("hf.py", "export", "--ckpt", "plain.pt", "--out", "base", "--adapter", "adapter", cwd=tmp_path,
                      check=False)
    one_line_error(result, "has no LoRA adapters")
    assert not (tmp_path / "base").exists() and not (tmp_path / "adapter").exists()
