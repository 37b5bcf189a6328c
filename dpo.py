"""
Direct preference optimization (Rafailov et al. 2023): learn from pairs of answers to one prompt, one
preferred (chosen, y_w) and one not (rejected, y_l), with no reward model and no sampling. train.py runs
it for a dataset of prepare.py --task preference (see tasks.py); this file holds the loss, the
reference model and the evaluation, and as a script builds preference pairs offline:

  python dpo.py --init_from=out-instruct --input=../shared/data/instruct/instruction-data.json \\
      --dataset=alpaca --out=data/alpaca_pairs.jsonl          # chosen: the data's answer; rejected: the model's
  python prepare.py --task preference --input data/alpaca_pairs.jsonl --tokenizer_from data/alpaca \\
      --max_length 256 --out data/alpaca_pairs
  python train.py config/dpo_instruct.py

Design choices:
- The loss, per pair: -log sigmoid(beta * [(log pi(y_w|x) - log pi_ref(y_w|x)) - (log pi(y_l|x) -
  log pi_ref(y_l|x))]), each log-probability summed over the answer's tokens (its end-of-text included),
  never the prompt's. beta * (log pi - log pi_ref) is an answer's implicit reward: its accuracy (chosen
  above rejected, a tie counting half) and margin are what to watch; at the start the policy is the
  reference, every margin is 0 and the accuracy 0.5.
- dpo_label_smoothing = e is conservative DPO (cDPO): each label is taken as flipped with probability
  e, loss = (1 - e) L(D) + e L(-D). dpo_loss=robust is Robust DPO's unbiased form of the same
  assumption, (1 - e) L(D) - e L(-D) over 1 - 2e (trl's "robust").
- rpo_alpha adds rpo_alpha times the chosen answers' cross-entropy per token (RPO, Pang et al. 2024):
  the DPO margin can widen while both answers lose likelihood, the chosen one included.
- The reference: a frozen copy of the starting checkpoint (or of dpo_reference) in eval mode; with
  trainable=lora on adapters this run added, the policy itself with its adapters switched off, so no
  second copy of the weights is held. A resumed run reloads the reference its checkpoint names.
- Synthetic pairs, built offline from an instruct dataset and its SFT model: the data's answer as
  chosen, the model's own greedy answer as rejected (pairs where they agree are skipped), each in the
  split the instruct dataset gave its record. A stand-in for human preferences that teaches one thing:
  answer like the data, not like yourself. For a public set (needs the network and `datasets`):
  python prepare.py --task preference --input trl-lib/ultrafeedback_binarized --tokenizer_from DIR
"""
import json
import os
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from common import UserError, description, make_folder, replace_durably, run_cli

LOSSES = ("sigmoid", "robust")


# -----------------------------------------------------------------------------------------------
# the loss

def token_logprobs(logits, targets):
    """logits (N, T, V), targets (N, T) with -1 off the answer -> (N, T) log-probability of each target
    token (0 where -1)."""
    logp = torch.log_softmax(logits.float(), dim=-1)  # (N, T, V)
    picked = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # (N, T)
    return picked * (targets != -1)


def response_logprobs(logits, targets):
    """(N,) log-probability of each answer, summed over its tokens, and (N,) its token count."""
    return token_logprobs(logits, targets).sum(-1), (targets != -1).sum(-1)


def dpo_losses(chosen, rejected, ref_chosen, ref_rejected, beta, label_smoothing=0.0, kind="sigmoid"):
    """Per-pair DPO losses (B,) from the answers' summed log-probabilities under the policy and the
    reference, and the implicit rewards beta * (log pi - log pi_ref) of the chosen and rejected answers."""
    chosen_rewards = beta * (chosen - ref_chosen)
    rejected_rewards = beta * (rejected - ref_rejected)
    margin = chosen_rewards - rejected_rewards  # beta * D
    e = label_smoothing
    if kind == "sigmoid":
        losses = -(1 - e) * F.logsigmoid(margin) - e * F.logsigmoid(-margin)
    elif kind == "robust":
        losses = (-(1 - e) * F.logsigmoid(margin) + e * F.logsigmoid(-margin)) / (1 - 2 * e)
    else:
        raise ValueError(f"dpo_loss must be one of {', '.join(LOSSES)}, got {kind!r}")
    return losses, chosen_rewards, rejected_rewards


