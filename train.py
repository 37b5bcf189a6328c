"""
Train a GPT on a prepared dataset: on a laptop CPU, one GPU, or many with torchrun.

  python train.py config/train_shakespeare_char_cpu.py --max_iters=500
  torchrun --standalone --nproc_per_node=8 train.py config/train_gpt2.py

Settings: the defaults below (TrainConfig, and GPTConfig in model.py for the architecture),
then a config file, then --key=value. `python train.py --help` lists them all.
Writes to out_dir: ckpt.pt (model, optimizer, settings, iteration) and metrics.jsonl (one JSON
object per log or eval line).
"""
import json
import math
import os
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
    seed: int = 1337                      # seeds weights, dropout and batch sampling
    peak_flops: float = 0.0               # device peak FLOP/s for MFU; 0 looks the GPU up in a table
    bench: int = 0                        # >0: time this many training steps and sampling, print the figures, save nothing


ARCH_KEYS = [k for k in GPTConfig.keys() if k not in ("attn_impl",)]
# settings that shape the weights: a checkpoint's values win over the command line for these
SHAPE_KEYS = [k for k in ARCH_KEYS if k not in ("dropout", "block_size")]


class TrainError(RuntimeError):
    """A problem with the user's data or settings; printed as one line."""


# -----------------------------------------------------------------------------------------------
# data

def resolve_dataset(dataset):
    path = dataset if os.path.isdir(dataset) else os.path.join("data", dataset)
    meta_path = os.path.join(path, "meta.json")
    if not os.path.isfile(meta_path):
        raise TrainError(f"dataset {dataset!r} not found (no {meta_path}); "
                         f"build it first, e.g. python prepare.py shakespeare_char")
    with open(meta_path, encoding="utf-8") as f:
        return path, json.load(f)


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
        muon = torch.optim.Muon([{"params": hidden, "base_lr": cfg["muon_lr"]}], lr=cfg["muon_lr"],
                                weight_decay=cfg["weight_decay"], momentum=cfg["muon_momentum"],
                                adjust_lr_fn="match_rms_adamw" if cfg["muon_match_adamw"] else "original")
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
    """(rank, local_rank, world_size); joins the process group when launched by torchrun."""
    if "RANK" not in os.environ:
        return 0, 0, 1
    rank, local_rank, world = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    backend = cfg["backend"]
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() and cfg["device"] in ("auto", "cuda") else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
        cfg["device"] = f"cuda:{local_rank}"
    dist.init_process_group(backend=backend)
    return rank, local_rank, world


# -----------------------------------------------------------------------------------------------
# checkpoints

def checkpoint_path(path):
    return os.path.join(path, "ckpt.pt") if os.path.isdir(path) else path


def load_checkpoint(path):
    path = checkpoint_path(path)
    if not os.path.isfile(path):
        raise TrainError(f"no checkpoint at {path}; train one first, or check init_from / out_dir")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise TrainError(f"could not read checkpoint {path} ({type(e).__name__}); it may be truncated") from None


