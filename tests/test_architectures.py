"""The architecture switches beyond GPT-2 and LLaMA (model.py): ALiBi, sliding-window attention and
its bounded cache, NormHead, logit soft-capping, the z-losses. Cached decoding, batched left-padded
prompts and the sliding context of each are also covered by test_decoding.py's families."""
import math
from dataclasses import asdict

import pytest
import torch

from conftest import LIVELY, copy_run, lively_gpt, one_line_error, run_main
from decoding import KVCache, generate_batch
from model import GPT, GPTConfig, alibi_slopes, attention_bias, causal_mask, z_losses


def test_alibi_slopes_for_8_and_12_heads_are_the_papers():
    assert alibi_slopes(8).tolist() == pytest.approx([2 ** -h for h in range(1, 9)])
    # 12 is not a power of two: the 8-head slopes, then every other 16-head slope, 2^(-h/2) for odd h
    assert alibi_slopes(12).tolist() == pytest.approx([2 ** -h for h in range(1, 9)] +
                                                      [2 ** -0.5, 2 ** -1.5, 2 ** -2.5, 2 ** -3.5])


def test_alibi_adds_slope_times_distance_to_each_heads_scores():
    bias = attention_bias(causal_mask(4, 4, "cpu"), alibi_slopes(2))  # (1, 2, 4, 4)
    assert bias.shape == (1, 2, 4, 4)
    assert bias[0, 0, 3].tolist() == pytest.approx([-3 / 16, -2 / 16, -1 / 16, 0])  # m_1 = 2^-4 for 2 heads
    assert bias[0, 1, 3].tolist() == pytest.approx([-3 / 256, -2 / 256, -1 / 256, 0])
    assert bias[0, 0, 1, 2:].tolist() == [-math.inf, -math.inf]  # the future stays hidden


def test_alibi_has_no_position_table_and_its_attention_paths_agree():
    fused, explicit = lively_gpt(positions="alibi"), lively_gpt(positions="alibi", attn_impl="explicit")
    assert "wpe" not in fused.transformer and fused.state_dict().keys() == explicit.state_dict().keys()
    idx = torch.randint(0, 29, (3, 20))
    torch.testing.assert_close(fused(idx)[0], explicit(idx)[0], atol=1e-5, rtol=0)


def test_alibi_cached_decoding_equals_a_full_forward():
    model = lively_gpt(positions="alibi")
    seq = torch.randint(0, 29, (2, 20))
    cache = KVCache.for_model(model, batch_size=2)
    model(seq[:, :5], cache=cache)
    for t in range(5, 20):
        step, _ = model(seq[:, t:t + 1], cache=cache)
        torch.testing.assert_close(step[:, -1], model(seq[:, :t + 1])[0][:, -1], atol=1e-5, rtol=0)


@pytest.mark.parametrize("pattern", ["S", "SL"])
def test_a_windowed_layer_cannot_see_a_key_w_positions_back(pattern):
    W = 4
    model = lively_gpt(attn_window=W, attn_window_pattern=pattern, n_layer=1, positions="rope")
    idx = torch.randint(0, 29, (1, 20))
    changed = idx.clone()
    changed[0, 10] = (idx[0, 10] + 1) % 29
    a, b = model(idx)[0][0], model(changed)[0][0]
    assert torch.equal(a[:10], b[:10])  # the past never sees the future
    assert not torch.allclose(a[10:10 + W], b[10:10 + W])  # positions 10..13 have token 10 in their window
    assert torch.equal(a[10 + W:], b[10 + W:])  # from position 14 on it is W back: out of the window
    # two windowed layers see twice as far back, less one
    deep = lively_gpt(attn_window=W, n_layer=2, positions="rope")
    a, b = deep(idx)[0][0], deep(changed)[0][0]
    reach = 2 * (W - 1)
    assert not torch.allclose(a[10 + reach], b[10 + reach]) and torch.equal(a[10 + reach + 1:], b[10 + reach + 1:])


def test_the_window_pattern_tiles_over_the_layers():
    config = GPTConfig(**{**LIVELY, "n_layer": 6}, attn_window=8, attn_window_pattern="SSL")
    assert [config.windowed(i) for i in range(6)] == [True, True, False, True, True, False]
    assert not GPTConfig(**LIVELY).windowed(0)  # attn_window=0: every layer sees everything


