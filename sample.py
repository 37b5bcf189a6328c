"""
Generate text from a trained checkpoint.

  python sample.py --out_dir=out-shakespeare-char --start="ROMEO:" --num_samples=3
  python sample.py --out_dir=out --start=FILE:prompt.txt --temperature=0.8 --top_k=200
  python sample.py --out_dir=out-instruct --instruct --start="Name three primary colors."
  python sample.py --out_dir=out-instruct --instruct --interactive
  python sample.py --out_dir=out-spam --start="WIN a free prize"   # a classifier: label and probability
A classifier checkpoint labels the text instead (with FILE:, each non-empty line).

The tokenizer is the one of the dataset the checkpoint was trained on (recorded in the
checkpoint from the dataset's meta.json). `python sample.py --help` lists every setting.
"""
import os
import sys
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from configurator import ConfigError, parse_args
from model import GPT, GPTConfig
from tokenizer import TokenizerError, load_tokenizer
from train import TrainError, load_checkpoint, pick_device, pick_dtype


@dataclass
class SampleConfig:
    out_dir: str = "out"           # folder of the checkpoint to sample from (its ckpt.pt)
    init_from: str = "resume"      # resume (out_dir/ckpt.pt) | PATH of a checkpoint file or folder
    start: str = "\n"              # the prompt; FILE:path reads it from a file
    num_samples: int = 3           # how many samples to draw
    max_new_tokens: int = 500      # tokens generated per sample
    temperature: float = 0.8       # 1.0 samples the model's distribution, lower is more conservative, 0 is greedy
    top_k: int = 200               # sample only from the k most likely tokens; 0 keeps all
    seed: int = 1337               # random seed: the same seed gives the same samples
    device: str = "auto"           # auto | cpu | cuda | cuda:N | mps
    dtype: str = "auto"            # auto | float32 | bfloat16 | float16
    compile: bool = False          # torch.compile the model
    instruct: bool = False         # wrap the prompt in the instruction template (tasks.py); stop at end-of-text
    interactive: bool = False      # with instruct: answer instructions typed at a "> " prompt until an empty line
    instruct_eval: str = ""        # val | test: answer every prompt of that split of the checkpoint's instruct dataset (greedy); print the end-of-text rate


def check_settings(cfg):
    if cfg["temperature"] < 0:
        raise ConfigError(f"temperature must be >= 0, got {cfg['temperature']}")
    if cfg["top_k"] < 0:
        raise ConfigError(f"top_k must be >= 1 (or 0 to keep all tokens), got {cfg['top_k']}")
    if cfg["max_new_tokens"] < 1:
        raise ConfigError(f"max_new_tokens must be >= 1, got {cfg['max_new_tokens']}")
    if cfg["num_samples"] < 1:
        raise ConfigError(f"num_samples must be >= 1, got {cfg['num_samples']}")


def read_prompt(start):
    if start.startswith("FILE:"):
        path = start[5:]
        if not os.path.isfile(path):
            raise ConfigError(f"prompt file {path} not found")
        with open(path, encoding="utf-8") as f:
            return f.read()
    return start


def load_model(cfg, device):
    """The model and tokenizer of a checkpoint."""
    ckpt = load_checkpoint(cfg["out_dir"] if cfg["init_from"] == "resume" else cfg["init_from"])
    config = GPTConfig(**{k: v for k, v in ckpt["model_config"].items() if k in GPTConfig.keys()})
    model = GPT(config)
    model.load_state_dict(ckpt["model"])
    tokenizer = load_tokenizer(ckpt["tokenizer"], ckpt.get("dataset_dir"))
    return model.to(device).eval(), tokenizer


def print_labels(model, tokenizer, cfg, device):
    """One line per text: label, its probability, the text."""
    from tasks import label_texts
    ckpt_cfg = load_checkpoint(cfg["out_dir"] if cfg["init_from"] == "resume" else cfg["init_from"])["config"]
    text = read_prompt(cfg["start"])
    texts = [t for t in text.splitlines() if t.strip()] if cfg["start"].startswith("FILE:") else [text]
    for t, (label, p) in zip(texts, label_texts(model, tokenizer, texts, ckpt_cfg.get("label_names", []), device)):
        print(f"{label}\t{p:.4f}\t{t}")


