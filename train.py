"""
Train a GPT on a prepared dataset: on a laptop CPU, one GPU, or many with torchrun.

  python train.py config/train_shakespeare_char_cpu.py --max_iters=500
  torchrun --standalone --nproc_per_node=8 train.py config/train_gpt2.py

Settings: the defaults below (TrainConfig, and GPTConfig in model.py for the architecture),
then a config file, then --key=value. `python train.py --help` lists them all.
Writes to out_dir: ckpt.pt (model, optimizer, settings, iteration, random states), ckpt.json (a
JSON summary of it) and metrics.jsonl (one JSON object per log or eval line). With parallel=fsdp the
weights and optimizer state also go to ckpt-ITER.dcp/, one file per process, and ckpt.pt has no optimizer.

Never lose a run: checkpoints are written whole or not at all (temporary file, fsync, rename), and
--init_from=resume continues exactly where the checkpoint left off (same losses, bit for bit on CPU
float32). SIGTERM or Ctrl-C finishes the step, saves, and prints the command that resumes. A nan or
inf loss stops the run (nan_policy=skip drops the step instead) and never overwrites a good
checkpoint. To resume with a larger max_iters on the same schedule, set lr_decay_iters: its default
0 means "max_iters", so the cosine would stretch to the new end.
"""
import ctypes
import gc
import json
import math
import os
import random
import shlex
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from configurator import ConfigError, parse_args
from model import GPT, GPTConfig, preset_config


@dataclass
class TrainConfig:
    # I/O
    out_dir: str = "out"                  # checkpoints and metrics.jsonl are written here
    init_from: str = "scratch"            # scratch | resume (out_dir/ckpt.pt) | PATH of a checkpoint or Hugging Face folder | gpt2*
    preset: str = ""                      # start the architecture from a preset of model.py (gpt2, llama3-tiny, ...)
    eval_interval: int = 250              # evaluate train/val loss every this many iterations
    eval_iters: int = 20                  # batches per split in each evaluation
    eval_only: bool = False               # evaluate once and exit
    log_interval: int = 10                # print a log line every this many iterations
    always_save_checkpoint: bool = False  # save at every evaluation, not only when val loss improves
    wandb_log: bool = False               # also log to Weights & Biases (WANDB_MODE=offline works offline)
    wandb_project: str = "gpt"            # wandb project name
    wandb_run_name: str = "run"           # wandb run name
    keep_checkpoints: int = 0             # also keep ckpt-ITER.pt of the last N saves (hard links); 0: only ckpt.pt
    nan_policy: str = "stop"              # on a nan/inf loss: stop (keeping the last checkpoint) | skip that step
    debug: bool = False                   # on an error, show the full traceback instead of one line
    # data
    dataset: str = "shakespeare_char"     # a folder under data/ made by prepare.py, or a path to one
    batch_size: int = 12                  # sequences per micro-batch (per process)
    gradient_accumulation_steps: int = 1  # micro-batches per optimizer step, summed over all processes
    # optimizer: AdamW
    learning_rate: float = 6e-4           # peak learning rate
    max_iters: int = 5000                 # optimizer steps in the whole run
    weight_decay: float = 0.1             # AdamW decay of weight matrices and embeddings (none on biases, norm gains)
    beta1: float = 0.9                    # AdamW beta1
    beta2: float = 0.95                   # AdamW beta2
    grad_clip: float = 1.0                # clip the gradient's global norm to this; 0 disables
    label_smoothing: float = 0.0          # cross-entropy label smoothing, as torch's F.cross_entropy
    optimizer: str = "adamw"              # adamw | muon (Muon for the matrices in the blocks, AdamW for the rest)
    muon_lr: float = 0.02                 # Muon's peak learning rate (follows the same schedule)
    muon_momentum: float = 0.95           # Muon's momentum
    muon_match_adamw: bool = False        # scale Muon's update to AdamW's RMS (then muon_lr ~ learning_rate)
    # learning-rate schedule: linear warmup, then decay to min_lr
    decay_lr: bool = True                 # False keeps learning_rate constant after warmup
    lr_schedule: str = "cosine"           # cosine | wsd (warmup, stable, then linear warm-down)
    warmup_iters: int = 100               # iterations of linear warmup
    warmdown_iters: int = 0               # wsd: iterations of the final linear decay
    lr_decay_iters: int = 0               # iteration where the schedule reaches min_lr; 0 means max_iters
    min_lr: float = 6e-5                  # floor of the schedule, about learning_rate / 10
    # system
    device: str = "auto"                  # auto | cpu | cuda | cuda:N | mps
    dtype: str = "auto"                   # auto | float32 | bfloat16 | float16 (auto: bfloat16 on CUDA if supported, else float32)
    compile: bool = False                 # torch.compile the model (worth it on GPUs)
    backend: str = "auto"                 # torch.distributed backend: auto (nccl on CUDA, gloo on CPU) | nccl | gloo
    parallel: str = "ddp"                 # ddp (whole model in each process) | fsdp (weights, grads, optimizer state sharded)
    seed: int = 1337                      # seeds weights, dropout and batch sampling
    peak_flops: float = 0.0               # device peak FLOP/s for MFU; 0 looks the GPU up in a table
    bench: int = 0                        # >0: time this many training steps and sampling, print the figures, save nothing
    # fine-tuning: datasets of prepare.py --task classify|instruct (see tasks.py); LoRA keys are in the model's
    trainable: str = "all"                # all | last_blocks (last trainable_blocks blocks, final norm, head) | lora (adapters, head)
    trainable_blocks: int = 1             # trainable=last_blocks: how many of the last blocks train
    cls_lm_weight: float = 0.0            # classify: lambda of the auxiliary LM loss, L = L_cls + lambda * L_lm (GPT-1)
    class_weights: bool = False           # classify: weight the loss of each class by its inverse frequency
    balanced: bool = False                # classify: draw training examples so that every class is equally likely
    pack: bool = False                    # instruct: pack several whole examples into each row of block_size tokens


ARCH_KEYS = [k for k in GPTConfig.keys() if k not in ("attn_impl",)]
# added to a loaded model by adapt_model (a head, adapters) rather than read from its checkpoint
ADAPT_KEYS = ("n_classes", "lora_rank", "lora_alpha", "lora_dropout", "lora_targets")
# settings that shape the weights: a checkpoint's values win over the command line for these
SHAPE_KEYS = [k for k in ARCH_KEYS if k not in ("dropout", "block_size") and k not in ADAPT_KEYS]


class TrainError(RuntimeError):
    """A problem with the user's data or settings; printed as one line."""


# -----------------------------------------------------------------------------------------------
# data

def resolve_dataset(dataset):
    path = dataset if os.path.isdir(dataset) else os.path.join("data", dataset)
    meta_path = os.path.join(path, "meta.json")
    if os.path.isdir(path) and not os.path.isfile(meta_path):
        raise TrainError(f"dataset folder {path} has no meta.json; re-run prepare.py to build it")
    if not os.path.isfile(meta_path):
        raise TrainError(f"dataset {dataset!r} not found (no {meta_path}); "
                         f"build it first, e.g. python prepare.py shakespeare_char")
    try:
        with open(meta_path, encoding="utf-8") as f:
            meta = json.load(f)
    except (ValueError, OSError) as e:
        raise TrainError(f"{meta_path} is not readable JSON ({type(e).__name__}); re-run prepare.py") from None
    check_meta(meta, meta_path)
    return path, meta