def check_settings(cfg):
    """The DPO settings' ranges, one line each."""
    if cfg["dpo_beta"] <= 0:
        raise UserError(f"dpo_beta must be > 0, got {cfg['dpo_beta']}")
    if cfg["dpo_loss"] not in LOSSES:
        raise UserError(f"dpo_loss={cfg['dpo_loss']!r} is not one of {', '.join(LOSSES)}")
    top = 0.5 if cfg["dpo_loss"] == "robust" else 1.0
    if not 0 <= cfg["dpo_label_smoothing"] < top:
        raise UserError(f"dpo_label_smoothing must be in [0, {top}) for dpo_loss={cfg['dpo_loss']}, "
                        f"got {cfg['dpo_label_smoothing']}")
    if cfg["rpo_alpha"] < 0:
        raise UserError(f"rpo_alpha must be >= 0, got {cfg['rpo_alpha']}")


# -----------------------------------------------------------------------------------------------
# the reference policy

class Reference:
    """log pi_ref of answers: a frozen model of its own, or (model=None) the policy with its LoRA adapters
    switched off. Either way in eval mode (no dropout) and without gradients."""

    def __init__(self, policy, model=None):
        self.policy, self.model = policy, model
        if model is not None:
            model.eval().requires_grad_(False)

    @torch.no_grad()
    def logits(self, x, autocast):
        """(N, T, V) logits of the reference for token ids x (N, T)."""
        if self.model is not None:
            with autocast:
                return self.model(x)[0]
        was_training = self.policy.training
        self.policy.eval()
        try:
            with self.policy.adapters_disabled(), autocast:
                return self.policy(x)[0]
        finally:
            self.policy.train(was_training)

    def logprobs(self, x, y, autocast):
        """(N,) log pi_ref of each answer of y (N, T; -1 off the answer), summed over its tokens."""
        return response_logprobs(self.logits(x, autocast), y)[0]


# -----------------------------------------------------------------------------------------------
# a batch, and a split

def pair_loss(policy, reference, batch, cfg, autocast):
    """The loss of one micro-batch of pairs (x, y of 2B rows: chosen, then rejected) and its figures:
    the per-pair losses, rewards and the chosen answers' log-probability, as tensors."""
    x, y = batch
    with autocast:
        logits = policy(x)[0]  # (2B, T, V)
    logps, counts = response_logprobs(logits, y)
    ref = reference.logprobs(x, y, autocast)
    B = x.size(0) // 2
    losses, chosen_r, rejected_r = dpo_losses(logps[:B], logps[B:], ref[:B], ref[B:], cfg["dpo_beta"],
                                              cfg["dpo_label_smoothing"], cfg["dpo_loss"])
    chosen_nll = -logps[:B].sum() / counts[:B].sum()  # per token, as SFT's loss
    loss = losses.mean() + (cfg["rpo_alpha"] * chosen_nll if cfg["rpo_alpha"] else 0.0)
    figures = {"losses": losses.detach(), "chosen": chosen_r.detach(), "rejected": rejected_r.detach(),
               "chosen_logp": logps[:B].detach(), "chosen_nll": chosen_nll.detach() * counts[:B].sum(),
               "chosen_tokens": counts[:B].sum()}
    return loss, figures


@torch.no_grad()
def evaluate_pairs(policy, reference, batches, cfg, autocast, limit=None):
    """Over a split's pairs in order (all, or the first limit): the DPO loss, reward accuracy (a tie counts
    half), mean margin and rewards, and the chosen answers' mean log-probability (summed over each answer)
    and cross-entropy per token. The policy is left in the mode it came in."""
    was_training = policy.training
    policy.eval()
    n = batches.n if limit is None else min(limit, batches.n)
    sums = {"loss": 0.0, "reward_acc": 0.0, "margin": 0.0, "chosen_reward": 0.0, "rejected_reward": 0.0,
            "chosen_logp": 0.0}
    nll, tokens = 0.0, 0
    for start in range(0, n, batches.batch_size):
        ids = torch.arange(start, min(n, start + batches.batch_size)).numpy()
        _, f = pair_loss(policy, reference, batches.get(ids), cfg, autocast)
        margin = f["chosen"] - f["rejected"]
        sums["loss"] += f["losses"].sum().item()
        sums["reward_acc"] += ((margin > 0).float() + 0.5 * (margin == 0).float()).sum().item()
        sums["margin"] += margin.sum().item()
        sums["chosen_reward"] += f["chosen"].sum().item()
        sums["rejected_reward"] += f["rejected"].sum().item()
        sums["chosen_logp"] += f["chosen_logp"].sum().item()
        nll += f["chosen_nll"].item()
        tokens += int(f["chosen_tokens"])
    policy.train(was_training)
    return {**{k: v / max(n, 1) for k, v in sums.items()}, "chosen_nll": nll / max(tokens, 1)}


