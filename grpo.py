"""
Group relative policy optimization (GRPO; DeepSeekMath, Shao et al. 2024) with verifiable rewards: the
policy samples several answers to each prompt, a program scores them (rewards.py), and each answer is
pushed up or down by how it did against the others of its group. No value model, no reward model.
train.py runs it when rl_task names a task (config/grpo_arithmetic.py); its dataset only lends the
tokenizer.

Design choices:
- Rollouts: each micro-batch takes batch_size prompts from the task and samples grpo_group completions
  of each from the current policy (decoding.generate_batch on the KV cache, at rl_temperature, up to
  rl_max_new_tokens, ending at the task's stop), scored by the task's reward plus rl_format_reward for
  a well-formed answer.
- Advantages are normalised within each group, A = (r - mean) / (std + 1e-4): a group whose answers all
  scored the same teaches nothing and gets 0.
- The loss, on the completion tokens only (the stop included, the prompt never):
  -min(rho A, clip(rho, 1 - grpo_clip, 1 + grpo_clip) A) with rho = pi / pi_old per token, averaged over
  every completion token of the micro-batch (DAPO's token mean: a long answer is not down-weighted).
  pi_old is the policy that sampled: with grpo_updates = 1, rho is 1 and this is REINFORCE with the
  group as baseline; with grpo_updates = mu, each batch of rollouts serves mu optimizer steps and the
  clip keeps them close to pi_old.
- kl_beta > 0 adds kl_beta * KL(pi || pi_ref) per token by the k3 estimator exp(q) - q - 1 with
  q = log pi_ref - log pi (unbiased, never negative); pi_ref is the starting checkpoint (dpo.Reference).
- A run's train/val "loss" is its error rate, 1 - exact-match accuracy of greedy answers on
  eval_examples training and val problems, so the best checkpoint is the one most accurate on val;
  the val accuracy is logged as TASK/acc, and the test set is scored at the end.
- Two torch.Generators draw the prompts (CPU) and the samples (on the device); both, and rollouts not
  yet used up when grpo_updates > 1, go into the checkpoint, so a resumed run repeats the rest exactly.
"""
import torch

from common import UserError
from decoding import generate_batch
from dpo import token_logprobs


# -----------------------------------------------------------------------------------------------
# advantages and the loss

def group_advantages(rewards, group):
    """rewards (P * G,) of P groups of G answers in a row -> advantages (P * G,), normalised per group."""
    r = rewards.view(-1, group)  # (P, G)
    std = r.std(dim=1, keepdim=True) if group > 1 else torch.zeros_like(r[:, :1])
    return ((r - r.mean(dim=1, keepdim=True)) / (std + 1e-4)).reshape(-1)


def policy_loss(logps, old_logps, advantages, mask, clip, ref_logps=None, kl_beta=0.0):
    """The clipped policy-gradient loss (+ kl_beta * KL) averaged over the mask's tokens; and its figures
    (the share of tokens whose ratio was clipped, the mean KL). logps, old_logps, ref_logps, mask:
    (N, T); advantages: (N,)."""
    ratio = torch.exp(logps - old_logps)
    A = advantages[:, None]
    surrogate = torch.minimum(ratio * A, ratio.clamp(1 - clip, 1 + clip) * A)  # (N, T)
    per_token = -surrogate
    n = mask.sum().clamp(min=1)
    kl = torch.zeros((), device=logps.device)
    if kl_beta and ref_logps is not None:
        q = ref_logps - logps
        kl_tokens = torch.exp(q) - q - 1
        per_token = per_token + kl_beta * kl_tokens
        kl = (kl_tokens * mask).sum().detach() / n
    loss = (per_token * mask).sum() / n
    clipped = (((ratio - 1).abs() > clip) & mask).sum() / n
    return loss, {"clip_frac": clipped.detach(), "kl": kl}


# -----------------------------------------------------------------------------------------------
# sampling and scoring

def stop_token(tokenizer, task):
    ids = tokenizer.encode(task.stop)
    if len(ids) != 1:
        raise UserError(f"the tokenizer encodes the {task.name} task's stop {task.stop!r} as {len(ids)} tokens; "
                        f"use a tokenizer where it is one (e.g. the dataset prepare.py {task.name} writes)")
    return ids[0]


def check_alphabet(tokenizer, task):
    """The tokenizer must be able to write every prompt and answer of the task."""
    try:
        tokenizer.encode(task.alphabet)
    except UserError as e:
        raise UserError(f"the dataset's tokenizer cannot encode the {task.name} task ({e}); use the dataset "
                        f"python prepare.py {task.name} writes") from None


@torch.no_grad()
def complete(model, prompts, stop, max_new_tokens, temperature=0.0, generator=None):
    """The model's completions of prompts (token ids) up to the stop token: [token ids, with the stop
    when it came]."""
    was_training = model.training
    model.eval()
    try:
        out = generate_batch(model, prompts, max_new_tokens, temperature=temperature, stop_tokens=[stop],
                             generator=generator)
    finally:
        model.train(was_training)
    return [ids + [stop] if len(ids) < max_new_tokens else ids for ids in out]


