"""
Generate text from a trained checkpoint.

  python sample.py --out_dir=out-shakespeare-char --start="ROMEO:" --num_samples=3
  python sample.py --out_dir=out --start=FILE:prompt.txt --temperature=0.8 --top_k=200
  python sample.py --out_dir=out --prompts_file=prompts.txt --top_p=0.9 --stop="\n\n" --stream
  python sample.py --out_dir=out --beam_width=4 --num_samples=1 --temperature=0
  python sample.py --bench    # tokens/s with the KV cache vs re-running the whole context
  python sample.py --out_dir=out-instruct --instruct --start="Name three primary colors."
  python sample.py --out_dir=out-instruct --instruct --interactive
  python sample.py --out_dir=out-spam --start="WIN a free prize"   # a classifier: label and probability

Decoding uses a KV cache (model.KVCache): the prompts are prefilled once, then each step runs the
model on one new token. All prompts and their num_samples samples are decoded as one batch
(left-padded), except with --stream, which decodes one sample at a time and prints it as it grows.
Generation stops at max_new_tokens, at the end-of-text token (BPE tokenizers) or at --stop.
A classifier checkpoint labels the text instead (with FILE:, each non-empty line).

The tokenizer is the one of the dataset the checkpoint was trained on (recorded in the
checkpoint from the dataset's meta.json). `python sample.py --help` lists every setting.
"""
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from configurator import ConfigError, parse_args
from hf import is_hf_source, load_hf_checkpoint
from model import GPT, GPTConfig, beam_search, generate_batch
from tokenizer import StreamDecoder, TokenizerError, load_tokenizer
from train import TrainError, load_checkpoint, pick_device, pick_dtype


@dataclass
class SampleConfig:
    out_dir: str = "out"           # folder of the checkpoint to sample from (its ckpt.pt)
    init_from: str = "resume"      # resume (out_dir/ckpt.pt) | PATH of a checkpoint file or folder, or a Hugging Face folder | gpt2*
    start: str = "\n"              # the prompt; FILE:path reads it from a file
    prompts_file: str = ""         # a file of prompts, one per line (blank lines skipped); overrides --start
    num_samples: int = 3           # how many samples to draw per prompt (all decoded in parallel)
    max_new_tokens: int = 500      # most tokens generated per sample (>= 1)
    temperature: float = 0.8       # 1.0 samples the model's distribution, lower is more conservative, 0 is greedy
    top_k: int = 200               # sample only from the k most likely tokens (>= 1; the vocab size keeps all)
    top_p: float = 1.0             # nucleus: the likeliest tokens holding this much probability, in (0, 1]; 1 keeps all
    repetition_penalty: float = 1.0  # > 1 makes tokens already in the text less likely (CTRL's rule); 1 is off
    beam_width: int = 1            # > 1: beam search, printing the num_samples best beams (no sampling); 1: sample
    length_penalty: float = 1.0    # beam search ranks by log-prob / length**this (0: total log-prob, 1: per token)
    stop: str = ""                 # end a sample where this text appears (not printed; \n, \t allowed); "" never
    stop_at_eot: bool = True       # stop a sample at the end-of-text token (tokenizers that have one)
    stream: bool = False           # print each sample as it is generated, one sample at a time
    use_cache: bool = True         # KV cache; False re-runs the whole context every step (same text, slower)
    bench: bool = False            # tokens/s with vs without KV cache, random 6x384 model, block 256; no checkpoint
    seed: int = 1337               # random seed: the same seed gives the same samples
    device: str = "auto"           # auto | cpu | cuda | cuda:N | mps
    dtype: str = "auto"            # auto | float32 | bfloat16 | float16
    compile: bool = False          # torch.compile the model
    threads: int = 0               # CPU threads for torch (1 suits one-token steps on a busy machine); 0: torch's default
    instruct: bool = False         # wrap the prompt in the instruction template (tasks.py); stop at end-of-text
    interactive: bool = False      # with instruct: answer instructions typed at a "> " prompt until an empty line
    instruct_eval: str = ""        # val | test: answer every prompt of that split of the checkpoint's instruct dataset (greedy); print the end-of-text rate


def check_settings(cfg):
    if cfg["temperature"] < 0:
        raise ConfigError(f"temperature must be >= 0, got {cfg['temperature']}")
    if cfg["top_k"] < 1:
        raise ConfigError(f"top_k must be >= 1, got {cfg['top_k']}; to keep every token pass the vocabulary size")
    if not 0 < cfg["top_p"] <= 1:
        raise ConfigError(f"top_p must be in (0, 1], got {cfg['top_p']}; 1 keeps every token")
    if cfg["repetition_penalty"] <= 0:
        raise ConfigError(f"repetition_penalty must be > 0 (1 is off), got {cfg['repetition_penalty']}")
    if cfg["max_new_tokens"] < 1:
        raise ConfigError(f"max_new_tokens must be >= 1, got {cfg['max_new_tokens']}")
    if cfg["threads"] < 0:
        raise ConfigError(f"threads must be >= 1, or 0 for torch's default, got {cfg['threads']}")
    if cfg["num_samples"] < 1:
        raise ConfigError(f"num_samples must be >= 1, got {cfg['num_samples']}")
    if cfg["beam_width"] < 1:
        raise ConfigError(f"beam_width must be >= 1 (1 samples without beam search), got {cfg['beam_width']}")
    if cfg["beam_width"] > 1 and cfg["num_samples"] > cfg["beam_width"]:
        raise ConfigError(f"beam search prints the num_samples best of its beams: num_samples "
                          f"({cfg['num_samples']}) must be <= beam_width ({cfg['beam_width']})")
    if cfg["beam_width"] > 1 and cfg["stream"]:
        raise ConfigError("--stream cannot show beam search (the best beam is known only at the end); "
                          "drop --stream or use --beam_width=1")


