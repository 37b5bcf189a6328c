"""
Generate text from a trained checkpoint.

  python sample.py --out_dir=out-shakespeare-char --start="ROMEO:" --num_samples=3
  python sample.py --out_dir=out --start=FILE:prompt.txt --temperature=0.8 --top_k=200
  python sample.py --out_dir=out --prompts_file=prompts.txt --top_p=0.9 --stop="\n\n" --stream
  python sample.py --out_dir=out --beam_width=4 --num_samples=1 --temperature=0
  python sample.py --bench    # tokens/s: KV cache, static cache compiled, int8 weights, full recompute
  python sample.py --out_dir=out --quantize=int8 --compile   # int8 weights, one compiled graph per step
  python sample.py --out_dir=out --draft=out-draft --temperature=0   # speculative decoding with a small draft
  python sample.py --out_dir=out-instruct --instruct --start="Name three primary colors."
  python sample.py --out_dir=out-instruct --instruct --interactive
  python sample.py --out_dir=out-spam --start="WIN a free prize"   # a classifier: label and probability
  python sample.py --out_dir=out-mlm --start="To be, or not to [MASK]"  # an encoder: fills each [MASK]

Decoding uses a KV cache (decoding.py): the prompts are prefilled once, then each step runs the
model on one new token, in every mode (--instruct, --interactive and --instruct_eval too). All prompts
and their num_samples samples are decoded as one batch (left-padded), except with --stream, which
decodes one sample at a time and prints it as it grows. --compile decodes on a static KV cache whose
steps torch.compile captures as one graph (decoding.StaticKVCache); --quantize=int8 reads int8 weights
(quantize.py); --draft decodes each sample speculatively: a smaller model with the same tokenizer
guesses --draft_k tokens and the checkpoint keeps those it would have chosen (the same greedy text, the
same distribution when sampling), printing its acceptance rate.
Generation stops at max_new_tokens, at the tokenizer's stop tokens (end-of-text for BPE; Llama 3's
<|end_of_text|> and <|eot_id|>) or at --stop.
A classifier checkpoint labels the text instead (with FILE:, each non-empty line). An encoder
(causal=False, trained with objective=mlm) fills every [MASK] of the prompt in one forward pass: it
prints the text with each mask's likeliest token, then each mask's top_k candidates (at most 10)
and their probabilities.

The tokenizer is the one of the dataset the checkpoint was trained on (recorded in the
checkpoint from the dataset's meta.json). `python sample.py --help` lists every setting.
"""
import os
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass

from common import yield_idle_cores
yield_idle_cores()  # before torch loads OpenMP

import torch

import quantize
import runtime
from common import UserError, description, read_meta, read_text_file, run_cli
from configurator import parse_args
from decoding import beam_search, generate_batch
from hf import load_for_inference
from model import GPT, GPTConfig
from tokenizer import StopText


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
    bench: bool = False            # tokens/s and MBU: KV cache, int8 weights (with --compile, the compiled static cache too) and full recompute, random 6x384 model; with --draft, the checkpoint alone against k = 1..draft_k guesses on the prompts
    seed: int = 1337               # random seed: the same seed gives the same samples
    device: str = "auto"           # auto | cpu | cuda | cuda:N | mps
    dtype: str = "auto"            # auto | float32 | bfloat16 | float16 (auto: as train.py's, see runtime.py)
    utf8: bool = True              # byte-level tokenizers (gpt2, bpe): never sample a token that breaks UTF-8, and drop a character cut by max_new_tokens
    compile: bool = False          # sampling: a static KV cache with one torch.compile'd graph per step (decoding.compiled_step); other modes: torch.compile the model
    draft: str = ""                # checkpoint (file or out_dir) of a smaller model with the same tokenizer: speculative decoding, one sample at a time
    draft_k: int = 4               # tokens the draft guesses per round (>= 1)
    quantize: str = ""             # int8 (the blocks' matrices) | int8_all (embedding and head too): weight-only int8, quantize.py; "" none
    threads: int = 0               # CPU threads for torch; 0 (auto): 1 when a CPU decodes one sequence at a time (as fast, and robust to a busy CPU), else torch's default
    instruct: bool = False         # wrap the prompt in the instruction template (tasks.py); stop at end-of-text
    interactive: bool = False      # answer instructions typed at a "> " prompt until an empty line (implies instruct)
    instruct_eval: str = ""        # val | test: answer every prompt of that split of the checkpoint's instruct dataset (greedy); print the end-of-text rate