def check_meta(meta, meta_path):
    if not isinstance(meta, dict) or any(k not in meta for k in ("vocab_size", "dtype", "tokenizer")):
        raise TrainError(f"{meta_path} lacks vocab_size, dtype or tokenizer; re-run prepare.py")
    try:
        dtype = np.dtype(meta["dtype"])
    except TypeError:
        dtype = None
    if dtype is None or dtype.kind != "u":
        raise TrainError(f"{meta_path} names dtype {meta['dtype']!r}, not an unsigned integer type; re-run prepare.py")
    if not isinstance(meta["vocab_size"], int) or meta["vocab_size"] < 1:
        raise TrainError(f"{meta_path} has vocab_size {meta['vocab_size']!r}; re-run prepare.py")


def largest_token(path, dtype, whole=1 << 26, chunk=1 << 22):
    """The largest token id in a .bin: every token of a file up to `whole` tokens, else 32 spread chunks."""
    data = np.memmap(path, dtype=dtype, mode="r")
    n = len(data)
    if n <= whole:
        starts = range(0, n, chunk)
    else:  # a sample keeps startup fast on billions of tokens; a wrong dtype shows up anywhere
        chunk = 1 << 20
        starts = sorted({int(i) for i in np.linspace(0, n - chunk, 32)})
    return max(int(data[s:s + chunk].max()) for s in starts)


def check_bins(data_dir, meta):
    """The bins agree with meta.json: whole tokens of its dtype, every id below its vocab_size."""
    dtype = np.dtype(meta["dtype"])
    for split in ("train", "val"):
        path = os.path.join(data_dir, f"{split}.bin")
        if not os.path.isfile(path):
            raise TrainError(f"{path} is missing; re-run prepare.py for this dataset")
        size = os.path.getsize(path)
        if size == 0 or size % dtype.itemsize:
            raise TrainError(f"{path} is {size:,} bytes, not a whole number of {dtype.name} tokens; it is truncated "
                             f"or does not belong to this meta.json; re-run prepare.py")
        top = largest_token(path, dtype)
        if top >= meta["vocab_size"]:
            raise TrainError(f"{path} holds token id {top} but meta.json's vocab_size is {meta['vocab_size']}; "
                             f"the bins and meta.json disagree; re-run prepare.py")


def check_data_length(data_dir, meta, block_size):
    for split in ("train", "val"):
        path = os.path.join(data_dir, f"{split}.bin")
        if not os.path.isfile(path):
            raise TrainError(f"{path} is missing; re-run prepare.py for this dataset")
        n = os.path.getsize(path) // np.dtype(meta["dtype"]).itemsize
        if n < block_size + 1:
            raise TrainError(f"{path} has {n} tokens, fewer than block_size+1 = {block_size + 1}; "
                             f"lower block_size or use more data")


class Batches:
    """Random (x, y) windows of block_size tokens from a token .bin, y shifted by one.

    A torch.Generator with a fixed seed draws the start positions, the same on every process, so
    a run split over N processes sees exactly the batches of a 1-process run; each process takes
    its own share of the micro-batches of a step.
    """

    def __init__(self, path, dtype, block_size, batch_size, device, seed):
        self.data = np.memmap(path, dtype=dtype, mode="r")
        self.block_size, self.batch_size, self.device = block_size, batch_size, device
        self.offsets = np.arange(block_size + 1)
        self.generator = torch.Generator().manual_seed(seed)

    def draw(self, n):
        """Start positions for n micro-batches: (n, batch_size)."""
        high = len(self.data) - self.block_size
        return torch.randint(high, (n, self.batch_size), generator=self.generator).numpy()

    def get(self, starts):
        """The (x, y) pair for one micro-batch of start positions."""
        xy = torch.from_numpy(self.data[starts[:, None] + self.offsets].astype(np.int64))  # (B, T+1)
        x, y = xy[:, :-1], xy[:, 1:]
        if self.device.startswith("cuda"):
            return x.pin_memory().to(self.device, non_blocking=True), y.pin_memory().to(self.device, non_blocking=True)
        return x.to(self.device), y.to(self.device)


# -----------------------------------------------------------------------------------------------
# optimization

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
    X = G / (G.norm(dim=(-2, -1), keepdim=True) + eps)
    tall = X.size(-2) > X.size(-1)
    if tall:  # iterate on the wide orientation: X X^T is the smaller product
        X = X.mT
    for _ in range(steps):
        A = X @ X.mT
        X = a * X + (b * A + c * A @ A) @ X
    return X.mT if tall else X


class MuonFloat32(torch.optim.Optimizer):
    """Muon (momentum, then orthogonalised updates) for 2-D matrices, in float32, with the matrices
    of one shape orthogonalised together in a batch; the same update rule as torch.optim.Muon."""

    def __init__(self, params, lr=0.02, weight_decay=0.0, momentum=0.95, nesterov=True, adjust_lr_fn=None):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov,
                                      adjust_lr_fn=adjust_lr_fn))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            by_shape = {}
            for p in group["params"]:
                if p.grad is None:
                    continue
                buf = self.state[p].setdefault("momentum_buffer", torch.zeros_like(p))
                buf.mul_(group["momentum"]).add_(p.grad)
                update = p.grad.add(buf, alpha=group["momentum"]) if group["nesterov"] else buf
                by_shape.setdefault(tuple(p.shape), []).append((p, update))
            for (rows, cols), items in by_shape.items():
                ortho = newton_schulz(torch.stack([u for _, u in items]).float())
                if group["adjust_lr_fn"] == "match_rms_adamw":  # update RMS of AdamW's (Moonshot)
                    lr = group["lr"] * 0.2 * math.sqrt(max(rows, cols))
                else:  # Keller Jordan's original scaling for non-square matrices
                    lr = group["lr"] * math.sqrt(max(1.0, rows / cols))
                for (p, _), o in zip(items, ortho):
                    p.mul_(1 - group["lr"] * group["weight_decay"])
                    p.add_(o.to(p.dtype), alpha=-lr)


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
    if cfg["optimizer"] == "muon":
        hidden = [p for n, p in named if p.dim() == 2 and n.startswith("transformer.h.")]
        rest = [(n, p) for n, p in named if not (p.dim() == 2 and n.startswith("transformer.h."))]
        muon_kwargs = dict(lr=cfg["muon_lr"], weight_decay=cfg["weight_decay"], momentum=cfg["muon_momentum"],
                           adjust_lr_fn="match_rms_adamw" if cfg["muon_match_adamw"] else "original")
        # torch's Muon orthogonalises in bfloat16: right on GPUs, many times slower than float32 on most CPUs
        muon_cls = torch.optim.Muon if device_type == "cuda" else MuonFloat32
        muon = muon_cls([{"params": hidden, "base_lr": cfg["muon_lr"]}], **muon_kwargs)
        groups = [{"params": [p for _, p in rest if p.dim() >= 2], "weight_decay": 0.0},
                  {"params": [p for _, p in rest if p.dim() < 2], "weight_decay": 0.0}]
        return Optimizers(muon, adamw(groups, cfg, device_type))
    if cfg["optimizer"] != "adamw":
        raise TrainError(f"optimizer={cfg['optimizer']!r} is not one of adamw, muon")
    groups = [{"params": [p for _, p in named if p.dim() >= 2], "weight_decay": cfg["weight_decay"]},
              {"params": [p for _, p in named if p.dim() < 2], "weight_decay": 0.0}]
    return adamw(groups, cfg, device_type)


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


# -----------------------------------------------------------------------------------------------
# device, precision, processes

