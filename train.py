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
    init_from: str = "scratch"            # scratch | resume (out_dir/ckpt.pt) | PATH of a checkpoint to start from
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
    # learning-rate schedule: linear warmup, then cosine decay to min_lr
    decay_lr: bool = True                 # False keeps learning_rate constant after warmup
    warmup_iters: int = 100               # iterations of linear warmup
    lr_decay_iters: int = 0               # iteration where the cosine reaches min_lr; 0 means max_iters
    min_lr: float = 6e-5                  # floor of the schedule, about learning_rate / 10
    # system
    device: str = "auto"                  # auto | cpu | cuda | cuda:N | mps
    dtype: str = "auto"                   # auto | float32 | bfloat16 | float16 (auto: bfloat16 on CUDA if supported, else float32)
    compile: bool = False                 # torch.compile the model (worth it on GPUs)
    backend: str = "auto"                 # torch.distributed backend: auto (nccl on CUDA, gloo on CPU) | nccl | gloo
    seed: int = 1337                      # seeds weights, dropout and batch sampling
    peak_flops: float = 0.0               # device peak FLOP/s for MFU; 0 looks the GPU up in a table
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

def make_optimizer(model, cfg, device_type):
    """AdamW; weight decay only on matrices (linear weights, embeddings), not on biases and norms."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg["weight_decay"]},
              {"params": no_decay, "weight_decay": 0.0}]
    # the fused kernel does the whole update in one pass; available on CUDA and, lately, CPU
    kwargs = dict(lr=cfg["learning_rate"], betas=(cfg["beta1"], cfg["beta2"]))
    try:
        return torch.optim.AdamW(groups, fused=device_type in ("cuda", "cpu"), **kwargs)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(groups, foreach=True, **kwargs)


def get_lr(it, cfg):
    """Linear warmup for warmup_iters, then cosine decay to min_lr at lr_decay_iters."""
    lr, min_lr, warmup = cfg["learning_rate"], cfg["min_lr"], cfg["warmup_iters"]
    decay_iters = cfg["lr_decay_iters"] or cfg["max_iters"]
    if it < warmup:
        return lr * (it + 1) / (warmup + 1)
    if not cfg["decay_lr"]:
        return lr
    if it >= decay_iters:
        return min_lr
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
        ckpt = load_checkpoint(cfg["out_dir"] if cfg["init_from"] == "resume" else cfg["init_from"])
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
    if world > 1:
        raise TrainError(f"{task} datasets train in one process; run train.py without torchrun")
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


def save_adapters(model, cfg):
    """With LoRA, also write adapters.pt: only the adapters and the head (small), plus the model
    config and the base checkpoint they apply to."""
    if not model.config.lora_rank:
        return
    from model import lora_state_dict
    base = cfg["init_from"] if cfg["init_from"] not in ("resume", "scratch") else cfg.get("lora_base", "")
    cfg["lora_base"] = base  # a resumed run keeps pointing at the original base checkpoint
    torch.save({"adapters": lora_state_dict(model), "model_config": asdict(model.config), "config": cfg,
                "base": os.path.abspath(checkpoint_path(base)) if base else ""},
               os.path.join(cfg["out_dir"], "adapters.pt"))


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
    task = setup_task(cfg, meta, world)
    if task == "lm":
        check_data_length(data_dir, meta, cfg["block_size"])  # before building a model that size
    torch.manual_seed(cfg["seed"])  # the same initial weights on every process
    wanted = {k: cfg[k] for k in ADAPT_KEYS}  # build_model overwrites them with the checkpoint's
    model, ckpt = build_model(cfg, explicit, meta["vocab_size"])
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
        print(f"model: {model.get_num_params() / 1e6:.2f}M parameters, {model.config.n_layer} layers, "
              f"{model.config.n_head} heads, {model.config.n_embd} wide, block_size {block_size}")
        print(f"tokens per iteration: {tokens_per_iter:,} ({world} process(es) x {local_accum} micro-batches "
              f"x {cfg['batch_size']} x {block_size}); device {device}, {dtype}")
        if task != "lm" or cfg["trainable"] != "all" or model.config.lora_rank:
            print(trainable_line)
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
    metrics = open(os.path.join(cfg["out_dir"], "metrics.jsonl"), metrics_mode) if master else None
    wandb_run = None
    if cfg["wandb_log"] and master:
        import wandb
        wandb_run = wandb.init(project=cfg["wandb_project"], name=cfg["wandb_run_name"], config=cfg,
                               dir=cfg["out_dir"])

    def log(record):
        if master:
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
            batch = splits["train"].get(starts)  # (x, y); classify: (x, lengths, labels)
            if world > 1:  # all-reduce gradients only after the last micro-batch
                model.require_backward_grad_sync = micro == len(micro_batches) - 1
            with autocast:
                if loss_fn is None:
                    _, loss = model(*batch, label_smoothing=cfg["label_smoothing"])
                else:
                    _, loss = loss_fn(batch)
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

    loss_fn = task_loss_fn(raw_model, cfg, meta, task, device)
    if task != "lm":
        estimate_loss = task_evaluator(raw_model, splits, cfg, autocast)  # noqa: F811 (whole examples, all of val)
    peak = cfg["peak_flops"] or peak_flops_of(device_type)
    max_iters, start_iter = cfg["max_iters"], iter_num
    t_last, iters_since = time.time(), 0
    run_start = time.time()
    while True:
        just_resumed = cfg["init_from"] == "resume" and iter_num == start_iter  # evaluated before the stop
        if (iter_num % cfg["eval_interval"] == 0 or iter_num >= max_iters) and not just_resumed or cfg["eval_only"]:
            losses = estimate_loss()
            if master:
                extra = {k: v for k, v in losses.items() if "/" in k}  # a task's val metrics
                print(f"step {iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}"
                      + "".join(f", {k} {v:.4f}" for k, v in extra.items()))
                log({"iter": iter_num, "tokens": iter_num * tokens_per_iter, "train/loss": losses["train"],
                     "val/loss": losses["val"], **extra, "elapsed_s": time.time() - run_start})
                if not cfg["eval_only"] and iter_num > start_iter and (
                        losses["val"] < best_val_loss or cfg["always_save_checkpoint"]):
                    best_val_loss = min(best_val_loss, losses["val"])
                    save(best_val_loss)
                    save_adapters(raw_model, cfg)
                    print(f"saved checkpoint to {cfg['out_dir']}")
            t_last, iters_since = time.time(), 0  # evaluation time is not training time
        if iter_num >= max_iters or cfg["eval_only"]:
            break

        lr = get_lr(iter_num, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
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

    if task != "lm" and master and not cfg["eval_only"]:
        record = task_test(raw_model, splits, cfg, autocast, iter_num)
        print("test (final model): " + ", ".join(f"{k[5:]} {v:.4f}" for k, v in record.items() if k != "iter"))
        log(record)
    if master:
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
