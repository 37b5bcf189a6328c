"""
Measure what a model knows: bits per byte on a dataset split or any text, multiple-choice benchmarks
scored as the lm-evaluation-harness scores them (HellaSwag's protocol), a cloze test built from any
prepared dataset, an instruction model's response loss, and any task of the lm-evaluation-harness.

  python eval.py --out_dir=out-shakespeare-char-cpu                  # bpb of its dataset's val split, and the cloze test
  python eval.py --out_dir=out --tasks=bpb --text=FILE:book.txt       # bpb of a text file, in sliding windows
  python eval.py --out_dir=out --tasks=mc --mc_file=questions.jsonl   # {"context", "choices", "label"} per line
  python eval.py --init_from=gpt2 --tasks=hellaswag --limit=500       # HellaSwag's val split (downloaded once)
  python eval.py --out_dir=out-instruct --split=test                  # response loss, perplexity, end-of-text share
  python eval.py --out_dir=out --lm_eval_tasks=arc_easy               # the lm-evaluation-harness (pip install lm-eval)
  python eval.py --bench                                              # scoring speed: questions/s, tokens/s

Writes eval.json beside the checkpoint (or --out) and prints a table: one line per task with its
metric, value, standard error and number of examples. A later run on the same checkpoint adds its
tasks to eval.json (and replaces those it ran again).

Design choices:
- The scoring itself is benchmarks.py's (bits per byte, multiple choice, cloze); this file picks the
  data a task reads (a dataset split, a text, a question file) and writes the results.
- --tasks=auto measures what the checkpoint's dataset is for: bpb and cloze for a language-model
  dataset, the response loss and the end-of-text share for an instruct one.
- lm-eval's tasks run through lm_eval_adapter.py, imported only when --lm_eval_tasks asks.
"""
import json
import math
import os
import sys
from dataclasses import dataclass

from common import yield_idle_cores
yield_idle_cores()  # before torch loads OpenMP

import numpy as np
import torch

import quantize
import runtime
from benchmarks import (benchmark_questions, benchmark_scores, bits_per_byte, check_task_names, cloze_questions,
                        encode_choices, mean_and_stderr, score_choices, score_cloze, score_stream, token_bytes)
from common import UserError, description, read_meta, read_text_file, run_cli, write_json_atomic
from configurator import parse_args
from hf import load_for_inference

TASKS = ("bpb", "cloze", "mc", "hellaswag", "instruct", "arithmetic")


@dataclass
class EvalConfig:
    out_dir: str = "out"           # folder of the checkpoint to evaluate (its ckpt.pt); eval.json goes there
    init_from: str = "resume"      # resume (out_dir/ckpt.pt) | PATH of a checkpoint file or folder, or a Hugging Face folder | gpt2*
    tasks: str = "auto"            # comma-separated: bpb | cloze | mc (--mc_file) | hellaswag | instruct | arithmetic; auto: bpb,cloze (instruct for an instruct dataset, bpb,arithmetic for an arithmetic one)
    split: str = "val"             # the dataset split that bpb, cloze and instruct read (train | val | test); arithmetic: its val or test problems
    dataset: str = ""              # a prepared dataset folder; "" is the one the checkpoint was trained on
    text: str = ""                 # bpb of this text instead of a split (FILE:path reads a file)
    stride: int = 0                # sliding window: tokens newly predicted per window (0: half of the window)
    context: int = 0               # bpb: windows of this many tokens (0: block_size); past block_size only for rope and alibi models
    max_tokens: int = 0            # bpb reads at most this many tokens of the split (0: all of it)
    mc_file: str = ""              # JSONL of {"context", "choices", "label"} for the mc task
    hellaswag_split: str = "val"   # val | train: HellaSwag's file, downloaded once into data/hellaswag/
    limit: int = 0                 # at most this many questions per multiple-choice task (0: all)
    cloze_questions: int = 1000    # questions in the cloze test
    cloze_tokens: int = 16         # tokens in each continuation of the cloze test
    batch_size: int = 16           # windows (bpb), examples (instruct) or requests (lm-eval) per forward pass
    max_new_tokens: int = 100      # instruct: the longest answer generated
    lm_eval_tasks: str = ""        # comma-separated tasks of the lm-evaluation-harness (pip install lm-eval), through lm_eval_adapter.py
    lm_eval_include: str = ""      # a folder of local lm-eval task YAMLs (offline: dataset_path json + data_files)
    lm_eval_fewshot: int = -1      # few-shot examples for the lm-eval tasks (-1: each task's own default)
    seed: int = 1337               # fixes the cloze test's questions (and lm-eval's sampling, if a task samples)
    out: str = ""                  # where eval.json goes ("" : beside the checkpoint)
    device: str = "auto"           # auto | cpu | cuda | cuda:N | mps
    dtype: str = "auto"            # auto | float32 | bfloat16 | float16 (as train.py's)
    quantize: str = ""             # int8 | int8_all: weight-only int8 (quantize.py), to measure what it costs; "" none
    bench: bool = False            # scoring speed on two random models (the CPU config's shape and 6x384); no checkpoint