def check_settings(cfg):
    if cfg["temperature"] < 0:
        raise UserError(f"temperature must be >= 0, got {cfg['temperature']}")
    if cfg["top_k"] < 1:
        raise UserError(f"top_k must be >= 1, got {cfg['top_k']}; to keep every token pass the vocabulary size")
    if not 0 < cfg["top_p"] <= 1:
        raise UserError(f"top_p must be in (0, 1], got {cfg['top_p']}; 1 keeps every token")
    if cfg["repetition_penalty"] <= 0:
        raise UserError(f"repetition_penalty must be > 0 (1 is off), got {cfg['repetition_penalty']}")
    if cfg["max_new_tokens"] < 1:
        raise UserError(f"max_new_tokens must be >= 1, got {cfg['max_new_tokens']}")
    if cfg["threads"] < 0:
        raise UserError(f"threads must be >= 1, or 0 for the automatic choice, got {cfg['threads']}")
    if cfg["num_samples"] < 1:
        raise UserError(f"num_samples must be >= 1, got {cfg['num_samples']}")
    if cfg["beam_width"] < 1:
        raise UserError(f"beam_width must be >= 1 (1 samples without beam search), got {cfg['beam_width']}")
    if cfg["beam_width"] > 1 and cfg["num_samples"] > cfg["beam_width"]:
        raise UserError(f"beam search prints the num_samples best of its beams: num_samples "
                          f"({cfg['num_samples']}) must be <= beam_width ({cfg['beam_width']})")
    if cfg["draft_k"] < 1:
        raise UserError(f"draft_k must be >= 1, got {cfg['draft_k']}")
    if cfg["draft"] and (cfg["beam_width"] > 1 or cfg["instruct"] or cfg["interactive"] or cfg["instruct_eval"]):
        raise UserError("--draft speeds up sampling from prompts; it does not run with beam search or the "
                        "instruct modes (drop --draft)")
    if cfg["draft"] and (cfg["stream"] or cfg["repetition_penalty"] != 1.0 or not cfg["use_cache"]):
        raise UserError("--draft decodes on the KV cache without a repetition penalty and prints each sample whole; "
                        "drop --stream, --repetition_penalty or --use_cache=False (or --draft)")
    if cfg["draft"] and cfg["compile"]:
        raise UserError("--draft and --compile do not combine (the draft's rounds feed varying lengths); drop one")
    if cfg["beam_width"] > 1 and cfg["stream"]:
        raise UserError("--stream cannot show beam search (the best beam is known only at the end); "
                          "drop --stream or use --beam_width=1")


def read_prompt(start):
    return read_text_file(start[5:], "prompt file") if start.startswith("FILE:") else start


def read_prompts(cfg):
    """The prompt texts: the lines of --prompts_file, or --start."""
    path = cfg["prompts_file"]
    if not path:
        return [read_prompt(cfg["start"])]
    prompts = [line.rstrip("\r") for line in read_text_file(path, "prompts file").split("\n") if line.strip()]
    if not prompts:
        raise UserError(f"prompts file {path} has no prompts; write one per line")
    return prompts


def encode_prompt(tokenizer, text):
    ids = tokenizer.encode(text)
    if not ids:
        if tokenizer.bos_token is None:
            raise UserError("the prompt is empty; pass --start=TEXT")
        ids = [tokenizer.bos_token]  # the token a fresh document starts after (GPT-2's end-of-text)
    return ids


def unescape(text):
    """--stop=\\n typed in a shell arrives as backslash-n; a stop string almost always means a newline."""
    return text.replace("\\n", "\n").replace("\\t", "\t")


def cut_at_stop(text, stop):
    """text up to the first occurrence of stop (all of it when stop is "" or absent)."""
    return text[:text.index(stop)] if stop and stop in text else text


def sampling_args(cfg, tokenizer, fast):
    """generate_batch's arguments: the settings', and fast's (utf8: a Utf8Mask; static: a step function)."""
    return dict(temperature=cfg["temperature"], top_k=cfg["top_k"], top_p=cfg["top_p"],
                repetition_penalty=cfg["repetition_penalty"], use_cache=cfg["use_cache"],
                stop_tokens=tokenizer.stop_tokens if cfg["stop_at_eot"] else (), **fast)


