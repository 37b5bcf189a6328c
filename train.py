"""
Train a GPT on a prepared dataset: on a laptop CPU, one GPU, or many with torchrun.

  python train.py config/train_shakespeare_char_cpu.py --max_iters=500
  torchrun --standalone --nproc_per_node=8 train.py config/train_gpt2.py

Settings: the defaults below (TrainConfig, and GPTConfig in model.py for the architecture),
then a config file, then --key=value. `python train.py --help` lists them all.
Writes to out_dir: ckpt.pt (model, optimizer, settings, iteration, random states; see checkpoint.py),
ckpt.json (a JSON summary of it) and metrics.jsonl (one JSON object per log or eval line). With
parallel=fsdp the weights and optimizer state also go to ckpt-ITER.dcp/, one file per process, and
ckpt.pt has no optimizer.

Never lose a run: checkpoints are written whole or not at all (temporary file, fsync, rename), and
--init_from=resume continues exactly where the checkpoint left off (same losses, bit for bit on CPU
float32). SIGTERM or Ctrl-C finishes the step, saves, and prints the command that resumes. A nan or
inf loss stops the run (nan_policy=skip drops the step instead) and never overwrites a good
checkpoint. To resume with a larger max_iters on the same schedule, set lr_decay_iters: its default
0 means "max_iters", so the cosine would stretch to the new end.

How the file reads: TrainConfig; the dataset checks and the batch sampler; the settings checks; the
model (built, loaded, given a task head or adapters); Run, which holds a run's whole state and does
one thing per method (evaluate, step, save, log); and train(), the loop: evaluate -> maybe save ->
step -> log. The settings are read, never written: what a run learns about itself (the architecture
actually trained, the task's labels) is in Run.facts and saved beside them. Optimizers and the
learning-rate schedule are in optim.py, devices and processes in runtime.py, the checkpoint format
in checkpoint.py.
"""
import contextlib
import functools
import hashlib
import json
import math
import os
import shlex
import signal
import sys
import time
from dataclasses import asdict, dataclass

from common import yield_idle_cores
yield_idle_cores()  # before torch loads OpenMP

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel as DDP

import runtime
from benchmarks import (TRAIN_TASKS, benchmark_questions, benchmark_scores, bits_per_byte, check_task_names,
                        nats_and_bytes, token_bytes, totals_on)
from checkpoint import (describe_tokenizer, load_sharded, lora_state_dict, model_from_checkpoint, resume_changes,
                        rng_state, save_adapters, save_checkpoint, save_sharded, set_rng_state)
from common import UserError, description, first_line, hold_folder, read_meta, run_cli
from configurator import parse_args
from decoding import generate_batch, weight_bytes_per_token
from hf import load_source
from model import GPT, GPTConfig, preset_config, z_losses
from optim import get_lr, make_optimizer, set_lr


@dataclass
class TrainConfig:
    # I/O
    out_dir: str = "out"                  # checkpoints and metrics.jsonl are written here
    init_from: str = "scratch"            # scratch | resume (out_dir/ckpt.pt) | PATH of a checkpoint or Hugging Face folder | gpt2*
    preset: str = ""                      # start the architecture from a preset of model.py (gpt2, llama3-tiny, ...)
    eval_interval: int = 250              # evaluate train/val loss every this many iterations
    eval_iters: int = 20                  # batches per split in each evaluation
    eval_only: bool = False               # evaluate once and exit
    eval_at_start: bool = True            # evaluate the starting model too (a speedrun, whose clock counts evaluations, skips it)
    eval_tasks: str = ""                  # also at every evaluation, eval.py's benchmarks: cloze | mc | hellaswag, logged as TASK/acc
    eval_examples: int = 200              # questions per eval_tasks benchmark, the same ones at every evaluation
    eval_mc_file: str = ""                # the {"context", "choices", "label"} JSONL that eval_tasks=mc reads
    log_interval: int = 10                # print a log line every this many iterations
    always_save_checkpoint: bool = False  # save at every evaluation, not only when val loss improves
    overwrite: bool = False               # let a new run (init_from other than resume) replace the checkpoint in out_dir
    wandb_log: bool = False               # also log to Weights & Biases (WANDB_MODE=offline works offline)
    wandb_project: str = "gpt"            # wandb project name
    wandb_run_name: str = "run"           # wandb run name
    keep_checkpoints: int = 0             # also keep ckpt-ITER.pt of the last N saves (hard links); 0: only ckpt.pt
    nan_policy: str = "stop"              # on a nan/inf loss: stop (keeping the last checkpoint) | skip that step
    debug: bool = False                   # on an error, show the full traceback instead of one line
    # data
    dataset: str = "shakespeare_char"     # a folder under data/ made by prepare.py, or a path to one
    batch_size: int = 12                  # sequences per micro-batch (per process)
    objective: str = "clm"                # clm: predict each next token | mlm: BERT's masked tokens (an encoder, causal=False)
    mlm_prob: float = 0.15                # mlm: share of positions chosen (80% masked, 10% a random token, 10% kept)
    gradient_accumulation_steps: int = 1  # micro-batches per optimizer step, summed over all processes
    # optimizer: AdamW
    learning_rate: float = 6e-4           # peak learning rate
    embedding_lr: float = 0.0             # peak learning rate of the token embedding (and a head tied to it); 0: learning_rate
    max_iters: int = 5000                 # optimizer steps in the whole run
    weight_decay: float = 0.1             # AdamW decay of weight matrices and embeddings (none on biases, norm gains)
    beta1: float = 0.9                    # AdamW beta1
    beta2: float = 0.95                   # AdamW beta2
    grad_clip: float = 1.0                # clip the gradient's global norm to this; 0 disables
    label_smoothing: float = 0.0          # cross-entropy label smoothing, as torch's F.cross_entropy
    z_loss: float = 0.0                   # weight of PaLM's z-loss, log^2 of the softmax normaliser (1e-4 in PaLM)
    max_z_loss: float = 0.0               # weight of Baichuan 2's max-z loss, the squared largest logit (2e-4 there)
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
    dtype: str = "auto"                   # auto | float32 | bfloat16 | float16 (auto: bfloat16 on CUDA and on CPUs with native bf16, else float16 on CUDA, float32 on CPU)
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
    # preference tuning (DPO) on datasets of prepare.py --task preference; see dpo.py
    dpo_beta: float = 0.1                 # beta: the reward's scale; higher keeps the policy closer to the reference
    dpo_loss: str = "sigmoid"             # sigmoid (DPO; with label smoothing, conservative DPO) | robust (Robust DPO)
    dpo_label_smoothing: float = 0.0      # the share of pairs taken to be mislabelled
    rpo_alpha: float = 0.0                # weight of the chosen answers' cross-entropy added to the DPO loss (RPO)
    dpo_reference: str = ""               # the reference checkpoint; "": init_from (trainable=lora: the model, adapters off)
    # reinforcement learning with verifiable rewards (GRPO); see grpo.py and rewards.py
    rl_task: str = ""                     # arithmetic: train by GRPO on this task's rewards (the dataset gives the tokenizer)
    grpo_group: int = 8                   # completions sampled per prompt (batch_size prompts per micro-batch)
    grpo_clip: float = 0.2                # epsilon of the clipped probability ratio
    grpo_updates: int = 1                 # optimizer steps on each batch of completions (mu); above 1 the clip bites
    kl_beta: float = 0.0                  # weight of KL(policy || starting checkpoint); 0 holds no reference
    rl_temperature: float = 1.0           # temperature the completions are sampled at
    rl_max_new_tokens: int = 8            # the longest completion, in tokens
    rl_format_reward: float = 0.0         # added to the reward of a well-formed completion


ARCH_KEYS = [k for k in GPTConfig.keys() if k not in ("attn_impl",)]
# added to a loaded model by adapt_model (a head, adapters) rather than read from its checkpoint
ADAPT_KEYS = ("n_classes", "lora_rank", "lora_alpha", "lora_dropout", "lora_targets")
# settings that shape the weights: a checkpoint's values win over the command line for these
SHAPE_KEYS = [k for k in ARCH_KEYS if k not in ("dropout", "block_size") and k not in ADAPT_KEYS]
LORA_TARGETS = {"attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"}