# -----------------------------------------------------------------------------------------------
# the script

def check_settings(cfg):
    """The task names and ranges, checked; returns the tasks (["auto"]: chosen by the dataset)."""
    tasks = ["auto"] if cfg["tasks"].strip() == "auto" else check_task_names(cfg["tasks"], TASKS, "--tasks")
    if not tasks:
        raise UserError(f"--tasks is empty; choose from {', '.join(TASKS)}")
    if "mc" in tasks and not cfg["mc_file"]:
        raise UserError("--tasks=mc needs --mc_file=FILE, a JSONL of {\"context\", \"choices\", \"label\"}")
    for key in ("stride", "max_tokens", "limit", "cloze_questions", "batch_size", "cloze_tokens", "max_new_tokens",
                "lm_eval_fewshot"):
        low = {"stride": 0, "max_tokens": 0, "limit": 0, "lm_eval_fewshot": -1}.get(key, 1)
        if cfg[key] < low:
            raise UserError(f"{key} must be >= {low}, got {cfg[key]}")
    if cfg["split"] not in ("train", "val", "test"):
        raise UserError(f"split must be train, val or test, got {cfg['split']!r}")
    if cfg["hellaswag_split"] not in ("train", "val"):
        raise UserError(f"hellaswag_split must be train or val, got {cfg['hellaswag_split']!r}")
    if cfg["lm_eval_include"] and not os.path.isdir(cfg["lm_eval_include"]):
        raise UserError(f"--lm_eval_include={cfg['lm_eval_include']} is not a folder of lm-eval task YAMLs")
    return tasks


def dataset_of(cfg, ckpt):
    """The prepared dataset folder that bpb, cloze and instruct read, and its meta.json."""
    data_dir = cfg["dataset"] or ckpt.get("dataset_dir") or ""
    if not os.path.isfile(os.path.join(data_dir, "meta.json")):
        raise UserError(f"no dataset to read: {data_dir or 'the checkpoint names none'}; pass --dataset=FOLDER "
                        f"(a prepared dataset) or --text=FILE:path")
    return data_dir, read_meta(data_dir)


def chosen_tasks(tasks, cfg, ckpt):
    """--tasks=auto made concrete: none beside --lm_eval_tasks; instruct for a checkpoint of an instruct
    dataset; else bpb and cloze."""
    if tasks != ["auto"]:
        return tasks
    if cfg["lm_eval_tasks"]:
        return []
    try:
        meta = dataset_of(cfg, ckpt)[1]
    except UserError:  # no dataset: bpb says so, or measures --text
        meta = {}
    if meta.get("rl_task") in TASKS:  # a task whose answers a program checks (rewards.py)
        return ["bpb", meta["rl_task"]]
    return ["instruct"] if meta.get("task") == "instruct" else ["bpb", "cloze"]


