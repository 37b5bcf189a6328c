"""decoding.py: the KV cache, sampling strategies, batches of prompts, beam search; tested against
model.py's reference GPT.generate, which re-runs the whole context at every step."""
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import CountingForward
from decoding import (KVCache, beam_search, check_sampling, choose_next, decode_steps, generate_batch,
                      penalize_repeats, top_k_filter, top_p_filter)
from model import GPT, GPTConfig

FAMILIES = {
    "gpt2": dict(),
    "llama_gqa": dict(positions="rope", norm="rmsnorm", mlp="swiglu", n_kv_head=2, bias=False,
                      tie_embeddings=False),
    "llama_qknorm_mqa": dict(positions="rope", norm="rmsnorm", mlp="swiglu", n_kv_head=1, qk_norm=True),
    "alibi": dict(positions="alibi", norm_head=True, logit_softcap=5.0),
    "window_sl": dict(positions="rope", attn_window=4, attn_window_pattern="SL", n_kv_head=2, value_embeds=True),
    "alibi_window": dict(positions="alibi", attn_window=3),
}
BLOCK = 16


def lively(family="gpt2", **kw):
    """A tiny model whose weights are large enough that greedy decoding does not repeat one token."""
    torch.manual_seed(0)
    cfg = GPTConfig(block_size=BLOCK, vocab_size=61, n_layer=2, n_head=4, n_embd=32, **{**FAMILIES[family], **kw})
    model = GPT(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.2)
    return model


def run(model, idx, n, **kw):
    """(tokens (B, n), per-step logits [(B, V)]) of decode_steps."""
    steps = list(decode_steps(model, idx, n, **kw))
    return torch.stack([t for t, _ in steps], dim=1), [logits for _, logits in steps]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("impl", ["fused", "explicit"])
def test_cached_greedy_logits_equal_a_full_forward_at_every_step(family, impl):
    model = lively(family, attn_impl=impl)
    prompt = torch.randint(0, 61, (2, 3))
    tokens, logits = run(model, prompt, BLOCK - 3, temperature=0)
    seq = torch.cat((prompt, tokens), dim=1)
    assert len(set(seq[0].tolist())) > 3  # the check below compares varied text, not one repeated token
    for i, step_logits in enumerate(logits):
        full, _ = model(seq[:, :3 + i])
        torch.testing.assert_close(step_logits, full[:, -1], atol=1e-5, rtol=0)
    uncached, uncached_logits = run(model, prompt, BLOCK - 3, temperature=0, use_cache=False)
    assert torch.equal(uncached, tokens)
    for a, b in zip(logits, uncached_logits):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_grouped_query_cache_holds_only_the_kv_heads():
    model = lively("llama_gqa")  # 4 query heads, 2 key/value heads
    cache = KVCache.for_model(model, batch_size=3)
    model(torch.randint(0, 61, (3, 5)), cache=cache)
    assert cache.length == 5
    assert cache.k[0].shape == (3, 2, BLOCK, 8) and cache.v[1].shape == (3, 2, BLOCK, 8)


