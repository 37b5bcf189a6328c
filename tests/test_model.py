"""model.py: attention paths, causality, shapes, presets, the reference generate."""
import warnings

import pytest
import torch

from model import GPT, GPTConfig, PRESETS, preset_config

FAMILIES = {
    "gpt2": dict(),
    "llama": dict(positions="rope", norm="rmsnorm", mlp="swiglu", n_kv_head=2, bias=False,
                  tie_embeddings=False, rope_theta=500000.0),
    "llama_qknorm_mqa": dict(positions="rope", norm="rmsnorm", mlp="swiglu", n_kv_head=1, qk_norm=True),
}


def tiny(family="gpt2", **kw):
    torch.manual_seed(0)
    cfg = GPTConfig(block_size=16, vocab_size=61, n_layer=2, n_head=4, n_embd=32, **{**FAMILIES[family], **kw})
    return GPT(cfg).eval()


def set_attn_impl(model, impl):
    for block in model.transformer.h:
        block.attn.impl = impl


@pytest.mark.parametrize("family", FAMILIES)
def test_explicit_and_fused_attention_agree(family):
    model = tiny(family)
    idx = torch.randint(0, 61, (3, 16))
    fused, _ = model(idx)
    set_attn_impl(model, "explicit")
    explicit, _ = model(idx)
    torch.testing.assert_close(explicit, fused, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("impl", ["fused", "explicit"])
def test_changing_a_later_token_changes_no_earlier_logit(family, impl):
    model = tiny(family, attn_impl=impl)
    idx = torch.randint(0, 61, (1, 16))
    changed = idx.clone()
    changed[0, 10] = (idx[0, 10] + 1) % 61
    a, _ = model(idx)
    b, _ = model(changed)
    torch.testing.assert_close(a[:, :10], b[:, :10], atol=0, rtol=0)
    assert not torch.allclose(a[:, 10:], b[:, 10:])


def test_loss_is_cross_entropy_and_ignores_minus_one_targets():
    model = tiny()
    idx = torch.randint(0, 61, (2, 16))
    targets = torch.randint(0, 61, (2, 16))
    logits, loss = model(idx, targets)
    expected = torch.nn.functional.cross_entropy(logits.view(-1, 61), targets.view(-1))
    torch.testing.assert_close(loss, expected)
    masked = targets.clone()
    masked[:, :8] = -1
    _, loss_masked = model(idx, masked)
    torch.testing.assert_close(loss_masked, torch.nn.functional.cross_entropy(logits[:, 8:].reshape(-1, 61),
                                                                              targets[:, 8:].reshape(-1)))


def test_untrained_loss_is_near_log_vocab():
    model = tiny()
    _, loss = model(torch.randint(0, 61, (4, 16)), torch.randint(0, 61, (4, 16)))
    assert abs(loss.item() - torch.log(torch.tensor(61.0)).item()) < 0.3


def test_tied_embeddings_share_one_matrix_and_untied_do_not():
    tied, untied = tiny(), tiny(tie_embeddings=False)
    assert tied.lm_head.weight is tied.transformer.wte.weight
    assert untied.lm_head.weight is not untied.transformer.wte.weight
    assert untied.get_num_params() == tied.get_num_params() + 61 * 32


# the parameter counts of the published models (Hugging Face's num_parameters of OpenAI's and Meta's checkpoints)
PUBLISHED = {"gpt2": 124_439_808, "gpt2-medium": 354_823_168, "gpt2-large": 774_030_080, "gpt2-xl": 1_557_611_200,
             "llama3.2-1b": 1_235_814_400, "llama3.2-3b": 3_212_749_824}


@pytest.mark.parametrize("name", PUBLISHED)
def test_each_published_preset_has_the_parameter_count_of_its_checkpoint(name):
    with torch.device("meta"):
        model = GPT(preset_config(name))
    assert model.get_num_params(non_embedding=False) == PUBLISHED[name]


@pytest.mark.parametrize("name", PRESETS)
def test_each_preset_has_the_parameter_count_transformers_gives_the_same_shape(name):
    transformers = pytest.importorskip("transformers")
    c = preset_config(name)
    with torch.device("meta"):
        ours = GPT(c).get_num_params(non_embedding=False)
        if c.positions == "learned":
            theirs = transformers.GPT2LMHeadModel(transformers.GPT2Config(
                n_layer=c.n_layer, n_head=c.n_head, n_embd=c.n_embd, vocab_size=c.vocab_size, n_positions=c.block_size))
        else:
            theirs = transformers.LlamaForCausalLM(transformers.LlamaConfig(
                vocab_size=c.vocab_size, hidden_size=c.n_embd, intermediate_size=c.mlp_hidden, num_hidden_layers=c.n_layer,
                num_attention_heads=c.n_head, num_key_value_heads=c.n_kv_head, tie_word_embeddings=c.tie_embeddings))
    assert ours == sum(p.numel() for p in theirs.parameters())


def test_bad_config_is_refused_with_the_key_named():
    with pytest.raises(ValueError, match="n_kv_head"):
        GPTConfig(n_head=4, n_kv_head=3, n_embd=32)
    with pytest.raises(ValueError, match="norm"):
        GPTConfig(norm="batchnorm")


def test_sequence_longer_than_block_size_is_refused():
    with pytest.raises(ValueError, match="block_size"):
        tiny()(torch.zeros(1, 17, dtype=torch.long))


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_crop_block_size_keeps_the_logits_of_shorter_contexts(family):
    model = tiny(family)
    idx = torch.randint(0, 61, (1, 8))
    before, _ = model(idx)
    model.crop_block_size(8)
    after, _ = model(idx)
    assert model.config.block_size == 8
    torch.testing.assert_close(before, after)
    with pytest.raises(ValueError):
        model(torch.zeros(1, 9, dtype=torch.long))


def test_greedy_generation_is_deterministic_and_extends_past_block_size():
    model = tiny()
    idx = torch.zeros(2, 1, dtype=torch.long)
    a = model.generate(idx, 40, temperature=0)
    b = model.generate(idx, 40, temperature=0)
    assert a.shape == (2, 41) and torch.equal(a, b)


def test_top_k_1_sampling_equals_greedy():
    model = tiny()
    idx = torch.randint(0, 61, (1, 3))
    torch.manual_seed(1)
    assert torch.equal(model.generate(idx, 10, temperature=1.0, top_k=1), model.generate(idx, 10, temperature=0))


def test_mfu_is_achieved_flops_over_peak():
    model = tiny()
    flops = model.flops_per_token() * 1000  # 1000 tokens in 1 s
    assert model.estimate_mfu(1000, 1.0, flops * 2) == pytest.approx(0.5)


def test_from_dict_leaves_out_unknown_keys_and_defaults_missing_ones():
    config = GPTConfig.from_dict({"n_layer": 3, "n_head": 2, "n_embd": 16, "a_future_key": 1})
    assert config.n_layer == 3 and config.norm == "layernorm" and not hasattr(config, "a_future_key")


def test_qk_norm_under_bfloat16_autocast_normalises_in_bfloat16_with_the_fused_kernel():
    # q and k leave the bfloat16 matmul in bfloat16; a float32 gain would send rms_norm to its slow
    # composite path (with a warning) and promote q and k back to float32
    model = tiny("llama_qknorm_mqa")
    norm = model.transformer.h[0].attn.q_norm
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(2, 4, 16, 8).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16), warnings.catch_warnings():
        warnings.simplefilter("error")
        y = norm(x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y, torch.nn.functional.rms_norm(x, (8,), norm.weight.bfloat16(), norm.eps))


def test_attention_computes_in_its_sdpa_dtype_under_autocast_and_returns_to_the_autocast_dtype(monkeypatch):
    model = tiny("llama_qknorm_mqa").train()
    seen = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, **kw):
        seen.append((q.dtype, k.dtype, v.dtype))
        return sdpa(q, k, v, **kw)
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    idx = torch.randint(0, 61, (2, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        default, _ = model(idx, idx)
    model.set_sdpa_dtype(torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        upcast, loss = model(idx, idx)
    loss.backward()
    assert seen[:2] == [(torch.bfloat16,) * 3] * 2 and seen[2:] == [(torch.float32,) * 3] * 2
    assert upcast.dtype == default.dtype
    assert all(p.grad is not None for p in model.transformer.h[0].attn.c_attn.parameters())
    torch.testing.assert_close(upcast.float(), default.float(), atol=0.1, rtol=0)  # bfloat16 rounding apart
