"""
Benchmarks: every speed figure in the README comes from this script.

  python bench.py config/train_shakespeare_char_cpu.py                 # training and sampling speed
  python bench.py config/speedrun_shakespeare_char_cpu.py --target=1.88   # wall time to val <= 1.88
  python bench.py --suite=speed --nanogpt=../nanoGPT      # tokens/s against nanoGPT's CPU recipe
  python bench.py --suite=speedrun --nanogpt=../nanoGPT   # the README's time-to-1.88 table
  python bench.py --suite=bar --nanogpt=../nanoGPT --repeat=3   # its first and last rows: the speedrun's ratio
  python bench.py --suite=switches                        # each architecture switch against the speedrun config

Speed: `train.py CONFIG --bench=N` in a fresh process times N training steps and sampling (ms/iter,
tokens/s, MFU on GPUs, peak memory, sampling tokens/s and its model-bandwidth utilisation, MBU).
Time to target: the config trains into a temporary out_dir and the clock runs from the command's start (imports and data loading count) to
the first evaluation at or below the target, where the run is stopped. --nanogpt=PATH runs
nanoGPT's README CPU recipe from a clone at PATH, in the same way and in the same invocation, so
the two are measured side by side. Anything else on the command line goes to train.py. Nothing is
written outside the temporary directories.
"""
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

from common import ArgumentParser, UserError, description, run_cli

HERE = os.path.dirname(os.path.abspath(__file__))
EVAL_LINE = re.compile(r"^step (\d+): train loss ([\d.]+), val loss ([\d.]+)")  # train.py's and nanoGPT's
NANOGPT_ITER = re.compile(r"^iter (\d+): loss [\d.naif]+, time ([\d.]+)ms")
BPB = re.compile(r"val/bpb ([\d.]+)")  # train.py prints it on its evaluation lines

# nanoGPT's README command for a CPU (shakespeare_char, 4 layers x 128, block 64, batch 12)
NANOGPT_CPU = ["config/train_shakespeare_char.py", "--device=cpu", "--compile=False", "--eval_iters=20",
               "--log_interval=1", "--block_size=64", "--batch_size=12", "--n_layer=4", "--n_head=4",
               "--n_embd=128", "--max_iters=2000", "--lr_decay_iters=2000", "--dropout=0.0"]
NANOGPT_TOKENS_PER_ITER = 12 * 64  # its batch_size x block_size above
CPU = "config/train_shakespeare_char_cpu.py"
SPEEDRUN = "config/speedrun_shakespeare_char_cpu.py"
MODERN = ["--positions=rope", "--norm=rmsnorm", "--mlp=relu2", "--qk_norm=True", "--zero_init_proj=True"]
# the speedrun config before its window, its shorter run and its single evaluation (2026-11-22)
SPEEDRUN_300 = [SPEEDRUN, "--batch_size=16", "--attn_window=0", "--max_iters=300", "--warmdown_iters=120",
                "--eval_interval=300", "--eval_at_start=True"]
# the speedrun config of 2026-12-02: batch 16, 210 iterations, 140 of them warm-down
SPEEDRUN_210 = [SPEEDRUN, "--batch_size=16", "--max_iters=210", "--warmdown_iters=140", "--eval_interval=210"]
MUON = ["--optimizer=muon", "--muon_lr=0.03", "--learning_rate=3e-3", "--weight_decay=0.0", "--lr_schedule=wsd",
        "--warmup_iters=20", "--min_lr=0.0"]

