"""quantize.py: weight-only int8, per output channel. Each row keeps its own scale and rounds to within
half a step; every product kernel computes the dequantized product; a quantized model predicts nearly
what the float one does in a quarter of the bytes; a saved int8 checkpoint is the model quantized on the
fly, bit for bit; and what cannot be quantized is refused in one line, with nothing written."""
from dataclasses import asdict

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import quantize
from checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
from common import UserError
from conftest import TINY_MODEL, copy_run, lively_gpt, one_line_error, run_main, snapshot
from decoding import generate_batch
from quantize import (KERNELS, Int8Embedding, Int8Linear, check_quantizable, choose_kernel, dequantize_rows,
                      prepare, quantize_model, quantize_rows, weight_bytes)

LLAMA = dict(positions="rope", norm="rmsnorm", mlp="swiglu", n_kv_head=2, bias=False, tie_embeddings=False)
SAMPLE = ["--device=cpu", "--dtype=float32", "--num_samples=2", "--max_new_tokens=40", "--seed=7"]


def rows_of_every_size(seed=0):
    """(out, in) weights whose rows differ in magnitude by orders: an outlier row, a tiny one, an all-zero one."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(12, 40, generator=gen) * torch.logspace(-3, 1, 12)[:, None]
    w[3] = 0.0
    w[5, 7] = 50.0  # one outlier weight
    return w


# ----------------------------------------------------------------------------------------------
# rows

def test_each_row_round_trips_to_within_half_of_its_own_step():
    w = rows_of_every_size()
    q, scales = quantize_rows(w)
    assert q.dtype == torch.int8 and q.shape == w.shape and scales.shape == (w.size(0),)
    assert int(q.abs().max()) <= 127
    err = (dequantize_rows(q, scales) - w).abs()  # (out, in)
    step = scales[:, None]
    assert torch.all(err <= step / 2 * (1 + 1e-5) + 1e-12), (err / step).max()
    # the bound is tight: rounding does use up most of half a step on some weights of a random row
    assert (err / step)[0].max() > 0.3


def test_scales_are_per_output_channel_so_an_outlier_costs_only_its_own_row():
    w = rows_of_every_size()
    _, scales = quantize_rows(w)
    torch.testing.assert_close(scales[torch.arange(12) != 3], w.abs().amax(dim=1)[torch.arange(12) != 3] / 127)
    louder = w.clone()
    louder[5] *= 1000  # only row 5's scale moves
    _, louder_scales = quantize_rows(louder)
    assert torch.equal(louder_scales[torch.arange(12) != 5], scales[torch.arange(12) != 5])
    assert louder_scales[5] > 999 * scales[5]
    # the smallest row keeps its relative precision: a per-tensor scale would round it all to zero
    q, _ = quantize_rows(w)
    assert q[0].abs().max() == 127


def test_an_all_zero_row_stays_zero_and_its_scale_stays_positive():
    w = rows_of_every_size()
    q, scales = quantize_rows(w)
    assert torch.all(q[3] == 0) and scales[3] > 0
    assert torch.all(dequantize_rows(q, scales)[3] == 0)
    assert torch.isfinite(scales).all()


# ----------------------------------------------------------------------------------------------
# kernels

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}  # relative to the largest output


@pytest.mark.parametrize("dtype", TOLERANCE, ids=str)
def test_every_kernel_computes_the_dequantized_product_on_the_dtypes_it_runs(dtype):
    gen = torch.Generator().manual_seed(1)
    q, scales = quantize_rows(torch.randn(64, 32, generator=gen) * 0.05)
    x = torch.randn(3, 5, 32, generator=gen).to(dtype)  # (B, T, in), as a model feeds it
    want = F.linear(x.double(), dequantize_rows(q, scales, torch.float64))  # the exact product of these inputs
    ran = []
    candidates = KERNELS
    for name, kernel in candidates.items():
        try:
            got = kernel(x, q, scales)
        except (RuntimeError, NotImplementedError):  # not built for this device and dtype
            continue
        ran.append(name)
        assert got.shape == (3, 5, 64) and got.dtype == dtype, name
        # int8pack_bf16 rounds the activations to bfloat16 first: within bfloat16's tolerance whatever x's dtype
        tol = TOLERANCE[torch.bfloat16] if name == "int8pack_bf16" else TOLERANCE[dtype]
        err = (got.double() - want).abs().max() / want.abs().max()
        assert err <= tol, (name, float(err))
    assert "dequant" in ran  # the fallback runs everywhere


def test_a_kernel_that_ignored_the_scales_would_be_caught():
    """The tolerance above is tight enough to matter: q @ x without the scales is far off."""
    gen = torch.Generator().manual_seed(1)
    q, scales = quantize_rows(torch.randn(64, 32, generator=gen) * 0.05)
    x = torch.randn(4, 32, generator=gen)
    want = F.linear(x, dequantize_rows(q, scales))
    wrong = F.linear(x, dequantize_rows(q, torch.full_like(scales, scales.mean().item())))
    assert (wrong - want).abs().max() / want.abs().max() > 100 * TOLERANCE[torch.float32]


def test_choose_kernel_picks_one_that_runs_here_and_keeps_its_choice():
    name = choose_kernel("cpu", torch.float32, 32)
    assert name in KERNELS
    assert choose_kernel("cpu", torch.float32, 64) == name  # measured once per (device, dtype)


@pytest.mark.parametrize("kernel", KERNELS)
def test_int8_linear_is_the_linear_layer_with_its_weight_rounded(kernel):
    torch.manual_seed(0)
    linear = nn.Linear(32, 48, bias=True)
    with torch.no_grad():
        linear.bias.normal_()
    layer = Int8Linear.from_linear(linear)
    layer.use_kernel(kernel)
    x = torch.randn(2, 7, 32)
    try:
        got = layer(x)
    except (RuntimeError, NotImplementedError):
        pytest.skip(f"{kernel} does not run on this CPU")
    q, scales = quantize_rows(linear.weight)
    want = F.linear(x, dequantize_rows(q, scales), linear.bias)
    tol = 1e-2 if kernel == "int8pack_bf16" else 1e-5
    assert (got - want).abs().max() <= tol * want.abs().max()
    assert (got - linear(x)).abs().max() < 0.02 * linear(x).abs().max()  # and near the float layer
    assert [n for n, _ in layer.named_parameters()] == ["bias"]  # the weight is int8 buffers, not a parameter


def test_int8_embedding_reads_the_dequantized_rows():
    w = rows_of_every_size()
    emb = Int8Embedding(*w.shape)
    emb.qweight, emb.scales = quantize_rows(w)
    idx = torch.tensor([[0, 5, 3], [11, 11, 2]])
    assert torch.equal(emb(idx), dequantize_rows(*quantize_rows(w))[idx])


# ----------------------------------------------------------------------------------------------
# a model

def logits_of(model, idx):
    with torch.no_grad():
        return model(idx)[0]


@pytest.mark.parametrize("mode", quantize.MODES)
@pytest.mark.parametrize("arch", [{}, LLAMA], ids=["gpt2", "llama"])
def test_a_quantized_model_predicts_nearly_what_the_float_one_does(mode, arch):
    model, quantized = lively_gpt(**arch), quantize_model(lively_gpt(**arch), mode)
    idx = torch.randint(0, 29, (64, 24), generator=torch.Generator().manual_seed(1))
    a, b = logits_of(model, idx), logits_of(quantized, idx)
    assert not torch.equal(a, b)  # it did quantize
    assert (a - b).norm() / a.norm() < 0.05
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() > 0.9  # next-token choices, teacher-forced
    prompts = [[i % 29, 3 * i % 29] for i in range(20)]
    greedy = generate_batch(model, prompts, 16, temperature=0)
    greedy_q = generate_batch(quantized, prompts, 16, temperature=0)
    same = sum(x == y for p, r in zip(greedy, greedy_q) for x, y in zip(p, r)) / (20 * 16)
    assert same > 0.65  # free-running: one early difference changes the rest of its row
    assert sum(p == r for p, r in zip(greedy, greedy_q)) >= 6


def test_int8_quantizes_the_blocks_and_int8_all_also_the_embedding_and_head():
    blocks = quantize_model(lively_gpt(), "int8")
    assert all(isinstance(getattr(getattr(b, part), name), Int8Linear) for b in blocks.transformer.h
               for part, name in (p.split(".") for p in quantize.BLOCK_LINEARS))
    assert isinstance(blocks.lm_head, nn.Linear) and isinstance(blocks.transformer.wte, nn.Embedding)
    everything = quantize_model(lively_gpt(tie_embeddings=False), "int8_all")
    assert isinstance(everything.lm_head, Int8Linear) and isinstance(everything.transformer.wte, Int8Embedding)
    assert everything.transformer.wte.qweight.data_ptr() != everything.lm_head.qweight.data_ptr()
    assert not any(p.dim() == 2 and name != "transformer.wpe.weight" for name, p in everything.named_parameters())


def test_int8_all_with_tied_embeddings_keeps_one_table_and_a_quarter_of_the_bytes():
    # wide rows and no biases: nearly every byte is in a matrix, so the ratio shows int8 against float32
    shape = dict(positions="rope", bias=False, n_embd=128, vocab_size=256)
    model = lively_gpt(**shape)
    before = weight_bytes(model)
    quantize_model(model, "int8_all")
    wte, head = model.transformer.wte, model.lm_head
    assert wte.qweight is head.qweight and wte.scales is head.scales  # one table, read both ways
    assert 3.6 < before / weight_bytes(model) <= 4.0, before / weight_bytes(model)
    # untied, the same shape holds a second table: exactly one vocab x n_embd int8 matrix and its scales more
    untied = quantize_model(lively_gpt(**shape, tie_embeddings=False), "int8_all")
    assert weight_bytes(untied) - weight_bytes(model) == 256 * 128 + 256 * 4


MOVES = {  # what hf.load_for_inference does to a loaded model (.to(device)), and a cast
    "copied-as-to-another-device": lambda m: m._apply(torch.clone),  # .to("cuda") copies each tensor like this
    "cast-to-bfloat16": lambda m: m.to(torch.bfloat16),
}


@pytest.mark.parametrize("move", MOVES.values(), ids=MOVES.keys())
def test_a_tied_int8_all_model_keeps_one_table_when_moved(move):
    float_model = move(lively_gpt())
    assert float_model.transformer.wte.weight is float_model.lm_head.weight  # the float tie survives
    model = move(quantize_model(lively_gpt(), "int8_all"))
    assert model.transformer.wte.qweight is model.lm_head.qweight
    assert model.transformer.wte.scales is model.lm_head.scales


def test_check_quantizable_names_what_it_refuses():
    refusals = {
        ("int4", ()): "choose int8 or int8_all",
        ("int8", (("lora_rank", 2),)): "merge_lora.py",
        ("int8_all", (("norm_head", True),)): "norm_head",
        ("int8_all", (("value_embeds", True),)): "value embeddings",
    }
    for (mode, kw), message in refusals.items():
        with pytest.raises(ValueError, match=message):
            check_quantizable(lively_gpt(**dict(kw)), mode)
    for ok in (dict(norm_head=True), dict(value_embeds=True)):  # int8 leaves the head and embeddings alone
        check_quantizable(lively_gpt(**ok), "int8")
    with pytest.raises(UserError, match="norm_head"):
        prepare(lively_gpt(norm_head=True), "int8_all")


def test_prepare_quantizes_once_and_leaves_a_float_model_alone_without_a_mode():
    model = lively_gpt()
    assert prepare(model, "") is None and isinstance(model.lm_head, nn.Linear)
    note = prepare(model, "int8")
    assert note.startswith("weights: int8 (kernel ") and model.quantization == "int8"
    kernels = {m.kernel for m in model.modules() if isinstance(m, Int8Linear)}
    assert len(kernels) == 1 and kernels <= set(KERNELS)
    assert prepare(model, "int8_all").startswith("weights: int8 ")  # already quantized: kept as it is
    assert isinstance(model.lm_head, nn.Linear)


# ----------------------------------------------------------------------------------------------
# the command and the checkpoint it writes

@pytest.fixture(scope="module")
def quantized_runs(tiny_run, tmp_path_factory):
    """tiny_run's float checkpoint quantized by the command: {mode: folder of its ckpt.pt}."""
    folder = tmp_path_factory.mktemp("quantized")
    out = {}
    for mode in quantize.MODES:
        result = run_main("quantize.py", f"--out_dir={tiny_run / 'out'}", f"--out={folder / mode}",
                          f"--quantize={mode}", cwd=folder)
        assert f"{mode}: " in result.stdout and "MB of weights ->" in result.stdout
        out[mode] = folder / mode
    return out