def test_a_windowed_layers_cache_stays_bounded_while_a_full_layers_grows():
    W = 5
    model = lively_gpt(attn_window=W, attn_window_pattern="SL", positions="alibi")
    cache = KVCache.for_model(model, batch_size=2)
    seq = torch.randint(0, 29, (2, 24))
    model(seq[:, :8], cache=cache)
    sizes = []
    for t in range(8, 24):
        step, _ = model(seq[:, t:t + 1], cache=cache)
        sizes.append(cache.k[0].size(2))
        torch.testing.assert_close(step[:, -1], model(seq[:, :t + 1])[0][:, -1], atol=1e-5, rtol=0)
    assert max(sizes) == W - 1 and cache.v[0].size(2) == W - 1  # the windowed layer: its last W - 1 keys
    assert cache.k[1].size(2) == model.config.block_size  # the full layer: the whole context


def test_windowed_rows_of_different_lengths_decode_as_they_do_alone():
    model = lively_gpt(attn_window=3, positions="alibi", n_kv_head=2)
    prompts = [[5], [1, 2, 3, 4, 5, 6, 7, 8, 9], [9, 8, 7]]
    together = generate_batch(model, prompts, 30, temperature=0)  # past block_size: the context slides
    assert together == [generate_batch(model, [p], 30, temperature=0)[0] for p in prompts]


def test_norm_head_logits_do_not_change_when_a_head_row_is_scaled():
    model = lively_gpt(norm_head=True, tie_embeddings=False)
    idx = torch.randint(0, 29, (2, 10))
    before = model(idx)[0]
    with torch.no_grad():
        model.lm_head.weight[7] *= 13.0
    torch.testing.assert_close(model(idx)[0], before, atol=1e-5, rtol=0)
    plain = lively_gpt(tie_embeddings=False)
    with torch.no_grad():
        plain.lm_head.weight[7] *= 13.0
    assert not torch.allclose(plain(idx)[0][..., 7], before[..., 7])  # without NormHead they scale with it


def test_norm_head_logits_are_cosines_times_the_hidden_norm():
    model = lively_gpt(norm_head=True, tie_embeddings=False)
    h = model.hidden_states(torch.randint(0, 29, (1, 6)))  # (1, 6, C)
    w = model.lm_head.weight
    expected = torch.nn.functional.cosine_similarity(h[..., None, :], w, dim=-1) * h.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(model.logits(h), expected, atol=1e-5, rtol=1e-5)


def test_soft_capped_logits_stay_within_the_cap():
    model = lively_gpt(logit_softcap=3.0)
    with torch.no_grad():
        model.lm_head.weight.mul_(100.0)
    logits = model(torch.randint(0, 29, (2, 12)))[0]
    assert logits.abs().max() <= 3.0 and logits.abs().max() > 2.9
    uncapped = lively_gpt()
    with torch.no_grad():
        uncapped.lm_head.weight.mul_(100.0)
    assert uncapped(torch.randint(0, 29, (2, 12)))[0].abs().max() > 10


def test_z_losses_on_hand_made_logits():
    logits = torch.tensor([[[0.0, 0.0, 0.0, 0.0], [3.0, 1.0, -1.0, 0.0], [9.0, 9.0, 9.0, 9.0]]])  # (1, 3, 4)
    targets = torch.tensor([[1, 0, -1]])  # the last position is not a target: left out
    z, max_z = z_losses(logits, targets)
    log_z1 = math.log(math.exp(3) + math.exp(1) + math.exp(-1) + 1)
    assert z.item() == pytest.approx((math.log(4) ** 2 + log_z1 ** 2) / 2)
    assert max_z.item() == pytest.approx((0 + 9) / 2)


def test_the_z_losses_add_to_the_cross_entropy_with_their_weights():
    model = lively_gpt()
    idx, targets = torch.randint(0, 29, (2, 10)), torch.randint(0, 29, (2, 10))
    logits, ce = model(idx, targets)
    z, max_z = z_losses(logits, targets)
    _, total = model(idx, targets, z_loss=1e-2, max_z_loss=3e-2)
    assert total.item() == pytest.approx(ce.item() + 1e-2 * z.item() + 3e-2 * max_z.item(), rel=1e-6)