def read_prompt(start):
    if start.startswith("FILE:"):
        path = start[5:]
        if not os.path.isfile(path):
            raise ConfigError(f"prompt file {path} not found")
        with open(path, encoding="utf-8") as f:
            return f.read()
    return start


def read_prompts(cfg):
    """The prompt texts: the lines of --prompts_file, or --start."""
    path = cfg["prompts_file"]
    if not path:
        return [read_prompt(cfg["start"])]
    if not os.path.isfile(path):
        raise ConfigError(f"prompts file {path} not found")
    with open(path, encoding="utf-8") as f:
        prompts = [line.rstrip("\r\n") for line in f if line.strip()]
    if not prompts:
        raise ConfigError(f"prompts file {path} has no prompts; write one per line")
    return prompts


def encode_prompt(tokenizer, text):
    ids = tokenizer.encode(text)
    if not ids:
        if tokenizer.eot_token is None:
            raise ConfigError("the prompt is empty; pass --start=TEXT")
        ids = [tokenizer.eot_token]  # BPE models start a fresh document after end-of-text
    return ids


class StopText:
    """Text of one sample as its tokens arrive: cut at the stop string, and releasing only text
    that cannot turn out to be the start of it, so streamed output never shows the stop string."""

    def __init__(self, tokenizer, stop):
        self.decoder, self.stop = StreamDecoder(tokenizer), stop
        self.text, self.released, self.done = "", 0, False

    def _release(self, safe):
        out = self.text[self.released:safe] if safe > self.released else ""
        self.released = max(self.released, safe)
        return out

    def add(self, token):
        """Feed one token; returns the text now safe to show."""
        self.text += self.decoder.feed([token])
        if not self.stop:
            return self._release(len(self.text))
        # an earlier match would have been complete at the previous step, so look from here
        at = self.text.find(self.stop, max(0, self.released - len(self.stop)))
        if at >= 0:
            self.text, self.done = self.text[:at], True
            return self._release(at)
        return self._release(len(self.text) - len(self.stop) + 1)

    def finish(self):
        """The rest: held-back text and any incomplete character."""
        if not self.done:
            self.text += self.decoder.flush()
            if self.stop and self.stop in self.text:
                self.text = self.text[:self.text.index(self.stop)]
        return self._release(len(self.text))


def load_model(cfg, device):
    """The model and tokenizer of a checkpoint."""
    source = cfg["out_dir"] if cfg["init_from"] == "resume" else cfg["init_from"]
    ckpt = (load_hf_checkpoint(source, with_tokenizer=True) if cfg["init_from"] != "resume" and is_hf_source(source)
            else load_checkpoint(source))
    config = GPTConfig(**{k: v for k, v in ckpt["model_config"].items() if k in GPTConfig.keys()})
    model = GPT(config)
    model.load_state_dict(ckpt["model"])
    tokenizer = load_tokenizer(ckpt["tokenizer"], ckpt.get("dataset_dir"))
    return model.to(device).eval(), tokenizer


def unescape(text):
    """--stop=\\n typed in a shell arrives as backslash-n; a stop string almost always means a newline."""
    return text.replace("\\n", "\n").replace("\\t", "\t")


def cut_at_stop(text, stop):
    """text up to the first occurrence of stop (all of it when stop is "" or absent)."""
    return text[:text.index(stop)] if stop and stop in text else text


def sampling_args(cfg):
    return dict(temperature=cfg["temperature"], top_k=cfg["top_k"], top_p=cfg["top_p"],
                repetition_penalty=cfg["repetition_penalty"], use_cache=cfg["use_cache"])


def print_sample(prompt_text, text):
    print(prompt_text + text)
    print("---------------")


def run_beams(model, tokenizer, prompts, cfg, eot):
    """Beam search per prompt; prints the num_samples best hypotheses. Returns tokens generated."""
    n = 0
    for ids in prompts:
        ranked = beam_search(model, ids, cfg["max_new_tokens"], cfg["beam_width"], cfg["length_penalty"],
                             eot_token=eot, use_cache=cfg["use_cache"])
        for tokens, _ in ranked[:cfg["num_samples"]]:
            n += len(tokens)
            print_sample(tokenizer.decode(ids), cut_at_stop(tokenizer.decode(tokens), unescape(cfg["stop"])))
    return n