# rows: (label, train.py arguments); "nanogpt" is the clone given with --nanogpt
SUITES = {
    "speed": [  # nanoGPT's CPU recipe shape; --bench
        ("nanoGPT's CPU recipe", "nanogpt"),
        ("GPT-2 blocks (train_shakespeare_char_cpu.py)", [CPU]),
        ("the speedrun config (its blocks and Muon) at batch 12", [SPEEDRUN, "--batch_size=12"]),
    ],
    "speedrun": [  # time to val <= target, each change at nanoGPT's width and depth
        ("nanoGPT's CPU recipe", "nanogpt"),
        ("the same recipe in this repo, 2,000 iterations", [CPU, "--max_iters=2000", "--lr_decay_iters=2000"]),
        ("the same with 3,000 iterations (train_shakespeare_char_cpu.py)", [CPU]),
        ("+ RoPE, RMSNorm, squared ReLU, QK-norm, zero-init projections (AdamW)",
         [CPU, *MODERN, "--eval_interval=100"]),
        ("Muon alone on GPT-2 blocks, 800 iterations, WSD",
         [CPU, *MUON, "--max_iters=800", "--lr_decay_iters=800", "--warmdown_iters=320", "--eval_interval=100"]),
        ("both, batch 12, 400 iterations, WSD", [*SPEEDRUN_300, "--batch_size=12", "--max_iters=400",
                                                 "--warmdown_iters=160", "--eval_interval=100"]),
        ("both, batch 16, 300 iterations", SPEEDRUN_300),
        ("+ value embeddings", [*SPEEDRUN_300, "--value_embeds=True"]),
        ("+ sliding window 4 on 3 layers of 4 (SSSL)", [*SPEEDRUN_300, "--attn_window=4"]),
        ("+ 210 iterations, half of them warm-down, no evaluation at step 0",
         [*SPEEDRUN_210, "--attn_window=4", "--warmdown_iters=105"]),
        ("+ window 3, two thirds of the run as warm-down", SPEEDRUN_210),
        ("+ batch 24, 150 iterations (the speedrun config)", [SPEEDRUN]),
        ("the speedrun config in float32 (no bfloat16 autocast)", [SPEEDRUN, "--dtype=float32"]),
    ],
    "switches": [  # time to val <= target: the speedrun config's 300-iteration recipe, then each switch of model.py
        ("the speedrun config at 300 iterations, no window", SPEEDRUN_300),
        ("+ ALiBi instead of RoPE", [*SPEEDRUN_300, "--positions=alibi"]),
        ("+ sliding window 16, SSSL", [*SPEEDRUN_300, "--attn_window=16", "--attn_window_pattern=SSSL"]),
        ("+ sliding window 4, SSSL", [*SPEEDRUN_300, "--attn_window=4", "--attn_window_pattern=SSSL"]),
        ("+ NormHead", [*SPEEDRUN_300, "--norm_head=True"]),
        ("+ logit soft-cap 15", [*SPEEDRUN_300, "--logit_softcap=15"]),
        ("+ z-loss 1e-4", [*SPEEDRUN_300, "--z_loss=1e-4"]),
        ("+ max-z loss 2e-4", [*SPEEDRUN_300, "--max_z_loss=2e-4"]),
        ("+ value embeddings", [*SPEEDRUN_300, "--value_embeds=True"]),
    ],
}
SUITES["bar"] = [row for row in SUITES["speedrun"] if row[1] in ("nanogpt", [SPEEDRUN])]  # nanoGPT and the config


def run_lines(cmd, cwd, until=None):
    """Run cmd; returns [(seconds since start, line)] of its output and the total wall time.
    until(line) True stops the run there (a time-to-target run need not finish)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines, stopped = [], False
    for line in proc.stdout:
        lines.append((time.perf_counter() - t0, line.rstrip("\n")))
        if until is not None and until(line):
            proc.terminate()  # train.py saves its checkpoint and exits
            stopped = True
            break
    for line in proc.stdout:  # drain what it prints while stopping
        lines.append((time.perf_counter() - t0, line.rstrip("\n")))
    rc = proc.wait()
    wall = time.perf_counter() - t0
    if rc and not stopped:
        last = next((l for _, l in reversed(lines) if l.strip()), "no output")
        raise UserError(f"{' '.join(cmd)} exited with {rc}: {last}")
    return lines, wall


def command(row, nanogpt, out_dir, extra):
    """(argv, cwd) of a row: train.py here, or nanoGPT's train.py in its clone."""
    if row == "nanogpt":
        if not os.path.isfile(os.path.join(nanogpt, "data", "shakespeare_char", "train.bin")):
            raise UserError(f"{nanogpt}/data/shakespeare_char/train.bin is missing; run "
                             f"python data/shakespeare_char/prepare.py in {nanogpt} first")
        return [sys.executable, "train.py", *NANOGPT_CPU, f"--out_dir={out_dir}"], nanogpt
    return [sys.executable, os.path.join(HERE, "train.py"), *row, *extra, f"--out_dir={out_dir}"], os.getcwd()


def speed(argv, cwd, steps, nanogpt_row):
    """Figures of one row: {name: text}."""
    if nanogpt_row:  # nanoGPT has no bench mode: time its per-iteration log lines, evaluations left out
        argv = [a for a in argv if not a.startswith("--max_iters")] + [f"--max_iters={steps + 10}"]
        lines, _ = run_lines(argv, cwd)
        ms, after_eval = [], False
        for _, line in lines:
            if EVAL_LINE.match(line):  # it evaluates at the top of an iteration, so that iteration's time holds it
                after_eval = True
            elif m := NANOGPT_ITER.match(line):
                if int(m[1]) >= 10 and not after_eval:  # the first iterations warm up
                    ms.append(float(m[2]))
                after_eval = False
        if not ms:
            raise UserError(f"no iteration lines in nanoGPT's output: {lines[-1][1] if lines else ''}")
        dt = statistics.mean(ms)
        return {"train ms/iter": f"{dt:.2f}", "train tokens/s": f"{NANOGPT_TOKENS_PER_ITER * 1000 / dt:,.0f}"}
    lines, _ = run_lines(argv + [f"--bench={steps}"], cwd)
    figures = {}
    for _, line in lines:
        name, sep, value = line.partition(": ")
        if sep and name in ("train ms/iter", "train tokens/s", "train mfu", "peak memory", "page faults per step",
                            "sample tokens/s", "sample mbu"):
            figures[name] = value.split(" (")[0]  # the figure, without its explanation
    return figures