def split_tokens(cfg, ckpt, tokenizer):
    """The tokens of the dataset split bpb and cloze read (memory-mapped), checked against the tokenizer."""
    data_dir, meta = dataset_of(cfg, ckpt)
    if meta.get("task", "lm") != "lm":
        hint = "; --tasks=instruct measures an instruct dataset" if meta["task"] == "instruct" else ""
        raise UserError(f"{data_dir} is a {meta['task']} dataset; bpb and cloze read a language-model dataset{hint}")
    if meta.get("tokenizer", {}).get("kind") != tokenizer.kind or meta["vocab_size"] != tokenizer.vocab_size:
        raise UserError(f"{data_dir} was tokenized with another tokenizer than the model's; pass --text=FILE:path "
                        f"to measure any text with the model's own")
    path = os.path.join(data_dir, f"{cfg['split']}.bin")
    if cfg["split"] == "test":
        raise UserError(f"{data_dir}: language-model datasets have train and val splits only; use --split=val")
    if not os.path.isfile(path):
        raise UserError(f"{path} is missing; re-run prepare.py for this dataset")
    tokens = np.memmap(path, dtype=np.dtype(meta["dtype"]), mode="r")
    return tokens[:cfg["max_tokens"]] if cfg["max_tokens"] else tokens


def text_tokens(cfg, tokenizer):
    """The --text (or FILE:) encoded, after the end-of-text token where there is one so that its first
    token is predicted too."""
    text = read_text_file(cfg["text"][5:], "--text file") if cfg["text"].startswith("FILE:") else cfg["text"]
    ids = tokenizer.encode(text)
    if tokenizer.bos_token is not None:
        ids = [tokenizer.bos_token] + ids
    if len(ids) < 2:
        raise UserError("--text is too short to measure: it needs at least two tokens")
    return ids


def instruct_rows(cfg, model, tokenizer, ckpt, autocast):
    """An instruct dataset's split: the loss and perplexity per response token (the loss fine-tuning
    minimises), and the share of greedy answers that stay in the template and end with end-of-text."""
    from tasks import ExampleBatches, evaluate_split, instruct_report
    data_dir, meta = dataset_of(cfg, ckpt)
    if meta.get("task") != "instruct":
        raise UserError(f"{data_dir} is not an instruct dataset (prepare.py --task=instruct builds one); "
                        f"--tasks=instruct measures instruction following")
    if not os.path.isfile(os.path.join(data_dir, f"{cfg['split']}.bin")):
        raise UserError(f"{data_dir} has no {cfg['split']} split")
    device = next(model.parameters()).device
    batches = ExampleBatches(data_dir, cfg["split"], meta, model.config.block_size, cfg["batch_size"], device,
                             cfg["seed"])
    loss = evaluate_split(model, batches, autocast())["loss"]
    stays, _, _ = instruct_report(model, tokenizer, data_dir, meta, cfg["split"], cfg["max_new_tokens"], show=0,
                                  batch_size=cfg["batch_size"])
    name = f"instruct ({cfg['split']})"
    rate, se = mean_and_stderr(stays)
    return [dict(task=name, metric="loss/token", value=loss, stderr=None, examples=batches.n),
            dict(task=name, metric="perplexity", value=math.exp(loss), stderr=None, examples=batches.n),
            dict(task=name, metric="ends_eot", value=rate, stderr=se, examples=len(stays))]


def exact_match_rows(task_name, cfg, model, tokenizer):
    """Exact-match accuracy of greedy answers to a checked task's val or test problems (rewards.py)."""
    from grpo import accuracy, check_alphabet
    from rewards import make_task
    if cfg["split"] not in ("val", "test"):
        raise UserError(f"--tasks={task_name} scores the task's held-out problems: --split=val or --split=test")
    task = make_task(task_name)
    check_alphabet(tokenizer, task)
    problems = getattr(task, cfg["split"])[:cfg["limit"] or None]
    scores = accuracy(model, tokenizer, task, problems, max(len(a) for _, a in problems) + 1)
    value, se = mean_and_stderr(scores)
    return [dict(task=f"{task_name} ({cfg['split']})", metric="exact", value=value, stderr=se, examples=len(scores))]


def set_context(model, context):
    """Let the model read windows of context tokens (an extrapolation test when past its block_size)."""
    try:
        model.set_block_size(context)
    except ValueError as e:
        raise UserError(f"--context={context}: {e}") from None


