"""GRPO with verifiable rewards (grpo.py, rewards.py, train.py --rl_task): the reward, the held-out
problems, the advantages, the clipped loss and its KL, rollouts that train only on completions, resuming
mid-run, and bad inputs."""
import json

import pytest
import torch

from conftest import TINY_MODEL, copy_run, evals, one_line_error, read_metrics, run_main, snapshot
from grpo import group_advantages, policy_loss
from rewards import Arithmetic

GRPO_ARGS = [a for a in TINY_MODEL if not a.startswith(("--dataset", "--batch_size", "--learning_rate"))] + [
    "--dataset=arithmetic", "--init_from=out", "--rl_task=arithmetic", "--batch_size=4", "--grpo_group=4",
    "--learning_rate=1e-3", "--eval_interval=4", "--eval_examples=40", "--log_interval=2", "--rl_max_new_tokens=5"]


def test_the_arithmetic_reward_is_one_for_the_exact_answer_only():
    task = Arithmetic()
    assert task.reward("522", "522") == 1.0 and task.reward(" 522 ", "522") == 1.0
    assert task.reward("5220", "522") == 0.0 and task.reward("52", "522") == 0.0 and task.reward("", "522") == 0.0
    assert task.well_formed("17") and not task.well_formed("1+7") and not task.well_formed("")
    assert task.problem(37, 485) == ("\n37+485=", "522")


def test_held_out_problems_are_fixed_distinct_and_never_drawn_for_training():
    a, b = Arithmetic(), Arithmetic()
    assert a.val == b.val and a.test == b.test and len(a.val) == 500 and len(a.test) == 1000
    assert not set(a.val) & set(a.test)
    drawn = a.sample(torch.Generator().manual_seed(0), 3000)
    assert not set(drawn) & set(a.val + a.test)
    lengths = {tuple(len(s) for s in p[1:-1].split("+")) for p, _ in drawn}
    assert lengths == {(i, j) for i in (1, 2, 3) for j in (1, 2, 3)}  # every class still trained on


def test_advantages_are_normalised_within_each_group():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0])
    adv = group_advantages(rewards, 4)
    first = adv[:4]
    assert first.mean().item() == pytest.approx(0.0, abs=1e-6)
    assert first.std().item() == pytest.approx(1.0, abs=1e-3)  # up to the 1e-4 in the denominator
    assert first[0] > 0 and (first[1:] < 0).all()
    assert adv[4:].tolist() == [0.0] * 4  # all answers alike: nothing to learn from this group


def test_at_ratio_one_the_loss_gradient_is_the_advantage_weighted_logprob_gradient():
    logps = torch.tensor([[-1.0, -2.0, 0.0], [-0.5, -1.5, -3.0]], requires_grad=True)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.bool)
    adv = torch.tensor([2.0, -1.0])
    loss, figures = policy_loss(logps, logps.detach(), adv, mask, clip=0.2)
    loss.backward()
    expected = -(adv[:, None] * mask) / mask.sum()  # d/dlogp of -A * ratio, averaged over the tokens
    assert torch.allclose(logps.grad, expected) and figures["clip_frac"].item() == 0


def test_the_clip_stops_the_gradient_of_tokens_that_moved_too_far():
    old = torch.zeros(1, 2)
    logps = torch.log(torch.tensor([[1.5, 1.1]])).requires_grad_()  # ratios 1.5 (past 1 + 0.2) and 1.1
    loss, figures = policy_loss(logps, old, torch.tensor([1.0]), torch.ones(1, 2, dtype=torch.bool), clip=0.2)
    loss.backward()
    assert logps.grad[0, 0].item() == 0.0 and logps.grad[0, 1].item() < 0
    assert figures["clip_frac"].item() == 0.5


def test_the_kl_term_is_zero_at_the_reference_and_positive_away_from_it():
    logps = torch.tensor([[-1.0, -2.0]])
    mask = torch.ones(1, 2, dtype=torch.bool)
    zero = torch.zeros(1)
    _, at_ref = policy_loss(logps, logps, zero, mask, 0.2, ref_logps=logps, kl_beta=0.1)
    loss, away = policy_loss(logps, logps, zero, mask, 0.2, ref_logps=logps - 0.5, kl_beta=0.1)
    assert at_ref["kl"].item() == 0.0
    k3 = torch.exp(torch.tensor(-0.5)) + 0.5 - 1  # exp(q) - q - 1 at q = -0.5
    assert away["kl"].item() == pytest.approx(k3.item(), abs=1e-6) and loss.item() == pytest.approx(0.1 * k3.item())


