"""
The optimizers and the learning-rate schedule of train.py.

Design choices:
- AdamW decays the weight matrices and embeddings only, never biases and norm gains, and uses the
  fused kernel (one pass over all parameters) where torch has it: CUDA and, lately, the CPU.
- optimizer=muon: Muon (momentum, then an orthogonalised update) for the 2-D matrices inside the
  blocks, AdamW for the embeddings, the head, biases and norms. On GPUs torch.optim.Muon; elsewhere
  BatchedMuon, the same rule with the matrices of one shape orthogonalised together in a batch, in
  bfloat16 on CPUs that multiply it natively (AVX512-BF16, AMX) and in float32 on the others, which
  emulate bfloat16 many times slower (torch's Muon always orthogonalises in bfloat16).
- Several optimizers step as one (Optimizers), so the loop, the grad scaler and the checkpoint see one.
- The schedule: linear warmup, then a cosine down to min_lr at lr_decay_iters (0: max_iters), or WSD
  (flat, then a linear warm-down over the last warmdown_iters). Every group follows it scaled from its
  own peak (Muon's differs from AdamW's; embedding_lr gives the token embedding a peak of its own).
"""
import math

import torch

import runtime
from common import UserError


class Optimizers:
    """Several optimizers stepped as one, e.g. Muon for the hidden matrices and AdamW for the rest."""

    def __init__(self, *optimizers):
        self.optimizers = optimizers

    @property
    def param_groups(self):
        return [g for opt in self.optimizers for g in opt.param_groups]

    @property
    def state(self):  # GradScaler looks here
        return {k: v for opt in self.optimizers for k, v in opt.state.items()}

    def step(self):
        for opt in self.optimizers:
            opt.step()

    def zero_grad(self, set_to_none=True):
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self):
        return {"optimizers": [opt.state_dict() for opt in self.optimizers]}

    def load_state_dict(self, state):
        for opt, s in zip(self.optimizers, state["optimizers"]):
            opt.load_state_dict(s)


def newton_schulz(G, steps=5, eps=1e-7):
    """The nearest semi-orthogonal matrix to each G (..., m, n), approximately: the quintic
    Newton-Schulz iteration of Muon, tuned to push all singular values towards 1 in 5 steps."""
    a, b, c = 3.4445, -4.7750, 2.0315
    shape = G.shape
    X = G.reshape(-1, *shape[-2:])  # (k, m, n): baddbmm wants one batch dimension
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + eps)
    tall = X.size(-2) > X.size(-1)
    if tall:  # iterate on the wide orientation: X X^T is the smaller product
        X = X.mT
    for _ in range(steps):
        A = X @ X.mT
        B = torch.baddbmm(A, A, A, beta=b, alpha=c)  # b A + c A A, fused: small matrices are bound by memory
        X = torch.baddbmm(X, B, X, beta=a, alpha=1.0)  # a X + B X
    return (X.mT if tall else X).reshape(shape)


class BatchedMuon(torch.optim.Optimizer):
    """Muon (momentum, then orthogonalised updates) for 2-D matrices, with the matrices of one shape
    orthogonalised together in a batch and in a dtype of our choosing (float32, or bfloat16 where the
    CPU multiplies it natively); the same update rule as torch.optim.Muon."""

    def __init__(self, params, lr=0.02, weight_decay=0.0, momentum=0.95, nesterov=True, adjust_lr_fn=None,
                 ns_dtype=torch.float32):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov,
                                      adjust_lr_fn=adjust_lr_fn))
        self.ns_dtype = ns_dtype

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            bufs = [self.state[p].setdefault("momentum_buffer", torch.zeros_like(p)) for p in params]
            # one kernel launch per list, not per matrix: at this size the launches are the cost
            torch._foreach_mul_(bufs, group["momentum"])
            torch._foreach_add_(bufs, grads)
            updates = torch._foreach_add(grads, bufs, alpha=group["momentum"]) if group["nesterov"] else bufs
            if group["weight_decay"]:
                torch._foreach_mul_(params, 1 - group["lr"] * group["weight_decay"])
            by_shape = {}
            for p, u in zip(params, updates):
                by_shape.setdefault(tuple(p.shape), []).append((p, u))
            for (rows, cols), items in by_shape.items():
                ortho = newton_schulz(torch.stack([u for _, u in items]).to(self.ns_dtype))
                if group["adjust_lr_fn"] == "match_rms_adamw":  # update RMS of AdamW's (Moonshot)
                    lr = group["lr"] * 0.2 * math.sqrt(max(rows, cols))
                else:  # Keller Jordan's original scaling for non-square matrices
                    lr = group["lr"] * math.sqrt(max(1.0, rows / cols))
                torch._foreach_add_([p for p, _ in items], list(ortho.to(items[0][0].dtype).unbind()), alpha=-lr)