# -----------------------------------------------------------------------------------------------
# data

def resolve_dataset(dataset):
    """The dataset's folder (a path, or a name under data/) and its meta.json, checked."""
    path = dataset if os.path.isdir(dataset) else os.path.join("data", dataset)
    if os.path.isfile(dataset) or os.path.isfile(path):
        raise UserError(f"dataset {dataset!r} is a file; name a folder made by prepare.py (holding meta.json, "
                        f"train.bin and val.bin), or its name under data/")
    if not os.path.isdir(path):
        raise UserError(f"dataset {dataset!r} not found (no {os.path.join(path, 'meta.json')}); "
                        f"build it first, e.g. python prepare.py shakespeare_char")
    meta = read_meta(path)
    meta_path = os.path.join(path, "meta.json")
    if any(k not in meta for k in ("vocab_size", "dtype", "tokenizer")):
        raise UserError(f"{meta_path} lacks vocab_size, dtype or tokenizer; re-run prepare.py")
    try:
        dtype = np.dtype(meta["dtype"])
    except TypeError:
        dtype = None
    if dtype is None or dtype.kind != "u":
        raise UserError(f"{meta_path} names dtype {meta['dtype']!r}, not an unsigned integer type; re-run prepare.py")
    if not isinstance(meta["vocab_size"], int) or meta["vocab_size"] < 1:
        raise UserError(f"{meta_path} has vocab_size {meta['vocab_size']!r}; re-run prepare.py")
    from tokenizer import vocab_size_of  # what sample.py will decode with must cover every id the model can emit
    n = vocab_size_of(meta["tokenizer"], path)
    if n != meta["vocab_size"]:
        raise UserError(f"{meta_path} says vocab_size {meta['vocab_size']} but its tokenizer has {n} tokens; "
                        f"re-run prepare.py")
    return path, meta


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
            raise UserError(f"{path} is missing; re-run prepare.py for this dataset")
        size = os.path.getsize(path)
        if size == 0 or size % dtype.itemsize:
            raise UserError(f"{path} is {size:,} bytes, not a whole number of {dtype.name} tokens; it is truncated "
                             f"or does not belong to this meta.json; re-run prepare.py")
        top = largest_token(path, dtype)
        if top >= meta["vocab_size"]:
            raise UserError(f"{path} holds token id {top} but meta.json's vocab_size is {meta['vocab_size']}; "
                             f"the bins and meta.json disagree; re-run prepare.py")


def check_data_length(data_dir, meta, block_size):
    for split in ("train", "val"):
        path = os.path.join(data_dir, f"{split}.bin")
        if not os.path.isfile(path):
            raise UserError(f"{path} is missing; re-run prepare.py for this dataset")
        n = os.path.getsize(path) // np.dtype(meta["dtype"]).itemsize
        if n < block_size + 1:
            raise UserError(f"{path} has {n} tokens, fewer than block_size+1 = {block_size + 1}; "
                             f"lower block_size or use more data")


def mlm_corrupt(x, mask_id, prob, generator):
    """BERT's cloze task on token ids x (B, T): each position is chosen with probability prob (at least
    one a row, or a short batch could have no loss); a chosen token becomes mask_id 80% of the time,
    a random token 10% (ids below mask_id, the tokenizer's own) and stays itself 10%, so the model
    cannot learn that only [MASK] needs predicting. Returns (inputs, targets): targets are x where
    chosen, -1 (no loss) elsewhere."""
    B, T = x.shape
    chosen = torch.rand(B, T, generator=generator) < prob
    none = ~chosen.any(dim=1)
    chosen[none.nonzero()[:, 0], torch.randint(T, (int(none.sum()),), generator=generator)] = True
    u = torch.rand(B, T, generator=generator)
    inputs = x.clone()
    inputs[chosen & (u < 0.8)] = mask_id
    swap = chosen & (u >= 0.8) & (u < 0.9)
    inputs[swap] = torch.randint(mask_id, (int(swap.sum()),), generator=generator)
    return inputs, x.masked_fill(~chosen, -1)


class Batches:
    """Random (x, y) windows of block_size tokens from a token .bin, y shifted by one; with mlm
    (mask_id, prob), x masked and y the hidden tokens (mlm_corrupt).

    A torch.Generator with a fixed seed draws the start positions, the same on every process, so
    a run split over N processes sees exactly the batches of a 1-process run; each process takes
    its own share of the micro-batches of a step. The masks are a function of a micro-batch's
    starts and the seed, so they too are the same on every process, on a resume, and at every
    evaluation of the same batches.
    """

    def __init__(self, path, dtype, block_size, batch_size, device, seed, mlm=None):
        self.data = np.memmap(path, dtype=dtype, mode="r")
        self.block_size, self.batch_size, self.device = block_size, batch_size, device
        self.offsets = np.arange(block_size + 1)
        self.generator = torch.Generator().manual_seed(seed)
        self.seed, self.mlm = seed, mlm

    def draw(self, n):
        """Start positions for n micro-batches: (n, batch_size)."""
        high = len(self.data) - self.block_size
        return torch.randint(high, (n, self.batch_size), generator=self.generator).numpy()

    def get(self, starts):
        """The (x, y) pair for one micro-batch of start positions."""
        xy = torch.from_numpy(self.data[starts[:, None] + self.offsets].astype(np.int64))  # (B, T+1)
        x, y = xy[:, :-1], xy[:, 1:]
        if self.mlm is not None:
            digest = hashlib.blake2b(np.ascontiguousarray(starts, dtype=np.int64).tobytes() +
                                     self.seed.to_bytes(8, "little", signed=True), digest_size=8).digest()
            x, y = mlm_corrupt(x, *self.mlm, torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1))
        if self.device.startswith("cuda"):
            return x.pin_memory().to(self.device, non_blocking=True), y.pin_memory().to(self.device, non_blocking=True)
        return x.to(self.device), y.to(self.device)


# -----------------------------------------------------------------------------------------------
# settings: checked before joining the process group, so a bad one fails at once instead of hanging
# in a collective

# (key, lowest value allowed, whether the lowest is excluded): settings outside these ranges would fail
# later with a traceback or train silently on nonsense (a loss of nan from eval_iters=0)
RANGES = [("batch_size", 1, False), ("gradient_accumulation_steps", 1, False), ("block_size", 1, False),
          ("max_iters", 0, False), ("eval_interval", 1, False), ("eval_iters", 1, False), ("log_interval", 1, False),
          ("learning_rate", 0, True), ("min_lr", 0, False), ("warmup_iters", 0, False), ("lr_decay_iters", 0, False),
          ("warmdown_iters", 0, False), ("weight_decay", 0, False), ("grad_clip", 0, False), ("bench", 0, False),
          ("label_smoothing", 0, False), ("z_loss", 0, False), ("max_z_loss", 0, False), ("dropout", 0, False), ("muon_lr", 0, True), ("keep_checkpoints", 0, False),
          ("eval_examples", 1, False), ("grpo_group", 1, False), ("grpo_clip", 0, True), ("grpo_updates", 1, False),
          ("kl_beta", 0, False), ("rl_temperature", 0, True), ("rl_max_new_tokens", 1, False)]
CHOICES = {"objective": ("clm", "mlm"), "nan_policy": ("stop", "skip"), "parallel": ("ddp", "fsdp"),
           "optimizer": ("adamw", "muon"), "lr_schedule": ("cosine", "wsd"), "trainable": ("all", "last_blocks", "lora")}


def check_values(cfg):
    """Every number in its range and every choice among its options, or one line naming the key."""
    for key, low, excluded in RANGES:
        if cfg[key] < low or (excluded and cfg[key] == low):
            raise UserError(f"{key} must be {'>' if excluded else '>='} {low}, got {cfg[key]}")
    if not 0 < cfg["mlm_prob"] < 1:
        raise UserError(f"mlm_prob must be between 0 and 1, got {cfg['mlm_prob']}")
    for key in ("label_smoothing", "dropout"):
        if cfg[key] >= 1:
            raise UserError(f"{key} must be below 1, got {cfg[key]}")
    for key, allowed in CHOICES.items():
        if cfg[key] not in allowed:
            raise UserError(f"{key}={cfg[key]!r} is not one of {', '.join(allowed)}")