def print_sample(prompt_text, text):
    print(prompt_text + text)
    print("---------------")


def run_beams(model, tokenizer, prompts, cfg):
    """Beam search per prompt; prints the num_samples best hypotheses. Returns tokens generated."""
    n = 0
    stop = tokenizer.stop_tokens if cfg["stop_at_eot"] else ()
    for ids in prompts:
        ranked = beam_search(model, ids, cfg["max_new_tokens"], cfg["beam_width"], cfg["length_penalty"],
                             stop_tokens=stop, use_cache=cfg["use_cache"])
        for tokens, _ in ranked[:cfg["num_samples"]]:
            n += len(tokens)
            print_sample(tokenizer.decode(ids), cut_at_stop(tokenizer.decode(tokens), unescape(cfg["stop"])))
    return n


def samples_per_prompt(cfg):
    """num_samples, except greedy decoding (temperature 0), whose samples would all be the same text."""
    if cfg["temperature"] == 0 and cfg["beam_width"] == 1 and cfg["num_samples"] > 1:
        print(f"note: temperature=0 is greedy, so one sample per prompt (its {cfg['num_samples']} samples would be "
              f"the same text); set a temperature above 0 to draw several", file=sys.stderr)
        return 1
    return cfg["num_samples"]


def run_batch(model, tokenizer, prompts, cfg, generator, fast):
    """All prompts x num_samples decoded as one batch; prints them at the end. Returns tokens generated."""
    rows = [ids for ids in prompts for _ in range(samples_per_prompt(cfg))]
    texts = [StopText(tokenizer, [unescape(cfg["stop"])]) for _ in rows]

    def on_token(row, token):
        texts[row].add(token)
        return texts[row].done

    out = generate_batch(model, rows, cfg["max_new_tokens"], on_token=on_token, generator=generator,
                         **sampling_args(cfg, tokenizer, fast))
    for ids, tokens in zip(rows, out):  # decoded whole, independently of the stop checks
        print_sample(tokenizer.decode(ids), cut_at_stop(tokenizer.decode(tokens), unescape(cfg["stop"])))
    return sum(len(tokens) for tokens in out)


def run_stream(model, tokenizer, prompts, cfg, generator, fast):
    """One sample at a time, each printed as its tokens arrive. Returns tokens generated."""
    n, k = 0, samples_per_prompt(cfg)
    for ids in prompts:
        for _ in range(k):
            print(tokenizer.decode(ids), end="", flush=True)
            text = StopText(tokenizer, [unescape(cfg["stop"])], drop_incomplete=fast["utf8"] is not None)

            def on_token(row, token):
                print(text.add(token), end="", flush=True)
                return text.done

            out = generate_batch(model, [ids], cfg["max_new_tokens"], on_token=on_token, generator=generator,
                                 **sampling_args(cfg, tokenizer, fast))
            print(text.finish())
            print("---------------", flush=True)
            n += len(out[0])
    return n


def timed(run, device):
    """(run's output, seconds it took), the device synchronised."""
    t0 = time.perf_counter()
    out = run()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return out, time.perf_counter() - t0


