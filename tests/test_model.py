"""model.py: attention paths, causality, shapes, presets, generation."""
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


def test_gpt2_preset_has_124m_parameters():
    with torch.device("meta"):
        model = GPT(preset_config("gpt2"))
    # 124,439,808 with the position table, as OpenAI's checkpoint
    assert model.get_num_params(non_embedding=False) == 124_439_808


def test_every_preset_builds():
    with torch.device("meta"):
        for name in PRESETS:
            assert GPT(preset_config(name)).get_num_params() > 0


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