def run_batch(model, tokenizer, prompts, cfg, eot, generator):
    """All prompts x num_samples decoded as one batch; prints them at the end. Returns tokens generated."""
    rows = [ids for ids in prompts for _ in range(cfg["num_samples"])]
    texts = [StopText(tokenizer, unescape(cfg["stop"])) for _ in rows]

    def on_token(row, token):
        texts[row].add(token)
        return texts[row].done

    out = generate_batch(model, rows, cfg["max_new_tokens"], eot_token=eot, on_token=on_token,
                         generator=generator, **sampling_args(cfg))
    for ids, tokens in zip(rows, out):  # decoded whole, independently of the stop checks
        print_sample(tokenizer.decode(ids), cut_at_stop(tokenizer.decode(tokens), unescape(cfg["stop"])))
    return sum(len(tokens) for tokens in out)


def run_stream(model, tokenizer, prompts, cfg, eot, generator):
    """One sample at a time, each printed as its tokens arrive. Returns tokens generated."""
    n = 0
    for ids in prompts:
        for _ in range(cfg["num_samples"]):
            print(tokenizer.decode(ids), end="", flush=True)
            text = StopText(tokenizer, unescape(cfg["stop"]))

            def on_token(row, token):
                print(text.add(token), end="", flush=True)
                return text.done

            out = generate_batch(model, [ids], cfg["max_new_tokens"], eot_token=eot, on_token=on_token,
                                 generator=generator, **sampling_args(cfg))
            print(text.finish())
            print("---------------", flush=True)
            n += len(out[0])
    return n


@torch.no_grad()
def generate_by_recompute(model, idx, max_new_tokens):
    """Greedy decoding as nanoGPT's generate does it, the baseline of --bench: every step crops
    the context to block_size and runs the whole of it through the model for the last logits."""
    for _ in range(max_new_tokens):
        logits, _ = model(idx[:, -model.config.block_size:])
        idx = torch.cat((idx, logits[:, -1, :].argmax(dim=-1, keepdim=True)), dim=1)
    return idx


def bench(cfg, device):
    """Tokens/s of greedy decoding from a one-token prompt, KV cache vs full recompute, side by
    side on the same randomly initialised shakespeare-char-sized model (speed ignores the weights)."""
    torch.manual_seed(cfg["seed"])
    config = GPTConfig(n_layer=6, n_head=6, n_embd=384, block_size=256, vocab_size=65, dropout=0.0)
    model = GPT(config).to(device).eval()
    idx = torch.zeros(1, 1, dtype=torch.long, device=device)
    n = cfg["max_new_tokens"]
    model.generate(idx, 8, temperature=0)  # warm-up: first calls pay for allocations
    rates = {}
    for name, run in [("kv cache", lambda: model.generate(idx, n, temperature=0)),
                      ("full recompute", lambda: generate_by_recompute(model, idx, n))]:
        t0 = time.perf_counter()
        out = run()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        rates[name] = (out.size(1) - 1) / (time.perf_counter() - t0)
    print(f"{n} tokens, 6 layers x 384 wide, 6 heads, block_size 256, on {device}, "
          f"{torch.get_num_threads()} threads")
    for name, rate in rates.items():
        print(f"{name:>15}: {rate:8.1f} tokens/s")
    print(f"{'speed-up':>15}: {rates['kv cache'] / rates['full recompute']:8.1f}x")


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
    if cfg["threads"]:
        torch.set_num_threads(cfg["threads"])
    if cfg["bench"]:
        return bench(cfg, device)
    model, tokenizer = load_model(cfg, device)
    if cfg["compile"]:
        model = torch.compile(model)
    if model.config.n_classes:
        return print_labels(model, tokenizer, cfg, device)
    if cfg["instruct_eval"]:
        return print_instruct_eval(model, tokenizer, cfg, device)
    if cfg["instruct"] or cfg["interactive"]:
        return instruct_loop(model, tokenizer, cfg, device)
    prompts = [encode_prompt(tokenizer, text) for text in read_prompts(cfg)]
    eot = tokenizer.eot_token if cfg["stop_at_eot"] else None
    generator = torch.Generator(device=device).manual_seed(cfg["seed"])
    autocast = (torch.autocast(device_type=device_type, dtype=getattr(torch, dtype))
                if dtype != "float32" else nullcontext())
    t0 = time.perf_counter()
    with autocast:
        if cfg["beam_width"] > 1:
            n = run_beams(model, tokenizer, prompts, cfg, eot)
        elif cfg["stream"]:
            n = run_stream(model, tokenizer, prompts, cfg, eot, generator)
        else:
            n = run_batch(model, tokenizer, prompts, cfg, eot, generator)
    dt = time.perf_counter() - t0
    print(f"{n} tokens in {dt:.2f} s: {n / dt:.1f} tokens/s", file=sys.stderr)


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except (ConfigError, TrainError, TokenizerError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