def pick_device(name):
    if name != "auto":
        if name.startswith("cuda") and not torch.cuda.is_available():
            raise TrainError(f"device={name} but CUDA is not available; use --device=cpu")
        return name
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def keep_freed_memory():
    """On CPU, glibc returns every large freed tensor to the OS and the next step faults its pages back
    in, zeroed: over a thousand page faults a step for a small model. Keep freed memory in the process."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (musl, say): its allocator is left as it is
        return
    libc.mallopt(-3, 1 << 30)  # M_MMAP_THRESHOLD: blocks under 1 GiB come from the heap, not fresh mmaps
    libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD: keep up to 1 GiB of freed heap for the next step


def pick_dtype(name, device_type):
    if name == "auto":
        if device_type == "cuda":
            return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
        return "float32"
    if name not in ("float32", "bfloat16", "float16"):
        raise TrainError(f"dtype={name!r} is not one of auto, float32, bfloat16, float16")
    return name


# Dense bf16 tensor-core peaks (FLOP/s) of common training GPUs, for MFU
GPU_PEAK_FLOPS = {"A100": 312e12, "H100": 989e12, "H200": 989e12, "A10G": 125e12, "L4": 121e12,
                  "RTX 4090": 165e12, "RTX 3090": 71e12}


def peak_flops_of(device_type):
    if device_type != "cuda":
        return 0.0
    name = torch.cuda.get_device_name()
    return next((v for k, v in GPU_PEAK_FLOPS.items() if k in name), 0.0)


def setup_distributed(cfg):
    """(rank, local_rank, world_size); joins the process group when launched by torchrun. parallel=fsdp
    without torchrun makes a group of one process, so that it runs (and resumes its checkpoints) alone too."""
    torchrun = "RANK" in os.environ
    if not torchrun and cfg["parallel"] != "fsdp":
        return 0, 0, 1
    env = os.environ if torchrun else {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1"}
    rank, local_rank, world = int(env["RANK"]), int(env["LOCAL_RANK"]), int(env["WORLD_SIZE"])
    backend = cfg["backend"]
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() and cfg["device"] in ("auto", "cuda") else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
        cfg["device"] = f"cuda:{local_rank}"
    alone = {} if torchrun else dict(store=dist.HashStore(), rank=0, world_size=1)
    dist.init_process_group(backend=backend, **alone)
    return rank, local_rank, world


def shard_model(model, compile_blocks, dtype, device_type, world):
    """parallel=fsdp: split each block's weights, then the rest, over the processes, moving them to the
    device one block at a time; each group is gathered for its forward and backward only. Computes in
    dtype, keeps float32 weights for the optimizer and reduces gradients in float32 (instead of autocast)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mesh = init_device_mesh(device_type, (world,))  # fsdp's default would pick CUDA even for device=cpu
    policy = MixedPrecisionPolicy(param_dtype=getattr(torch, dtype), reduce_dtype=torch.float32)
    for block in model.transformer.h:
        if compile_blocks:  # in place, before sharding: fsdp's hooks stay outside compiled code, names unchanged
            block.compile()
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)


# -----------------------------------------------------------------------------------------------
# checkpoints

def checkpoint_path(path):
    return os.path.join(path, "ckpt.pt") if os.path.isdir(path) else path


def load_checkpoint(path):
    path = checkpoint_path(path)
    if not os.path.isfile(path):
        raise TrainError(f"no checkpoint at {path}; train one first, or check init_from / out_dir")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise TrainError(f"could not read checkpoint {path} ({type(e).__name__}); it is truncated or corrupted, "
                         f"or not a checkpoint; use an earlier one (keep_checkpoints) or start again") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "model_config" not in ckpt:
        raise TrainError(f"{path} is not a checkpoint of train.py (no model or model_config in it)")
    return ckpt


