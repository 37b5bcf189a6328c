"""The code paths GPU runs take (the GPU configs default to compile=True and bfloat16), exercised on the CPU:
torch.compile for training and sampling, bfloat16 autocast, float16 with the grad scaler. FSDP in bfloat16
and DDP with gradient accumulation under torchrun are in test_fsdp.py and test_train.py. NCCL and the
flash-attention kernels exist on CUDA only."""
import functools
import re
from dataclasses import asdict

import pytest
import torch

import train
from checkpoint import save_checkpoint
from configurator import parse_args
from conftest import TINY_MODEL, curve, evals, run_main
from model import GPT, GPTConfig

RUN = [*TINY_MODEL, "--eval_interval=5", "--log_interval=1", "--always_save_checkpoint=True", "--lr_decay_iters=20"]


def close_curves(got, want, tol):
    assert [(i, k) for i, k, _ in got] == [(i, k) for i, k, _ in want]
    for (i, k, a), (_, _, b) in zip(got, want):
        assert a == pytest.approx(b, abs=tol), (i, k, a, b)


@pytest.mark.slow  # inductor compiles C++ kernels for the CPU: about a minute
def test_compiled_training_logs_the_losses_of_eager_training(workdir):
    run_main("train.py", *RUN, "--max_iters=10", "--out_dir=eager", cwd=workdir)
    run_main("train.py", *RUN, "--max_iters=10", "--out_dir=compiled", "--compile=True", cwd=workdir)
    close_curves(curve(workdir / "compiled"), curve(workdir / "eager"), tol=1e-4)


def lively_checkpoint(folder):
    """out/ckpt.pt of a tiny char model whose weights are large enough that greedy text varies."""
    torch.manual_seed(0)
    chars = "".join(sorted(set("abcdefghijklmnopqrstuvwxyz ,.\n")))
    model = GPT(GPTConfig(block_size=16, vocab_size=len(chars), n_layer=2, n_head=2, n_embd=32))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3)
    (folder / "out").mkdir()
    save_checkpoint({"model": model.state_dict(), "model_config": asdict(model.config), "config": {},
                     "iter_num": 0, "best_val_loss": 0.0, "tokenizer": {"kind": "char", "chars": chars}}, folder / "out")


@pytest.mark.slow  # inductor: about 20 s
def test_compiled_sampling_gives_the_text_of_eager_sampling(tmp_path):
    lively_checkpoint(tmp_path)
    args = ["--out_dir=out", "--start=the king", "--temperature=0", "--num_samples=2", "--max_new_tokens=40",
            "--device=cpu", "--dtype=float32"]  # 40 tokens: past block_size 16, where the window slides
    eager = run_main("sample.py", *args, cwd=tmp_path).stdout
    compiled = run_main("sample.py", *args, "--compile=True", cwd=tmp_path).stdout
    assert compiled == eager and len(set(eager)) > 8


def test_bfloat16_autocast_trains_close_to_float32_on_float32_weights(workdir):
    run_main("train.py", *RUN, "--max_iters=10", "--out_dir=fp32", cwd=workdir)
    out = run_main("train.py", *RUN, "--max_iters=10", "--out_dir=bf16", "--dtype=bfloat16", cwd=workdir).stdout
    assert re.search(r"^attention in (bfloat16|float32): the faster on this CPU", out, re.M)  # chosen by timing
    close_curves(curve(workdir / "bf16"), curve(workdir / "fp32"), tol=0.02)
    assert evals(workdir / "bf16")[-1]["val/loss"] < evals(workdir / "bf16")[0]["val/loss"]
    ckpt = torch.load(workdir / "bf16" / "ckpt.pt", weights_only=True)
    assert all(t.dtype == torch.float32 for t in ckpt["model"].values()) and ckpt["config"]["dtype"] == "bfloat16"
    text = run_main("sample.py", "--out_dir=bf16", "--dtype=bfloat16", "--start=To be", "--num_samples=1",
                    "--max_new_tokens=20", "--device=cpu", cwd=workdir).stdout
    assert text.startswith("To be") and len(text.split("---------------")[0]) > 20


def make_run(argv):
    cfg, explicit = parse_args(argv, [train.TrainConfig, GPTConfig], "train.py", "")
    return train.Run(cfg, explicit, argv)


def test_float16_skips_a_step_whose_scaled_gradients_overflow_and_halves_the_scale(workdir, monkeypatch):
    monkeypatch.setattr(torch.amp, "GradScaler", functools.partial(torch.amp.GradScaler, init_scale=2.0 ** 40))
    monkeypatch.chdir(workdir)
    run = make_run([*RUN, "--dtype=float16", "--out_dir=out", "--max_iters=5"])
    assert run.scaler.is_enabled()
    before = [p.detach().clone() for p in run.raw_model.parameters()]
    loss = run.step(run.draw())
    assert torch.isfinite(loss) and run.scaler.get_scale() == 2.0 ** 39  # inf in the float16 gradients
    assert all(torch.equal(a, b) for a, b in zip(before, run.raw_model.parameters()))  # the step was skipped
    for _ in range(30):  # the scale comes down until the gradients fit, then the steps go through
        run.step(run.draw())
    assert run.scaler.get_scale() < 2.0 ** 20
    assert not all(torch.equal(a, b) for a, b in zip(before, run.raw_model.parameters()))
    run.finish()


def test_float16_resume_restores_the_grad_scaler_and_continues_exactly(workdir, monkeypatch):
    monkeypatch.setattr(torch.amp, "GradScaler", functools.partial(torch.amp.GradScaler, init_scale=2.0 ** 24))
    fp16 = [*RUN, "--dtype=float16"]
    run_main("train.py", *fp16, "--max_iters=20", "--out_dir=full", cwd=workdir)
    run_main("train.py", *fp16, "--max_iters=10", "--out_dir=part", cwd=workdir)
    saved = torch.load(workdir / "part" / "ckpt.pt", weights_only=True)["scaler"]
    assert saved["scale"] < 2.0 ** 24  # overflowing steps lowered it: a resume must not start at 2^24 again
    run_main("train.py", *fp16, "--max_iters=20", "--out_dir=part", "--init_from=resume", cwd=workdir)
    assert curve(workdir / "part") == curve(workdir / "full")