def test_a_cache_refuses_more_than_block_size_tokens():
    model = lively()
    cache = KVCache.for_model(model)
    model(torch.zeros(1, BLOCK - 1, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(1, 2, dtype=torch.long), cache=cache)


@pytest.mark.parametrize("family", ["gpt2", "llama_gqa"])
def test_generating_4x_block_size_slides_the_window_and_matches_recomputing_it(family):
    model = lively(family)
    prompt = torch.randint(0, 61, (1, 5))
    n = 4 * BLOCK
    tokens, logits = run(model, prompt, n, temperature=0)
    seq = torch.cat((prompt, tokens), dim=1)
    assert seq.shape == (1, 5 + n)
    # the documented window: once it would pass block_size, it restarts from the last block_size // 2
    start = 0
    for i, step_logits in enumerate(logits):
        end = 5 + i  # tokens before the one chosen at step i
        if end - start > BLOCK:
            start = end - BLOCK // 2
        window, _ = model(seq[:, start:end])
        torch.testing.assert_close(step_logits, window[:, -1], atol=1e-5, rtol=0)
    uncached, _ = run(model, prompt, n, temperature=0, use_cache=False)
    assert torch.equal(uncached, tokens)


def test_a_prompt_longer_than_block_size_is_cropped_to_its_last_block_size_tokens():
    model = lively()
    prompt = torch.randint(0, 61, (1, BLOCK + 7))
    _, logits = run(model, prompt, 1, temperature=0)
    full, _ = model(prompt[:, -BLOCK:])
    torch.testing.assert_close(logits[0], full[:, -1], atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("impl", ["fused", "explicit"])
def test_batched_prompts_of_different_lengths_equal_prompt_by_prompt(family, impl):
    model = lively(family, attn_impl=impl)
    prompts = [[5], [1, 2, 3, 4, 5, 6, 7], [9, 8, 7]]
    n = 2 * BLOCK  # past block_size too, where the window of each row slides
    together = generate_batch(model, prompts, n, temperature=0)
    alone = [generate_batch(model, [p], n, temperature=0)[0] for p in prompts]
    assert together == alone and all(len(t) == n for t in together)


def test_batched_logits_equal_prompt_by_prompt_logits():
    model = lively("llama_gqa")
    short, long = [3, 1], [4, 1, 5, 9, 2, 6]
    idx = torch.tensor([[0] * 4 + short, long])
    pad = torch.tensor([4, 0])
    _, batched = run(model, idx, 6, temperature=0, pad=pad)
    _, alone = run(model, torch.tensor([short]), 6, temperature=0)
    for a, b in zip(batched, alone):
        torch.testing.assert_close(a[0], b[0], atol=1e-5, rtol=0)


def test_num_samples_of_one_prompt_are_drawn_in_parallel_and_differ():
    model = lively()
    g = torch.Generator().manual_seed(0)
    samples = generate_batch(model, [[1, 2]] * 4, 12, temperature=1.0, generator=g)
    assert len(samples) == 4 and len({tuple(s) for s in samples}) > 1


def test_a_seed_makes_sampling_reproducible():
    model = lively()

    def draw(seed):
        return generate_batch(model, [[1, 2], [3]], 20, temperature=1.0, top_p=0.9,
                              generator=torch.Generator().manual_seed(seed))

    assert draw(7) == draw(7)
    assert draw(7) != draw(8)


def test_top_k_1_and_top_p_near_0_sample_the_greedy_tokens():
    model = lively()
    prompt = [[3, 1, 4]]
    greedy = generate_batch(model, prompt, 20, temperature=0)
    assert generate_batch(model, prompt, 20, temperature=1.5, top_k=1) == greedy
    assert generate_batch(model, prompt, 20, temperature=1.5, top_p=1e-6) == greedy
    # and the reference decoder, which re-runs the whole context, agrees (within one window: past
    # block_size it crops at every step where the cache slides)
    n = BLOCK - 3
    assert model.generate(torch.tensor(prompt), n, temperature=1.0, top_k=1)[0, 3:].tolist() == greedy[0][:n]


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = torch.log(torch.tensor([[0.2, 0.5, 0.3]]))
    kept = lambda p: torch.isfinite(top_p_filter(logits, p))[0].tolist()  # noqa: E731
    assert kept(0.5) == [False, True, False]
    assert kept(0.6) == [False, True, True]
    assert kept(0.85) == [True, True, True]
    assert kept(1.0) == [True, True, True]


def test_top_k_keeps_the_k_largest_logits():
    logits = torch.tensor([[1.0, 4.0, 3.0, 2.0]])
    assert torch.isfinite(top_k_filter(logits, 2))[0].tolist() == [False, True, True, False]
    assert torch.equal(top_k_filter(logits, 10), logits)


def test_repetition_penalty_lowers_seen_tokens_whatever_their_sign():
    logits = torch.tensor([[2.0, -2.0, 2.0, -2.0]])
    seen = torch.tensor([[True, True, False, False]])
    assert penalize_repeats(logits, seen, 2.0).tolist() == [[1.0, -4.0, 2.0, -2.0]]


def test_repetition_penalty_steers_greedy_away_from_repeats():
    model = lively()
    plain = generate_batch(model, [[1]], 30, temperature=0)[0]
    penalized = generate_batch(model, [[1]], 30, temperature=0, repetition_penalty=5.0)[0]
    assert len(set(penalized)) > len(set(plain))


def test_temperature_zero_is_argmax():
    logits = torch.tensor([[0.1, 3.0, -1.0], [5.0, 0.0, 0.0]])
    assert choose_next(logits, temperature=0).tolist() == [1, 0]


def test_a_row_ends_before_the_end_of_text_token_and_the_others_go_on():
    model = lively()
    free = generate_batch(model, [[1, 2], [7]], 10, temperature=0)
    eot = free[0][3]  # the 4th token row 0 generates
    ended = generate_batch(model, [[1, 2], [7]], 10, temperature=0, stop_tokens=[eot])
    assert ended[0] == free[0][:free[0].index(eot)]
    first = free[1].index(eot) if eot in free[1] else 10
    assert ended[1] == free[1][:first]


def test_on_token_returning_true_ends_that_row():
    model = lively()
    seen = []
    out = generate_batch(model, [[1], [2]], 10, temperature=0,
                         on_token=lambda row, tok: seen.append((row, tok)) or (row == 0 and len(seen) >= 5))
    assert len(out[0]) == 3 and len(out[1]) == 10  # row 0 stopped at its 3rd token (the 5th call)
    assert [t for r, t in seen if r == 1] == out[1]


def test_a_row_ends_at_any_of_several_stop_tokens():
    model = lively()
    free = generate_batch(model, [[1, 2]], 12, temperature=0)[0]
    first, second = free[6], free[3]  # whichever of them comes first ends the row
    ended = generate_batch(model, [[1, 2]], 12, temperature=0, stop_tokens=(first, second))[0]
    assert ended == free[:min(free.index(first), free.index(second))]


@pytest.mark.parametrize("family", FAMILIES)
def test_the_kv_cache_decodes_the_tokens_of_the_reference_that_reruns_the_context(family):
    model = lively(family)
    prompt = torch.tensor([[3, 1, 4]])
    n = 2 * BLOCK  # past block_size: the reference crops at every step, so compare within one window
    reference = model.generate(prompt, BLOCK - 3, temperature=0)[0, 3:].tolist()
    assert generate_batch(model, [[3, 1, 4]], BLOCK - 3, temperature=0)[0] == reference
    assert len(generate_batch(model, [[3, 1, 4]], n, temperature=0)[0]) == n


def test_one_cached_forward_per_new_token_after_the_prefill():
    model = lively()
    counter = CountingForward(model)
    out = generate_batch(model, [[3, 1, 4], [5]], 10, temperature=0)
    assert [len(t) for t in out] == [10, 10]
    assert counter.lengths == [3] + [1] * 9  # the prompts once, then one position per token


@pytest.mark.parametrize("family", ["gpt2", "llama_gqa"])
def test_beam_search_with_one_beam_is_greedy(family):
    model = lively(family)
    greedy = generate_batch(model, [[3, 1]], 2 * BLOCK, temperature=0)[0]
    assert beam_search(model, [3, 1], 2 * BLOCK, beam_width=1)[0][0] == greedy
    eot = greedy[5]
    greedy_eot = generate_batch(model, [[3, 1]], 2 * BLOCK, temperature=0, stop_tokens=[eot])[0]
    assert beam_search(model, [3, 1], 2 * BLOCK, beam_width=1, stop_tokens=[eot])[0][0] == greedy_eot


def myopic_bigram_model():
    """Next-token probabilities depend only on the last token (the blocks are zeroed out):
    after 0, token 1 (0.6) beats token 2 (0.4), but 1 leads to a uniform guess while 2 leads
    to 3 with probability 0.97, so the best two-token path is 0 -> 2 -> 3, not greedy's 0 -> 1."""
    V = 4
    cfg = GPTConfig(block_size=8, vocab_size=V, n_layer=1, n_head=1, n_embd=V, positions="rope",
                    norm="rmsnorm", bias=False, tie_embeddings=False, norm_eps=0.0)
    model = GPT(cfg).eval()
    probs = torch.tensor([[1e-4, 0.6, 0.4 - 2e-4, 1e-4],
                          [0.25, 0.25, 0.25, 0.25],
                          [0.01, 0.01, 0.01, 0.97],
                          [0.25, 0.25, 0.25, 0.25]])
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "c_proj" in name:
                p.zero_()  # attention and MLP add nothing: the residual stream is the embedding
        model.transformer.wte.weight.copy_(torch.eye(V))
        # rmsnorm turns the one-hot e_i into 2 e_i, so logits[j] = 2 W[j, i]
        model.lm_head.weight.copy_(probs.log().T / 2)
    return model


def total_logprob(model, prompt, tokens):
    seq = torch.tensor([prompt + tokens])
    logp = F.log_softmax(model(seq)[0][0, :-1], dim=-1)  # (T-1, V)
    return sum(logp[len(prompt) - 1 + i, t].item() for i, t in enumerate(tokens))


def test_beam_search_finds_a_likelier_sequence_than_myopic_greedy():
    model = myopic_bigram_model()
    greedy = generate_batch(model, [[0]], 2, temperature=0)[0]
    (best, score), *_ = beam_search(model, [0], 2, beam_width=2, length_penalty=0.0)
    assert greedy[0] == 1 and best == [2, 3]
    assert score == pytest.approx(total_logprob(model, [0], best), abs=1e-4)
    assert score > total_logprob(model, [0], greedy) + 0.5


def test_beam_search_ranks_by_length_normalized_score_and_drops_end_of_text():
    model = myopic_bigram_model()
    ranked = beam_search(model, [0], 4, beam_width=3, length_penalty=1.0, stop_tokens=[3])
    lengths = [len(t) + (1 if len(t) < 4 else 0) for t, _ in ranked]  # finished ones count their eot
    scores = [s / n for (_, s), n in zip(ranked, lengths)]
    assert scores == sorted(scores, reverse=True)
    assert all(3 not in tokens for tokens, _ in ranked)
    assert ranked[0][0] == [2]  # 0 -> 2 -> eot: log(0.4 * 0.97) / 2 beats every other path


@pytest.mark.parametrize("kw, message", [
    (dict(temperature=-0.1), "temperature"),
    (dict(top_k=0), "top_k"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(repetition_penalty=0.0), "repetition_penalty"),
])
def test_bad_sampling_settings_are_refused_by_name(kw, message):
    with pytest.raises(ValueError, match=message):
        check_sampling(**kw)
    with pytest.raises(ValueError, match=message):
        generate_batch(lively(), [[0]], 3, **{"temperature": 1.0, **kw})


def test_beam_width_below_1_is_refused():
    with pytest.raises(ValueError, match="beam_width"):
        beam_search(lively(), [1], 3, beam_width=0)


def test_sampled_tokens_follow_the_model_distribution():
    torch.manual_seed(0)
    logits = torch.log(torch.tensor([[0.7, 0.2, 0.1]])).expand(20000, 3)
    counts = torch.bincount(choose_next(logits, temperature=1.0), minlength=3).float() / 20000
    torch.testing.assert_close(counts, torch.tensor([0.7, 0.2, 0.1]), atol=0.02, rtol=0)
    assert math.isclose(choose_next(logits[:1], temperature=1.0, top_k=1).item(), 0)