@pytest.mark.parametrize("mode", quantize.MODES)
def test_a_saved_quantized_checkpoint_is_the_model_quantized_on_the_fly(mode, tiny_run, quantized_runs):
    ckpt = load_checkpoint(str(quantized_runs[mode]))
    assert ckpt["quantization"] == mode and "optimizer" not in ckpt
    loaded = quantize.load_model(ckpt).eval()
    on_the_fly = quantize_model(model_from_checkpoint(load_checkpoint(str(tiny_run / "out"))), mode).eval()
    float_model = model_from_checkpoint(load_checkpoint(str(tiny_run / "out"))).eval()
    idx = torch.randint(0, loaded.config.vocab_size, (4, 32), generator=torch.Generator().manual_seed(0))
    assert torch.equal(logits_of(loaded, idx), logits_of(on_the_fly, idx))
    assert not torch.equal(logits_of(loaded, idx), logits_of(float_model, idx))
    if mode == "int8_all":  # the tie survives the round trip: one table again
        assert loaded.transformer.wte.qweight is loaded.lm_head.qweight
    # the same kernel chosen for both: still bit for bit
    prepare(loaded, "")
    prepare(on_the_fly, "")
    assert torch.equal(logits_of(loaded, idx), logits_of(on_the_fly, idx))


