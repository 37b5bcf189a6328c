"""
Fold a LoRA fine-tune into plain weights for export: base checkpoint + adapters.pt -> one checkpoint.

  python merge_lora.py out-spam-lora                 # writes out-spam-lora/merged.pt
  python sample.py --init_from=out-spam-lora/merged.pt --start="WIN a prize"

Reads OUT_DIR/adapters.pt (the adapters and head train.py saves beside ckpt.pt when lora_rank > 0)
and the base checkpoint it names, sets W <- W + (alpha / r) B A in every adapted layer, and saves
a checkpoint with lora_rank = 0 that loads anywhere a checkpoint of this repo does.
"""
import argparse
import os
import sys

import torch

from model import GPT, GPTConfig
from train import TrainError, load_checkpoint


def merge(out_dir, out_path=None):
    path = os.path.join(out_dir, "adapters.pt")
    if not os.path.isfile(path):
        raise TrainError(f"no adapters at {path}; train with trainable=lora (lora_rank > 0) first")
    adapters = torch.load(path, map_location="cpu", weights_only=True)
    if not adapters["base"]:
        raise TrainError(f"{path} names no base checkpoint (trained from scratch); merge ckpt.pt's own weights "
                         f"with GPT.merge_lora() instead")
    base = load_checkpoint(adapters["base"])
    model = GPT(GPTConfig(**{k: v for k, v in adapters["model_config"].items() if k in GPTConfig.keys()}))
    missing, unexpected = model.load_state_dict({**base["model"], **adapters["adapters"]}, strict=False)
    if unexpected or [k for k in missing if ".lora_" not in k and not k.startswith("cls_head.")]:
        raise TrainError(f"{path} does not fit base {adapters['base']} ({len(missing)} missing, "
                         f"{len(unexpected)} unexpected tensors)")
    model.merge_lora()
    out_path = out_path or os.path.join(out_dir, "merged.pt")
    ckpt = {"model": model.state_dict(), "model_config": {**adapters["model_config"], "lora_rank": 0},
            "config": adapters["config"], "iter_num": 0, "best_val_loss": float("inf"),
            "dataset_dir": base.get("dataset_dir"), "tokenizer": base["tokenizer"]}
    torch.save(ckpt, out_path + ".tmp")
    os.replace(out_path + ".tmp", out_path)  # a crash leaves no half-written checkpoint
    n = sum(v.numel() for v in adapters["adapters"].values())
    print(f"merged {n:,} adapter and head parameters into {out_path}")
    return out_path


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("out_dir", help="the LoRA run's out_dir (holding adapters.pt)")
    p.add_argument("--out", help="where to write the merged checkpoint (default: OUT_DIR/merged.pt)")
    args = p.parse_args()
    try:
        merge(args.out_dir, args.out)
    except TrainError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
