"""DPO (dpo.py, train.py on a preference dataset): the loss, the reference (a copy, or LoRA's adapters
switched off), preference data and its bad inputs, synthetic pairs, and resuming mid-run."""
import json
import math

import pytest
import torch

from conftest import TINY_MODEL, copy_run, evals, one_line_error, run_main, snapshot
from dpo import Reference, dpo_losses, response_logprobs
from model import GPT, GPTConfig

DPO_ARGS = [a for a in TINY_MODEL if not a.startswith(("--dataset", "--block_size", "--learning_rate"))] + [
    "--dataset=pairs", "--block_size=96", "--init_from=out", "--learning_rate=1e-3", "--eval_interval=10"]


def test_dpo_loss_is_minus_log_sigmoid_of_the_scaled_margin_on_hand_made_logprobs():
    chosen, rejected = torch.tensor([-1.0, -5.0]), torch.tensor([-3.0, -4.0])
    ref = torch.tensor([-2.0, -4.0]), torch.tensor([-2.0, -4.0])
    losses, cr, rr = dpo_losses(chosen, rejected, *ref, beta=0.5)
    # pair 0: rewards 0.5 and -0.5, margin 1; pair 1: rewards -0.5 and 0, margin -0.5
    assert torch.allclose(cr, torch.tensor([0.5, -0.5])) and torch.allclose(rr, torch.tensor([-0.5, 0.0]))
    sig = lambda z: 1 / (1 + math.exp(-z))  # noqa: E731
    assert losses.tolist() == pytest.approx([-math.log(sig(1.0)), -math.log(sig(-0.5))], abs=1e-6)
    smoothed, _, _ = dpo_losses(chosen, rejected, *ref, beta=0.5, label_smoothing=0.1)  # conservative DPO
    assert smoothed[0].item() == pytest.approx(-0.9 * math.log(sig(1.0)) - 0.1 * math.log(sig(-1.0)), abs=1e-6)
    robust, _, _ = dpo_losses(chosen, rejected, *ref, beta=0.5, label_smoothing=0.1, kind="robust")
    assert robust[0].item() == pytest.approx((-0.9 * math.log(sig(1.0)) + 0.1 * math.log(sig(-1.0))) / 0.8, abs=1e-6)


def test_answer_logprobs_sum_over_the_answer_tokens_only():
    logits = torch.randn(2, 4, 5)
    y = torch.tensor([[-1, -1, 3, 1], [-1, 2, 0, -1]])
    total, count = response_logprobs(logits, y)
    logp = torch.log_softmax(logits, -1)
    assert total[0].item() == pytest.approx((logp[0, 2, 3] + logp[0, 3, 1]).item(), abs=1e-6)
    assert total[1].item() == pytest.approx((logp[1, 1, 2] + logp[1, 2, 0]).item(), abs=1e-6)
    assert count.tolist() == [2, 2]


def test_a_lora_reference_is_the_policy_with_its_adapters_off_and_holds_no_copy():
    torch.manual_seed(0)
    base = GPT(GPTConfig(vocab_size=11, n_layer=1, n_head=2, n_embd=16, block_size=8, dropout=0.1))
    policy = GPT(GPTConfig(vocab_size=11, n_layer=1, n_head=2, n_embd=16, block_size=8, dropout=0.1))
    policy.load_state_dict(base.state_dict())
    policy.add_lora(4)
    for name, p in policy.named_parameters():
        if "lora_B" in name:
            p.data.normal_()  # adapters that change the outputs
    base.eval()
    x = torch.randint(11, (2, 8))
    reference = Reference(policy)
    policy.train()
    got = reference.logits(x, torch.autocast("cpu", enabled=False))
    assert reference.model is None and policy.training  # the policy's mode is left as it was
    assert torch.allclose(got, base(x)[0], atol=1e-6)
    policy.eval()
    assert not torch.allclose(policy(x)[0], got, atol=1e-3)  # with the adapters on, another model