@pytest.mark.parametrize("mode", quantize.MODES)
def test_sample_reads_a_saved_int8_checkpoint_as_it_quantizes_on_load(mode, tiny_run, quantized_runs):
    saved = run_main("sample.py", f"--out_dir={quantized_runs[mode]}", *SAMPLE, cwd=tiny_run)
    on_load = run_main("sample.py", "--out_dir=out", f"--quantize={mode}", *SAMPLE, cwd=tiny_run)
    assert saved.stdout == on_load.stdout
    assert f"weights: {mode} (kernel " in saved.stderr and f"weights: {mode} (kernel " in on_load.stderr
    assert len(saved.stdout.replace("-", "").strip()) > 40


def test_sample_quantize_int8_prints_text_from_a_trained_checkpoint(tiny_run):
    result = run_main("sample.py", "--out_dir=out", "--quantize=int8", "--start=ROMEO:", *SAMPLE, cwd=tiny_run)
    samples = [s for s in result.stdout.split("---------------") if s.strip()]
    assert len(samples) == 2 and all(s.strip().startswith("ROMEO:") and len(s.strip()) > 30 for s in samples)
    assert "weights: int8 (kernel " in result.stderr


def test_a_saved_checkpoint_is_a_quarter_of_the_float_ones_matrices(tiny_run, quantized_runs):
    float_sd = load_checkpoint(str(tiny_run / "out"))["model"]
    int8_sd = load_checkpoint(str(quantized_runs["int8"]))["model"]
    for name, t in float_sd.items():
        if any(f".{path}.weight" in name for path in quantize.BLOCK_LINEARS):
            stem = name.removesuffix(".weight")
            assert int8_sd[stem + ".qweight"].dtype == torch.int8 and stem + ".weight" not in int8_sd
            assert int8_sd[stem + ".scales"].shape == (t.size(0),)