def check_run_settings(cfg):
    check_values(cfg)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if cfg["gradient_accumulation_steps"] % world:
        raise UserError(f"gradient_accumulation_steps={cfg['gradient_accumulation_steps']} is not divisible "
                        f"by the {world} processes; make it a multiple of {world}")
    if cfg["parallel"] == "fsdp" and not torch.distributed.is_available():
        raise UserError("parallel=fsdp needs torch.distributed, which this build of torch lacks; use parallel=ddp")
    if cfg["parallel"] == "fsdp" and cfg["optimizer"] == "muon":
        raise UserError("optimizer=muon does not work with parallel=fsdp: Muon orthogonalises whole matrices, which "
                        "fsdp splits over the processes; use optimizer=adamw or parallel=ddp")
    if cfg["trainable"] == "last_blocks" and cfg["trainable_blocks"] < 1:
        raise UserError(f"trainable_blocks must be >= 1, got {cfg['trainable_blocks']}")
    if cfg["trainable"] == "lora" and cfg["lora_rank"] < 1:
        raise UserError("trainable=lora needs lora_rank >= 1 (e.g. --lora_rank=8)")
    if cfg["lora_rank"] < 0 or cfg["lora_alpha"] <= 0 or not 0 <= cfg["lora_dropout"] < 1:
        raise UserError("lora_rank must be >= 0, lora_alpha > 0 and lora_dropout in [0, 1)")
    if "mc" in check_task_names(cfg["eval_tasks"], TRAIN_TASKS, "eval_tasks") and not cfg["eval_mc_file"]:
        raise UserError("eval_tasks=mc needs eval_mc_file=FILE, a JSONL of {\"context\", \"choices\", \"label\"}")
    targets = [t.strip() for t in cfg["lora_targets"].split(",") if t.strip()]
    if not targets or set(targets) - LORA_TARGETS:
        raise UserError(f"lora_targets={cfg['lora_targets']!r}: a comma-separated list of "
                        f"{', '.join(sorted(LORA_TARGETS))}")


def check_runtime(cfg, rt):
    if cfg["parallel"] == "fsdp" and rt.device_type not in ("cuda", "cpu"):
        raise UserError(f"parallel=fsdp runs on CUDA or CPU, not {rt.device_type}; use parallel=ddp")
    if cfg["parallel"] == "fsdp" and rt.dtype == "float16":  # GradScaler would find infs in each process's shards alone
        raise UserError("parallel=fsdp trains in bfloat16 or float32: float16's loss scaling does not work on "
                        "sharded gradients; set --dtype=bfloat16 (or float32), or use parallel=ddp")


def task_facts(cfg, meta, world):
    """What the dataset's task adds to the run (nothing for language modelling): its name and, to
    classify, the classes. Refuses settings the task cannot take."""
    task = meta.get("task", "lm")
    if task == "lm" and cfg["rl_task"]:
        task = "grpo"
    elif cfg["rl_task"]:
        raise UserError(f"rl_task takes its tokenizer from a language-model dataset, not a {task} one; e.g. "
                        f"python prepare.py {cfg['rl_task']} and --dataset={cfg['rl_task']}")
    if task == "lm":
        return {}
    if task not in ("classify", "instruct", "preference", "grpo"):
        raise UserError(f"dataset {cfg['dataset']!r} has unknown task {task!r}; re-run prepare.py")
    if world > 1 or cfg["parallel"] == "fsdp":
        what = "rl_task runs" if task == "grpo" else f"{task} datasets train"
        raise UserError(f"{what} in one process; run train.py without torchrun and parallel=fsdp")
    if cfg["pack"] and task != "instruct":
        raise UserError("pack=True applies to instruct datasets only")
    if task in ("preference", "grpo") and cfg["init_from"] == "scratch":
        raise UserError(f"{'DPO' if task == 'preference' else 'GRPO'} starts from a trained model (its reference): "
                        f"set init_from to a checkpoint")
    if task == "preference":
        from dpo import check_settings
        check_settings(cfg)
        return {"task": task}
    if task == "grpo":
        from rewards import make_task
        make_task(cfg["rl_task"])  # a known task, or one line
        return {"task": task, "rl_task": cfg["rl_task"]}
    if cfg["cls_lm_weight"] < 0:
        raise UserError(f"cls_lm_weight must be >= 0, got {cfg['cls_lm_weight']}")
    if task == "instruct":
        return {"task": task}
    names = list(meta["label_names"])
    return {"task": task, "n_classes": len(names), "label_names": names,
            "positive_id": names.index(meta["positive_class"])}


def check_objective(cfg, task, config, meta):
    """An encoder (causal=False) learns by masked language modelling and fine-tunes to classify; a
    decoder learns by next-token prediction. Refuses the pairings that would train on nonsense."""
    encoder = not config.causal
    if cfg["objective"] == "mlm" and task != "lm":
        raise UserError(f"objective=mlm trains on a language-model dataset, not a {task} one; an encoder "
                        f"fine-tunes on classify data with objective=clm (the default)")
    if task == "lm" and cfg["objective"] == "mlm" and not encoder:
        raise UserError("objective=mlm trains an encoder: set causal=False (a causal model cannot see the "
                        "tokens after a mask)")
    if task == "lm" and encoder and cfg["objective"] != "mlm":
        raise UserError("an encoder (causal=False) sees every next token, so next-token prediction would teach "
                        "it to copy; set objective=mlm")
    if encoder and task not in ("lm", "classify"):
        raise UserError(f"an encoder (causal=False) does not generate, so it cannot train on {task} data; "
                        f"fine-tune it on a classify dataset")
    if cfg["objective"] == "mlm" and meta["tokenizer"].get("mask_token") is None:
        raise UserError(f"dataset {cfg['dataset']!r} has no mask token; prepare it again with --mask_token")
    if encoder and (cfg["cls_lm_weight"] or cfg["eval_tasks"] or meta.get("rl_task")):
        what = ("cls_lm_weight" if cfg["cls_lm_weight"] else "eval_tasks" if cfg["eval_tasks"]
                else "a task corpus's accuracy")
        raise UserError(f"{what} scores next tokens, which an encoder (causal=False) can see; drop it")


# -----------------------------------------------------------------------------------------------
# the model: built or loaded, then given what the task needs

def new_config(cfg, explicit, vocab_size, n_classes):
    """The GPTConfig of a model trained from scratch: the settings (or a preset, which the settings
    given explicitly override), the dataset's vocabulary, the task's classes."""
    arch = {k: cfg[k] for k in ARCH_KEYS}
    if cfg["preset"]:
        arch = asdict(preset_config(cfg["preset"], **{k: cfg[k] for k in ARCH_KEYS if k in explicit}))
    arch.update(vocab_size=vocab_size, n_classes=n_classes)
    return GPTConfig(**arch)


def build_model(cfg, explicit, meta, n_classes):
    """A new model, or one whose weights come from a checkpoint; returns (model, checkpoint or None)."""
    if cfg["init_from"] == "scratch":
        try:
            return GPT(new_config(cfg, explicit, meta["vocab_size"], n_classes)), None
        except ValueError as e:  # a shape model.py refuses, e.g. n_embd not divisible by n_head
            raise UserError(f"the model's settings do not fit together: {e}") from None
    missing = cfg["init_from"] != "resume" and not os.path.exists(cfg["init_from"])
    maker = config_writing(cfg["init_from"]) if missing else None
    if maker:  # e.g. a fine-tuning config whose base model is trained by another config first
        raise UserError(f"no checkpoint at {cfg['init_from']}; train it first: python train.py {maker}")
    ckpt = load_source(cfg["init_from"], cfg["out_dir"])  # ours, a Hugging Face folder or a gpt2* name
    if ckpt.get("quantization"):
        raise UserError(f"the checkpoint is quantized ({ckpt['quantization']}, by quantize.py) for inference; "
                        f"train from the float checkpoint it was made from")
    arch = dict(ckpt["model_config"])
    if arch["vocab_size"] != meta["vocab_size"]:
        raise UserError(f"the checkpoint's vocabulary has {arch['vocab_size']} tokens but dataset "
                        f"{cfg['dataset']!r} has {meta['vocab_size']}; use a dataset built with the same tokenizer")
    changed = [k for k in SHAPE_KEYS if k in explicit and cfg[k] != arch[k]]
    if changed and cfg["init_from"] != "resume":  # a resume refuses them instead (resume_changes)
        print(f"note: keeping the checkpoint's {', '.join(changed)} (they shape the weights)")
    arch["dropout"] = cfg["dropout"]
    model = GPT(GPTConfig.from_dict(arch))
    model.load_state_dict(ckpt["model"])
    if cfg["block_size"] < model.config.block_size and (cfg["init_from"] != "resume" or "block_size" in explicit):
        model.crop_block_size(cfg["block_size"])
    return model, ckpt


