"""The LLaMA switches of model.py (RoPE, RMSNorm, SwiGLU, GQA) and the LLaMA-style CPU config."""
import math

import pytest
import torch

from conftest import REPO, TINY_MODEL, run_main
from configurator import read_config_file
from model import GPT, GPTConfig, apply_rope, norm, rope_cos_sin, rope_inv_freq

LLAMA = dict(positions="rope", norm="rmsnorm", mlp="swiglu", bias=False, tie_embeddings=False)


def test_rope_attention_scores_depend_only_on_the_position_offset():
    config = GPTConfig(n_embd=32, n_head=2, positions="rope", rope_theta=500.0)
    cos, sin = rope_cos_sin(config, 24)  # (T, d/2)
    torch.manual_seed(0)
    q = torch.randn(16).expand(1, 1, 24, 16)  # the same query and key vector at every position
    k = torch.randn(16).expand(1, 1, 24, 16)
    scores = (apply_rope(q, cos, sin) @ apply_rope(k, cos, sin).transpose(-1, -2))[0, 0]  # (T, T)
    for offset in (-5, 0, 3, 11):
        diagonal = torch.diagonal(scores, offset)  # all (m, n) with n - m = offset
        torch.testing.assert_close(diagonal, diagonal[:1].expand_as(diagonal), atol=1e-5, rtol=0)
    assert not torch.allclose(torch.diagonal(scores, 0)[0], torch.diagonal(scores, 3)[0])


def test_rope_rotates_pairs_i_and_i_plus_half_head_dim():
    config = GPTConfig(n_embd=8, n_head=1, positions="rope")
    cos, sin = rope_cos_sin(config, 3)
    x = torch.zeros(1, 1, 3, 8)
    x[..., 0] = 1.0  # a unit vector in dimension 0 turns towards dimension 4 only
    y = apply_rope(x, cos, sin)[0, 0]
    torch.testing.assert_close(y[:, 0], torch.cos(torch.arange(3.0)))
    torch.testing.assert_close(y[:, 4], torch.sin(torch.arange(3.0)))
    assert y[:, [1, 2, 3, 5, 6, 7]].abs().max() == 0


@pytest.mark.parametrize("impl", ["fused", "explicit"])
@pytest.mark.parametrize("n_kv_head", [1, 2, 6])
def test_grouped_query_attention_equals_multi_head_with_each_kv_head_repeated(impl, n_kv_head):
    torch.manual_seed(0)
    shape = dict(LLAMA, block_size=16, vocab_size=50, n_layer=2, n_head=6, n_embd=36, head_dim=8, attn_impl=impl)
    gqa = GPT(GPTConfig(n_kv_head=n_kv_head, **shape)).eval()
    mha = GPT(GPTConfig(n_kv_head=6, **shape)).eval()
    state = gqa.state_dict()
    H, d, rep = 6, 8, 6 // n_kv_head
    for i in range(2):  # kv head j serves query heads j*rep .. j*rep+rep-1
        w = state[f"transformer.h.{i}.attn.c_attn.weight"]  # ((H + 2 Hkv) d, C)
        q, k, v = w.split([H * d, n_kv_head * d, n_kv_head * d])
        repeat = lambda t: t.view(n_kv_head, d, -1).repeat_interleave(rep, dim=0).reshape(H * d, -1)
        state[f"transformer.h.{i}.attn.c_attn.weight"] = torch.cat([q, repeat(k), repeat(v)])
    mha.load_state_dict(state)
    idx = torch.randint(0, 50, (2, 16))
    torch.testing.assert_close(gqa(idx)[0], mha(idx)[0], atol=1e-5, rtol=0)


def test_rmsnorm_is_x_over_its_root_mean_square_times_the_gain():
    torch.manual_seed(0)
    x, gain = torch.randn(3, 5, 16) * 3, torch.randn(16)
    by_hand = x / torch.sqrt((x * x).mean(-1, keepdim=True) + 1e-5) * gain
    torch.testing.assert_close(norm(x, gain, None, "rmsnorm", 1e-5), by_hand)


