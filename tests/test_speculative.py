"""Speculative decoding (decoding.speculative_generate): a draft guesses, the target verifies. Greedy, the
text is the target's own greedy text whatever the draft, the architecture or k; sampling, every token is
distributed as the target's, which the counts of many seeded draws show against exact probabilities
(and which a wrong acceptance rule visibly fails); a draft equal to the target has every guess accepted."""

import pytest
import torch

import decoding
from conftest import lively_gpt
from decoding import (accept_or_resample, check_speculative, choose_next, generate_batch, sampling_probs,
                      speculative_generate)
from model import GPT, GPTConfig

ARCHITECTURES = {
    "learned": {},
    "rope-swiglu-rmsnorm-gqa": dict(positions="rope", norm="rmsnorm", mlp="swiglu", n_kv_head=2),
    "alibi": dict(positions="alibi"),
}
PROMPTS = [[(5 * i + j) % 29 for j in range(1 + i % 5)] for i in range(20)]  # 20 prompts of 1 to 5 tokens
N_NEW = 30  # past block_size 24: the windows slide


def perturbed(model, noise=0.03, seed=5):
    """model with noise added to its matrices: a draft that agrees with it often, not always."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.add_(torch.randn(p.shape, generator=gen) * noise)
    return model


def drafts(arch):
    return {"perturbed": perturbed(lively_gpt(**arch)),
            # another shape and a shorter context: its window slides on its own schedule
            "smaller": lively_gpt(**arch, n_layer=1, n_embd=16, block_size=10)}


def check_stats(tokens, stats, k):
    """Every round yields its accepted guesses and one token of the target's (no stop token here)."""
    assert len(tokens) == stats["accepted"] + stats["rounds"]
    assert 0 <= stats["accepted"] <= stats["proposed"] <= k * stats["rounds"]


# ----------------------------------------------------------------------------------------------
# greedy: the target's text

@pytest.mark.parametrize("k", [1, 3, 6])
@pytest.mark.parametrize("arch", ARCHITECTURES.values(), ids=ARCHITECTURES.keys())
def test_greedy_speculative_text_is_the_targets_greedy_text(arch, k):
    target, draft = lively_gpt(**arch), drafts(arch)["perturbed"]
    totals = dict(rounds=0, proposed=0, accepted=0)
    for prompt in PROMPTS:
        tokens, stats = speculative_generate(target, draft, prompt, N_NEW, k=k, temperature=0)
        assert tokens == generate_batch(target, [prompt], N_NEW, temperature=0)[0], prompt
        check_stats(tokens, stats, k)
        totals = {key: totals[key] + stats[key] for key in totals}
    # the draft is neither always right nor always wrong: both branches of verification ran
    assert 0 < totals["accepted"] < totals["proposed"], totals


@pytest.mark.parametrize("arch", ARCHITECTURES.values(), ids=ARCHITECTURES.keys())
def test_a_smaller_draft_with_a_shorter_context_leaves_the_greedy_text_unchanged(arch):
    target, draft = lively_gpt(**arch), drafts(arch)["smaller"]
    assert draft.config.n_layer < target.config.n_layer and draft.config.block_size < target.config.block_size
    for prompt in PROMPTS:
        tokens, stats = speculative_generate(target, draft, prompt, N_NEW, k=3, temperature=0)
        assert tokens == generate_batch(target, [prompt], N_NEW, temperature=0)[0], prompt
        check_stats(tokens, stats, 3)


@pytest.mark.parametrize("temperature", [0, 1.0])
def test_a_draft_equal_to_the_target_has_every_guess_accepted(temperature):
    target, draft = lively_gpt(), lively_gpt()  # two copies of the same weights
    k = 4
    gen = torch.Generator().manual_seed(0)
    tokens, stats = speculative_generate(target, draft, [1, 2, 3], 20, k=k, temperature=temperature, generator=gen)
    assert len(tokens) == 20 and stats["accepted"] == stats["proposed"] > 0
    assert stats["rounds"] == 4  # 5 tokens a round (k guesses and the target's next) until the window is full
    if temperature == 0:
        assert tokens == generate_batch(target, [[1, 2, 3]], 20, temperature=0)[0]


def test_rounds_stay_inside_one_window_so_the_text_is_the_targets_past_block_size():
    target, draft = lively_gpt(), lively_gpt()
    prompt = list(range(20))  # 4 slots left: a round of k = 6 must stop at the window's end
    tokens, stats = speculative_generate(target, draft, prompt, 60, k=6, temperature=0)
    assert tokens == generate_batch(target, [prompt], 60, temperature=0)[0] and len(tokens) == 60
    check_stats(tokens, stats, 6)


# ----------------------------------------------------------------------------------------------
# stop tokens and arguments