def test_rollouts_train_on_the_completion_tokens_only(arith_run):
    from checkpoint import load_checkpoint, model_from_checkpoint
    from grpo import Rollouts
    from tokenizer import dataset_tokenizer
    model = model_from_checkpoint(load_checkpoint(str(arith_run / "out")))
    tok = dataset_tokenizer(str(arith_run / "data" / "arithmetic"))
    cfg = {"batch_size": 3, "grpo_group": 4, "rl_max_new_tokens": 5, "rl_temperature": 1.0, "rl_format_reward": 0.0,
           "grpo_updates": 1, "grpo_clip": 0.2, "kl_beta": 0.0}
    rollouts = Rollouts(Arithmetic(), tok, model, None, cfg, "cpu", 0, torch.autocast("cpu", enabled=False))
    batch, = rollouts.draw(1)
    x, y = batch["x"], batch["y"]
    assert x.shape[0] == 12 and batch["advantages"].shape == (12,)
    for row in range(12):
        text = tok.decode(x[row].tolist())
        prompt_end = text.index("=")  # the prompt is "\na+b="; y is -1 up to its last token
        targets = y[row].tolist()
        assert all(t == -1 for t in targets[:prompt_end])
        answer = [t for t in targets if t != -1]
        assert 1 <= len(answer) <= 5 and x[row, prompt_end + 1:prompt_end + len(answer)].tolist() == answer[:-1]


def test_grpo_logs_held_out_accuracy_and_scores_the_test_problems(arith_run, tmp_path):
    folder = copy_run(arith_run, tmp_path)
    out = run_main("train.py", *GRPO_ARGS, "--out_dir=rl", "--max_iters=4", cwd=folder)
    records = evals(folder / "rl")
    assert all(0 <= r["arithmetic/acc"] <= 1 and r["val/loss"] == pytest.approx(1 - r["arithmetic/acc"])
               for r in records)
    steps = [r for r in read_metrics(folder / "rl") if "rollout/reward" in r]
    assert steps and all(0 <= r["rollout/reward"] <= 1 for r in steps)
    assert "test (final model): acc" in out.stdout


def test_resuming_mid_grpo_continues_exactly(arith_run, tmp_path):
    folder = copy_run(arith_run, tmp_path)
    args = [*GRPO_ARGS, "--grpo_updates=2", "--kl_beta=0.05"]  # rollouts carried over a checkpoint, a reference
    run_main("train.py", *args, "--out_dir=full", "--max_iters=6", "--always_save_checkpoint=True", cwd=folder)
    run_main("train.py", *args, "--out_dir=half", "--max_iters=3", "--lr_decay_iters=6", "--eval_interval=3",
             "--always_save_checkpoint=True", cwd=folder)
    run_main("train.py", *args, "--out_dir=half", "--max_iters=6", "--init_from=resume", cwd=folder)
    losses = lambda d: [(r["iter"], r["loss"]) for r in read_metrics(d) if "loss" in r and r["iter"] > 3]  # noqa: E731
    assert losses(folder / "half") == losses(folder / "full") and losses(folder / "full")


def test_an_unknown_task_or_a_tokenizer_without_its_alphabet_is_one_line(arith_run, tiny_run, tmp_path):
    folder = copy_run(arith_run, tmp_path)
    before = snapshot(folder / "out")
    one_line_error(run_main("train.py", *GRPO_ARGS, "--rl_task=chess", "--out_dir=x", cwd=folder, check=False),
                   "unknown rl_task 'chess'")
    (folder / "data" / "tiny").symlink_to(tiny_run / "data" / "tiny")
    args = [a for a in GRPO_ARGS if not a.startswith(("--dataset", "--init_from"))]
    result = run_main("train.py", *args, "--dataset=tiny", f"--init_from={tiny_run / 'out'}", "--out_dir=x",
                      cwd=folder, check=False)
    one_line_error(result, "cannot encode the arithmetic task")
    assert snapshot(folder / "out") == before and not (folder / "x" / "ckpt.pt").exists()


def test_eval_scores_exact_match_on_the_held_out_problems(arith_run, tmp_path):
    folder = copy_run(arith_run, tmp_path)
    out = run_main("eval.py", "--out_dir=out", "--tasks=arithmetic", "--split=test", "--limit=50", "--device=cpu",
                   cwd=folder)
    assert "arithmetic (test) exact" in out.stdout and "50" in out.stdout


def test_pretraining_on_a_task_corpus_logs_the_tasks_held_out_accuracy(arith_run, tmp_path):
    folder = copy_run(arith_run, tmp_path)
    records = evals(folder / "out")
    assert [r["iter"] for r in records] == [0, 40] and all(0 <= r["arithmetic/acc"] <= 1 for r in records)
    run_main("eval.py", "--out_dir=out", "--tasks=arithmetic", "--split=val", "--limit=200", "--device=cpu",
             cwd=folder)
    (row,) = json.loads((folder / "out" / "eval.json").read_text())["results"]
    assert row["examples"] == 200 and records[-1]["arithmetic/acc"] == pytest.approx(row["value"])  # eval_examples