def test_swiglu_hidden_width_is_two_thirds_of_4x_rounded_up_to_the_multiple():
    assert GPTConfig(n_embd=128, n_head=4, mlp="swiglu").mlp_hidden == 512  # 341 -> 512
    assert GPTConfig(n_embd=4096, n_head=32, mlp="swiglu").mlp_hidden == 11008  # LLaMA-7B
    assert GPTConfig(n_embd=128, n_head=4, mlp="swiglu", mlp_multiple_of=32).mlp_hidden == 352


@pytest.mark.parametrize("theta, factor, low, high, orig, head_dim", [
    (500000.0, 32.0, 1.0, 4.0, 8192, 64),    # Llama 3.2 1B
    (500000.0, 8.0, 1.0, 4.0, 8192, 128),    # Llama 3.1 8B
    (10000.0, 4.0, 2.0, 8.0, 64, 16),        # small context: all three bands are used
])
def test_llama3_rope_scaling_matches_transformers(theta, factor, low, high, orig, head_dim):
    pytest.importorskip("transformers")
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    scaling = {"rope_type": "llama3", "factor": factor, "low_freq_factor": low, "high_freq_factor": high,
               "original_max_position_embeddings": orig}
    hf_config = LlamaConfig(hidden_size=head_dim * 4, num_attention_heads=4, rope_theta=theta, rope_scaling=scaling)
    theirs, _ = ROPE_INIT_FUNCTIONS["llama3"](hf_config, "cpu")
    ours = rope_inv_freq(GPTConfig(n_embd=head_dim * 4, n_head=4, positions="rope", rope_theta=theta,
                                   rope_scaling="llama3", rope_factor=factor, rope_low_freq_factor=low,
                                   rope_high_freq_factor=high, rope_original_context=orig))
    unscaled = rope_inv_freq(GPTConfig(n_embd=head_dim * 4, n_head=4, positions="rope", rope_theta=theta))
    torch.testing.assert_close(ours.float(), theirs, rtol=1e-6, atol=0)
    assert (ours < unscaled).any() and (ours == unscaled).any()  # some frequencies slowed, some kept


def params_of(config_file, vocab_size=65):
    settings = {k: v for k, v in read_config_file(REPO / config_file).items() if k in GPTConfig.keys()}
    with torch.device("meta"):
        return GPT(GPTConfig(vocab_size=vocab_size, **settings)).get_num_params(non_embedding=False)


def test_llama_cpu_config_has_the_parameter_count_of_the_gpt2_cpu_config():
    gpt2, llama = params_of("config/train_shakespeare_char_cpu.py"), params_of("config/train_shakespeare_char_llama.py")
    assert abs(llama - gpt2) / gpt2 < 0.02, (llama, gpt2)
    settings = read_config_file(REPO / "config/train_shakespeare_char_llama.py")
    assert settings["positions"] == "rope" and settings["norm"] == "rmsnorm" and settings["mlp"] == "swiglu"
    assert settings["n_kv_head"] < settings["n_head"]


def test_llama_config_trains_and_sample_reads_its_checkpoint(workdir):
    run_main("train.py", REPO / "config/train_shakespeare_char_llama.py", *TINY_MODEL, "--n_kv_head=1",
               "--mlp_hidden=64", "--out_dir=out", "--max_iters=30", "--eval_interval=15", cwd=workdir)
    ckpt = torch.load(workdir / "out" / "ckpt.pt", weights_only=True)
    assert ckpt["model_config"]["positions"] == "rope" and ckpt["model_config"]["n_kv_head"] == 1
    assert ckpt["best_val_loss"] < math.log(ckpt["model_config"]["vocab_size"]) - 0.5
    proc = run_main("sample.py", "--out_dir=out", "--start=ROMEO:", "--num_samples=1", "--max_new_tokens=80",
                      "--device=cpu", cwd=workdir)  # 80 tokens: past block_size 32, so the context slides
    assert proc.stdout.startswith("ROMEO:") and len(proc.stdout.split("---------------")[0]) > 80