def config_writing(out_dir):
    """The config file of this repository whose run writes out_dir, if one does (config/NAME.py)."""
    from configurator import read_config_file
    folder = os.path.join(os.path.dirname(os.path.abspath(__file__)), "config")
    for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        if name.endswith(".py") and read_config_file(os.path.join(folder, name)).get("out_dir") == \
                os.path.normpath(out_dir):
            return f"config/{name}"
    return None


def check_same_vocabulary(ckpt, meta, dataset):
    """Fine-tuning needs the token ids to mean what they meant to the checkpoint."""
    if ckpt.get("tokenizer") and ckpt["tokenizer"] != meta["tokenizer"]:  # None: imported weights, vocab size checked
        raise UserError(f"the checkpoint's tokenizer ({describe_tokenizer(ckpt['tokenizer'])}) differs from dataset "
                        f"{dataset!r}'s ({describe_tokenizer(meta['tokenizer'])}); use a dataset built with the "
                        f"checkpoint's tokenizer")


def adapt_model(model, cfg, task, n_classes):
    """Give a built or loaded model what the run needs (classification head of n_classes, LoRA adapters
    as the settings ask), then freeze what cfg["trainable"] keeps fixed; returns a line with the
    trainable-parameter count."""
    try:
        if task == "classify" and model.config.n_classes == 0:  # e.g. from a language-model checkpoint
            model.add_classifier(n_classes)
        elif task == "classify" and model.config.n_classes != n_classes:
            raise UserError(f"the checkpoint's head has {model.config.n_classes} classes but dataset "
                            f"{cfg['dataset']!r} has {n_classes}")
        if cfg["lora_rank"] and not model.config.lora_rank:
            model.add_lora(cfg["lora_rank"], cfg["lora_alpha"], cfg["lora_dropout"], cfg["lora_targets"])
    except ValueError as e:
        raise UserError(str(e)) from None
    mode = cfg["trainable"]
    n_layer = model.config.n_layer
    last = tuple(f"transformer.h.{i}." for i in range(max(0, n_layer - cfg["trainable_blocks"]), n_layer))
    for name, p in model.named_parameters():
        if mode == "all":
            keep = True
        elif mode == "lora":
            keep = ".lora_" in name or (task == "classify" and name.startswith("cls_head."))
        else:  # last_blocks: the top of the network and whichever head the task reads
            keep = name.startswith(last + ("transformer.ln_f.",)) or (
                name.startswith("cls_head.") if task == "classify" and model.config.n_classes
                else p is model.lm_head.weight)
        p.requires_grad_(keep)
    n_total = sum(p.numel() for p in model.parameters())
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return f"trainable: {n_train:,} of {n_total:,} parameters ({100 * n_train / n_total:.2f}%), trainable={mode}"


def model_is_finite(model):
    """Of this process's weights: with fsdp, its own shards (to_local), so the processes must combine them."""
    return all(bool(torch.isfinite(p.to_local() if hasattr(p, "to_local") else p).all()) for p in model.parameters())


# -----------------------------------------------------------------------------------------------
# a run's state

