"""
The checkpoint format: what a run saves, how it is written, and how it is read back.

ckpt.pt is one torch.save'd dict of tensors and plain values (read with weights_only=True):
  format        FORMAT_VERSION of the writer (absent in checkpoints older than the field: 0)
  model         the state dict; model_config: the GPTConfig fields as a dict
  optimizer     its state dict (absent with parallel=fsdp, whose state is in the shards)
  scaler        the float16 grad scaler's state; config: the run's settings, with the architecture
                actually trained and the task's facts (label_names, ...)
  iter_num, best_val_loss, evaluated (whether iter_num's evaluation already ran)
  tokenizer, dataset_dir   the tokenizer entry of the dataset's meta.json, and the dataset folder
  rng, world_size          every process's random states (python, numpy, torch, CUDA)
  train_generator          the batch sampler's state; sharded: the ckpt-ITER.dcp/ folder (fsdp)
ckpt.json beside it sums it up in JSON for people and tools; adapters.pt (LoRA) holds only what a
LoRA fine-tune adds to its base.

Design choices:
- Whole or not at all: a temporary file, fsync, rename (common.replace_durably). A crash at any
  moment leaves the old checkpoint or the new one; a failed write says the old one is intact.
- keep=N also keeps the N newest saves as ckpt-ITER.pt, hard links of ckpt.pt (no second copy).
- Sharded (fsdp): every process writes its shards into ckpt-ITER.dcp.tmp/, renamed when all are
  done; ckpt.pt, written last by rank 0, is the commit, and names the folder.
- RESUME_* is the one table of which settings a resume may change.
"""
import math
import os
import random
import shutil
import sys
import time

import numpy as np
import torch

from common import UserError, first_line, fsync_dir, remove_quietly, replace_durably, write_json_atomic
from model import GPT, GPTConfig

FORMAT_VERSION = 1

# what a resume does with each setting: the architecture must be the weights' (model_config), the
# optimizer must be the one whose state was saved, a few keys say how to start; the rest may change
# (max_iters, the schedule, evaluation cadence, logging, ...) and is listed when the run starts
RESUME_ARCH = [k for k in GPTConfig.keys() if k not in ("dropout", "attn_impl")]
RESUME_RUN = ["optimizer"]
RESUME_IGNORED = ["init_from", "debug", "parallel"]


def checkpoint_path(path):
    return os.path.join(path, "ckpt.pt") if os.path.isdir(path) else path


def load_checkpoint(path):
    """A checkpoint of this repository (a file, or the folder holding ckpt.pt), or a UserError."""
    path = checkpoint_path(path)
    if not os.path.isfile(path):
        raise UserError(f"no checkpoint at {path}; train one first, or check init_from / out_dir")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"could not read checkpoint {path} ({type(e).__name__}); it is truncated or corrupted, "
                        f"or not a checkpoint; use an earlier one (keep_checkpoints) or start again") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "model_config" not in ckpt:
        raise UserError(f"{path} is not a checkpoint of train.py (no model or model_config in it)")
    if ckpt.get("format", 0) > FORMAT_VERSION:
        raise UserError(f"{path} has checkpoint format {ckpt['format']}, newer than this code's "
                        f"{FORMAT_VERSION}; update the repository to read it")
    return ckpt


def model_from_checkpoint(ckpt):
    """The GPT of a loaded checkpoint, its weights in place (on the CPU)."""
    try:
        model = GPT(GPTConfig.from_dict(ckpt["model_config"]))
    except (TypeError, ValueError) as e:
        raise UserError(f"the checkpoint's model_config is not a model this code can build ({first_line(e)})") from None
    if ckpt.get("quantization"):
        raise UserError(f"the checkpoint holds quantize.py's {ckpt['quantization']} weights, which quantize.load_model "
                        f"reads (sample.py, eval.py and serve.py do); train and export from the float checkpoint")
    model.load_state_dict(ckpt["model"])
    return model


def save_checkpoint(ckpt, out_dir, keep=0, name="ckpt.pt"):
    """Write ckpt as out_dir/name (and a JSON summary beside it), whole or not at all."""
    path = os.path.join(out_dir, name)
    for other in os.listdir(out_dir):  # leftovers of killed saves only take disk space
        if other.startswith(name + ".") and other.endswith(".tmp"):
            remove_quietly(os.path.join(out_dir, other))
    ckpt = {"format": FORMAT_VERSION, **ckpt}
    try:
        replace_durably(lambda f: torch.save(ckpt, f), path)
    except (OSError, RuntimeError) as e:  # torch.save reports a failed write as a RuntimeError
        why = e.strerror if isinstance(e, OSError) and e.strerror else first_line(e)
        kept = (f"the previous checkpoint {path} is intact" if os.path.isfile(path)
                else "no earlier checkpoint exists")
        raise UserError(f"could not write checkpoint {path} ({why}); {kept}; free disk space (or fix out_dir), "
                        f"then resume with --init_from=resume") from None
    try:  # a summary for people and tools; the checkpoint itself never needs it
        write_json_atomic(os.path.splitext(path)[0] + ".json", summary(ckpt, path))
    except OSError as e:
        print(f"warning: could not write the JSON summary beside {path} ({e.strerror})", file=sys.stderr)
    if keep > 0:
        keep_recent(path, ckpt["iter_num"], keep)


def summary(ckpt, path):
    keys = ("format", "iter_num", "best_val_loss", "model_config", "config", "tokenizer", "dataset_dir", "world_size")
    out = {k: ckpt[k] for k in keys if k in ckpt}
    if not math.isfinite(out.get("best_val_loss", 0.0)):
        out["best_val_loss"] = None  # JSON has no inf
    return {"file": os.path.basename(path), "bytes": os.path.getsize(path), "saved_at": time.time(),
            "torch": torch.__version__, **out}


