"""The static KV cache (decoding.StaticKVCache): fixed shapes, the filled length a tensor, so that one
torch.compile'd graph serves every decoding step; the tokens are those of the growing KVCache."""
import pytest
import torch

from conftest import lively_gpt, one_line_error, run_main
from decoding import CompiledStep, StaticKVCache, _step, check_static, compiled_step, generate_batch

ARCHITECTURES = {
    "learned": {},
    "rope-gqa-swiglu": dict(positions="rope", norm="rmsnorm", mlp="swiglu", n_kv_head=2, bias=False),
    "qk_norm-softcap-value_embeds": dict(positions="rope", qk_norm=True, logit_softcap=5.0, value_embeds=True),
    "norm_head-untied": dict(norm_head=True, tie_embeddings=False),
}
PROMPTS = [[1, 2, 3, 4, 5], [6, 7], [8]]  # left-padded rows of different lengths


@pytest.mark.parametrize("arch", ARCHITECTURES.values(), ids=ARCHITECTURES.keys())
def test_static_cache_decodes_the_tokens_of_the_growing_cache(arch):
    model = lively_gpt(**arch)
    eager = generate_batch(model, PROMPTS, 60, temperature=0)  # 60 > block_size 24: the window slides twice
    static = generate_batch(model, PROMPTS, 60, temperature=0, static=_step)
    assert static == eager


def test_static_cache_samples_the_same_tokens_from_the_same_seed():
    model = lively_gpt()
    runs = [generate_batch(model, PROMPTS, 30, temperature=1.0, generator=torch.Generator().manual_seed(3),
                           static=step) for step in (None, _step)]
    assert runs[0] == runs[1]


def test_a_step_has_the_same_shapes_at_every_position():
    model = lively_gpt()
    cache = StaticKVCache.for_model(model, torch.zeros(1, dtype=torch.long))
    model(torch.tensor([[1, 2, 3]]), cache=cache)
    shapes = []
    for token in (4, 5, 6):
        _step(model, torch.tensor([[token]]), cache)
        shapes.append((tuple(cache.k[0].shape), tuple(cache.attn_mask(1).shape), cache.pos.dim()))
    assert shapes == [((1, 4, 24, 8), (1, 1, 1, 24), 0)] * 3 and int(cache.pos) == 6


def test_compiled_decoding_of_100_tokens_compiles_once_and_matches_eager():
    from torch._dynamo.testing import CompileCounterWithBackend
    model = lively_gpt(positions="rope", n_kv_head=2, block_size=64)
    eager = generate_batch(model, PROMPTS, 100, temperature=0)  # past block_size: prefills between steps
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("eager")  # dynamo's graph capture, without inductor's C++ build
    step = torch.compile(_step, backend=counter, fullgraph=True)
    assert generate_batch(model, PROMPTS, 100, temperature=0, static=step) == eager
    assert counter.frame_count == 1  # one graph for all 100 steps: nothing recompiled
    torch._dynamo.reset()


def test_later_calls_reuse_the_cache_and_the_graph():
    from torch._dynamo.testing import CompileCounterWithBackend
    model = lively_gpt(positions="rope")
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("eager")
    step = CompiledStep("cpu", backend=counter)
    first = generate_batch(model, [[1, 2]], 30, temperature=0, static=step)
    cache = step.caches[(id(model), 1)][1]
    buffers = [t.data_ptr() for t in cache.k]
    second = generate_batch(model, [[3]], 30, temperature=0, static=step)
    assert len(step.caches) == 1 and [t.data_ptr() for t in cache.k] == buffers  # the same buffers again
    assert counter.frame_count == 1  # and the same graph
    assert first == generate_batch(model, [[1, 2]], 30, temperature=0) and second == generate_batch(model, [[3]], 30,
                                                                                                   temperature=0)
    torch._dynamo.reset()


@pytest.mark.slow
def test_inductor_compiled_step_matches_eager():
    model = lively_gpt(positions="rope", n_kv_head=2, block_size=64)
    eager = generate_batch(model, PROMPTS, 100, temperature=0)
    torch._dynamo.reset()
    assert generate_batch(model, PROMPTS, 100, temperature=0, static=compiled_step("cpu")) == eager
    torch._dynamo.reset()


@pytest.mark.parametrize("arch, message", [(dict(positions="alibi"), "ALiBi"),
                                           (dict(attn_window=4), "sliding-window"),
                                           (dict(attn_window=4, attn_window_pattern="L"), "sliding-window"),
                                           (dict(causal=False), "encoder")])
def test_what_the_static_cache_cannot_run_is_refused_by_name(arch, message):
    model = lively_gpt(**arch)
    with pytest.raises(ValueError, match=message):
        check_static(model.config)


def test_sample_compile_refuses_alibi_in_one_line(tmp_path):
    from dataclasses import asdict
    model = lively_gpt(positions="alibi")
    torch.save({"model": model.state_dict(), "model_config": asdict(model.config),
                "tokenizer": {"kind": "char", "chars": "abcdefghijklmnopqrstuvwxyz .,"}}, tmp_path / "ckpt.pt")
    result = run_main("sample.py", "--out_dir=.", "--compile", "--device=cpu", "--start=ab", cwd=tmp_path, check=False)
    one_line_error(result, "ALiBi")