@pytest.mark.parametrize("kw, message", [
    (dict(positions="sinusoid"), "positions='sinusoid' is not one of"),
    (dict(attn_window=-1), "attn_window must be >= 0"),
    (dict(attn_window=4, attn_window_pattern="SXL"), "attn_window_pattern='SXL'"),
    (dict(logit_softcap=-1.0), "logit_softcap must be >= 0"),
])
def test_bad_switch_values_are_refused_by_name(kw, message):
    with pytest.raises(ValueError, match=message):
        GPTConfig(**LIVELY, **kw)


def test_value_embeddings_add_a_table_per_layer_that_changes_the_values_and_nothing_else():
    plain, ve = lively_gpt(), lively_gpt(value_embeds=True)
    assert [n for n in ve.state_dict() if n not in plain.state_dict()] == [f"transformer.ve.{i}.weight" for i in range(2)]
    assert ve.transformer.ve[0].weight.shape == (29, 32)  # vocab x (n_kv_head * head_dim)
    ve.load_state_dict({**plain.state_dict(), **{f"transformer.ve.{i}.weight": torch.zeros(29, 32) for i in range(2)}})
    idx = torch.randint(0, 29, (2, 10))
    torch.testing.assert_close(ve(idx)[0], plain(idx)[0])  # zero tables: the plain model
    with torch.no_grad():
        ve.transformer.ve[1].weight[idx[0, 3]] += 1.0
    changed = ve(idx)[0]
    assert torch.allclose(changed[:, :3], plain(idx)[0][:, :3], atol=1e-6)  # causal: earlier positions see no change
    assert not torch.allclose(changed[0, 3:], plain(idx)[0][0, 3:], atol=1e-4)


def test_a_checkpoint_config_from_before_the_switches_builds_todays_model():
    old = {k: v for k, v in asdict(GPTConfig(**LIVELY)).items()
           if k not in ("attn_window", "attn_window_pattern", "norm_head", "logit_softcap", "causal", "value_embeds")}
    config = GPTConfig.from_dict(old)
    assert (config.attn_window, config.norm_head, config.logit_softcap, config.causal) == (0, False, 0.0, True)
    torch.manual_seed(0)
    a = GPT(GPTConfig(**LIVELY)).eval()
    b = GPT(config).eval()
    b.load_state_dict(a.state_dict())
    idx = torch.randint(0, 29, (1, 8))
    assert torch.equal(a(idx)[0], b(idx)[0])


def test_training_with_every_decoder_switch_lowers_the_loss():
    torch.manual_seed(0)
    model = GPT(GPTConfig(**LIVELY, positions="alibi", attn_window=6, attn_window_pattern="SL", norm_head=True,
                          logit_softcap=15.0))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    idx = torch.randint(0, 29, (4, 24))
    losses = []
    for _ in range(30):
        _, loss = model(idx[:, :-1], idx[:, 1:], z_loss=1e-4, max_z_loss=2e-4)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


def test_an_alibi_model_crops_its_context_like_the_others():
    model = lively_gpt(positions="alibi")
    idx = torch.randint(0, 29, (1, 16))
    before = model(idx)[0]
    model.crop_block_size(16)
    assert model.config.block_size == 16 and torch.equal(model(idx)[0], before)


@pytest.mark.parametrize("positions", ["rope", "alibi"])
def test_rope_and_alibi_models_read_contexts_longer_than_their_block_size(positions):
    model = lively_gpt(positions=positions)
    idx = torch.randint(0, 29, (1, 48))
    before = model(idx[:, :24])[0]
    model.set_block_size(48)
    logits = model(idx)[0]
    assert logits.shape == (1, 48, 29)
    torch.testing.assert_close(logits[:, :24], before, atol=1e-5, rtol=0)  # causal: the first 24 as before


def test_learned_positions_cannot_read_past_their_table():
    with pytest.raises(ValueError, match="learned positions stop at block_size 24"):
        lively_gpt().set_block_size(48)


def test_eval_scores_bits_per_byte_at_a_chosen_context_and_refuses_one_learned_positions_lack(tiny_run, tmp_path):
    folder = copy_run(tiny_run, tmp_path)
    out = run_main("eval.py", "--out_dir=out", "--tasks=bpb", "--context=16", "--max_tokens=2000", "--device=cpu",
                   cwd=folder)
    assert "bpb (val, context 16)" in out.stdout
    one_line_error(run_main("eval.py", "--out_dir=out", "--tasks=bpb", "--context=64", "--device=cpu", cwd=folder,
                            check=False), "--context=64: learned positions stop at block_size 32")