def first_line(e):
    """An exception's message cut to its first line (or its type's name), for a one-line error."""
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def save_checkpoint(ckpt, out_dir, keep=0):
    """Write to a temporary file, flush to disk, then rename: a crash leaves the old or the new file."""
    path = os.path.join(out_dir, "ckpt.pt")
    for name in os.listdir(out_dir):  # leftovers of killed saves only take disk space
        if name.startswith("ckpt.pt.") and name.endswith(".tmp"):
            remove_quietly(os.path.join(out_dir, name))
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "wb") as f:
            torch.save(ckpt, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch.save reports a failed write as a RuntimeError
        remove_quietly(tmp)
        why = e.strerror if isinstance(e, OSError) and e.strerror else first_line(e)
        kept = (f"the previous checkpoint {path} is intact" if os.path.isfile(path)
                else "no earlier checkpoint exists")
        raise TrainError(f"could not write checkpoint {path} ({why}); {kept}; free disk space (or fix out_dir), "
                         f"then resume with --init_from=resume") from None
    fsync_dir(out_dir)
    try:  # a JSON summary for people and tools; the checkpoint itself never needs it
        write_json_atomic(os.path.join(out_dir, "ckpt.json"), checkpoint_summary(ckpt, path))
    except OSError as e:
        print(f"warning: could not write ckpt.json beside {path} ({e.strerror})", file=sys.stderr)
    if keep > 0:
        keep_recent(path, ckpt["iter_num"], keep)


def remove_quietly(path):
    try:
        os.remove(path)
    except OSError:
        pass


def fsync_dir(path):
    """Make a rename in this folder durable; not every system can open a folder."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_json_atomic(path, obj):
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError:
        remove_quietly(tmp)
        raise


def checkpoint_summary(ckpt, path):
    keys = ("iter_num", "best_val_loss", "model_config", "config", "tokenizer", "dataset_dir", "world_size")
    summary = {k: ckpt[k] for k in keys if k in ckpt}
    if not math.isfinite(summary.get("best_val_loss", 0.0)):
        summary["best_val_loss"] = None  # JSON has no inf
    return {"file": os.path.basename(path), "bytes": os.path.getsize(path), "saved_at": time.time(),
            "torch": torch.__version__, **summary}


def keep_recent(path, iter_num, keep):
    """Also keep this checkpoint as ckpt-ITER.pt, and only the `keep` newest of those."""
    folder = os.path.dirname(path)
    named = os.path.join(folder, f"ckpt-{iter_num:08d}.pt")
    remove_quietly(named)
    try:
        os.link(path, named)  # no second copy on disk; ckpt.pt is replaced, never rewritten in place
    except OSError:
        import shutil
        shutil.copyfile(path, named + ".tmp")
        os.replace(named + ".tmp", named)
    kept = [os.path.join(folder, n) for n in os.listdir(folder)
            if n.startswith("ckpt-") and n.endswith(".pt")]
    kept.sort(key=os.path.getmtime)
    for old in kept[:-keep]:
        remove_quietly(old)


def save_sharded(model, optimizer, state, out_dir, keep, master):
    """parallel=fsdp: every process writes its shards of the weights and optimizer state into ckpt-ITER.dcp/,
    then rank 0 writes ckpt.pt: the whole model (gathered; what sample.py and init_from=PATH read), the run's
    state, and the name of that folder. ckpt.pt is the commit: until it is replaced, the previous ckpt.pt and
    the folder it names stay as they were. Called on every process; returns the whole weights on rank 0."""
    import shutil
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_state_dict
    name = f"ckpt-{state['iter_num']:08d}.dcp"
    folder, tmp = os.path.join(out_dir, name), os.path.join(out_dir, name + ".tmp")
    if master:
        shutil.rmtree(tmp, ignore_errors=True)  # a killed save's leftovers
    dist.barrier()  # nobody writes into tmp before it is empty
    model_state, optim_state = get_state_dict(model, optimizer)
    try:  # returns on every process once all shards and the index are on disk
        dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=tmp)
    except Exception as e:  # every process gets the exception, so they all stop here
        raise TrainError(f"could not write the sharded checkpoint {tmp} ({first_line(e)}); the previous checkpoint in "
                         f"{out_dir} is intact; free disk space (or fix out_dir), then resume with "
                         f"--init_from=resume") from None
    weights = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not master:
        return None
    shutil.rmtree(folder, ignore_errors=True)  # named by no ckpt.pt of this run: a save cut short, or an old run's
    os.replace(tmp, folder)
    fsync_dir(out_dir)
    save_checkpoint({"model": weights, **state, "sharded": name}, out_dir, keep)
    # the folders that ckpt.pt and the kept ckpt-ITER.pt name stay; the rest are old or unfinished saves
    names = os.listdir(out_dir)
    named = {name} | {n[:-3] + ".dcp" for n in names if n.startswith("ckpt-") and n.endswith(".pt")}
    for n in names:
        if n.startswith("ckpt-") and n.endswith((".dcp", ".dcp.tmp")) and n not in named:
            shutil.rmtree(os.path.join(out_dir, n), ignore_errors=True)
    return weights


def load_sharded(model, optimizer, path):
    """Read a ckpt-ITER.dcp/ folder into the sharded model and optimizer, with any number of processes."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    if not os.path.isdir(path):
        raise TrainError(f"{path}, the sharded state that ckpt.pt names, is missing; start a new run from "
                         f"ckpt.pt's weights with --init_from=PATH")
    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optim_state}
    try:
        dcp.load(state, checkpoint_id=path)
    except Exception as e:
        raise TrainError(f"could not read the sharded checkpoint {path} ({first_line(e)}); resume with the "
                         f"checkpoint's settings, or start anew from ckpt.pt's weights with --init_from=PATH") from None
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def rng_state(device):
    """This process's random states (python, numpy, torch, CUDA) as tensors and numbers, which
    weights_only loading accepts (numpy's and python's own state objects it refuses)."""
    version, py_state, gauss = random.getstate()
    _, keys, pos, has_gauss, np_gauss = np.random.get_state()
    state = {"python": torch.tensor(py_state, dtype=torch.int64), "python_version": version,
             "python_gauss": gauss, "numpy": torch.from_numpy(keys.astype(np.int64)), "numpy_pos": int(pos),
             "numpy_has_gauss": int(has_gauss), "numpy_gauss": float(np_gauss), "torch": torch.get_rng_state()}
    if device.startswith("cuda"):
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state, device):
    random.setstate((state["python_version"], tuple(state["python"].tolist()), state["python_gauss"]))
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"],
                         state["numpy_has_gauss"], state["numpy_gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and device.startswith("cuda"):
        torch.cuda.set_rng_state(state["cuda"], device)


def all_rng_states(world, device):
    """Every process's random states, in rank order (dropout differs per process)."""
    mine = rng_state(device)
    if world == 1:
        return [mine]
    states = [None] * world
    dist.all_gather_object(states, mine)
    return states


def any_process(flag, world, device):
    """True on every process when flag is true on any one: keeps collective decisions in step."""
    if world == 1:
        return bool(flag)
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def model_is_finite(model):
    """Of this process's weights: with fsdp, its own shards (to_local), so any_process must combine them."""
    return all(bool(torch.isfinite(p.to_local() if hasattr(p, "to_local") else p).all()) for p in model.parameters())


# settings that shape the weights or the meaning of token ids: a resumed run must match them
RESUME_FIXED = [k for k in ARCH_KEYS if k != "dropout"]
RESUME_FIXED_RUN = ["optimizer"]  # the saved optimizer state only fits the same optimizer


def check_resume(cfg, explicit, ckpt, meta):
    """Refuse a resume whose architecture or vocabulary differs from the checkpoint's; return the
    other settings that changed (allowed: max_iters, schedule, cadence, logging, ...)."""
    arch, saved = ckpt["model_config"], ckpt.get("config", {})
    diffs = []
    for k in RESUME_FIXED:
        derived = k in ("n_kv_head", "head_dim", "mlp_hidden") and cfg[k] == 0  # 0 means "derive it"
        if k in explicit and k in arch and cfg[k] != arch[k] and not derived:
            diffs.append(f"{k} {arch[k]!r} -> {cfg[k]!r}")
    for k in RESUME_FIXED_RUN:
        if k in saved and k in cfg and saved[k] != cfg[k]:
            diffs.append(f"{k} {saved[k]!r} -> {cfg[k]!r}")
    saved_parallel = "fsdp" if "sharded" in ckpt else "ddp"  # its optimizer state is sharded, or whole in ckpt.pt
    if cfg["parallel"] != saved_parallel:
        diffs.append(f"parallel {saved_parallel!r} -> {cfg['parallel']!r}")
    if arch.get("vocab_size") != meta["vocab_size"]:
        diffs.append(f"vocab_size {arch.get('vocab_size')} -> {meta['vocab_size']}")
    if ckpt.get("tokenizer") and ckpt["tokenizer"] != meta["tokenizer"]:  # None: imported weights, vocab size checked
        diffs.append(f"tokenizer {describe_tokenizer(ckpt['tokenizer'])} -> {describe_tokenizer(meta['tokenizer'])}")
    if diffs:
        raise TrainError(f"cannot resume: the checkpoint differs in {'; '.join(diffs)}; resume with the "
                         f"checkpoint's settings and data, or start a new run from it with --init_from=PATH")
    return [f"{k} {saved[k]!r} -> {cfg[k]!r}" for k in cfg
            if k in saved and k not in RESUME_FIXED + RESUME_FIXED_RUN + ["init_from", "debug", "parallel"]
            and saved[k] != cfg[k]]


def describe_tokenizer(tok):
    if tok.get("kind") == "char":
        return f"char ({len(tok.get('chars', ''))} characters)"
    return str(tok.get("kind"))


def check_same_vocabulary(ckpt, meta, dataset):
    """Fine-tuning needs the token ids to mean what they meant to the checkpoint."""
    if ckpt.get("tokenizer") and ckpt["tokenizer"] != meta["tokenizer"]:  # None: imported weights, vocab size checked
        raise TrainError(f"the checkpoint's tokenizer ({describe_tokenizer(ckpt['tokenizer'])}) differs from dataset "
                         f"{dataset!r}'s ({describe_tokenizer(meta['tokenizer'])}); use a dataset built with the "
                         f"checkpoint's tokenizer")


def trim_metrics(path, iter_num):
    """Drop log records past the resumed iteration: that training was lost and is done again."""
    if not os.path.isfile(path):
        return
    with open(path, encoding="utf-8") as f:
        lines = f.readlines()
    keep = []
    for line in lines:
        try:
            if json.loads(line).get("iter", 0) <= iter_num:
                keep.append(line)
        except ValueError:  # a line cut short by a kill
            pass
    if keep != lines:
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(keep)
        os.replace(tmp, path)


class StopSignal:
    """SIGTERM or SIGINT asks the loop to finish its step, checkpoint and exit; a second Ctrl-C interrupts."""

    def __init__(self):
        self.name = None
        self.previous = {s: signal.signal(s, self.handle) for s in (signal.SIGTERM, signal.SIGINT)}

    def handle(self, signum, frame):
        self.name = signal.Signals(signum).name
        signal.signal(signal.SIGINT, signal.default_int_handler)

    def restore(self):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


def resume_command(argv, world):
    args = [a for i, a in enumerate(argv) if not a.startswith("--init_from")
            and not (i > 0 and argv[i - 1] == "--init_from")]
    launcher = f"torchrun --standalone --nproc_per_node={world}" if world > 1 else "python"
    return f"{launcher} train.py {shlex.join(args + ['--init_from=resume'])}"


def check_run_settings(cfg):
    """Before joining the process group, so a bad setting fails at once instead of hanging in a collective."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if cfg["gradient_accumulation_steps"] % world:
        raise TrainError(f"gradient_accumulation_steps={cfg['gradient_accumulation_steps']} is not divisible "
                         f"by the {world} processes; make it a multiple of {world}")
    if cfg["nan_policy"] not in ("stop", "skip"):
        raise TrainError(f"nan_policy={cfg['nan_policy']!r} is not one of stop, skip")
    if cfg["keep_checkpoints"] < 0:
        raise TrainError(f"keep_checkpoints must be >= 0, got {cfg['keep_checkpoints']}")
    if cfg["parallel"] not in ("ddp", "fsdp"):
        raise TrainError(f"parallel={cfg['parallel']!r} is not one of ddp, fsdp")
    if cfg["parallel"] == "fsdp" and not dist.is_available():
        raise TrainError("parallel=fsdp needs torch.distributed, which this build of torch lacks; use parallel=ddp")
    if cfg["parallel"] == "fsdp" and cfg["optimizer"] == "muon":
        raise TrainError("optimizer=muon does not work with parallel=fsdp: Muon orthogonalises whole matrices, which "
                         "fsdp splits over the processes; use optimizer=adamw or parallel=ddp")


def build_model(cfg, explicit, vocab_size):
    """A new model, or one whose weights come from a checkpoint; returns (model, checkpoint or None)."""
    ckpt = None
    if cfg["init_from"] == "scratch":
        arch = {k: cfg[k] for k in ARCH_KEYS}
        if cfg["preset"]:  # a preset gives the shape; keys set in a file or on the command line win
            arch = asdict(preset_config(cfg["preset"], **{k: cfg[k] for k in ARCH_KEYS if k in explicit}))
        arch["vocab_size"] = vocab_size
        config = GPTConfig(**arch)
    else:
        import hf  # Hugging Face folders and gpt2* Hub names; transformers is not imported
        source = cfg["out_dir"] if cfg["init_from"] == "resume" else cfg["init_from"]
        ckpt = (hf.load_hf_checkpoint(source) if cfg["init_from"] != "resume" and hf.is_hf_source(source)
                else load_checkpoint(source))
        arch = dict(ckpt["model_config"])
        if arch["vocab_size"] != vocab_size:
            raise TrainError(f"the checkpoint's vocabulary has {arch['vocab_size']} tokens but dataset "
                             f"{cfg['dataset']!r} has {vocab_size}; use a dataset built with the same tokenizer")
        changed = [k for k in SHAPE_KEYS if k in explicit and cfg[k] != arch[k]]
        if changed and cfg["init_from"] != "resume":  # a resume refuses them instead (check_resume)
            print(f"note: keeping the checkpoint's {', '.join(changed)} (they shape the weights)")
        arch["dropout"] = cfg["dropout"]
        config = GPTConfig(**{k: v for k, v in arch.items() if k in GPTConfig.keys()})
    model = GPT(config)
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        if cfg["block_size"] < config.block_size and (cfg["init_from"] != "resume" or "block_size" in explicit):
            model.crop_block_size(cfg["block_size"])
    for k in ARCH_KEYS:  # the settings record the architecture actually trained
        cfg[k] = getattr(model.config, k)
    return model, ckpt


# -----------------------------------------------------------------------------------------------
# benchmark: the figures behind every speed claim in the README

def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def peak_memory_mb(device):
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    import resource  # CPU: the process's peak resident memory (kB on Linux)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def benchmark(cfg, model, train_step, batches, local_accum, rank, tokens_per_iter, peak, device, warmup=5):
    """Time cfg["bench"] training steps after a warmup, then sampling; one line per figure."""
    steps = cfg["bench"]
    for i in range(warmup + steps):
        if i == warmup:
            sync(device)
            t0 = time.perf_counter()
        starts = batches.draw(cfg["gradient_accumulation_steps"])
        loss = train_step(starts[rank * local_accum:(rank + 1) * local_accum])
    loss.item()
    sync(device)
    dt = (time.perf_counter() - t0) / steps
    if rank != 0:
        return
    print(f"train ms/iter: {dt * 1000:.2f}")
    print(f"train tokens/s: {tokens_per_iter / dt:,.0f}")
    print(f"train mfu: {model.estimate_mfu(tokens_per_iter, dt, peak) * 100:.1f}%" if peak else
          "train mfu: n/a (no peak FLOP/s known for this device; set peak_flops)")
    print(f"peak memory: {peak_memory_mb(device):,.0f} MB")
    if cfg["parallel"] == "fsdp":  # every process would have to take part in each forward
        print("sample tokens/s: n/a with parallel=fsdp (sample.py reads its ckpt.pt)")
        return
    model.eval()
    n_new = min(256, 4 * model.config.block_size)
    prompt = torch.zeros(1, 1, dtype=torch.long, device=device)
    model.generate(prompt, 8, temperature=1.0)  # warm up
    sync(device)
    t0 = time.perf_counter()
    model.generate(prompt, n_new, temperature=1.0)
    sync(device)
    print(f"sample tokens/s: {n_new / (time.perf_counter() - t0):,.1f} (batch 1, {n_new} tokens)")


# -----------------------------------------------------------------------------------------------
# fine-tuning tasks (classify, instruct; see tasks.py): helpers main() branches on once, so that
# plain language-model training runs exactly as before

def setup_task(cfg, meta, world):
    """Check the settings against the dataset's task ("lm" when meta.json names none); records the
    task's facts in cfg (saved with every checkpoint) and returns the task name."""
    task = meta.get("task", "lm")
    if cfg["trainable"] not in ("all", "last_blocks", "lora"):
        raise TrainError(f"trainable={cfg['trainable']!r} is not one of 'all', 'last_blocks', 'lora'")
    if cfg["trainable"] == "last_blocks" and cfg["trainable_blocks"] < 1:
        raise TrainError(f"trainable_blocks must be >= 1, got {cfg['trainable_blocks']}")
    if cfg["trainable"] == "lora" and cfg["lora_rank"] < 1:
        raise TrainError("trainable=lora needs lora_rank >= 1 (e.g. --lora_rank=8)")
    if cfg["lora_rank"] < 0 or cfg["lora_alpha"] <= 0 or not 0 <= cfg["lora_dropout"] < 1:
        raise TrainError("lora_rank must be >= 0, lora_alpha > 0 and lora_dropout in [0, 1)")
    known = {"attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"}
    targets = [t.strip() for t in cfg["lora_targets"].split(",") if t.strip()]
    if not targets or set(targets) - known:
        raise TrainError(f"lora_targets={cfg['lora_targets']!r}: a comma-separated list of {', '.join(sorted(known))}")
    if task == "lm":
        return task
    if task not in ("classify", "instruct"):
        raise TrainError(f"dataset {cfg['dataset']!r} has unknown task {task!r}; re-run prepare.py")
    if world > 1 or cfg["parallel"] == "fsdp":
        raise TrainError(f"{task} datasets train in one process; run train.py without torchrun and parallel=fsdp")
    if cfg["pack"] and task != "instruct":
        raise TrainError("pack=True applies to instruct datasets only")
    if cfg["cls_lm_weight"] < 0:
        raise TrainError(f"cls_lm_weight must be >= 0, got {cfg['cls_lm_weight']}")
    cfg["task"] = task
    if task == "classify":
        cfg["n_classes"] = len(meta["label_names"])
        cfg["label_names"] = list(meta["label_names"])
        cfg["positive_id"] = meta["label_names"].index(meta["positive_class"])
    return task


def adapt_model(model, cfg, task, wanted):
    """Give a built or loaded model what the run needs (classification head, LoRA adapters), then
    freeze what cfg["trainable"] keeps fixed; returns a line with the trainable-parameter count.
    wanted: the n_classes and lora_* settings asked for, before build_model copied the checkpoint's."""
    try:
        if task == "classify" and model.config.n_classes == 0:  # e.g. from a language-model checkpoint
            model.add_classifier(wanted["n_classes"])
        elif task == "classify" and model.config.n_classes != wanted["n_classes"]:
            raise TrainError(f"the checkpoint's head has {model.config.n_classes} classes but dataset "
                             f"{cfg['dataset']!r} has {wanted['n_classes']}")
        if wanted["lora_rank"] and not model.config.lora_rank:
            model.add_lora(wanted["lora_rank"], wanted["lora_alpha"], wanted["lora_dropout"], wanted["lora_targets"])
    except ValueError as e:
        raise TrainError(str(e)) from None
    mode = cfg["trainable"]
    n_layer = model.config.n_layer
    last = tuple(f"transformer.h.{i}." for i in range(max(0, n_layer - cfg["trainable_blocks"]), n_layer))
    head = "cls_head." if model.config.n_classes else None
    for name, p in model.named_parameters():
        if mode == "all":
            keep = True
        elif mode == "lora":
            keep = ".lora_" in name or (task == "classify" and name.startswith("cls_head."))
        else:  # last_blocks: the top of the network and whichever head the task reads
            keep = name.startswith(last + ("transformer.ln_f.",)) or (
                name.startswith("cls_head.") if task == "classify" and head else p is model.lm_head.weight)
        p.requires_grad_(keep)
    for k in ARCH_KEYS:
        cfg[k] = getattr(model.config, k)
    n_total = sum(p.numel() for p in model.parameters())
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return f"trainable: {n_train:,} of {n_total:,} parameters ({100 * n_train / n_total:.2f}%), trainable={mode}"


def task_splits(data_dir, meta, cfg, block_size, device):
    """train / val / test ExampleBatches of a task dataset (balanced and pack apply to train only)."""
    from tasks import ExampleBatches, TaskError
    try:
        return {s: ExampleBatches(data_dir, s, meta, block_size, cfg["batch_size"], device, cfg["seed"] + i,
                                  balanced=cfg["balanced"] and s == "train", pack=cfg["pack"] and s == "train")
                for i, s in enumerate(("train", "val", "test"))}
    except TaskError as e:
        raise TrainError(str(e)) from None


def task_loss_fn(model, cfg, meta, task, device):
    """batch -> (logits, loss) for classify; None for the tasks that batch as (x, y) (lm, instruct)."""
    if task != "classify":
        return None
    weight = None
    if cfg["class_weights"]:  # inverse frequency, normalised so that a balanced set gets weight 1
        counts = np.array([meta["label_counts"][n] for n in meta["label_names"]], dtype=np.float64)
        weight = torch.tensor(counts.sum() / (len(counts) * counts), dtype=torch.float32, device=device)
    return lambda batch: model.classify(*batch, lm_weight=cfg["cls_lm_weight"],
                                        label_smoothing=cfg["label_smoothing"], class_weight=weight)


def task_evaluator(model, splits, cfg, autocast):
    """estimate_loss for a task: loss on the first eval_iters batches of train and on all of val,
    plus val/acc, val/precision, val/recall, val/f1 (of the positive class) for classify."""
    from tasks import evaluate_split

    def evaluate():
        train = evaluate_split(model, splits["train"], cfg, autocast, limit=cfg["eval_iters"] * cfg["batch_size"])
        val = evaluate_split(model, splits["val"], cfg, autocast)
        return {"train": train["loss"], "val": val["loss"], **{f"val/{k}": v for k, v in val.items() if k != "loss"}}
    return evaluate


def task_test(model, splits, cfg, autocast, iter_num):
    """The metrics of the final model on the held-out test split, as a metrics.jsonl record."""
    from tasks import evaluate_split
    result = evaluate_split(model, splits["test"], cfg, autocast)
    return {"iter": iter_num, **{f"test/{k}": v for k, v in result.items()}}


def save_adapters(model, cfg, weights):
    """With LoRA, also write adapters.pt: only the adapters and the head (small), plus the model
    config and the base checkpoint they apply to. weights: the whole state dict saved in ckpt.pt."""
    if not model.config.lora_rank:
        return
    from model import lora_state_dict
    base = cfg["init_from"] if cfg["init_from"] not in ("resume", "scratch") else cfg.get("lora_base", "")
    cfg["lora_base"] = base  # a resumed run keeps pointing at the original base checkpoint
    adapters = {k: weights[k] for k in lora_state_dict(model)}  # with fsdp, the model itself holds only shards
    torch.save({"adapters": adapters, "model_config": asdict(model.config), "config": cfg,
                "base": os.path.abspath(checkpoint_path(base)) if base else ""},
               os.path.join(cfg["out_dir"], "adapters.pt"))


# -----------------------------------------------------------------------------------------------
# the run

def main(argv):
    cfg, explicit = parse_args(argv, [TrainConfig, GPTConfig], "train.py", __doc__.strip().splitlines()[0])
    check_run_settings(cfg)
    rank, local_rank, world = setup_distributed(cfg)
    master = rank == 0
    device = pick_device(cfg["device"])
    device_type = "cuda" if device.startswith("cuda") else device
    dtype = pick_dtype(cfg["dtype"], device_type)
    if device_type == "cpu":
        keep_freed_memory()
    sharded = cfg["parallel"] == "fsdp"
    if sharded and device_type not in ("cuda", "cpu"):
        raise TrainError(f"parallel=fsdp runs on CUDA or CPU, not {device_type}; use parallel=ddp")
    if sharded and dtype == "float16":  # GradScaler would find infs in each process's shards alone
        raise TrainError("parallel=fsdp trains in bfloat16 or float32: float16's loss scaling does not work on "
                         "sharded gradients; set --dtype=bfloat16 (or float32), or use parallel=ddp")
    local_accum = cfg["gradient_accumulation_steps"] // world

    data_dir, meta = resolve_dataset(cfg["dataset"])
    task = setup_task(cfg, meta, world)
    if task == "lm":
        check_data_length(data_dir, meta, cfg["block_size"])  # before building a model that size
        check_bins(data_dir, meta)
    torch.manual_seed(cfg["seed"])  # the same initial weights on every process
    requested = dict(cfg)  # build_model overwrites the architecture keys with the checkpoint's
    wanted = {k: cfg[k] for k in ADAPT_KEYS}  # the head and adapters asked for, before that
    model, ckpt = build_model(cfg, explicit, meta["vocab_size"])
    changed = check_resume(requested, explicit, ckpt, meta) if cfg["init_from"] == "resume" else []
    if ckpt is not None and cfg["init_from"] != "resume":
        check_same_vocabulary(ckpt, meta, cfg["dataset"])
    trainable_line = adapt_model(model, cfg, task, wanted)
    block_size = model.config.block_size
    tokens_per_iter = cfg["gradient_accumulation_steps"] * cfg["batch_size"] * block_size
    torch.manual_seed(cfg["seed"] + rank)  # dropout differs per process; batches don't (see Batches)
    if task == "lm":
        splits = {s: Batches(os.path.join(data_dir, f"{s}.bin"), meta["dtype"], block_size, cfg["batch_size"], device,
                             cfg["seed"] + (0 if s == "train" else 1)) for s in ("train", "val")}
    else:
        splits = task_splits(data_dir, meta, cfg, block_size, device)

    iter_num, best_val_loss = 0, float("inf")
    if sharded:  # before the optimizer, which must hold the sharded parameters
        shard_model(model, cfg["compile"], dtype, device_type, world)
    else:
        model.to(device)
    optimizer = make_optimizer(model, cfg, device_type)
    scaler = torch.amp.GradScaler(device_type, enabled=dtype == "float16")
    resumed_evaluated = True  # whether the checkpoint's iteration was already evaluated
    if cfg["init_from"] == "resume":
        if sharded:
            load_sharded(model, optimizer, os.path.join(cfg["out_dir"], ckpt["sharded"]))
        else:
            try:
                optimizer.load_state_dict(ckpt["optimizer"])
            except (ValueError, KeyError, RuntimeError) as e:
                raise TrainError(f"the checkpoint's optimizer state does not fit this run ({first_line(e)}); "
                                 f"resume with the checkpoint's settings") from None
        iter_num, best_val_loss = ckpt["iter_num"], ckpt["best_val_loss"]
        if "train_generator" in ckpt:
            splits["train"].generator.set_state(ckpt["train_generator"])
        resumed_evaluated = restore_run_state(ckpt, scaler, rank, world, device, master)
        if master and changed:
            print(f"resuming with changed settings: {'; '.join(changed)}")
    ckpt = None  # free the loaded weights

    if master:
        os.makedirs(cfg["out_dir"], exist_ok=True)
        print(f"model: {model.config.n_layer} layers, {model.config.n_head} heads, {model.config.n_embd} wide, "
              f"block_size {block_size}, {model.config.norm}, {model.config.positions} positions, {model.config.mlp}")
        print(model.describe())
        print(f"tokens per iteration: {tokens_per_iter:,} ({world} process(es) x {local_accum} micro-batches "
              f"x {cfg['batch_size']} x {block_size}); device {device}, {dtype}{', fsdp' if sharded else ''}")
        if task != "lm" or cfg["trainable"] != "all" or model.config.lora_rank:
            print(trainable_line)
    if device_type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    autocast = (torch.autocast(device_type=device_type, dtype=getattr(torch, dtype))
                if dtype != "float32" and not sharded else nullcontext())  # fsdp: its mixed-precision policy
    raw_model = model
    if cfg["compile"] and not sharded:  # fsdp compiled the blocks
        model = torch.compile(model)
    if world > 1 and not sharded:
        model = DDP(model, device_ids=[local_rank] if device_type == "cuda" else None)

    metrics_mode = "a" if cfg["init_from"] == "resume" else "w"  # a resumed run continues its log
    writes = master and not cfg["bench"]  # a benchmark leaves no files
    if writes and cfg["init_from"] == "resume":
        trim_metrics(os.path.join(cfg["out_dir"], "metrics.jsonl"), iter_num)
    metrics = open(os.path.join(cfg["out_dir"], "metrics.jsonl"), metrics_mode) if writes else None
    wandb_run = None
    if cfg["wandb_log"] and writes:
        import wandb
        wandb_run = wandb.init(project=cfg["wandb_project"], name=cfg["wandb_run_name"], config=cfg,
                               dir=cfg["out_dir"])

    def log(record):
        if writes:
            metrics.write(json.dumps(record) + "\n")
            metrics.flush()
            if wandb_run is not None:
                wandb_run.log({k: v for k, v in record.items() if k != "iter"}, step=record["iter"])

    @torch.no_grad()
    def estimate_loss():
        """Mean loss over eval_iters fixed batches per split, shared out over the processes."""
        model.eval()
        out = {}
        for split, batches in splits.items():
            g = torch.Generator().manual_seed(cfg["seed"] + 2)  # the same batches at every evaluation
            high = len(batches.data) - block_size
            starts = torch.randint(high, (cfg["eval_iters"], cfg["batch_size"]), generator=g).numpy()
            total = torch.zeros(2, device=device)
            # fsdp: every process runs as many forwards, each of which gathers the weights from all of them
            n = -(-cfg["eval_iters"] // world) * world if sharded else cfg["eval_iters"]
            for k in range(rank, n, world):
                x, y = batches.get(starts[k % cfg["eval_iters"]])
                with autocast:
                    _, loss = model(x, y)
                if k < cfg["eval_iters"]:
                    total += torch.stack([loss.float(), torch.ones((), device=device)])
            if world > 1:
                dist.all_reduce(total)
            out[split] = (total[0] / total[1]).item()
        model.train()
        return out

    def train_step(micro_batches):
        """One optimizer step over this process's micro-batches; returns the mean loss (a tensor)."""
        loss_sum = torch.zeros((), device=device)
        for micro, starts in enumerate(micro_batches):
            batch = splits["train"].get(starts)  # (x, y); classify: (x, lengths, labels)
            last = micro == len(micro_batches) - 1  # reduce gradients only after the last micro-batch
            if sharded:
                model.set_requires_gradient_sync(last)
            elif world > 1:
                model.require_backward_grad_sync = last
            with autocast:
                if loss_fn is None:
                    _, loss = model(*batch, label_smoothing=cfg["label_smoothing"])
                else:
                    _, loss = loss_fn(batch)
                loss = loss / len(micro_batches)
            scaler.scale(loss).backward()
            loss_sum += loss.detach()
        if not finite_loss(loss_sum):
            optimizer.zero_grad(set_to_none=True)
            return loss_sum
        if cfg["grad_clip"] > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["grad_clip"])
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        return loss_sum

    skipped = [0]  # consecutive steps skipped for a non-finite loss

    def finite_loss(loss_sum):
        """False when this step must be skipped; raises when nan_policy is stop. Every process agrees."""
        if not any_process(not bool(torch.isfinite(loss_sum)), world, device):
            skipped[0] = 0
            return True
        what = f"loss is {loss_sum.item()} at iteration {iter_num + 1} (lr {optimizer.param_groups[0]['lr']:.2e})"
        if cfg["nan_policy"] == "skip" and skipped[0] < 10:
            skipped[0] += 1
            if master:
                print(f"warning: {what}; skipped that step (nan_policy=skip)")
            return False
        more = " for 10 steps in a row" if cfg["nan_policy"] == "skip" else ""
        raise TrainError(f"{what}{more}; stopped, the last checkpoint in {cfg['out_dir']} is kept; lower "
                         f"learning_rate or raise warmup_iters, or set nan_policy=skip to drop such steps")

    def save(val_loss, evaluated=True, eval_loss=0.0):
        """A checkpoint of everything a resume needs to continue exactly. Called on every process; returns
        the saved weights on rank 0."""
        if any_process(not model_is_finite(raw_model), world, device):  # all processes stop together
            raise TrainError(f"the model's weights are not finite at iteration {iter_num}; not saving over the "
                             f"checkpoint in {cfg['out_dir']}; lower learning_rate and resume or start again")
        if not math.isfinite(eval_loss):
            raise TrainError(f"the validation loss is {eval_loss} at iteration {iter_num}; not saving over the "
                             f"checkpoint in {cfg['out_dir']}; lower learning_rate and resume or start again")
        state = {"scaler": scaler.state_dict(), "model_config": asdict(raw_model.config), "config": cfg,
                 "iter_num": iter_num, "best_val_loss": val_loss, "evaluated": evaluated,
                 "dataset_dir": os.path.abspath(data_dir), "tokenizer": meta["tokenizer"],
                 "train_generator": splits["train"].generator.get_state(), "rng": all_rng_states(world, device),
                 "world_size": world}
        if sharded:
            return save_sharded(raw_model, optimizer, state, cfg["out_dir"], cfg["keep_checkpoints"], master)
        if master:
            weights = raw_model.state_dict()
            save_checkpoint({"model": weights, "optimizer": optimizer.state_dict(), **state}, cfg["out_dir"],
                            cfg["keep_checkpoints"])
            return weights

    loss_fn = task_loss_fn(raw_model, cfg, meta, task, device)
    if task != "lm":
        estimate_loss = task_evaluator(raw_model, splits, cfg, autocast)  # noqa: F811 (whole examples, all of val)
    peak = cfg["peak_flops"] or peak_flops_of(device_type)
    if cfg["bench"]:  # every process takes part in the timed steps; rank 0 reports
        benchmark(cfg, raw_model, train_step, splits["train"], local_accum, rank, tokens_per_iter, peak, device)
        return
    max_iters, start_iter = cfg["max_iters"], iter_num
    t_last, iters_since = time.time(), 0
    run_start = time.time()
    stop = StopSignal() if not cfg["eval_only"] else None
    while True:
        if stop is not None and any_process(stop.name is not None, world, device):
            stop_and_save(stop, save, iter_num, start_iter, best_val_loss, cfg, argv, world, master)
            break
        just_resumed = (cfg["init_from"] == "resume" and iter_num == start_iter  # evaluated before the stop
                        and resumed_evaluated)
        if (iter_num % cfg["eval_interval"] == 0 or iter_num >= max_iters) and not just_resumed or cfg["eval_only"]:
            losses = estimate_loss()
            if master:
                extra = {k: v for k, v in losses.items() if "/" in k}  # a task's val metrics
                print(f"step {iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}"
                      + "".join(f", {k} {v:.4f}" for k, v in extra.items()))
                log({"iter": iter_num, "tokens": iter_num * tokens_per_iter, "train/loss": losses["train"],
                     "val/loss": losses["val"], **extra, "elapsed_s": time.time() - run_start})
            # every process decides (and saves) together: saving gathers their random states
            if not cfg["eval_only"] and iter_num > start_iter and any_process(
                    losses["val"] < best_val_loss or cfg["always_save_checkpoint"], world, device):
                best_val_loss = min(best_val_loss, losses["val"])
                weights = save(best_val_loss, eval_loss=losses["val"])
                if master:
                    save_adapters(raw_model, cfg, weights)
                    print(f"saved checkpoint to {cfg['out_dir']}")
            t_last, iters_since = time.time(), 0  # evaluation time is not training time
        if iter_num >= max_iters or cfg["eval_only"]:
            break

        lr = get_lr(iter_num, cfg)
        set_lr(optimizer, lr, cfg)
        starts = splits["train"].draw(cfg["gradient_accumulation_steps"])
        loss = train_step(starts[rank * local_accum:(rank + 1) * local_accum])
        iter_num += 1
        iters_since += 1

        if iter_num % cfg["log_interval"] == 0:
            if world > 1:
                dist.all_reduce(loss, op=dist.ReduceOp.AVG)
            loss = loss.item()  # waits for the device: only on log steps
            dt = (time.time() - t_last) / iters_since
            t_last, iters_since = time.time(), 0
            if master:
                tok_s = tokens_per_iter / dt
                eta = (max_iters - iter_num) * dt
                mfu = raw_model.estimate_mfu(tokens_per_iter, dt, peak) if peak else None
                mfu_text = f", mfu {mfu * 100:.1f}%" if mfu is not None else ""
                print(f"iter {iter_num}: loss {loss:.4f}, lr {lr:.2e}, {dt * 1000:.1f} ms/iter, "
                      f"{tok_s:,.0f} tok/s{mfu_text}, eta {eta / 60:.1f} min")
                log({"iter": iter_num, "tokens": iter_num * tokens_per_iter, "loss": loss, "lr": lr,
                     "ms_per_iter": dt * 1000, "tokens_per_s": tok_s, "mfu": mfu})

    if stop is not None:
        stop.restore()
    if task != "lm" and master and not cfg["eval_only"]:
        record = task_test(raw_model, splits, cfg, autocast, iter_num)
        print("test (final model): " + ", ".join(f"{k[5:]} {v:.4f}" for k, v in record.items() if k != "iter"))
        log(record)
    if writes:
        metrics.close()
        if wandb_run is not None:
            wandb_run.finish()


def restore_run_state(ckpt, scaler, rank, world, device, master):
    """Random states and grad scaler of a resumed run; returns whether its iteration was evaluated."""
    if scaler.is_enabled() and ckpt.get("scaler"):
        scaler.load_state_dict(ckpt["scaler"])
    rng = ckpt.get("rng")
    if rng is not None and len(rng) == world:
        set_rng_state(rng[rank], device)
    elif master:
        print(f"note: the checkpoint holds no random states for {world} process(es); dropout will not "
              f"repeat the interrupted run exactly")
    return ckpt.get("evaluated", True)


def stop_and_save(stop, save, iter_num, start_iter, best_val_loss, cfg, argv, world, master):
    """After SIGTERM/SIGINT: checkpoint the finished step and say how to go on."""
    if iter_num > start_iter:
        save(best_val_loss, evaluated=False)
        where = f"checkpoint saved to {os.path.join(cfg['out_dir'], 'ckpt.pt')}"
    elif cfg["init_from"] != "resume":  # a scratch or fine-tuning run stopped before its first step
        where = "no step taken, nothing saved; run the same command again"
    else:
        where = "no step since the checkpoint, nothing new to save"
    if master:
        resumable = iter_num > start_iter or cfg["init_from"] == "resume"
        then = f"; resume with: {resume_command(argv, world)}" if resumable else ""
        print(f"stopped by {stop.name or 'a signal to another process'} at iteration {iter_num}; {where}{then}",
              flush=True)


def cli(argv):
    """main() with errors of input as one line and exit code 2 (--debug shows the traceback)."""
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        main(argv)
        if dist.is_available() and dist.is_initialized():  # all end together (rank 0 writes ckpt.pt last):
            dist.barrier()  # none tears down its process group while another still uses it
    except (ConfigError, TrainError) as e:
        if any(a == "--debug" or a.lower() == "--debug=true" for a in argv):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # a second Ctrl-C: saves are atomic, so the last checkpoint is whole
        print("interrupted; the last checkpoint in out_dir is whole", file=sys.stderr)
        return 130
    finally:  # main may end by an error with its own handlers still installed, or its process group
        for s, handler in handlers.items():
            signal.signal(s, handler)
        if dist.is_available() and dist.is_initialized():
            gc.collect()  # free fsdp's reference cycles now: freed in interpreter shutdown, they aborted
            dist.destroy_process_group()  # the process at exit (gloo; about 1 run in 25 before this)
    return 0


if __name__ == "__main__":
    sys.exit(cli(sys.argv[1:]))
