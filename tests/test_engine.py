"""engine.py: continuous batching. Requests that join a running batch, leave it early or are
cancelled decode exactly what each would alone."""
import threading

import pytest
import torch

from decoding import KVCache, generate_batch, layer_windows
from engine import Engine, Request
from model import GPT, GPTConfig


@pytest.fixture(scope="module", params=["learned", "alibi_window"])
def model(request):
    """A plain GPT-2-style model, and one whose first layer attends through a window of 3 (its cache
    holds 2 keys per row) with ALiBi distances."""
    torch.manual_seed(0)
    switches = dict(positions="alibi", attn_window=3, attn_window_pattern="SL") if request.param != "learned" else {}
    return GPT(GPTConfig(vocab_size=50, block_size=32, n_layer=2, n_head=2, n_embd=32, dropout=0.0, **switches)).eval()


def collect(prompt, max_new, **kw):
    """A Request whose tokens and end reason land in lists; .done is set at its end."""
    done = threading.Event()
    tokens, reasons = [], []

    def on_end(reason):
        reasons.append(reason)
        done.set()
    r = Request(prompt, max_new, on_token=lambda t, lp, top: tokens.append(t) and False, on_end=on_end, **kw)
    r.tokens, r.reasons, r.done = tokens, reasons, done
    return r


def drive(engine, until):
    """Run the engine's loop on this thread until every request in until has ended."""
    while not all(r.done.is_set() for r in until):
        engine.admit(wait=not engine.rows)
        if engine.rows:
            engine.step()


def test_joined_caches_compute_what_each_row_computes_alone(model):
    a, b = torch.tensor([[1, 2, 3, 4, 5]]), torch.tensor([[7, 8]])
    caches = []
    for x in (a, b):
        c = KVCache(2, 32, torch.zeros(1, dtype=torch.long), layer_windows(model.config))
        model(x, cache=c)
        caches.append(c)
    caches[0].join(caches[1])
    logits, _ = model(torch.tensor([[9], [10]]), cache=caches[0])
    alone_a, _ = model(torch.cat((a, torch.tensor([[9]])), 1))
    alone_b, _ = model(torch.cat((b, torch.tensor([[10]])), 1))
    assert torch.allclose(logits[0, -1], alone_a[0, -1], atol=1e-5)
    assert torch.allclose(logits[1, -1], alone_b[0, -1], atol=1e-5)


def test_requests_joining_at_different_steps_decode_as_each_would_alone(model):
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10], [11], [12, 13]]
    engine = Engine(model, max_batch=3)
    requests = [collect(p, 10, temperature=0.0) for p in prompts]
    engine.submit(requests[0])
    engine.admit(wait=True)
    for _ in range(3):  # the first decodes alone for a while
        engine.step()
    for r in requests[1:]:  # then three arrive; only two fit in a batch of 3, the last waits its turn
        engine.submit(r)
    drive(engine, requests)
    for p, r in zip(prompts, requests):
        assert r.tokens == generate_batch(model, [p], 10, temperature=0.0)[0] and r.reasons == ["length"]


def test_a_seeded_sampled_request_is_the_same_in_a_batch_and_alone(model):
    alone = collect([3, 4], 12, temperature=1.0, seed=7)
    engine = Engine(model)
    engine.submit(alone)
    drive(engine, [alone])
    batched = [collect([3, 4], 12, temperature=1.0, seed=7), collect([9, 9, 9], 12, temperature=1.0, seed=8)]
    for r in batched:
        engine.submit(r)
    drive(engine, batched)
    assert batched[0].tokens == alone.tokens != batched[1].tokens


def test_stop_tokens_callbacks_cancellation_and_the_context_end_a_row(model):
    engine = Engine(model)
    free = collect([1, 2], 40, temperature=0.0)
    engine.submit(free)
    drive(engine, [free])
    assert free.reasons == ["length"] and len(free.tokens) == 32 - 2  # filled the context
    stop = collect([1, 2], 40, temperature=0.0, stop_tokens=(free.tokens[3],))
    cancelled = collect([5, 6], 40, temperature=0.0)
    engine.submit(stop)
    engine.submit(cancelled)
    engine.admit(wait=True)
    engine.step()
    cancelled.cancelled = True
    drive(engine, [stop, cancelled])
    assert stop.tokens == free.tokens[:free.tokens.index(free.tokens[3])] and stop.reasons == ["stop"]
    assert cancelled.reasons == ["cancelled"] and len(cancelled.tokens) == 1
    assert engine.outstanding == 0 and not engine.rows


def test_a_full_engine_refuses_a_request_and_a_stopped_one_cancels_what_is_left(model):
    engine = Engine(model, max_batch=1, max_queue=1)
    first, second = collect([1], 30, temperature=0.0), collect([2], 30, temperature=0.0)
    assert engine.submit(first) and engine.submit(second)
    assert not engine.submit(collect([3], 5))
    thread = threading.Thread(target=engine.run)
    thread.start()
    engine.stop()
    thread.join(timeout=10)
    assert not thread.is_alive() and first.done.is_set() and second.done.is_set()
    assert engine.outstanding == 0


def test_a_row_that_joined_late_runs_to_its_own_context_end_past_the_first_s(model):
    engine = Engine(model)
    first, late = collect([1, 2], 40, temperature=0.0), collect([3], 40, temperature=0.0)
    engine.submit(first)
    engine.admit(wait=True)
    for _ in range(12):
        engine.step()
    engine.submit(late)  # joins padded: its slots run past block_size before its positions do
    drive(engine, [first, late])
    assert late.tokens == generate_batch(model, [[3]], 31, temperature=0.0)[0] and late.reasons == ["length"]
    assert first.tokens == generate_batch(model, [[1, 2]], 30, temperature=0.0)[0]


def test_a_failed_prefill_ends_only_the_new_requests(model):
    engine = Engine(model)
    running = collect([1, 2], 20, temperature=0.0)
    engine.submit(running)
    engine.admit(wait=True)
    engine.step()
    bad = collect([3], 5, temperature=0.0, seed=2 ** 70)  # a seed no generator takes
    engine.submit(bad)
    drive(engine, [running, bad])
    assert bad.reasons == ["error"] and running.reasons == ["length"]
    assert running.tokens == generate_batch(model, [[1, 2]], 20, temperature=0.0)[0] and engine.outstanding == 0