def keep_recent(path, iter_num, keep):
    """Also keep this checkpoint as ckpt-ITER.pt, and only the `keep` newest of those."""
    folder = os.path.dirname(path)
    named = os.path.join(folder, f"ckpt-{iter_num:08d}.pt")
    remove_quietly(named)
    try:
        os.link(path, named)  # no second copy on disk; ckpt.pt is replaced, never rewritten in place
    except OSError:
        shutil.copyfile(path, named + ".tmp")
        os.replace(named + ".tmp", named)
    kept = [os.path.join(folder, n) for n in os.listdir(folder) if n.startswith("ckpt-") and n.endswith(".pt")]
    kept.sort(key=os.path.getmtime)
    for old in kept[:-keep]:
        remove_quietly(old)


# -----------------------------------------------------------------------------------------------
# sharded checkpoints (parallel=fsdp)

def save_sharded(model, optimizer, state, out_dir, keep, rt):
    """Every process writes its shards of the weights and optimizer state into ckpt-ITER.dcp/, then
    rank 0 writes ckpt.pt: the whole model (gathered; what sample.py and init_from=PATH read), the run's
    state, and the name of that folder. ckpt.pt is the commit: until it is replaced, the previous ckpt.pt
    and the folder it names stay as they were. Called on every process; returns the whole weights on rank 0."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_state_dict
    from runtime import barrier
    name = f"ckpt-{state['iter_num']:08d}.dcp"
    folder, tmp = os.path.join(out_dir, name), os.path.join(out_dir, name + ".tmp")
    if rt.master:
        shutil.rmtree(tmp, ignore_errors=True)  # a killed save's leftovers
    barrier()  # nobody writes into tmp before it is empty
    model_state, optim_state = get_state_dict(model, optimizer)
    try:  # returns on every process once all shards and the index are on disk
        dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=tmp)
    except Exception as e:  # every process gets the exception, so they all stop here
        raise UserError(f"could not write the sharded checkpoint {tmp} ({first_line(e)}); the previous checkpoint "
                        f"in {out_dir} is intact; free disk space (or fix out_dir), then resume with "
                        f"--init_from=resume") from None
    weights = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not rt.master:
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
        raise UserError(f"{path}, the sharded state that ckpt.pt names, is missing; start a new run from "
                        f"ckpt.pt's weights with --init_from=PATH")
    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optim_state}
    try:
        dcp.load(state, checkpoint_id=path)
    except Exception as e:
        raise UserError(f"could not read the sharded checkpoint {path} ({first_line(e)}); resume with the "
                        f"checkpoint's settings, or start anew from ckpt.pt's weights with --init_from=PATH") from None
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


# -----------------------------------------------------------------------------------------------
# random states: tensors and numbers, which weights_only loading accepts (numpy's and python's own
# state objects it refuses)

def rng_state(device):
    """This process's random states (python, numpy, torch, CUDA)."""
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


# -----------------------------------------------------------------------------------------------
# resuming

def describe_tokenizer(tok):
    if tok.get("kind") == "char":
        return f"char ({len(tok.get('chars', ''))} characters)"
    return str(tok.get("kind"))


def resume_changes(cfg, explicit, ckpt, meta):
    """Refuse a resume whose architecture, optimizer, parallelism or vocabulary differs from the
    checkpoint's; return the other settings that changed ("key old -> new")."""
    arch, saved = ckpt["model_config"], ckpt.get("config", {})
    diffs = []
    for k in RESUME_ARCH:
        derived = k in ("n_kv_head", "head_dim", "mlp_hidden") and cfg[k] == 0  # 0 means "derive it"
        if k in explicit and k in arch and cfg[k] != arch[k] and not derived:
            diffs.append(f"{k} {arch[k]!r} -> {cfg[k]!r}")
    for k in RESUME_RUN:
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
        raise UserError(f"cannot resume: the checkpoint differs in {'; '.join(diffs)}; resume with the "
                        f"checkpoint's settings and data, or start a new run from it with --init_from=PATH")
    fixed = set(RESUME_ARCH + RESUME_RUN + RESUME_IGNORED)
    return [f"{k} {saved[k]!r} -> {cfg[k]!r}" for k in cfg if k in saved and k not in fixed and saved[k] != cfg[k]]


# -----------------------------------------------------------------------------------------------
# LoRA adapters

def lora_state_dict(model):
    """Only the adapters and the classification head: what a LoRA fine-tune adds to its base."""
    return {k: v for k, v in model.state_dict().items() if ".lora_" in k or k.startswith("cls_head.")}


def save_adapters(out_dir, adapters, model_config, config, base):
    """adapters.pt: the adapter and head tensors, the model config, the run's settings and the
    absolute path of the base checkpoint they apply to ("" when trained from scratch)."""
    state = {"format": FORMAT_VERSION, "adapters": adapters, "model_config": model_config, "config": config,
             "base": os.path.abspath(checkpoint_path(base)) if base else ""}
    replace_durably(lambda f: torch.save(state, f), os.path.join(out_dir, "adapters.pt"))


def load_adapters(out_dir):
    path = os.path.join(out_dir, "adapters.pt")
    if not os.path.isfile(path):
        raise UserError(f"no adapters at {path}; train with trainable=lora (lora_rank > 0) first")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"could not read {path} ({type(e).__name__}); it is truncated or corrupted") from None