# ----------------------------------------------------------------------------------------------
# refusals: exit code 2, one line, nothing written

def write_float_checkpoint(folder, **config):
    """A float checkpoint of a lively model (config overrides its shape) in folder/ckpt.pt."""
    model = lively_gpt(**config)
    folder.mkdir(parents=True, exist_ok=True)
    save_checkpoint({"model": model.state_dict(), "model_config": asdict(model.config), "iter_num": 0}, str(folder))
    return folder


def refuse(cwd, message, *args):
    before = sorted(p.relative_to(cwd) for p in cwd.rglob("*"))
    result = run_main("quantize.py", *args, cwd=cwd, check=False)
    one_line_error(result, message)
    assert sorted(p.relative_to(cwd) for p in cwd.rglob("*")) == before  # nothing written anywhere
    return result


def test_refuses_to_write_into_the_source_folder(tiny_run, tmp_path):
    run = copy_run(tiny_run / "out", tmp_path / "out")
    files = snapshot(run)
    refuse(tmp_path, "is the source's folder", "--out_dir=out", "--out=out")
    refuse(tmp_path, "is the source's folder", "--out_dir=out/ckpt.pt", "--out=./out/")
    assert snapshot(run) == files


def test_refuses_a_checkpoint_that_is_quantized_already(quantized_runs, tmp_path):
    refuse(tmp_path, "is quantized already (int8)", f"--out_dir={quantized_runs['int8']}", "--out=again")


