"""
Fold a LoRA fine-tune into plain weights for export: base checkpoint + adapters.pt -> one checkpoint.

  python merge_lora.py out-spam-lora                 # writes out-spam-lora/merged.pt
  python sample.py --init_from=out-spam-lora/merged.pt --start="WIN a prize"

Reads OUT_DIR/adapters.pt (the adapters and head train.py saves beside ckpt.pt when lora_rank > 0)
and the base checkpoint it names, sets W <- W + (alpha / r) B A in every adapted layer, and saves
a checkpoint with lora_rank = 0 that loads anywhere a checkpoint of this repo does (written as
train.py writes its own: whole or not at all, with a JSON summary beside it).
"""
import os
import sys

from checkpoint import load_adapters, save_checkpoint
from common import ArgumentParser, UserError, description, first_line, run_cli
from hf import load_source
from model import GPT, GPTConfig


def merge(out_dir, out_path=None):
    adapters = load_adapters(out_dir)
    if not adapters["base"]:
        raise UserError(f"{os.path.join(out_dir, 'adapters.pt')} names no base checkpoint (trained from scratch); "
                        f"its ckpt.pt already holds the whole model")
    base = load_source(adapters["base"], with_tokenizer=True)
    try:
        model = GPT(GPTConfig.from_dict(adapters["model_config"]))
    except (TypeError, ValueError) as e:
        raise UserError(f"adapters.pt's model_config cannot be built ({first_line(e)})") from None
    missing, unexpected = model.load_state_dict({**base["model"], **adapters["adapters"]}, strict=False)
    if unexpected or [k for k in missing if ".lora_" not in k and not k.startswith("cls_head.")]:
        raise UserError(f"the adapters in {out_dir} do not fit base {adapters['base']} ({len(missing)} missing, "
                        f"{len(unexpected)} unexpected tensors)")
    model.merge_lora()
    out_path = out_path or os.path.join(out_dir, "merged.pt")
    ckpt = {"model": model.state_dict(), "model_config": {**adapters["model_config"], "lora_rank": 0},
            "config": adapters["config"], "iter_num": 0, "best_val_loss": float("inf"),
            "dataset_dir": base.get("dataset_dir"), "tokenizer": base["tokenizer"]}
    folder = os.path.dirname(os.path.abspath(out_path))
    if not os.path.isdir(folder):
        raise UserError(f"cannot write {out_path}: folder {folder} does not exist")
    save_checkpoint(ckpt, folder, name=os.path.basename(out_path))
    n = sum(v.numel() for v in adapters["adapters"].values())
    print(f"merged {n:,} adapter and head parameters into {out_path}")
    return out_path


def main(argv):
    p = ArgumentParser(prog="merge_lora.py", description=description(__doc__))
    p.add_argument("out_dir", help="the LoRA run's out_dir (holding adapters.pt)")
    p.add_argument("--out", help="where to write the merged checkpoint (default: OUT_DIR/merged.pt)")
    args = p.parse_args(argv)
    merge(args.out_dir, args.out)


if __name__ == "__main__":
    sys.exit(run_cli(main))