def to_target(argv, cwd, target):
    """Wall time from the command's start to the first evaluation with val loss <= target."""
    def reached(line):
        m = EVAL_LINE.match(line)
        return bool(m) and float(m[3]) <= target
    lines, wall = run_lines(argv, cwd, until=reached)
    evals = [(t, int(m[1]), float(m[3]), l) for t, l in lines if (m := EVAL_LINE.match(l))]
    if not evals:
        raise UserError(f"{' '.join(argv)} printed no evaluation")
    t, step, val, line = evals[-1]  # the run stops at the first evaluation that reaches the target
    bpb = m[1] if (m := BPB.search(line)) else ""
    return {"time to target": f"{t:.1f} s" if val <= target else f"not reached ({wall:.1f} s in all)",
            "iteration": str(step), "val loss": f"{val:.3f}", "val bpb": bpb}


def number(text):
    return float(text.replace(",", "").split()[0])


def run_suite(args, extra):
    if args.suite and args.suite not in SUITES:
        raise UserError(f"unknown suite {args.suite!r}; choose one of {', '.join(SUITES)}")
    if not args.suite and not extra:
        raise UserError("give a config file (e.g. config/train_shakespeare_char_cpu.py) or --suite")
    if args.steps < 1 or args.repeat < 1:
        raise UserError(f"--steps and --repeat must be >= 1, got {args.steps} and {args.repeat}")
    if args.suite in ("speedrun", "switches", "bar") and args.target is None:
        args.target = 1.88
    rows = SUITES[args.suite] if args.suite else [(" ".join(extra), [])]
    extra = [] if args.suite else extra
    if not args.nanogpt:
        rows = [(label, row) for label, row in rows if row != "nanogpt"]
    runs = {label: [] for label, _ in rows}
    for _ in range(args.repeat):  # repeats interleave the rows, so a slow spell of the machine hits them all
        for label, row in rows:
            with tempfile.TemporaryDirectory() as out_dir:
                argv, cwd = command(row, args.nanogpt, out_dir, extra)
                print(f"== {label}", flush=True)
                figures = (to_target(argv, cwd, args.target) if args.target is not None
                           else speed(argv, cwd, args.steps, row == "nanogpt"))
            for name, value in figures.items():
                print(f"{name}: {value}", flush=True)
            runs[label].append(figures)
    key = "time to target" if args.target is not None else "train tokens/s"
    table = [(label, median_run(figures, key)) for label, figures in runs.items()]
    if key == "train tokens/s" and len(table) > 1:  # against the first row, repeat by repeat
        base = runs[table[0][0]]
        for label, figures in table:
            ratios = [number(f[key]) / number(b[key]) for f, b in zip(runs[label], base)]
            figures["tokens/s ratio"] = f"{statistics.median(ratios):.2f}x"
    if len(table) > 1 or args.repeat > 1:
        print_table(table, args.repeat)


def median_run(runs, key):
    """The run whose key figure is the median of the repeats (a run that missed the target counts as slowest)."""
    ranked = sorted(runs, key=lambda f: float("inf") if f[key].startswith("not") else number(f[key]))
    return ranked[(len(ranked) - 1) // 2]


def print_table(table, repeat):
    names = list(dict.fromkeys(n for _, f in table for n in f))
    # each row: the run with the median figure; the ratio: the median of the repeats' ratios
    print(f"\n| run{' (median of ' + str(repeat) + ')' if repeat > 1 else ''} | " + " | ".join(names) + " |")
    print("| " + " | ".join(["---"] * (len(names) + 1)) + " |")
    for label, figures in table:
        print("| " + " | ".join([label] + [figures.get(n, "") for n in names]) + " |")


def main(argv):
    p = ArgumentParser(prog="bench.py", description=description(__doc__),
                       epilog="Any other arguments (config files, --key=value) go to train.py.")
    p.add_argument("--target", type=float, default=None, help="time a full run to this val loss instead "
                   "(the speedrun suite: 1.88)")
    p.add_argument("--steps", type=int, default=200, help="training steps timed per speed figure")
    p.add_argument("--suite", default="", help=f"a table of runs: {', '.join(SUITES)}")
    p.add_argument("--nanogpt", default="", help="a nanoGPT clone to run its CPU recipe from, side by side")
    p.add_argument("--repeat", type=int, default=1, help="runs of each row")
    args, extra = p.parse_known_args(argv)
    run_suite(args, extra)


if __name__ == "__main__":
    # a Ctrl-C reaches the runs too, and their out_dirs are temporary
    sys.exit(run_cli(main))