@pytest.mark.parametrize("config, mode, message", [
    (dict(lora_rank=2), "int8", "LoRA adapters: merge them"),
    (dict(norm_head=True), "int8_all", "norm_head"),
    (dict(value_embeds=True), "int8_all", "value embeddings"),
    ({}, "int4", "quantize='int4': choose int8 or int8_all"),
], ids=["lora", "norm_head", "value_embeds", "unknown-mode"])
def test_refuses_what_it_cannot_quantize(config, mode, message, tmp_path):
    write_float_checkpoint(tmp_path / "src", **config)
    refuse(tmp_path, message, "--out_dir=src", "--out=dst", f"--quantize={mode}")


def test_the_blocks_of_a_norm_head_model_still_quantize(tmp_path):
    """norm_head refuses int8_all only: int8 leaves the head in float."""
    write_float_checkpoint(tmp_path / "src", norm_head=True)
    run_main("quantize.py", "--out_dir=src", "--out=dst", cwd=tmp_path)
    ckpt = load_checkpoint(str(tmp_path / "dst"))
    model, reference = quantize.load_model(ckpt), lively_gpt(norm_head=True)
    idx = torch.randint(0, 29, (2, 24), generator=torch.Generator().manual_seed(0))
    a, b = logits_of(model, idx), logits_of(reference, idx)
    assert (a - b).norm() / a.norm() < 0.05


def test_train_refuses_to_start_from_a_quantized_checkpoint(tiny_run, quantized_runs, tmp_path):
    folder = copy_run(tiny_run, tmp_path / "run")
    result = run_main("train.py", *TINY_MODEL, f"--init_from={quantized_runs['int8']}", "--out_dir=again",
                      "--max_iters=2", cwd=folder, check=False)
    one_line_error(result, "the checkpoint is quantized (int8, by quantize.py)")
    assert not (folder / "again" / "ckpt.pt").exists()


@pytest.mark.parametrize("mode", quantize.MODES)
def test_a_model_cast_to_bfloat16_then_quantized_computes_in_bfloat16(mode):
    """serve.py casts the model to its dtype, then quantizes: the embedding's output must follow the cast."""
    model = lively_gpt().to(torch.bfloat16)
    prepare(model, mode)
    logits, _ = model(torch.tensor([[1, 2, 3]]))
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()