def run_task(task, cfg, model, tokenizer, ckpt, autocast):
    """Result lines of one task: [{"task", "metric", "value", "stderr", "examples"}]."""
    if task == "bpb" and cfg["context"]:
        set_context(model, cfg["context"])
    block = model.config.block_size
    if task == "arithmetic":
        return exact_match_rows(task, cfg, model, tokenizer)
    if task == "bpb":
        ids = text_tokens(cfg, tokenizer) if cfg["text"] else split_tokens(cfg, ckpt, tokenizer)
        nbytes = token_bytes(tokenizer, model.config.vocab_size)
        stride = min(cfg["stride"] or max(1, block // 2), block)
        totals = score_stream(model, ids, nbytes, block, stride, cfg["batch_size"], autocast)
        name = ("text" if cfg["text"] else cfg["split"]) + (f", context {block}" if cfg["context"] else "")
        return [dict(task=f"bpb ({name})", metric="bits/byte", value=bits_per_byte(totals), stderr=None,
                     examples=int(totals[2])),
                dict(task=f"bpb ({name})", metric="loss/token", value=float(totals[0] / totals[2]), stderr=None,
                     examples=int(totals[2]))]
    if task == "instruct":
        return instruct_rows(cfg, model, tokenizer, ckpt, autocast)
    tokens = split_tokens(cfg, ckpt, tokenizer) if task == "cloze" else None
    questions = benchmark_questions(task, block, cfg["cloze_questions"] if task == "cloze" else cfg["limit"],
                                    cfg["seed"], tokens, tokenizer, cfg["mc_file"], cfg["hellaswag_split"],
                                    cfg["cloze_tokens"])
    scores = benchmark_scores(task, model, questions, autocast)
    return [dict(task=task, metric=m, value=v, stderr=se, examples=len(questions))
            for m, (v, se) in ((m, mean_and_stderr(s)) for m, s in scores.items())]


def lm_eval_tasks(cfg):
    """The --lm_eval_tasks, checked against lm-eval's index before any work; (names, lm-eval's task manager)."""
    from lm_eval_adapter import task_manager
    names = [t.strip() for t in cfg["lm_eval_tasks"].split(",") if t.strip()]
    if not names:
        raise UserError(f"--lm_eval_tasks={cfg['lm_eval_tasks']!r} names no task; e.g. --lm_eval_tasks=hellaswag,arc_easy")
    return names, task_manager(names, cfg["lm_eval_include"])


def lm_eval_rows(cfg, names, manager, model, tokenizer, autocast):
    """The lm-evaluation-harness's tasks on this model (lm_eval_adapter.py), as result lines."""
    from lm_eval_adapter import run_lm_eval
    return run_lm_eval(model, tokenizer, names, manager, limit=cfg["limit"],
                       fewshot=None if cfg["lm_eval_fewshot"] < 0 else cfg["lm_eval_fewshot"],
                       batch_size=cfg["batch_size"], seed=cfg["seed"], autocast=autocast)


def results_path(cfg):
    if cfg["out"]:
        return cfg["out"]
    source = cfg["init_from"]
    if source == "resume":
        return os.path.join(cfg["out_dir"], "eval.json")
    if os.path.isdir(source) or os.path.isfile(source):
        return os.path.join(source if os.path.isdir(source) else os.path.dirname(source) or ".", "eval.json")
    return f"eval-{source}.json"


def print_table(rows):
    print(f"{'task':<16} {'metric':<10} {'value':>8} {'stderr':>8} {'examples':>9}")
    for r in rows:
        se = "" if r["stderr"] is None or math.isnan(r["stderr"]) else f"{r['stderr']:.4f}"
        print(f"{r['task']:<16} {r['metric']:<10} {r['value']:>8.4f} {se:>8} {r['examples']:>9,}")


def bench(cfg, rt):
    """Questions per second (cloze; multiple choice of 4 choices of about 30 characters after about 100)
    and bpb tokens per second, on randomly initialised char-vocabulary models (speed ignores the weights)."""
    import time
    from model import GPT, GPTConfig
    from tokenizer import CharTokenizer
    rng = np.random.default_rng(cfg["seed"])
    tok = CharTokenizer("".join(chr(c) for c in range(32, 97)))  # 65 characters, as shakespeare_char's
    tokens = rng.integers(0, tok.vocab_size, 100_000)
    text = lambda n: tok.decode(rng.integers(0, tok.vocab_size, n).tolist())  # noqa: E731
    mc = [(text(100), [text(int(rng.integers(20, 40))) for _ in range(4)], 0) for _ in range(40)]
    # (name, shape, cloze questions, multiple-choice questions, bpb tokens): about as long for each
    shapes = [("4x128, block 64 (the CPU config)", dict(n_layer=4, n_head=4, n_embd=128, block_size=64, bias=False),
               100, 40, 20_000),
              ("6x384, block 256", dict(n_layer=6, n_head=6, n_embd=384, block_size=256), 10, 10, 4_000)]
    print(f"on {rt.device}, {rt.dtype}, {torch.get_num_threads()} threads")
    for name, shape, n_cloze, n_mc, n_tokens in shapes:
        torch.manual_seed(cfg["seed"])
        model = GPT(GPTConfig(vocab_size=tok.vocab_size, dropout=0.0, **shape)).to(rt.device).eval()
        block = shape["block_size"]
        cloze = cloze_questions(tokens, n_cloze, block - cfg["cloze_tokens"], cfg["cloze_tokens"], cfg["seed"])
        rates = []
        for run, n in ((lambda: score_cloze(model, cloze, rt.autocast), n_cloze),
                       (lambda: score_choices(model, encode_choices(tok, mc[:n_mc], block), rt.autocast), n_mc),
                       (lambda: score_stream(model, tokens[:n_tokens], token_bytes(tok, tok.vocab_size), block,
                                             block // 2, cfg["batch_size"], rt.autocast), n_tokens)):
            run()  # warm-up
            t0 = time.perf_counter()
            run()
            rates.append(n / (time.perf_counter() - t0))
        print(f"{name}: cloze {rates[0]:,.1f} questions/s, multiple choice {rates[1]:,.1f} questions/s, "
              f"bpb {rates[2]:,.0f} tokens/s (stride {block // 2})")


def main(argv):
    cfg, _ = parse_args(argv, [EvalConfig], "eval.py", description(__doc__))
    tasks = check_settings(cfg)
    rt = runtime.local(cfg["device"], cfg["dtype"])
    if cfg["bench"]:
        return bench(cfg, rt)
    harness = lm_eval_tasks(cfg) if cfg["lm_eval_tasks"] else None
    ckpt, model, tokenizer = load_for_inference(cfg["init_from"], cfg["out_dir"], rt.device, "eval.py")
    if model.config.n_classes:
        raise UserError("this checkpoint is a classifier: eval.py measures language models (a classifier's "
                        "accuracy is train.py's val/acc)")
    note = quantize.prepare(model, cfg["quantize"])
    if note:
        print(note)
    rows = []
    for task in chosen_tasks(tasks, cfg, ckpt):
        rows += run_task(task, cfg, model, tokenizer, ckpt, rt.autocast)
    if harness:
        rows += lm_eval_rows(cfg, *harness, model, tokenizer, rt.autocast)
    if getattr(model, "quantization", ""):  # its own rows in eval.json, beside the float model's
        rows = [{**r, "task": f"{r['task']} [{model.quantization}]"} for r in rows]
    print_table(rows)
    path = results_path(cfg)
    source = cfg["out_dir"] if cfg["init_from"] == "resume" else cfg["init_from"]
    write_json_atomic(path, merged_results(path, source, ckpt.get("iter_num"), rows))
    print(f"wrote {path}")


def merged_results(path, source, iter_num, rows):
    """eval.json's content: these rows, and the earlier rows of other tasks if that file measured the same
    checkpoint at the same iteration (a rerun of a task replaces its rows)."""
    try:
        with open(path) as f:
            old = json.load(f)
        same = old.get("checkpoint") == source and old.get("iter_num") == iter_num
        kept = [r for r in old.get("results", []) if same and r["task"] not in {n["task"] for n in rows}]
    except (OSError, ValueError, AttributeError, KeyError, TypeError):
        kept = []
    return {"checkpoint": source, "iter_num": iter_num, "results": kept + rows}


if __name__ == "__main__":
    sys.exit(run_cli(main))