class Run:
    """One training run in one object: the settings (read, never written), where it runs (rt), the data
    (splits), the model (raw_model; model is what the steps call: compiled, or wrapped in DDP), the
    optimizer and grad scaler, the counters, the log, and what the run learns about itself (facts:
    the architecture actually trained, the task's classes), which every checkpoint records."""

    def __init__(self, cfg, explicit, argv):
        self.cfg, self.argv = cfg, argv
        check_run_settings(cfg)
        self.sharded = cfg["parallel"] == "fsdp"
        self.rt = runtime.start(cfg["device"], cfg["dtype"], cfg["backend"], group=self.sharded)
        check_runtime(cfg, self.rt)
        self.data_dir, self.meta = resolve_dataset(cfg["dataset"])
        self.facts = task_facts(cfg, self.meta, self.rt.world)
        self.task = self.facts.get("task", "lm")
        if self.task == "lm":
            check_data_length(self.data_dir, self.meta, cfg["block_size"])  # before building a model that size
            check_bins(self.data_dir, self.meta)
        self.resuming = cfg["init_from"] == "resume"
        ckpt = self.build(explicit)
        self.open_data()
        self.benchmarks = self.open_benchmarks()
        if self.sharded:  # before the optimizer, which must hold the sharded parameters
            runtime.shard_model(self.raw_model, self.rt, cfg["compile"])
        else:
            self.raw_model.to(self.rt.device)
        if self.reference is not None and self.reference.model is not None:
            self.reference.model.to(self.rt.device)
        self.attention_note = self.choose_attention_dtype()
        self.optimizer = make_optimizer(self.raw_model, cfg, self.rt.device_type)
        self.scaler = torch.amp.GradScaler(self.rt.device_type, enabled=self.rt.dtype == "float16")
        self.iter_num, self.best_val_loss, self.skipped, self.resumed_evaluated = 0, float("inf"), 0, True
        self.started = time.time()  # elapsed_s in the log counts from here (train() restarts it)
        if self.resuming:
            self.restore(ckpt)
        self.start_iter = self.iter_num
        self.announce()
        self.model = self.raw_model
        if cfg["compile"] and not self.sharded:  # fsdp compiled the blocks
            self.model = torch.compile(self.model)
        if self.rt.world > 1 and not self.sharded:
            self.model = DDP(self.model, device_ids=[self.rt.local_rank] if self.rt.device_type == "cuda" else None)
        self.open_logs()

    def build(self, explicit):
        """The model with the task's head and adapters, frozen as trainable says; returns the
        checkpoint it came from (None from scratch)."""
        cfg = self.cfg
        torch.manual_seed(cfg["seed"])  # the same initial weights on every process
        n_classes = self.facts.get("n_classes", cfg["n_classes"])
        model, ckpt = build_model(cfg, explicit, self.meta, n_classes)
        check_objective(cfg, self.task, model.config, self.meta)
        self.changed = resume_changes(cfg, explicit, ckpt, self.meta) if self.resuming else []
        if ckpt is not None and not self.resuming:
            check_same_vocabulary(ckpt, self.meta, cfg["dataset"])
        had_adapters = bool(model.config.lora_rank)
        self.trainable_line = adapt_model(model, cfg, self.task, n_classes)
        self.facts.update({k: getattr(model.config, k) for k in ARCH_KEYS})  # the architecture actually trained
        if model.config.lora_rank:  # the checkpoint the adapters apply to, kept through resumes
            base = ckpt.get("config", {}).get("lora_base", "") if self.resuming else cfg["init_from"]
            self.facts["lora_base"] = "" if base == "scratch" else base
        self.raw_model = model
        self.reference = self.open_reference(ckpt, had_adapters)
        return ckpt

    def open_reference(self, ckpt, had_adapters):
        """DPO's reference policy (GRPO's too, with kl_beta), recorded in facts as "adapters" (the policy
        with its LoRA adapters off) or the checkpoint it was loaded from, which a resume loads again."""
        cfg = self.cfg
        if self.task not in ("preference", "grpo") or (self.task == "grpo" and not cfg["kl_beta"]):
            return None
        from dpo import Reference
        if self.resuming:
            source = ckpt.get("config", {}).get("reference")
            if not source:
                raise UserError("the checkpoint names no reference policy; start the run again from its init_from")
        elif cfg["trainable"] == "lora" and not had_adapters and not cfg["dpo_reference"]:
            source = "adapters"  # adapters added by this run: switched off, the model is its starting point
        else:
            given = cfg["dpo_reference"] or cfg["init_from"]
            source = os.path.abspath(given) if os.path.exists(given) else given
        self.facts["reference"] = source
        if source == "adapters":
            return Reference(self.raw_model)
        ref = ckpt if not self.resuming and not cfg["dpo_reference"] else load_source(source)
        if ref.get("tokenizer") and ref["tokenizer"] != self.meta["tokenizer"] or \
                ref["model_config"]["vocab_size"] != self.meta["vocab_size"]:
            raise UserError(f"the reference checkpoint {source} has another tokenizer than dataset {cfg['dataset']!r} "
                            f"({describe_tokenizer(ref.get('tokenizer') or {})}); use a reference trained on the "
                            f"dataset's tokenizer")
        return Reference(self.raw_model, model_from_checkpoint(ref))

    def open_data(self):
        cfg, block_size = self.cfg, self.raw_model.config.block_size
        self.local_accum = cfg["gradient_accumulation_steps"] // self.rt.world
        self.tokens_per_iter = cfg["gradient_accumulation_steps"] * cfg["batch_size"] * block_size
        torch.manual_seed(cfg["seed"] + self.rt.rank)  # dropout differs per process; batches don't (see Batches)
        self.class_weight = self.token_bytes = None
        if self.task == "grpo":
            self.open_rollouts()
            return
        if self.task == "lm":
            mlm = (self.meta["tokenizer"]["mask_token"], cfg["mlm_prob"]) if cfg["objective"] == "mlm" else None
            self.splits = {s: Batches(os.path.join(self.data_dir, f"{s}.bin"), self.meta["dtype"], block_size,
                                      cfg["batch_size"], self.rt.device, cfg["seed"] + (0 if s == "train" else 1),
                                      mlm)
                           for s in ("train", "val")}
            if mlm is None:  # bits per byte of a few hidden tokens would not compare with a decoder's
                self.token_bytes = self.open_token_bytes()
            if self.meta.get("rl_task"):  # a task's corpus (prepare.py arithmetic): the log shows its accuracy too
                from rewards import make_task
                from tokenizer import dataset_tokenizer
                self.rl_task, self.tokenizer = make_task(self.meta["rl_task"]), dataset_tokenizer(self.data_dir)
            return
        from tasks import ExampleBatches
        self.splits = {s: ExampleBatches(self.data_dir, s, self.meta, block_size, cfg["batch_size"], self.rt.device,
                                         cfg["seed"] + i, balanced=cfg["balanced"] and s == "train",
                                         pack=cfg["pack"] and s == "train")
                       for i, s in enumerate(("train", "val", "test"))}
        if self.task == "classify" and cfg["class_weights"]:  # inverse frequency; a balanced set gets weight 1
            counts = np.array([self.meta["label_counts"][n] for n in self.meta["label_names"]], dtype=np.float64)
            self.class_weight = torch.tensor(counts.sum() / (len(counts) * counts), dtype=torch.float32,
                                             device=self.rt.device)

    def open_rollouts(self):
        """GRPO's source of batches, and the fixed training problems whose accuracy is train's error."""
        from grpo import Rollouts, check_alphabet
        from rewards import make_task
        from tokenizer import dataset_tokenizer
        cfg = self.cfg
        self.rl_task, self.tokenizer = make_task(cfg["rl_task"]), dataset_tokenizer(self.data_dir)
        check_alphabet(self.tokenizer, self.rl_task)
        longest = max(len(self.tokenizer.encode(p)) for p, _ in self.rl_task.val + self.rl_task.test)
        if longest + cfg["rl_max_new_tokens"] > self.raw_model.config.block_size:
            raise UserError(f"prompts of up to {longest} tokens and rl_max_new_tokens={cfg['rl_max_new_tokens']} do "
                            f"not fit block_size {self.raw_model.config.block_size}; lower rl_max_new_tokens")
        self.splits = {"train": Rollouts(self.rl_task, self.tokenizer, self.raw_model, self.reference, cfg,
                                         self.rt.device, cfg["seed"], self.rt.autocast())}
        self.train_problems = self.rl_task.sample(torch.Generator().manual_seed(cfg["seed"] + 3), cfg["eval_examples"])

    def restore(self, ckpt):
        """Continue where the checkpoint left off: optimizer, counters, batch sampler, scaler, random states."""
        if self.sharded:
            load_sharded(self.raw_model, self.optimizer, os.path.join(self.cfg["out_dir"], ckpt["sharded"]))
        else:
            try:
                self.optimizer.load_state_dict(ckpt["optimizer"])
            except (ValueError, KeyError, RuntimeError) as e:
                raise UserError(f"the checkpoint's optimizer state does not fit this run ({first_line(e)}); "
                                f"resume with the checkpoint's settings") from None
        self.iter_num, self.best_val_loss = ckpt["iter_num"], ckpt["best_val_loss"]
        if "train_generator" in ckpt:
            self.splits["train"].generator.set_state(ckpt["train_generator"])
        if "rollouts" in ckpt:
            self.splits["train"].load_state_dict(ckpt["rollouts"])
        if self.scaler.is_enabled() and ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        rng = ckpt.get("rng")
        if rng is not None and len(rng) == self.rt.world:
            set_rng_state(rng[self.rt.rank], self.rt.device)
        elif self.rt.master:
            print(f"note: the checkpoint holds no random states for {self.rt.world} process(es); dropout will not "
                  f"repeat the interrupted run exactly")
        self.resumed_evaluated = ckpt.get("evaluated", True)  # whether its iteration was already evaluated
        if not self.rt.master:
            return
        path = os.path.join(self.cfg["out_dir"], "ckpt.pt")
        print(f"resuming {path} from iteration {self.iter_num} (best val loss {self.best_val_loss:.4f})")
        if self.changed:
            print(f"resuming with changed settings: {'; '.join(self.changed)}")
        if self.iter_num >= self.cfg["max_iters"]:
            print(f"{path} is already at iteration {self.iter_num} and max_iters is {self.cfg['max_iters']}: nothing "
                  f"to train; to go on, raise --max_iters (and set --lr_decay_iters to keep the schedule)")

    def choose_attention_dtype(self):
        """On a CPU under bfloat16 autocast, fused attention in whichever of bfloat16 and float32 trains
        faster at this run's shape (timed); returns the line that says so, or ""."""
        c = self.raw_model.config
        if self.rt.device_type != "cpu" or self.rt.dtype == "float32" or c.attn_impl != "fused":
            return ""
        shape = (self.cfg["batch_size"], c.n_head, c.block_size, c.head_dim)
        dtype, ms = runtime.cpu_attention_dtype(shape, getattr(torch, self.rt.dtype))
        if dtype == torch.float32:
            self.raw_model.set_sdpa_dtype(dtype)
        times = ", ".join(f"{str(d).removeprefix('torch.')} {t:.1f} ms" for d, t in ms.items())
        return f"attention in {str(dtype).removeprefix('torch.')}: the faster on this CPU ({times} a layer, timed)"

    def announce(self):
        if not self.rt.master:
            return
        c, cfg, rt = self.raw_model.config, self.cfg, self.rt
        print(f"model: {c.n_layer} layers, {c.n_head} heads, {c.n_embd} wide, block_size {c.block_size}, {c.norm}, "
              f"{c.positions} positions, {c.mlp}")
        print(self.raw_model.describe())
        print(f"tokens per iteration: {self.tokens_per_iter:,} ({rt.world} process(es) x {self.local_accum} "
              f"micro-batches x {cfg['batch_size']} x {c.block_size}); device {rt.device}, {rt.dtype}"
              f"{', fsdp' if self.sharded else ''}")
        if self.task != "lm" or cfg["trainable"] != "all" or c.lora_rank:
            print(self.trainable_line)
        if self.attention_note:
            print(self.attention_note)
        busy = runtime.busy_cpu_note(rt.device)
        if busy:
            print(busy)

    def open_logs(self):
        """Hold out_dir for this run, refuse to replace a checkpoint unless asked, and open metrics.jsonl."""
        cfg = self.cfg
        self.writes = self.rt.master and not cfg["bench"]  # a benchmark leaves no files
        self.metrics = self.wandb = self.lock = None
        if not self.writes:
            return
        out_dir = cfg["out_dir"]
        try:
            os.makedirs(out_dir, exist_ok=True)
            self.lock = hold_folder(out_dir, f"pid {os.getpid()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}: "
                                             f"python train.py {shlex.join(self.argv)}")
        except OSError as e:
            raise UserError(f"cannot write into out_dir {out_dir} ({e.strerror or first_line(e)}); pass an "
                            f"--out_dir that is a folder you can write to") from None
        try:
            self.refuse_to_overwrite()
            path = os.path.join(out_dir, "metrics.jsonl")
            if self.resuming:  # a resumed run continues its log
                trim_metrics(path, self.iter_num)
            self.metrics = open(path, "a" if self.resuming else "w", encoding="utf-8")
            if cfg["wandb_log"]:
                import wandb
                self.wandb = wandb.init(project=cfg["wandb_project"], name=cfg["wandb_run_name"],
                                        config=self.recorded_config(), dir=out_dir)
        except BaseException:
            self.close()
            raise

    def refuse_to_overwrite(self):
        """A new run into a folder holding a checkpoint would replace it (and its log) without a word."""
        path = os.path.join(self.cfg["out_dir"], "ckpt.pt")
        if self.resuming or self.cfg["overwrite"] or not os.path.isfile(path):
            return
        summary = describe_saved(os.path.join(self.cfg["out_dir"], "ckpt.json"))
        raise UserError(f"{path} already holds a checkpoint{summary}; continue it with --init_from=resume, train "
                        f"into another --out_dir, or pass --overwrite=True to replace it")

    def close(self):
        """Release what the run holds: its log files and out_dir's lock."""
        for f in (self.metrics, self.lock):
            if f is not None:
                f.close()
        self.metrics = self.lock = None
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None

    def recorded_config(self):
        """The settings as a checkpoint records them: with the run's facts (architecture, task)."""
        return {**self.cfg, **self.facts}

    # -- what the loop calls ------------------------------------------------------------------

    def log(self, record):
        if self.writes:
            self.metrics.write(json.dumps(record) + "\n")
            self.metrics.flush()
            if self.wandb is not None:
                self.wandb.log({k: v for k, v in record.items() if k != "iter"}, step=record["iter"])

    def due_for_eval(self):
        cfg = self.cfg
        if cfg["eval_only"]:
            return True
        # a resumed run whose checkpoint was taken at an evaluation does not repeat it
        just_resumed = self.resuming and self.iter_num == self.start_iter and self.resumed_evaluated
        if self.iter_num == 0 and not cfg["eval_at_start"] and cfg["max_iters"] > 0:
            return False
        return (self.iter_num % cfg["eval_interval"] == 0 or self.iter_num >= cfg["max_iters"]) and not just_resumed

    def open_token_bytes(self):
        """(vocab_size,) bytes per token id on the device, for val/bpb; None (no val/bpb) where the dataset's
        tokenizer cannot be loaded here, e.g. GPT-2's vocabulary offline."""
        from tokenizer import dataset_tokenizer
        try:
            tokenizer = dataset_tokenizer(self.data_dir)
        except UserError as e:
            if self.rt.master:
                print(f"note: no val/bpb: {e}")
            return None
        return token_bytes(tokenizer, self.raw_model.config.vocab_size).to(self.rt.device)

    def open_benchmarks(self):
        """eval_tasks' questions, drawn and encoded once (text the tokenizer cannot encode fails here, not
        at an evaluation), so that every evaluation asks the same ones. Every process builds them; a
        failure on any stops all of them."""
        cfg = self.cfg
        names = check_task_names(cfg["eval_tasks"], TRAIN_TASKS, "eval_tasks")
        if names and self.task == "classify":
            raise UserError("eval_tasks score language models; a classifier is measured by its val/acc")
        if "cloze" in names and self.task != "lm":
            raise UserError("eval_tasks=cloze draws its questions from a language-model dataset's val split; use mc "
                            "or hellaswag on an instruct dataset")
        block = self.raw_model.config.block_size
        problem, questions = None, {}
        try:
            tokenizer = None
            if any(t != "cloze" for t in names):
                from tokenizer import dataset_tokenizer
                tokenizer = dataset_tokenizer(self.data_dir)
            val = self.splits["val"].data if self.task == "lm" else None
            questions = {t: benchmark_questions(t, block, cfg["eval_examples"], cfg["seed"], val, tokenizer,
                                                cfg["eval_mc_file"], cloze_tokens=min(16, block // 2))
                         for t in names}
        except UserError as e:
            problem = e
        if self.rt.any(problem is not None):
            raise problem or UserError("another process could not build eval_tasks' questions (see its message)")
        return questions

    @torch.no_grad()
    def evaluate_benchmarks(self):
        """eval_tasks' scores, {"TASK/acc": ..., "TASK/acc_norm": ...}, the questions shared out over the
        processes (with fsdp every process runs as many forwards: padding questions, not counted)."""
        rt, out = self.rt, {}
        model = self.raw_model.eval()
        autocast = functools.partial(rt.autocast, enabled=not self.sharded)
        for task, questions in self.benchmarks.items():
            share = -(-len(questions) // rt.world)
            mine = questions[rt.rank * share:(rt.rank + 1) * share]
            real = len(mine)
            if self.sharded:
                mine = mine + questions[:share - real]
            scores = benchmark_scores(task, model, mine, autocast)
            totals = torch.tensor([sum(v[:real]) for v in scores.values()] + [real], dtype=totals_on(rt.device).dtype,
                                  device=rt.device)
            rt.total(totals)
            out.update({f"{task}/{metric}": (totals[i] / totals[-1]).item() for i, metric in enumerate(scores)})
        model.train()
        return out

    @torch.no_grad()
    def evaluate(self):
        """Mean loss over eval_iters fixed batches per split, shared out over the processes, and val/bpb,
        the bits per byte of the same val batches (eval.py); a task's datasets are evaluated on whole
        examples, all of val (see tasks.evaluate_split)."""
        if self.task != "lm":
            return self.evaluate_task()
        cfg, rt = self.cfg, self.rt
        self.model.eval()
        out = {}
        for split, batches in self.splits.items():
            g = torch.Generator().manual_seed(cfg["seed"] + 2)  # the same batches at every evaluation
            high = len(batches.data) - batches.block_size
            starts = torch.randint(high, (cfg["eval_iters"], cfg["batch_size"]), generator=g).numpy()
            total = torch.zeros(2, device=rt.device)
            nats_bytes = totals_on(rt.device)  # for val/bpb, on the same batches
            # fsdp: every process runs as many forwards, each of which gathers the weights from all of them
            n = -(-cfg["eval_iters"] // rt.world) * rt.world if self.sharded else cfg["eval_iters"]
            for k in range(rt.rank, n, rt.world):
                x, y = batches.get(starts[k % cfg["eval_iters"]])
                with rt.autocast(enabled=not self.sharded):
                    logits, loss = self.model(x, y)
                if k < cfg["eval_iters"]:
                    total += torch.stack([loss.float(), torch.ones((), device=rt.device)])
                    if split == "val" and self.token_bytes is not None:
                        nats_bytes += nats_and_bytes(logits, y, self.token_bytes)
            rt.total(total)
            out[split] = (total[0] / total[1]).item()
            if split == "val" and self.token_bytes is not None:
                rt.total(nats_bytes)
                out["val/bpb"] = bits_per_byte(nats_bytes)
        self.model.train()
        if self.meta.get("rl_task"):  # a task's corpus: how many of its val problems the model now answers
            problems = self.rl_task.val[:cfg["eval_examples"]]
            out[f"{self.rl_task.name}/acc"] = float(np.mean(self.rl_accuracy(problems)))
        return {**out, **self.evaluate_benchmarks()}

    def evaluate_task(self):
        """Loss on the first eval_iters batches of train and on all of val, plus val/acc, val/precision,
        val/recall, val/f1 (of the positive class) for classify; DPO's and GRPO's figures for theirs."""
        from tasks import evaluate_split
        cfg, positive = self.cfg, self.facts.get("positive_id")
        if self.task == "preference":
            from dpo import evaluate_pairs
            train, val = (evaluate_pairs(self.raw_model, self.reference, self.splits[s], cfg, self.rt.autocast(),
                                         limit=cfg["eval_iters"] * cfg["batch_size"] if s == "train" else None)
                          for s in ("train", "val"))
            return {"train": train["loss"], "val": val["loss"], **{f"{s}/{k}": v for s, r in (("train", train),
                    ("val", val)) for k, v in r.items() if k != "loss"}}
        if self.task == "grpo":
            task = self.rl_task
            train, val = (float(np.mean(self.rl_accuracy(p))) for p in (self.train_problems,
                                                                         task.val[:cfg["eval_examples"]]))
            return {"train": 1 - train, "val": 1 - val, f"{task.name}/acc": val}
        train = evaluate_split(self.raw_model, self.splits["train"], self.rt.autocast(), positive,
                               limit=cfg["eval_iters"] * cfg["batch_size"])
        val = evaluate_split(self.raw_model, self.splits["val"], self.rt.autocast(), positive)
        return {"train": train["loss"], "val": val["loss"], **{f"val/{k}": v for k, v in val.items() if k != "loss"},
                **self.evaluate_benchmarks()}

    def rl_accuracy(self, problems):
        from grpo import accuracy
        return accuracy(self.raw_model, self.tokenizer, self.rl_task, problems, self.cfg["rl_max_new_tokens"])

    def test_metrics(self):
        """The final model on the test split (the task's test problems for GRPO)."""
        if self.task == "grpo":
            return {"acc": float(np.mean(self.rl_accuracy(self.rl_task.test)))}
        if self.task == "preference":
            from dpo import evaluate_pairs
            return evaluate_pairs(self.raw_model, self.reference, self.splits["test"], self.cfg, self.rt.autocast())
        from tasks import evaluate_split
        return evaluate_split(self.raw_model, self.splits["test"], self.rt.autocast(), self.facts.get("positive_id"))

    def loss(self, batch):
        """The training loss of one micro-batch: (x, y) for lm and instruct, (x, lengths, labels) to classify,
        pairs for DPO (dpo.py), rollouts for GRPO (grpo.py)."""
        cfg = self.cfg
        if self.task == "preference":
            from dpo import pair_loss
            return pair_loss(self.model, self.reference, batch, cfg, contextlib.nullcontext())[0]
        if self.task == "grpo":
            return self.splits["train"].loss(batch)[0]
        if self.task == "classify":
            return self.raw_model.classify(*batch, lm_weight=cfg["cls_lm_weight"], label_smoothing=cfg["label_smoothing"],
                                           class_weight=self.class_weight)[1]
        logits, loss = self.model(*batch, label_smoothing=cfg["label_smoothing"], z_loss=cfg["z_loss"],
                                  max_z_loss=cfg["max_z_loss"])
        if cfg["z_loss"] or cfg["max_z_loss"]:  # logged apart from the cross-entropy (report_step)
            self.z_terms += torch.stack(z_losses(logits.detach(), batch[1])) / self.local_accum
        return loss

    def draw(self):
        """This process's share of the next step's micro-batches (every process draws them all)."""
        starts = self.splits["train"].draw(self.cfg["gradient_accumulation_steps"])
        return starts[self.rt.rank * self.local_accum:(self.rt.rank + 1) * self.local_accum]

    def step(self, micro_batches):
        """One optimizer step over this process's micro-batches; returns the mean loss (a tensor)."""
        loss_sum = torch.zeros((), device=self.rt.device)
        self.z_terms = torch.zeros(2, device=self.rt.device)  # this step's mean log^2 Z and max-logit^2
        for micro, starts in enumerate(micro_batches):
            last = micro == len(micro_batches) - 1  # reduce gradients only after the last micro-batch
            if self.sharded:
                self.model.set_requires_gradient_sync(last)
            elif self.rt.world > 1:
                self.model.require_backward_grad_sync = last
            with self.rt.autocast(enabled=not self.sharded):  # fsdp computes in its mixed-precision policy
                loss = self.loss(self.splits["train"].get(starts)) / len(micro_batches)
            self.scaler.scale(loss).backward()
            loss_sum += loss.detach()
        if not self.finite(loss_sum):
            self.optimizer.zero_grad(set_to_none=True)
            return loss_sum
        if self.cfg["grad_clip"] > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg["grad_clip"])
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return loss_sum

    def finite(self, loss_sum):
        """False when this step must be skipped; raises when nan_policy is stop. Every process agrees."""
        if not self.rt.any(not bool(torch.isfinite(loss_sum))):
            self.skipped = 0
            return True
        cfg = self.cfg
        what = (f"loss is {loss_sum.item()} at iteration {self.iter_num + 1} "
                f"(lr {self.optimizer.param_groups[0]['lr']:.2e})")
        if cfg["nan_policy"] == "skip" and self.skipped < 10:
            self.skipped += 1
            if self.rt.master:
                print(f"warning: {what}; skipped that step (nan_policy=skip)")
            return False
        more = " for 10 steps in a row" if cfg["nan_policy"] == "skip" else ""
        raise UserError(f"{what}{more}; stopped, the last checkpoint in {cfg['out_dir']} is kept; lower "
                        f"learning_rate or raise warmup_iters, or set nan_policy=skip to drop such steps")

    def save(self, evaluated=True, eval_loss=0.0):
        """A checkpoint of everything a resume needs to continue exactly, never of a broken model. Called
        on every process (they gather their random states); returns the saved weights on rank 0."""
        cfg, rt = self.cfg, self.rt
        if rt.any(not model_is_finite(self.raw_model)):  # all processes stop together
            raise UserError(f"the model's weights are not finite at iteration {self.iter_num}; not saving over the "
                            f"checkpoint in {cfg['out_dir']}; lower learning_rate and resume or start again")
        if not math.isfinite(eval_loss):
            raise UserError(f"the validation loss is {eval_loss} at iteration {self.iter_num}; not saving over the "
                            f"checkpoint in {cfg['out_dir']}; lower learning_rate and resume or start again")
        state = {"scaler": self.scaler.state_dict(), "model_config": asdict(self.raw_model.config),
                 "config": self.recorded_config(), "iter_num": self.iter_num, "best_val_loss": self.best_val_loss,
                 "evaluated": evaluated, "dataset_dir": os.path.abspath(self.data_dir),
                 "tokenizer": self.meta["tokenizer"], "train_generator": self.splits["train"].generator.get_state(),
                 "rng": rt.gather(rng_state(rt.device)), "world_size": rt.world}
        if self.task == "grpo":
            state["rollouts"] = self.splits["train"].state_dict()
        if self.sharded:
            return save_sharded(self.raw_model, self.optimizer, state, cfg["out_dir"], cfg["keep_checkpoints"], rt)
        if rt.master:
            weights = self.raw_model.state_dict()
            save_checkpoint({"model": weights, "optimizer": self.optimizer.state_dict(), **state}, cfg["out_dir"],
                            cfg["keep_checkpoints"])
            return weights

    def save_adapters(self, weights):
        """With LoRA, also adapters.pt: only the adapters and the head (small). weights: the whole state
        dict saved in ckpt.pt (with fsdp the model itself holds only shards)."""
        if self.raw_model.config.lora_rank:
            adapters = {k: weights[k] for k in lora_state_dict(self.raw_model)}
            save_adapters(self.cfg["out_dir"], adapters, asdict(self.raw_model.config), self.recorded_config(),
                          self.facts["lora_base"])

    def report_eval(self, losses):
        """Print and log an evaluation; then save when val improved (or always_save_checkpoint)."""
        cfg, rt = self.cfg, self.rt
        if rt.master:
            extra = {k: v for k, v in losses.items() if "/" in k}  # a task's val metrics
            what = "error" if self.task == "grpo" else "loss"  # GRPO: 1 - exact-match accuracy (grpo.py)
            print(f"step {self.iter_num}: train {what} {losses['train']:.4f}, val {what} {losses['val']:.4f}"
                  + "".join(f", {k} {v:.4f}" for k, v in extra.items()))
            self.log({"iter": self.iter_num, "tokens": self.iter_num * self.tokens_per_iter,
                      "train/loss": losses["train"], "val/loss": losses["val"], **extra,
                      "elapsed_s": time.time() - self.started})
        # every process decides (and saves) together: saving gathers their random states
        if not cfg["eval_only"] and self.iter_num > self.start_iter and rt.any(
                losses["val"] < self.best_val_loss or cfg["always_save_checkpoint"]):
            self.best_val_loss = min(self.best_val_loss, losses["val"])
            weights = self.save(eval_loss=losses["val"])
            if rt.master:
                self.save_adapters(weights)
                print(f"saved checkpoint to {cfg['out_dir']}")

    def report_step(self, loss, lr, dt):
        """Print and log a training step: loss (averaged over the processes; waits for the device), lr, speed."""
        loss = self.rt.mean(loss).item()
        if not self.rt.master:
            return
        tok_s = self.tokens_per_iter / dt
        eta = (self.cfg["max_iters"] - self.iter_num) * dt
        peak = self.cfg["peak_flops"] or runtime.peak_flops_of(self.rt.device)
        mfu = self.raw_model.estimate_mfu(self.tokens_per_iter, dt, peak) if peak else None
        mfu_text = f", mfu {mfu * 100:.1f}%" if mfu is not None else ""
        rollouts = self.splits["train"].stats if self.task == "grpo" else {}  # the last step's samples
        cfg, parts = self.cfg, {}
        if cfg["z_loss"] or cfg["max_z_loss"]:  # the cross-entropy and the two penalties, unweighted
            z, max_z = self.z_terms.tolist()  # rank 0's, like the rollout figures
            parts = {"ce": loss - cfg["z_loss"] * z - cfg["max_z_loss"] * max_z, "z": z, "max_z": max_z}
        print(f"iter {self.iter_num}: loss {loss:.4f}" + "".join(f", {k} {v:.4f}" for k, v in parts.items()) +
              "".join(f", {k} {v:.3f}" for k, v in rollouts.items()) +
              f", lr {lr:.2e}, {dt * 1000:.1f} ms/iter, {tok_s:,.0f} tok/s{mfu_text}, eta {eta / 60:.1f} min")
        self.log({"iter": self.iter_num, "tokens": self.iter_num * self.tokens_per_iter, "loss": loss, "lr": lr,
                  "ms_per_iter": dt * 1000, "tokens_per_s": tok_s, "mfu": mfu,
                  **parts, **{f"rollout/{k}": v for k, v in rollouts.items()}})

    def stop_and_save(self, signal_name):
        """After SIGTERM/SIGINT: checkpoint the finished step and say how to go on."""
        cfg = self.cfg
        if self.iter_num > self.start_iter:
            self.save(evaluated=False)
            where = f"checkpoint saved to {os.path.join(cfg['out_dir'], 'ckpt.pt')}"
        elif not self.resuming:  # a scratch or fine-tuning run stopped before its first step
            where = "no step taken, nothing saved; run the same command again"
        else:
            where = "no step since the checkpoint, nothing new to save"
        if self.rt.master:
            resumable = self.iter_num > self.start_iter or self.resuming
            then = f"; resume with: {resume_command(self.argv, self.rt.world)}" if resumable else ""
            print(f"stopped by {signal_name or 'a signal to another process'} at iteration {self.iter_num}; "
                  f"{where}{then}", flush=True)

    def finish(self):
        """The final model's test metrics (tasks), and the logs closed."""
        if self.task != "lm" and self.rt.master and not self.cfg["eval_only"]:
            result = self.test_metrics()
            record = {"iter": self.iter_num, **{f"test/{k}": v for k, v in result.items()}}
            print("test (final model): " + ", ".join(f"{k[5:]} {v:.4f}" for k, v in record.items() if k != "iter"))
            self.log(record)
        self.close()


# -----------------------------------------------------------------------------------------------
# the loop

def train(run):
    """evaluate -> maybe save -> step -> log, from the checkpoint's iteration (or 0) to max_iters, or
    until a stop signal reaches any process."""
    cfg = run.cfg
    stop = StopSignal() if not cfg["eval_only"] else None
    run.started = t_last = time.time()
    iters_since = 0
    try:
        while True:
            if stop is not None and run.rt.any(stop.name is not None):
                run.stop_and_save(stop.name)
                break
            if run.due_for_eval():
                run.report_eval(run.evaluate())
                t_last, iters_since = time.time(), 0  # evaluation time is not training time
            if run.iter_num >= cfg["max_iters"] or cfg["eval_only"]:
                break
            lr = get_lr(run.iter_num, cfg)
            set_lr(run.optimizer, lr, cfg)
            loss = run.step(run.draw())
            run.iter_num += 1
            iters_since += 1
            if run.iter_num % cfg["log_interval"] == 0:
                run.report_step(loss, lr, (time.time() - t_last) / iters_since)
                t_last, iters_since = time.time(), 0
    finally:
        if stop is not None:
            stop.restore()
    run.finish()


def benchmark(run, warmup=5):
    """--bench=N: time N training steps after a warmup, then sampling; one line per figure, nothing saved."""
    steps, rt = run.cfg["bench"], run.rt
    for i in range(warmup + steps):
        if i == warmup:
            rt.sync()
            t0, faults = time.perf_counter(), runtime.minor_page_faults()
        loss = run.step(run.draw())
    loss.item()
    rt.sync()
    dt = (time.perf_counter() - t0) / steps
    faults = (runtime.minor_page_faults() - faults) / steps
    if not rt.master:
        return
    peak = run.cfg["peak_flops"] or runtime.peak_flops_of(rt.device)
    print(f"train ms/iter: {dt * 1000:.2f}")
    print(f"train tokens/s: {run.tokens_per_iter / dt:,.0f}")
    print(f"train mfu: {run.raw_model.estimate_mfu(run.tokens_per_iter, dt, peak) * 100:.1f}%" if peak else
          "train mfu: n/a (no peak FLOP/s known for this device; set peak_flops)")
    print(f"peak memory: {rt.peak_memory_mb():,.0f} MB")
    print(f"page faults per step: {faults:,.0f} (minor; on a CPU, freed memory faulted back in)")
    if run.sharded:  # every process would have to take part in each forward
        print("sample tokens/s: n/a with parallel=fsdp (sample.py reads its ckpt.pt)")
        return
    model = run.raw_model.eval()
    n_new = min(256, 4 * model.config.block_size)
    generate_batch(model, [[0]], 8, temperature=1.0)  # warm up
    rt.sync()
    t0 = time.perf_counter()
    generate_batch(model, [[0]], n_new, temperature=1.0)
    rt.sync()
    rate = n_new / (time.perf_counter() - t0)
    print(f"sample tokens/s: {rate:,.1f} (batch 1, {n_new} tokens)")
    nbytes, bandwidth = weight_bytes_per_token(model), runtime.copy_bandwidth(rt.device)
    print(f"sample mbu: {rate * nbytes / bandwidth:.1%} ({nbytes / 1e6:.1f} MB of weights a token at "
          f"{rate * nbytes / 1e9:.2f} GB/s, over a copy bandwidth of {bandwidth / 1e9:.1f} GB/s)")


def describe_saved(summary_path):
    """", at iteration N with val loss X" from a checkpoint's JSON summary, or "" when it cannot be read."""
    try:
        with open(summary_path, encoding="utf-8") as f:
            summary = json.load(f)
        val = summary.get("best_val_loss")
        return f" (iteration {summary['iter_num']}" + (f", val loss {val:.4f})" if val is not None else ")")
    except (OSError, ValueError, KeyError, TypeError):
        return ""


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


def main(argv):
    """train.py's command line: the settings, the run (or --bench), and then every process ends together
    and leaves the process group (rank 0 writes ckpt.pt last; none may tear its group down while another
    still uses it)."""
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    run = None
    try:
        cfg, explicit = parse_args(argv, [TrainConfig, GPTConfig], "train.py", description(__doc__))
        run = Run(cfg, explicit, argv)
        if cfg["bench"]:  # every process takes part in the timed steps; rank 0 reports
            benchmark(run)
        else:
            train(run)
        runtime.barrier()
    finally:  # main may end by an error with its own handlers still installed, and out_dir held
        if run is not None:
            run.close()
        for s, handler in handlers.items():
            signal.signal(s, handler)
        runtime.stop()


def cli(argv):
    """main() with errors of input as one line and exit code 2 (--debug shows the traceback); a second
    Ctrl-C interrupts at once, and as saves are atomic the last checkpoint is whole."""
    return run_cli(main, argv, interrupted="interrupted; the last checkpoint in out_dir is whole")


if __name__ == "__main__":
    sys.exit(cli(sys.argv[1:]))