def print_instruct_eval(model, tokenizer, cfg, device):
    import json
    from tasks import instruct_report
    ckpt = load_checkpoint(cfg["out_dir"] if cfg["init_from"] == "resume" else cfg["init_from"])
    data_dir = ckpt.get("dataset_dir") or ""
    meta_path = os.path.join(data_dir, "meta.json")
    if not os.path.isfile(meta_path):
        raise ConfigError(f"the checkpoint's dataset {data_dir} is gone; instruct_eval reads its prompts")
    with open(meta_path, encoding="utf-8") as f:
        meta = json.load(f)
    if meta.get("task") != "instruct" or cfg["instruct_eval"] not in ("val", "test"):
        raise ConfigError("instruct_eval=val|test needs a checkpoint trained on an instruct dataset")
    rate, examples = instruct_report(model, tokenizer, data_dir, meta, cfg["instruct_eval"], device,
                                     cfg["max_new_tokens"])
    for prompt, answer, reference, stopped in examples:
        print(f"{prompt}{answer}{'<|endoftext|>' if stopped else '...'}\n[reference: {reference}]\n---------------")
    print(f"{cfg['instruct_eval']}: {rate:.1%} of answers stay in the template and end with end-of-text")


def instruct_loop(model, tokenizer, cfg, device):
    """Answer the prompt (or, interactive, each line typed) in the instruction template."""
    from tasks import respond
    if tokenizer.eot_token is None:
        raise ConfigError("--instruct needs a model whose tokenizer has an end-of-text token (gpt2 or bpe)")
    top_k = cfg["top_k"] or None
    if not cfg["interactive"]:
        for _ in range(cfg["num_samples"]):
            print(respond(model, tokenizer, read_prompt(cfg["start"]), device, cfg["max_new_tokens"],
                          cfg["temperature"], top_k)[0])
            print("---------------")
        return
    while True:
        try:
            line = input("> ")
        except EOFError:
            break
        if not line.strip():
            break
        print(respond(model, tokenizer, line, device, cfg["max_new_tokens"], cfg["temperature"], top_k)[0], flush=True)


def main(argv):
    cfg, _ = parse_args(argv, [SampleConfig], "sample.py", __doc__.strip().splitlines()[0])
    check_settings(cfg)
    device = pick_device(cfg["device"])
    device_type = "cuda" if device.startswith("cuda") else device
    dtype = pick_dtype(cfg["dtype"], device_type)
    torch.manual_seed(cfg["seed"])
    model, tokenizer = load_model(cfg, device)
    if cfg["compile"]:
        model = torch.compile(model)
    if model.config.n_classes:
        return print_labels(model, tokenizer, cfg, device)
    if cfg["instruct_eval"]:
        return print_instruct_eval(model, tokenizer, cfg, device)
    if cfg["instruct"] or cfg["interactive"]:
        return instruct_loop(model, tokenizer, cfg, device)
    prompt = tokenizer.encode(read_prompt(cfg["start"]))
    if not prompt:
        if tokenizer.eot_token is None:
            raise ConfigError("the prompt is empty; pass --start=TEXT")
        prompt = [tokenizer.eot_token]  # BPE models start a fresh document after end-of-text
    x = torch.tensor(prompt, dtype=torch.long, device=device)[None, :]
    autocast = (torch.autocast(device_type=device_type, dtype=getattr(torch, dtype))
                if dtype != "float32" else nullcontext())
    with autocast:
        for _ in range(cfg["num_samples"]):
            y = model.generate(x, cfg["max_new_tokens"], temperature=cfg["temperature"],
                               top_k=cfg["top_k"] or None)
            print(tokenizer.decode(y[0].tolist()))
            print("---------------")


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except (ConfigError, TrainError, TokenizerError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