def adamw(groups, cfg, device_type):
    # the fused kernel does the whole update in one pass; available on CUDA and, lately, CPU
    kwargs = dict(lr=cfg["learning_rate"], betas=(cfg["beta1"], cfg["beta2"]))
    try:
        return torch.optim.AdamW(groups, fused=device_type in ("cuda", "cpu"), **kwargs)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(groups, foreach=True, **kwargs)


def make_optimizer(model, cfg, device_type):
    """AdamW with weight decay on matrices (linear weights, embeddings) only, not on biases and norms;
    or, with optimizer=muon, Muon for the matrices inside the blocks and AdamW for everything else."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    # with embedding_lr set, the token embedding has a group of its own (older checkpoints hold one fewer)
    embedding = [p for n, p in named if n == "transformer.wte.weight" and cfg["embedding_lr"]]
    named = [(n, p) for n, p in named if not (embedding and n == "transformer.wte.weight")]

    def embedding_group(decay):
        return [{"params": embedding, "weight_decay": decay, "base_lr": cfg["embedding_lr"]}] if embedding else []

    if cfg["optimizer"] == "muon":
        hidden = [p for n, p in named if p.dim() == 2 and n.startswith("transformer.h.")]
        rest = [(n, p) for n, p in named if not (p.dim() == 2 and n.startswith("transformer.h."))]
        muon_kwargs = dict(lr=cfg["muon_lr"], weight_decay=cfg["weight_decay"], momentum=cfg["muon_momentum"],
                           adjust_lr_fn="match_rms_adamw" if cfg["muon_match_adamw"] else "original")
        muon_group = [{"params": hidden, "base_lr": cfg["muon_lr"]}]
        if device_type == "cuda":
            muon = torch.optim.Muon(muon_group, **muon_kwargs)
        else:  # torch's Muon orthogonalises in bfloat16, which most CPUs emulate many times slower than float32
            ns_dtype = torch.bfloat16 if device_type == "cpu" and runtime.cpu_has_native_bf16() else torch.float32
            muon = BatchedMuon(muon_group, ns_dtype=ns_dtype, **muon_kwargs)
        groups = [{"params": [p for _, p in rest if p.dim() >= 2], "weight_decay": 0.0},
                  {"params": [p for _, p in rest if p.dim() < 2], "weight_decay": 0.0}]
        return Optimizers(muon, adamw(groups + embedding_group(0.0), cfg, device_type))
    if cfg["optimizer"] != "adamw":
        raise UserError(f"optimizer={cfg['optimizer']!r} is not one of adamw, muon")
    groups = [{"params": [p for _, p in named if p.dim() >= 2], "weight_decay": cfg["weight_decay"]},
              {"params": [p for _, p in named if p.dim() < 2], "weight_decay": 0.0}]
    return adamw(groups + embedding_group(cfg["weight_decay"]), cfg, device_type)


def set_lr(optimizer, lr, cfg):
    """Every group follows the schedule, scaled from its own peak (Muon's differs from AdamW's)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("base_lr", cfg["learning_rate"]) / cfg["learning_rate"]


def get_lr(it, cfg):
    """Linear warmup for warmup_iters, then down to min_lr at lr_decay_iters: along a cosine, or
    (lr_schedule=wsd) flat until the last warmdown_iters and linear from there."""
    lr, min_lr, warmup = cfg["learning_rate"], cfg["min_lr"], cfg["warmup_iters"]
    decay_iters = cfg["lr_decay_iters"] or cfg["max_iters"]
    if it < warmup:
        return lr * (it + 1) / (warmup + 1)
    if not cfg["decay_lr"]:
        return lr
    if it >= decay_iters:
        return min_lr
    if cfg["lr_schedule"] == "wsd":
        start = max(warmup, decay_iters - cfg["warmdown_iters"])
        return lr if it < start else lr - (lr - min_lr) * (it - start) / max(1, decay_iters - start)
    progress = (it - warmup) / max(1, decay_iters - warmup)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - min_lr)