def take_turns(runs, device, rounds):
    """Each of runs {name: a function} timed once a round, in turn, for `rounds` rounds, so that a machine
    that slows down for a while slows every one: ({name: the last output}, {name: median seconds})."""
    outs, times = {}, {name: [] for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            outs[name], dt = timed(run, device)
            times[name].append(dt)
    return outs, {name: sorted(t)[len(t) // 2] for name, t in times.items()}


def bench(cfg, device, rounds=3):
    """Tokens/s of greedy decoding from a one-token prompt on a randomly initialised
    shakespeare-char-sized model (speed ignores the weights), side by side: the KV cache in float32,
    with int8 weights (the blocks', then all), with --compile the static cache under torch.compile
    (float32, int8), and the reference GPT.generate that re-runs the whole context as nanoGPT's does.
    The rows take turns for `rounds` rounds and each reports its median, so a machine that slows down
    for a while slows every row. Each row also gives the weight bytes a token reads and the bandwidth
    they make, over this machine's copy bandwidth measured in the same command (MBU)."""
    from decoding import compiled_step, weight_bytes_per_token
    config = GPTConfig(n_layer=6, n_head=6, n_embd=384, block_size=256, vocab_size=65, dropout=0.0)
    n = cfg["max_new_tokens"]
    bandwidth = runtime.copy_bandwidth(device)
    runs = [("kv cache", "", False), ("kv cache, int8", "int8", False), ("kv cache, int8_all", "int8_all", False)]
    if cfg["compile"]:
        runs += [("static cache, compiled", "", True), ("static cache, compiled, int8", "int8", True),
                 ("static cache, compiled, int8_all", "int8_all", True)]
    decoders, nbytes, labels = {}, {}, {}  # by row name: the decode, weight bytes per token, the printed name
    for name, mode, compiled in runs + [("full recompute", None, False)]:
        torch.manual_seed(cfg["seed"])
        model = GPT(config).to(device).eval()
        kernel = quantize.prepare(model, mode) if mode else None
        if mode is None:
            prompt = torch.zeros(1, 1, dtype=torch.long, device=device)
            decoders[name] = (lambda m, p: lambda: m.generate(p, n, temperature=0)[0, 1:].tolist())(model, prompt)
        else:
            static = compiled_step(torch.device(device).type) if compiled else None
            decoders[name] = (lambda m, st: lambda: generate_batch(m, [[0]], n, temperature=0, static=st)[0])(
                model, static)
            generate_batch(model, [[0]], 8, temperature=0, static=static)  # warm-up: allocations, compilation
        nbytes[name] = weight_bytes_per_token(model)
        labels[name] = name + (f" ({kernel.split('kernel ')[1][:-1]})" if kernel else "")
    outs, seconds = take_turns(decoders, device, rounds)
    rate = {name: len(outs[name]) / seconds[name] for name in decoders}
    reference = outs["kv cache"]
    print(f"{n} tokens, 6 layers x 384 wide, 6 heads, block_size 256, on {device}, "
          f"{torch.get_num_threads()} threads, median of {rounds} rounds; copy bandwidth {bandwidth / 1e9:.1f} GB/s")
    width = max(len(label) for label in labels.values())
    print(f"{'':>{width}} {'tokens/s':>9} {'MB/token':>9} {'GB/s':>6} {'MBU':>6}  same tokens as float32")
    for name, r in rate.items():
        same = sum(a == b for a, b in zip(outs[name], reference)) / len(reference)
        print(f"{labels[name]:>{width}} {r:9.1f} {nbytes[name] / 1e6:9.1f} {r * nbytes[name] / 1e9:6.1f} "
              f"{r * nbytes[name] / bandwidth:6.1%}  {same:.0%}")
    print(f"speed-up of the cache over full recompute: {rate['kv cache'] / rate['full recompute']:.1f}x")
    print(f"speed-up of int8 weights: {rate['kv cache, int8'] / rate['kv cache']:.1f}x "
          f"(int8_all {rate['kv cache, int8_all'] / rate['kv cache']:.1f}x)")
    if cfg["compile"]:
        c = rate["static cache, compiled"]
        print(f"compiled static cache: float32 {c / rate['kv cache']:.1f}x the kv cache's; int8 "
              f"{rate['static cache, compiled, int8'] / rate['kv cache']:.1f}x the kv cache's float32, "
              f"{rate['static cache, compiled, int8'] / c:.1f}x the compiled float32 (int8_all "
              f"{rate['static cache, compiled, int8_all'] / rate['kv cache']:.1f}x, "
              f"{rate['static cache, compiled, int8_all'] / c:.1f}x)")


def bench_draft(model, draft, tokenizer, cfg, device, rounds=3):
    """--bench with --draft: each prompt decoded greedily one at a time by the checkpoint alone, then with
    the draft guessing k = 1 .. draft_k tokens a round; tokens/s of each (the rows take turns for
    `rounds` rounds, medians), the acceptance rate, and whether every text is the checkpoint's own."""
    from decoding import speculative_generate
    prompts = [encode_prompt(tokenizer, text) for text in read_prompts(cfg)]
    n = cfg["max_new_tokens"]
    generate_batch(model, [prompts[0]], 8, temperature=0)  # warm-up: first calls pay for allocations
    speculative_generate(model, draft, prompts[0], 8, 2, temperature=0)
    runs = {0: lambda: [(generate_batch(model, [ids], n, temperature=0)[0], None) for ids in prompts]}
    for k in range(1, cfg["draft_k"] + 1):
        runs[k] = (lambda k: lambda: [speculative_generate(model, draft, ids, n, k, temperature=0) for ids in prompts])(k)
    outs, dt = take_turns(runs, device, rounds)
    alone = [out for out, _ in outs[0]]
    tokens = sum(len(out) for out in alone)
    print(f"{len(prompts)} prompts x {n} tokens, greedy, one sequence at a time, on {device}, "
          f"{torch.get_num_threads()} threads, median of {rounds} rounds")
    print(f"{'':>11} {'tokens/s':>9} {'speed-up':>9} {'accepted':>9} {'tokens/forward':>15}  same text")
    print(f"{'alone':>11} {tokens / dt[0]:9.1f} {1.0:8.2f}x")
    for k in range(1, cfg["draft_k"] + 1):
        stats = {key: sum(r[1][key] for r in outs[k]) for key in ("rounds", "proposed", "accepted")}
        same = sum(out == ref for (out, _), ref in zip(outs[k], alone))
        print(f"{f'draft, k={k}':>11} {tokens / dt[k]:9.1f} {dt[0] / dt[k]:8.2f}x "
              f"{stats['accepted'] / max(1, stats['proposed']):9.1%} {tokens / max(1, stats['rounds']):15.2f}  "
              f"{same} of {len(prompts)}")


def print_labels(model, tokenizer, cfg, ckpt, device):
    """One line per text: label, its probability, the text."""
    from tasks import label_texts
    text = read_prompt(cfg["start"])
    texts = [t for t in text.splitlines() if t.strip()] if cfg["start"].startswith("FILE:") else [text]
    names = ckpt.get("config", {}).get("label_names", [])
    for t, (label, p) in zip(texts, label_texts(model, tokenizer, texts, names, device)):
        print(f"{label}\t{p:.4f}\t{t}")


@torch.no_grad()
def fill_masks(model, ids, mask_token, k, device):
    """An encoder's k best guesses at each masked position of ids, in one forward pass:
    [(position, [(token, probability)] * k)]."""
    x = torch.tensor(ids, dtype=torch.long, device=device)[None, :]  # (1, T)
    logits, _ = model(x)
    probs = torch.softmax(logits[0].float(), dim=-1)  # (T, vocab)
    out = []
    for pos in (i for i, t in enumerate(ids) if t == mask_token):
        p, tokens = probs[pos].topk(k)
        out.append((pos, list(zip(tokens.tolist(), p.tolist()))))
    return out


def print_fills(model, tokenizer, cfg, device):
    """The prompt with each [MASK] filled by the encoder's likeliest token, then every mask's candidates."""
    from tokenizer import MASK_TEXT, encode_with_masks
    ids = encode_with_masks(tokenizer, read_prompt(cfg["start"]))
    if tokenizer.mask_token not in ids:
        raise UserError(f"an encoder fills masks: put {MASK_TEXT} in --start, "
                        f"e.g. --start=\"To be, or not to {MASK_TEXT}\"")
    if len(ids) > model.config.block_size:
        raise UserError(f"the prompt has {len(ids)} tokens; the encoder reads at most {model.config.block_size}")
    fills = fill_masks(model, ids, tokenizer.mask_token, min(cfg["top_k"], 10), device)
    filled = list(ids)
    for pos, candidates in fills:
        filled[pos] = candidates[0][0]
    print(tokenizer.decode(filled))
    for n, (pos, candidates) in enumerate(fills, 1):
        shown = "  ".join(f"{tokenizer.decode([t])!r} {p:.3f}" for t, p in candidates)
        print(f"{MASK_TEXT} {n} (token {pos}): {shown}")


def print_instruct_eval(model, tokenizer, cfg, ckpt):
    """Greedy answers to every prompt of a split of the checkpoint's instruct dataset. Returns tokens generated."""
    from tasks import instruct_report
    data_dir = ckpt.get("dataset_dir") or ""
    if not os.path.isfile(os.path.join(data_dir, "meta.json")):
        raise UserError(f"the checkpoint's dataset {data_dir} is gone; instruct_eval reads its prompts")
    meta = read_meta(data_dir)
    if meta.get("task") != "instruct" or cfg["instruct_eval"] not in ("val", "test"):
        raise UserError("instruct_eval=val|test needs a checkpoint trained on an instruct dataset")
    stays, examples, n = instruct_report(model, tokenizer, data_dir, meta, cfg["instruct_eval"], cfg["max_new_tokens"])
    for prompt, answer, reference, stopped in examples:
        print(f"{prompt}{answer}{'<|endoftext|>' if stopped else '...'}\n[reference: {reference}]\n---------------")
    print(f"{cfg['instruct_eval']}: {sum(stays) / max(1, len(stays)):.1%} of answers stay in the template and end "
          f"with end-of-text (eval.py --tasks=instruct --split={cfg['instruct_eval']} adds the response loss and "
          f"perplexity)")
    return n


def instruct_loop(model, tokenizer, cfg, generator):
    """Answer the prompt (or, interactive, each line typed) in the instruction template. Returns tokens
    generated."""
    from tasks import respond
    if tokenizer.eot_token is None:
        raise UserError("--instruct needs a model whose tokenizer has an end-of-text token (gpt2 or bpe)")
    args = dict(max_new_tokens=cfg["max_new_tokens"], temperature=cfg["temperature"], top_k=cfg["top_k"],
                generator=generator, utf8=cfg["utf8"])
    n = 0
    if not cfg["interactive"]:
        for _ in range(samples_per_prompt(cfg)):
            text, ids, _ = respond(model, tokenizer, read_prompt(cfg["start"]), **args)
            n += len(ids)
            print(text)
            print("---------------")
        return n
    while True:
        try:
            line = input("> ")
        except EOFError:
            break
        if not line.strip():
            break
        text, ids, _ = respond(model, tokenizer, line, **args)
        n += len(ids)
        print(text, flush=True)
    return n


def plain_sampling(cfg, model):
    """Whether this run samples continuations of prompts (generate_batch: where the static cache runs)."""
    return (model.config.causal and not model.config.n_classes and not cfg["instruct_eval"] and not cfg["instruct"]
            and not cfg["interactive"] and cfg["beam_width"] == 1)


def one_sequence_at_a_time(cfg, model):
    """Whether every decoding step of this run is of a single sequence."""
    if model.config.n_classes or cfg["instruct_eval"]:
        return False
    if cfg["stream"] or cfg["instruct"] or cfg["interactive"] or cfg["draft"]:
        return True
    return cfg["beam_width"] == 1 and not cfg["prompts_file"] and (cfg["num_samples"] == 1 or cfg["temperature"] == 0)


@contextmanager
def cpu_threads(n):
    """torch's CPU threads set to n (0: left as they are) for the block, then put back as they were."""
    before = torch.get_num_threads()
    torch.set_num_threads(n or before)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def decode_threads(cfg, model, device):
    """--threads, or auto (0): one thread when a CPU decodes one sequence at a time, whose one-token steps
    ran as fast on one thread as on two (6x384 and GPT-2 124M) and do not stall behind a busy machine
    (README, "A busy CPU"); 0 (torch's default) otherwise."""
    if cfg["threads"]:
        return cfg["threads"]
    return 1 if device == "cpu" and one_sequence_at_a_time(cfg, model) else 0


def generate(model, tokenizer, ckpt, cfg, rt, draft=None):
    """What the checkpoint and the settings ask for; returns the number of tokens generated (None: labels)."""
    generator = torch.Generator(device=rt.device).manual_seed(cfg["seed"])
    if model.config.n_classes:
        print_labels(model, tokenizer, cfg, ckpt, rt.device)
        return None
    if not model.config.causal:
        print_fills(model, tokenizer, cfg, rt.device)
        return None
    if cfg["instruct_eval"]:
        return print_instruct_eval(model, tokenizer, cfg, ckpt)
    if cfg["instruct"] or cfg["interactive"]:
        return instruct_loop(model, tokenizer, cfg, generator)
    prompts = [encode_prompt(tokenizer, text) for text in read_prompts(cfg)]
    if cfg["beam_width"] > 1:
        return run_beams(model, tokenizer, prompts, cfg)
    from tasks import utf8_mask
    utf8 = utf8_mask(model, tokenizer) if cfg["utf8"] else None
    if draft is not None:
        return run_speculative(model, draft, tokenizer, prompts, cfg, generator, utf8)
    fast = dict(utf8=utf8, static=static_step(model, cfg, rt.device) if cfg["compile"] else None)
    if cfg["stream"]:
        return run_stream(model, tokenizer, prompts, cfg, generator, fast)
    return run_batch(model, tokenizer, prompts, cfg, generator, fast)


def static_step(model, cfg, device):
    """The compiled step of the static cache, or a UserError naming what it cannot run."""
    from decoding import check_static, compiled_step
    if not cfg["use_cache"]:
        raise UserError("--compile decodes on a static KV cache; it does not combine with --use_cache=False")
    try:
        check_static(model.config)
    except ValueError as e:
        raise UserError(str(e).replace("compile=False", "--compile=False")) from None
    return compiled_step(torch.device(device).type)


def load_draft(cfg, ckpt, model, device):
    """The --draft model, or a UserError if it cannot guess for model, this checkpoint's."""
    from decoding import check_speculative
    draft_ckpt, draft, _ = load_for_inference(cfg["draft"], cfg["draft"], device, decoder_for="--draft")
    if draft_ckpt.get("tokenizer") != ckpt.get("tokenizer"):
        raise UserError(f"the draft {cfg['draft']} was trained with another tokenizer than the checkpoint's; a draft "
                        f"must share the target's tokenizer (train it on the same prepared dataset)")
    try:
        check_speculative(model, draft)
    except ValueError as e:
        raise UserError(f"--draft {cfg['draft']}: {e}") from None
    return draft


def run_speculative(model, draft, tokenizer, prompts, cfg, generator, utf8):
    """Each sample of each prompt decoded speculatively with the draft; prints them, then the acceptance
    rate. Returns tokens generated."""
    from decoding import speculative_generate
    totals, n = dict(rounds=0, proposed=0, accepted=0), 0
    stop = tokenizer.stop_tokens if cfg["stop_at_eot"] else ()
    for ids in prompts:
        for _ in range(samples_per_prompt(cfg)):
            text = StopText(tokenizer, [unescape(cfg["stop"])])

            def on_token(token):
                text.add(token)
                return text.done
            tokens, stats = speculative_generate(model, draft, ids, cfg["max_new_tokens"], cfg["draft_k"],
                                                 cfg["temperature"], cfg["top_k"], cfg["top_p"], stop, generator, utf8,
                                                 on_token)
            totals = {key: totals[key] + stats[key] for key in totals}
            n += len(tokens)
            print_sample(tokenizer.decode(ids), cut_at_stop(tokenizer.decode(tokens), unescape(cfg["stop"])))
    rate = totals["accepted"] / max(1, totals["proposed"])
    print(f"draft: {totals['accepted']} of {totals['proposed']} guesses accepted ({rate:.1%}), "
          f"{n / max(1, totals['rounds']):.2f} tokens per target forward", file=sys.stderr)
    return n


def main(argv):
    cfg, _ = parse_args(argv, [SampleConfig], "sample.py", description(__doc__))
    check_settings(cfg)
    rt = runtime.local(cfg["device"], cfg["dtype"])
    torch.manual_seed(cfg["seed"])
    busy = runtime.busy_cpu_note(rt.device)  # before this run's own load counts in it
    if cfg["bench"] and not cfg["draft"]:
        with cpu_threads(cfg["threads"] or (1 if rt.device == "cpu" else 0)):  # batch 1: decode_threads' rule
            return bench(cfg, rt.device)
    ckpt, model, tokenizer = load_for_inference(cfg["init_from"], cfg["out_dir"], rt.device)
    draft = load_draft(cfg, ckpt, model, rt.device) if cfg["draft"] else None
    threads = decode_threads(cfg, model, rt.device)
    with cpu_threads(threads):  # the int8 kernel is timed as decoding will run it
        note = quantize.prepare(model, cfg["quantize"])
        if draft is not None:
            quantize.prepare(draft, cfg["quantize"])
    if note:
        print(note, file=sys.stderr)
    if cfg["bench"]:
        with cpu_threads(threads):
            return bench_draft(model, draft, tokenizer, cfg, rt.device)
    if cfg["compile"] and not plain_sampling(cfg, model):
        model = torch.compile(model, dynamic=True)  # the context grows every step: one graph for all lengths
    t0 = time.perf_counter()
    with cpu_threads(threads), rt.autocast():
        n = generate(model, tokenizer, ckpt, cfg, rt, draft)
    dt = time.perf_counter() - t0
    if n is not None:
        print(f"{n} tokens in {dt:.2f} s: {n / dt:.1f} tokens/s" + (f"\n{busy}" if busy else ""), file=sys.stderr)


if __name__ == "__main__":
    sys.exit(run_cli(main))