# -----------------------------------------------------------------------------------------------
# synthetic pairs from an instruct dataset and its SFT model

@dataclass
class PairsConfig:
    init_from: str = "out-instruct"   # the SFT checkpoint whose own answers become the rejected ones
    input: str = ""                   # the Alpaca-style JSON the instruct dataset was prepared from
    dataset: str = "alpaca"           # that instruct dataset (its split is kept: each pair stays in its record's split)
    out: str = "data/alpaca_pairs.jsonl"  # the pairs, one JSON object a line
    max_new_tokens: int = 128         # the longest answer the model may give
    batch_size: int = 16              # prompts answered together
    device: str = "auto"              # auto | cpu | cuda | mps


def record_splits(records, meta):
    """The split each record of an instruct dataset's input fell in, recomputed as prepare.py drew it."""
    from tasks import split_indices
    splits = split_indices(len(records), meta["val_fraction"], meta["test_fraction"], meta["seed"])
    if {k: len(v) for k, v in splits.items()} != meta["splits"]:
        raise UserError(f"the input's {len(records)} records do not split as the dataset's meta.json says "
                        f"({meta['splits']}); pass the --input it was prepared from")
    return {i: split for split, idx in splits.items() for i in idx}


def make_pairs(model, tokenizer, records, split_of, max_new_tokens, batch_size):
    """[{"instruction", "input", "chosen", "rejected", "split"}]: the records' answers against the model's
    greedy ones; (pairs, how many were skipped because the answers agree or the model's is empty)."""
    from tasks import answer, instruct_prompt_ids
    pairs, skipped = [], 0
    for start in range(0, len(records), batch_size):
        chunk = list(range(start, min(len(records), start + batch_size)))
        prompts = [instruct_prompt_ids(tokenizer, records[i][0], records[i][1], model.config.block_size)
                   for i in chunk]
        for i, (ids, _) in zip(chunk, answer(model, tokenizer, prompts, max_new_tokens)):
            instruction, input_text, output = records[i]
            mine = tokenizer.decode(ids).strip()
            if not mine or mine == output.strip():
                skipped += 1
                continue
            pairs.append({"instruction": instruction, "input": input_text, "chosen": output, "rejected": mine,
                          "split": split_of[i]})
    return pairs, skipped


def main(argv):
    from configurator import parse_args
    cfg, _ = parse_args(argv, [PairsConfig], "dpo.py", description(__doc__))
    if not cfg["input"]:
        raise UserError("--input is required: the Alpaca-style JSON the instruct dataset was prepared from")
    import runtime
    from common import read_meta
    from hf import load_for_inference
    from tasks import read_alpaca
    data_dir = cfg["dataset"] if os.path.isdir(cfg["dataset"]) else os.path.join("data", cfg["dataset"])
    meta = read_meta(data_dir)
    if meta.get("task") != "instruct":
        raise UserError(f"dataset {cfg['dataset']!r} is not an instruct dataset (prepare.py --task instruct)")
    rt = runtime.start(cfg["device"], "float32", distributed=False)
    ckpt, model, tokenizer = load_for_inference(cfg["init_from"], None, rt.device, "dpo.py")
    if ckpt.get("tokenizer") != meta["tokenizer"]:
        raise UserError(f"{cfg['init_from']}'s tokenizer differs from dataset {cfg['dataset']!r}'s; use the "
                        f"instruct dataset the checkpoint was fine-tuned on")
    records = read_alpaca(cfg["input"])
    pairs, skipped = make_pairs(model, tokenizer, records, record_splits(records, meta), cfg["max_new_tokens"],
                                cfg["batch_size"])
    folder = os.path.dirname(cfg["out"])
    if folder:
        make_folder(folder, "--out")
    text = "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs)
    replace_durably(lambda f: f.write(text.encode("utf-8")), cfg["out"])
    counts = {s: sum(p["split"] == s for p in pairs) for s in ("train", "val", "test")}
    print(f"{cfg['out']}: {len(pairs)} pairs ({counts['train']} train / {counts['val']} val / {counts['test']} "
          f"test), {skipped} skipped (the model's answer empty or the data's own)")


if __name__ == "__main__":
    sys.exit(run_cli(main))