def test_a_stop_token_ends_the_text_before_it_as_generate_batch_does():
    target, draft = lively_gpt(), perturbed(lively_gpt())
    prompt = [4, 5]
    greedy = generate_batch(target, [prompt], 20, temperature=0)[0]
    stop = next(t for i, t in enumerate(greedy) if i >= 5 and t not in greedy[:i])  # first seen after 5 tokens
    tokens, _ = speculative_generate(target, draft, prompt, 20, k=3, temperature=0, stop_tokens=[stop])
    assert tokens == greedy[:greedy.index(stop)] == generate_batch(target, [prompt], 20, temperature=0,
                                                                    stop_tokens=[stop])[0]
    assert len(tokens) >= 5


def test_sampled_texts_never_contain_a_stop_token_and_some_end_at_it():
    target, draft = lively_gpt(), perturbed(lively_gpt())
    gen = torch.Generator().manual_seed(0)
    stops = {3, 7}
    lengths = []
    for _ in range(12):
        tokens, _ = speculative_generate(target, draft, [1], 20, k=3, temperature=1.0, stop_tokens=stops,
                                         generator=gen)
        assert not stops & set(tokens)
        lengths.append(len(tokens))
    assert min(lengths) < 20 and max(lengths) <= 20


def test_check_speculative_refuses_a_draft_with_another_vocabulary():
    target, draft = lively_gpt(), lively_gpt(vocab_size=30)
    with pytest.raises(ValueError, match=r"the draft's vocabulary \(30\) is not the target's \(29\).*tokenizer"):
        check_speculative(target, draft)
    with pytest.raises(ValueError, match="vocabulary"):
        speculative_generate(target, draft, [1], 5)  # checked before anything runs


@pytest.mark.parametrize("kw, message", [
    (dict(causal=False), "encoder"),
    (dict(positions="rope", attn_window=4), "sliding-window"),
])
def test_check_speculative_refuses_models_that_cannot_take_guesses_back(kw, message):
    for target, draft in ((lively_gpt(**kw), lively_gpt()), (lively_gpt(), lively_gpt(**kw))):
        with pytest.raises(ValueError, match=message):
            check_speculative(target, draft)


@pytest.mark.parametrize("kw, message", [
    (dict(k=0), "k .* must be >= 1"),
    (dict(prompt=[]), "at least one token"),
    (dict(temperature=-1.0), "temperature"),
])
def test_bad_arguments_are_refused(kw, message):
    args = dict(prompt=[1], max_new_tokens=5, k=2, temperature=1.0)
    args.update(kw)
    with pytest.raises(ValueError, match=message):
        speculative_generate(lively_gpt(), lively_gpt(), **args)


# ----------------------------------------------------------------------------------------------
# the acceptance rule: distributed as the target

P = torch.tensor([0.5, 0.3, 0.15, 0.05])  # the target's next-token distribution
Q = torch.tensor([0.1, 0.2, 0.3, 0.4])    # the draft's, far from it
N_DRAWS = 20_000


def frequencies(rule, p, q, n=N_DRAWS, seed=0):
    """Frequencies of the tokens rule(p, q, guess, generator) returns, guess drawn from q; and how often kept."""
    gen = torch.Generator().manual_seed(seed)
    guesses = torch.multinomial(q, n, replacement=True, generator=gen).tolist()
    counts, kept = [0] * len(p), 0
    for guess in guesses:
        was_kept, token = rule(p, q, guess, gen)
        counts[token] += 1
        kept += was_kept
    return torch.tensor(counts, dtype=torch.float64) / n, kept / n


def distributed_as(freq, p, n):
    """freq is n draws' frequencies of p: chi-square (3 degrees of freedom: about 1e-6 chance above 30 by
    chance) and every cell within 5.5 standard deviations. Seeded, so the verdict never changes run to run."""
    p = p.double()
    seen = p > 0
    chi2 = float((n * (freq[seen] - p[seen]) ** 2 / p[seen]).sum())
    sd = (p * (1 - p) / n).sqrt()
    return chi2 < 30 and bool(torch.all((freq - p).abs() <= 5.5 * sd + 1e-12)) and bool(torch.all(freq[~seen] == 0))


def always_accept(p, q, guess, generator):
    return True, guess


def resample_from_p(p, q, guess, generator):
    """min(1, p/q) acceptance, but a refusal draws from p itself instead of the leftover max(0, p - q)."""
    if torch.rand((), generator=generator) * q[guess] <= p[guess]:
        return True, guess
    return False, int(torch.multinomial(p, 1, generator=generator))


def test_accept_or_resample_returns_tokens_distributed_as_the_target():
    freq, kept = frequencies(accept_or_resample, P, Q)
    assert distributed_as(freq, P, N_DRAWS), freq
    assert kept == pytest.approx(float(torch.minimum(P, Q).sum()), abs=0.02)  # acceptance is sum min(p, q)


@pytest.mark.parametrize("wrong", [always_accept, resample_from_p])
def test_the_distribution_check_rejects_a_wrong_acceptance_rule(wrong):
    freq, _ = frequencies(wrong, P, Q)
    assert not distributed_as(freq, P, N_DRAWS), freq