def save_checkpoint(ckpt, out_dir):
    """Write to a temporary file, flush to disk, then rename: a crash leaves the old or the new file."""
    path = os.path.join(out_dir, "ckpt.pt")
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        torch.save(ckpt, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


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
        if changed:
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
# the run

def main(argv):
    cfg, explicit = parse_args(argv, [TrainConfig, GPTConfig], "train.py", __doc__.strip().splitlines()[0])
    rank, local_rank, world = setup_distributed(cfg)
    master = rank == 0
    device = pick_device(cfg["device"])
    device_type = "cuda" if device.startswith("cuda") else device
    dtype = pick_dtype(cfg["dtype"], device_type)
    if cfg["gradient_accumulation_steps"] % world:
        raise TrainError(f"gradient_accumulation_steps={cfg['gradient_accumulation_steps']} is not divisible "
                         f"by the {world} processes; make it a multiple of {world}")
    local_accum = cfg["gradient_accumulation_steps"] // world

    data_dir, meta = resolve_dataset(cfg["dataset"])
    check_data_length(data_dir, meta, cfg["block_size"])  # before building a model that size
    torch.manual_seed(cfg["seed"])  # the same initial weights on every process
    model, ckpt = build_model(cfg, explicit, meta["vocab_size"])
    block_size = model.config.block_size
    tokens_per_iter = cfg["gradient_accumulation_steps"] * cfg["batch_size"] * block_size
    torch.manual_seed(cfg["seed"] + rank)  # dropout differs per process; batches don't (see Batches)
    splits = {s: Batches(os.path.join(data_dir, f"{s}.bin"), meta["dtype"], block_size, cfg["batch_size"], device,
                         cfg["seed"] + (0 if s == "train" else 1)) for s in ("train", "val")}

    iter_num, best_val_loss = 0, float("inf")
    model.to(device)
    optimizer = make_optimizer(model, cfg, device_type)
    scaler = torch.amp.GradScaler(device_type, enabled=dtype == "float16")
    if cfg["init_from"] == "resume":
        optimizer.load_state_dict(ckpt["optimizer"])
        iter_num, best_val_loss = ckpt["iter_num"], ckpt["best_val_loss"]
        if "train_generator" in ckpt:
            splits["train"].generator.set_state(ckpt["train_generator"])
    ckpt = None  # free the loaded weights

    if master:
        os.makedirs(cfg["out_dir"], exist_ok=True)
        print(f"model: {model.config.n_layer} layers, {model.config.n_head} heads, {model.config.n_embd} wide, "
              f"block_size {block_size}, {model.config.norm}, {model.config.positions} positions, {model.config.mlp}")
        print(model.describe())
        print(f"tokens per iteration: {tokens_per_iter:,} ({world} process(es) x {local_accum} micro-batches "
              f"x {cfg['batch_size']} x {block_size}); device {device}, {dtype}")
    if device_type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    autocast = (torch.autocast(device_type=device_type, dtype=getattr(torch, dtype))
                if dtype != "float32" else nullcontext())
    raw_model = model
    if cfg["compile"]:
        model = torch.compile(model)
    if world > 1:
        model = DDP(model, device_ids=[local_rank] if device_type == "cuda" else None)

    metrics_mode = "a" if cfg["init_from"] == "resume" else "w"  # a resumed run continues its log
    writes = master and not cfg["bench"]  # a benchmark leaves no files
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
            for k in range(rank, cfg["eval_iters"], world):
                x, y = batches.get(starts[k])
                with autocast:
                    _, loss = model(x, y)
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
            x, y = splits["train"].get(starts)
            if world > 1:  # all-reduce gradients only after the last micro-batch
                model.require_backward_grad_sync = micro == len(micro_batches) - 1
            with autocast:
                _, loss = model(x, y, label_smoothing=cfg["label_smoothing"])
                loss = loss / len(micro_batches)
            scaler.scale(loss).backward()
            loss_sum += loss.detach()
        if cfg["grad_clip"] > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["grad_clip"])
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        return loss_sum

    def save(val_loss):
        save_checkpoint({"model": raw_model.state_dict(), "optimizer": optimizer.state_dict(),
                         "model_config": asdict(raw_model.config), "config": cfg, "iter_num": iter_num,
                         "best_val_loss": val_loss, "dataset_dir": os.path.abspath(data_dir),
                         "tokenizer": meta["tokenizer"], "train_generator": splits["train"].generator.get_state()},
                        cfg["out_dir"])

    peak = cfg["peak_flops"] or peak_flops_of(device_type)
    if cfg["bench"]:  # every process takes part in the timed steps; rank 0 reports
        benchmark(cfg, raw_model, train_step, splits["train"], local_accum, rank, tokens_per_iter, peak, device)
        return
    max_iters, start_iter = cfg["max_iters"], iter_num
    t_last, iters_since = time.time(), 0
    run_start = time.time()
    while True:
        just_resumed = cfg["init_from"] == "resume" and iter_num == start_iter  # evaluated before the stop
        if (iter_num % cfg["eval_interval"] == 0 or iter_num >= max_iters) and not just_resumed or cfg["eval_only"]:
            losses = estimate_loss()
            if master:
                print(f"step {iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
                log({"iter": iter_num, "tokens": iter_num * tokens_per_iter, "train/loss": losses["train"],
                     "val/loss": losses["val"], "elapsed_s": time.time() - run_start})
                if not cfg["eval_only"] and iter_num > start_iter and (
                        losses["val"] < best_val_loss or cfg["always_save_checkpoint"]):
                    best_val_loss = min(best_val_loss, losses["val"])
                    save(best_val_loss)
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

    if writes:
        metrics.close()
        if wandb_run is not None:
            wandb_run.finish()
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except (ConfigError, TrainError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