def test_dpo_starts_at_chance_with_zero_margins_and_learns_the_pairs(pairs_run, tmp_path):
    folder = copy_run(pairs_run, tmp_path)
    run_main("train.py", *DPO_ARGS, "--out_dir=out-dpo", "--max_iters=30", cwd=folder)
    first, last = evals(folder / "out-dpo")[0], evals(folder / "out-dpo")[-1]
    assert first["val/reward_acc"] == 0.5 and first["val/margin"] == 0.0  # policy == reference: every margin 0
    assert first["val/loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert last["train/reward_acc"] > 0.8 and last["train/margin"] > 0
    ckpt = torch.load(folder / "out-dpo" / "ckpt.pt", weights_only=True)
    assert ckpt["config"]["reference"] == str(folder / "out")  # what a resume will load again


def test_dpo_with_lora_uses_the_adapters_off_as_reference(pairs_run, tmp_path):
    folder = copy_run(pairs_run, tmp_path)
    run_main("train.py", *DPO_ARGS, "--out_dir=out-lora", "--max_iters=20", "--trainable=lora", "--lora_rank=4",
             "--learning_rate=1e-2", cwd=folder)
    first, last = evals(folder / "out-lora")[0], evals(folder / "out-lora")[-1]
    assert first["val/reward_acc"] == 0.5 and first["val/loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert last["train/margin"] > 0
    ckpt = torch.load(folder / "out-lora" / "ckpt.pt", weights_only=True)
    assert ckpt["config"]["reference"] == "adapters"


def test_rpo_alpha_adds_the_chosen_answers_cross_entropy_per_token():
    from dpo import pair_loss
    torch.manual_seed(0)
    policy = GPT(GPTConfig(vocab_size=11, n_layer=1, n_head=2, n_embd=16, block_size=8, dropout=0.0))
    x = torch.randint(11, (4, 6))  # 2 pairs: rows 0-1 chosen, 2-3 rejected
    y = torch.randint(11, (4, 6))
    y[:, :3] = -1  # the prompt
    y[0, 5] = -1  # a shorter chosen answer
    cfg = {"dpo_beta": 0.1, "dpo_label_smoothing": 0.0, "dpo_loss": "sigmoid", "rpo_alpha": 0.0}
    off = torch.autocast("cpu", enabled=False)
    plain, _ = pair_loss(policy, Reference(policy), (x, y), cfg, off)
    with_sft, _ = pair_loss(policy, Reference(policy), (x, y), {**cfg, "rpo_alpha": 0.5}, off)
    nll = torch.nn.functional.cross_entropy(policy(x)[0][:2].reshape(-1, 11), y[:2].reshape(-1), ignore_index=-1)
    assert plain.item() == pytest.approx(math.log(2), abs=1e-6)  # a reference of the same weights: margin 0
    assert (with_sft - plain).item() == pytest.approx(0.5 * nll.item(), abs=1e-5)


def test_resuming_mid_dpo_continues_exactly(pairs_run, tmp_path):
    folder = copy_run(pairs_run, tmp_path)
    run_main("train.py", *DPO_ARGS, "--out_dir=full", "--max_iters=20", cwd=folder)
    run_main("train.py", *DPO_ARGS, "--out_dir=half", "--max_iters=10", "--lr_decay_iters=20", cwd=folder)
    run_main("train.py", *DPO_ARGS, "--out_dir=half", "--max_iters=20", "--init_from=resume", cwd=folder)
    assert evals(folder / "half")[-1] | {"elapsed_s": 0} == evals(folder / "full")[-1] | {"elapsed_s": 0}


def test_preference_data_keeps_the_splits_its_records_name(tmp_path):
    records = [{"prompt": f"Say {i}.", "chosen": f"{i}", "rejected": f"no {i}", "split": s}
               for i, s in enumerate(["train"] * 6 + ["val"] * 2 + ["test"] * 2)]
    records.append({"instruction": "Echo.", "input": "x", "chosen": "x", "rejected": "x", "split": "train"})
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    out = run_main("prepare.py", "--task", "preference", "--input", "p.jsonl", "--tokenizer", "bpe",
                   "--vocab_size", "300", "--out", "data/p", cwd=tmp_path)
    meta = json.loads((tmp_path / "data/p/meta.json").read_text())
    assert meta["task"] == "preference" and meta["splits"] == {"train": 6, "val": 2, "test": 2}
    assert "dropped 1 pair" in out.stdout  # chosen == rejected teaches nothing


@pytest.mark.parametrize("record, message", [
    ({"prompt": "Hi.", "chosen": "  ", "rejected": "no"}, '"chosen" is empty'),
    ({"prompt": "Hi.", "chosen": "yes"}, 'has no "rejected"'),
    ({"chosen": "yes", "rejected": "no"}, 'needs a non-empty "prompt"'),
    ({"prompt": "Hi.", "chosen": "yes", "rejected": "no", "split": "dev"}, '"split" must be train, val or test'),
])
def test_a_bad_preference_record_is_one_line(tmp_path, record, message):
    good = [{"prompt": f"Say {i}.", "chosen": f"{i}", "rejected": f"no {i}"} for i in range(10)]
    (tmp_path / "p.json").write_text(json.dumps(good + [record]))
    result = run_main("prepare.py", "--task", "preference", "--input", "p.json", "--tokenizer", "bpe",
                      "--vocab_size", "300", "--out", "data/p", cwd=tmp_path, check=False)
    one_line_error(result, message)
    assert not (tmp_path / "data" / "p").exists()


def test_a_reference_with_another_tokenizer_is_one_line(pairs_run, tiny_run, tmp_path):
    folder = copy_run(pairs_run, tmp_path)
    result = run_main("train.py", *DPO_ARGS, "--out_dir=x", "--max_iters=2",
                      f"--dpo_reference={tiny_run / 'out'}", cwd=folder, check=False)
    one_line_error(result, "has another tokenizer")
    assert not (folder / "x" / "ckpt.pt").exists()


def test_dpo_needs_a_starting_checkpoint(pairs_run, tmp_path):
    folder = copy_run(pairs_run, tmp_path)
    args = [a for a in DPO_ARGS if not a.startswith("--init_from")]
    one_line_error(run_main("train.py", *args, "--out_dir=x", cwd=folder, check=False), "starts from a trained model")


def test_synthetic_pairs_reject_the_models_own_answers_and_keep_its_splits(pairs_run):
    pairs = [json.loads(line) for line in (pairs_run / "data" / "pairs.jsonl").read_text().splitlines()]
    records = {r["instruction"] + r["input"]: r["output"] for r in json.loads((pairs_run / "a.json").read_text())}
    assert pairs and all(p["chosen"] == records[p["instruction"] + p["input"]] for p in pairs)
    assert all(p["rejected"].strip() and p["rejected"].strip() != p["chosen"].strip() for p in pairs)
    meta = json.loads((pairs_run / "data" / "alp" / "meta.json").read_text())
    counts = {s: sum(p["split"] == s for p in pairs) for s in ("train", "val", "test")}
    assert all(counts[s] <= meta["splits"][s] for s in counts) and counts["train"] > 0


def test_bad_dpo_settings_are_one_line_and_touch_nothing(pairs_run, tmp_path):
    folder = copy_run(pairs_run, tmp_path)
    before = snapshot(folder / "out")
    for arg, message in (("--dpo_beta=0", "dpo_beta must be > 0"), ("--dpo_loss=ipo", "dpo_loss='ipo'"),
                         ("--dpo_label_smoothing=0.5", "dpo_label_smoothing must be in [0, 1.0)"),
                         ("--pack=True", "pack=True applies to instruct")):
        extra = ["--dpo_loss=robust"] if "smoothing" in arg else []
        result = run_main("train.py", *DPO_ARGS, "--out_dir=out", "--overwrite=True", arg, *extra, cwd=folder,
                          check=False)
        one_line_error(result, message.replace("1.0", "0.5") if extra else message)
    assert snapshot(folder / "out") == before