def test_a_token_the_target_rules_out_is_never_returned():
    p = torch.tensor([0.6, 0.4, 0.0, 0.0])  # e.g. top_k=2 on the target
    q = torch.tensor([0.1, 0.1, 0.4, 0.4])
    freq, _ = frequencies(accept_or_resample, p, q, n=5000)
    assert distributed_as(freq, p, 5000) and freq[2] == freq[3] == 0


def test_tokens_the_draft_never_proposes_are_reached_through_the_leftover():
    p = torch.tensor([0.25, 0.25, 0.25, 0.25])
    q = torch.tensor([0.5, 0.5, 0.0, 0.0])
    freq, kept = frequencies(accept_or_resample, p, q, n=5000)
    assert distributed_as(freq, p, 5000) and kept == pytest.approx(0.5, abs=0.03)


def test_a_draft_distribution_equal_to_the_target_is_always_kept():
    gen = torch.Generator().manual_seed(0)
    for guess in torch.multinomial(P, 2000, replacement=True, generator=gen).tolist():
        assert accept_or_resample(P, P.clone(), guess, gen) == (True, guess)


@pytest.mark.parametrize("temperature, top_k, top_p", [(1.0, None, None), (0.7, 3, None), (1.3, None, 0.8)])
def test_sampling_probs_are_what_choose_next_samples_from(temperature, top_k, top_p):
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0, 0.0, 1.5]])
    probs = sampling_probs(logits, temperature, top_k, top_p)[0]
    assert probs.sum().item() == pytest.approx(1.0, abs=1e-6)
    if top_k:
        assert int((probs > 0).sum()) == top_k
    n = 20_000
    gen = torch.Generator().manual_seed(0)
    drawn = choose_next(logits.expand(n, -1), temperature, top_k, top_p, generator=gen)
    freq = torch.bincount(drawn, minlength=6).double() / n
    assert distributed_as(freq, probs, n), (freq, probs)


# ----------------------------------------------------------------------------------------------
# end to end: the first two tokens of speculative samples against the target's exact probabilities

def tiny_vocab_model(seed):
    torch.manual_seed(seed)
    model = GPT(GPTConfig(block_size=8, vocab_size=4, n_layer=1, n_head=2, n_embd=8)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.5)
    return model


@torch.no_grad()
def first_two_tokens(model, prompt, temperature=1.0, top_k=None):
    """(4, 4) exact probabilities of the first two sampled tokens (a, b) after prompt."""
    def probs(ids):
        return sampling_probs(model(torch.tensor([ids]))[0][:, -1], temperature, top_k)[0]
    first = probs(prompt)
    return torch.stack([first[a] * probs(prompt + [a]) for a in range(4)]).double()


def speculative_pairs(target, draft, prompt, n, temperature=1.0, top_k=None, seed=0):
    """(4, 4) frequencies of (first, second) token in n speculative samples of 3 tokens, k = 2: the second
    token is a verified guess, a resample after a refusal, or the target's own token after two acceptances."""
    gen = torch.Generator().manual_seed(seed)
    counts = torch.zeros(4, 4, dtype=torch.float64)
    for _ in range(n):
        tokens, _ = speculative_generate(target, draft, prompt, 3, k=2, temperature=temperature, top_k=top_k,
                                         generator=gen)
        counts[tokens[0], tokens[1]] += 1
    return counts / n


def check_pairs(n, temperature=1.0, top_k=None):
    target, draft, prompt = tiny_vocab_model(0), tiny_vocab_model(1), [1, 2]
    exact = first_two_tokens(target, prompt, temperature, top_k).flatten()
    draft_own = first_two_tokens(draft, prompt, temperature, top_k).flatten()
    # the draft's own distribution (what accepting every guess gives) would fail the check by far
    assert not distributed_as(draft_own, exact, n)
    freq = speculative_pairs(target, draft, prompt, n, temperature, top_k).flatten()
    assert distributed_as(freq, exact, n), (freq.view(4, 4), exact.view(4, 4))


def test_speculative_samples_are_distributed_as_the_targets():
    check_pairs(1500)


@pytest.mark.slow
@pytest.mark.parametrize("temperature, top_k", [(1.0, None), (0.7, 3)])
def test_speculative_samples_are_distributed_as_the_targets_many_draws(temperature, top_k):
    check_pairs(20_000, temperature, top_k)


# ----------------------------------------------------------------------------------------------
# a latent bug

def test_a_refusal_that_draws_the_guessed_token_again_still_decodes(monkeypatch):
    """accept_or_resample may return (False, guess): when leftover max(0, p - q) sums to 0 it draws from p,
    which can give the guess back. speculative_generate must carry on from there."""
    monkeypatch.setattr(decoding, "accept_or_resample", lambda p, q, guess, generator=None: (False, guess))
    gen = torch.Generator().manual_seed(0)
    tokens, stats = speculative_generate(lively_gpt(), perturbed(lively_gpt()), [1, 2], 10, k=3, temperature=1.0,
                                         generator=gen)
    assert len(tokens) == 10 and stats["accepted"] == 0 and stats["rounds"] == 10