def accuracy(model, tokenizer, task, problems, max_new_tokens, batch_size=256):
    """Exact-match scores (1 or 0 per problem) of greedy answers to [(prompt, answer)]."""
    stop, scores = stop_token(tokenizer, task), []
    for start in range(0, len(problems), batch_size):
        chunk = problems[start:start + batch_size]
        done = complete(model, [tokenizer.encode(p) for p, _ in chunk], stop, max_new_tokens)
        scores += [task.reward(tokenizer.decode(strip_stop(ids, stop)), a) for ids, (_, a) in zip(done, chunk)]
    return scores


def strip_stop(ids, stop):
    return ids[:-1] if ids and ids[-1] == stop else ids


class Rollouts:
    """train.py's batch source for GRPO: draw(n) -> n micro-batches of scored completions, get(item) ->
    the tensors of one: x, y (N, T) (y: the completion's tokens, -1 elsewhere), advantages (N,), and
    old_logps / ref_logps (N, T) where they are needed. Keeps the figures of its last draw in stats."""

    def __init__(self, task, tokenizer, policy, reference, cfg, device, seed, autocast):
        self.task, self.tokenizer, self.policy, self.reference = task, tokenizer, policy, reference
        self.cfg, self.device, self.autocast = cfg, device, autocast
        self.stop = stop_token(tokenizer, task)
        self.generator = torch.Generator().manual_seed(seed)  # prompts
        self.sampler = torch.Generator(device=device).manual_seed(seed + 1)  # completions
        self.buffer, self.used = None, 0
        self.stats = {}

    def draw(self, n):
        if self.buffer is None or self.used >= self.cfg["grpo_updates"] or len(self.buffer) != n:
            self.buffer, self.used = [self.rollout() for _ in range(n)], 0
            rewards = torch.cat([b["rewards"] for b in self.buffer])
            G = self.cfg["grpo_group"]
            solved = (rewards.view(-1, G) >= 1).any(dim=1).float().mean()
            self.stats = {"reward": rewards.mean().item(), "solved_groups": solved.item(),
                          "completion_tokens": sum(float(b["y"].ne(-1).sum()) for b in self.buffer) / len(rewards)}
        self.used += 1
        return self.buffer

    def get(self, item):
        return item

    def rollout(self):
        """One micro-batch: batch_size prompts, grpo_group sampled completions each, scored."""
        cfg, G = self.cfg, self.cfg["grpo_group"]
        problems = self.task.sample(self.generator, cfg["batch_size"])
        prompts = [self.tokenizer.encode(p) for p, _ in problems for _ in range(G)]  # each prompt G times in a row
        done = complete(self.policy, prompts, self.stop, cfg["rl_max_new_tokens"], cfg["rl_temperature"],
                        self.sampler)
        rewards = []
        for ids, (_, answer) in zip(done, [q for q in problems for _ in range(G)]):
            text = self.tokenizer.decode(strip_stop(ids, self.stop))
            r = self.task.reward(text, answer)
            if cfg["rl_format_reward"] and ids and ids[-1] == self.stop and self.task.well_formed(text):
                r += cfg["rl_format_reward"]
            rewards.append(r)
        rewards = torch.tensor(rewards, dtype=torch.float32)
        seqs = [p + ids for p, ids in zip(prompts, done)]
        starts = [len(p) for p in prompts]
        T = max(map(len, seqs)) - 1
        x = torch.zeros(len(seqs), T, dtype=torch.long)
        y = torch.full((len(seqs), T), -1, dtype=torch.long)
        for r, (s, k) in enumerate(zip(seqs, starts)):
            s = torch.tensor(s)
            x[r, :len(s) - 1] = s[:-1]
            y[r, k - 1:len(s) - 1] = s[k:]  # the completion's tokens, predicted from the position before each
        batch = {"x": x.to(self.device), "y": y.to(self.device), "rewards": rewards,
                 "advantages": group_advantages(rewards, G).to(self.device)}
        with torch.no_grad():
            if cfg["grpo_updates"] > 1:  # pi_old: the policy as it sampled
                with self.autocast:
                    batch["old_logps"] = token_logprobs(self.policy(batch["x"])[0], batch["y"])
            if self.reference is not None:
                batch["ref_logps"] = token_logprobs(self.reference.logits(batch["x"], self.autocast), batch["y"])
        return batch

    def loss(self, batch):
        """The GRPO loss of one micro-batch (and its figures), with gradients through the policy."""
        with self.autocast:
            logps = token_logprobs(self.policy(batch["x"])[0], batch["y"])
        old = batch.get("old_logps", logps.detach())
        return policy_loss(logps, old, batch["advantages"], batch["y"] != -1, self.cfg["grpo_clip"],
                           batch.get("ref_logps"), self.cfg["kl_beta"])

    def state_dict(self):
        state = {"prompts": self.generator.get_state(), "samples": self.sampler.get_state(), "used": self.used}
        if self.buffer is not None and self.used < self.cfg["grpo_updates"]:
            state["buffer"] = [{k: v.cpu() for k, v in b.items()} for b in self.buffer]
        return state

    def load_state_dict(self, state):
        self.generator.set_state(state["prompts"])
        self.sampler.set_state(state["samples"])
        self.used = state["used"]
        self.buffer = [{k: v.to(self.device) if k != "rewards" else v for k, v in b.items()}
                       for b in state["buffer"]] if "buffer" in state else None
