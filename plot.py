"""
Plot training runs from their metrics.jsonl: loss against iterations and against tokens, the
learning rate, and, where the runs logged them, val bits per byte (which compares runs with different
tokenizers) and accuracies (eval_tasks' benchmarks such as cloze/acc, a classifier's val/acc, a task's
held-out exact match such as arithmetic/acc, and GRPO's mean reward on its sampled answers). Several
runs share the axes, one colour each. For a GRPO run the eval "loss" is the error, 1 - accuracy.

  python plot.py out-shakespeare-char-cpu                      # writes out-shakespeare-char-cpu/loss.png
  python plot.py out-a out-b --labels gpt2,llama --out compare.png

Needs matplotlib (pip install matplotlib); nothing else in the repository does.
"""
import json
import os
import re
import sys

from common import ArgumentParser, UserError, description, run_cli


def read_run(out_dir):
    """The log lines (train loss, lr) and eval lines (train/val loss) of one run."""
    path = os.path.join(out_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise UserError(f"no metrics.jsonl in {out_dir}; train.py writes it into its out_dir")
    logs, evals = [], []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                raise UserError(f"{path} line {n} is not JSON; is this a train.py metrics file?") from None
            if "val/loss" in record:
                evals.append(record)
            elif "loss" in record:
                logs.append(record)
    if not logs and not evals:
        raise UserError(f"{path} holds no loss records yet")
    return logs, evals


ACCURACY = re.compile(r"^[\w-]+/acc(_norm)?$")  # cloze/acc, hellaswag/acc_norm, val/acc, arithmetic/acc
REWARD = "rollout/reward"  # GRPO's mean reward on the answers it sampled, at every log line


def accuracies(evals):
    """The accuracy keys the eval lines hold, in order of first appearance."""
    return list(dict.fromkeys(k for r in evals for k in r if ACCURACY.match(k)))


def plot(runs, labels, out_path):
    try:
        import matplotlib
        matplotlib.use("Agg")  # files only, no screen needed
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("plot.py needs matplotlib: pip install matplotlib") from None
    bpb = any("val/bpb" in r for _, evals in runs for r in evals)
    acc = any(accuracies(evals) or any(REWARD in r for r in logs) for logs, evals in runs)
    panels = 3 + bpb + acc
    fig, axes = plt.subplots(1, panels, figsize=(5.3 * panels, 4.5))
    ax_it, ax_tok, ax_lr = axes[:3]
    ax_bpb, ax_acc = (axes[3] if bpb else None), (axes[-1] if acc else None)
    for (logs, evals), label, color in zip(runs, labels, plt.rcParams["axes.prop_cycle"].by_key()["color"] * 10):
        for ax, x in ((ax_it, "iter"), (ax_tok, "tokens")):
            if logs:
                ax.plot([r[x] for r in logs], [r["loss"] for r in logs], color=color, alpha=0.35, lw=1)
            if evals:
                ax.plot([r[x] for r in evals], [r["val/loss"] for r in evals], "o-", color=color, ms=3,
                        label=f"{label} val")
                ax.plot([r[x] for r in evals], [r["train/loss"] for r in evals], "--", color=color, lw=1,
                        label=f"{label} train")
        if logs:
            ax_lr.plot([r["iter"] for r in logs], [r["lr"] for r in logs], color=color, label=label)
        with_bpb = [r for r in evals if "val/bpb" in r]
        if with_bpb:
            ax_bpb.plot([r["iter"] for r in with_bpb], [r["val/bpb"] for r in with_bpb], "o-", color=color, ms=3,
                        label=label)
        for key, style in zip(accuracies(evals), ("o-", "s--", "^:", "d-.") * 5):
            with_key = [r for r in evals if key in r]
            ax_acc.plot([r["iter"] for r in with_key], [r[key] for r in with_key], style, color=color, ms=3,
                        label=f"{label} {key}")
        with_reward = [r for r in logs if REWARD in r]
        if with_reward:
            ax_acc.plot([r["iter"] for r in with_reward], [r[REWARD] for r in with_reward], color=color, alpha=0.35,
                        lw=1, label=f"{label} {REWARD} (sampled)")
    ax_it.set(xlabel="iteration", ylabel="loss", title="loss (faint: every log line)")
    ax_tok.set(xlabel="tokens seen", ylabel="loss", title="loss against tokens")
    ax_lr.set(xlabel="iteration", ylabel="learning rate", title="learning rate")
    if bpb:
        ax_bpb.set(xlabel="iteration", ylabel="bits per byte", title="val bits per byte (any tokenizer)")
    if acc:
        ax_acc.set(xlabel="iteration", ylabel="accuracy", title="accuracy (held-out; faint: reward while training)")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_path, dpi=110)
    plt.close(fig)


def main(argv):
    p = ArgumentParser(prog="plot.py", description=description(__doc__))
    p.add_argument("out_dirs", nargs="+", help="run folders holding metrics.jsonl")
    p.add_argument("--labels", default="", help="comma-separated names for the runs (default: folder names)")
    p.add_argument("--out", default="", help="PNG to write (default: loss.png in the first run's folder)")
    args = p.parse_args(argv)
    labels = args.labels.split(",") if args.labels else [os.path.basename(os.path.normpath(d)) for d in args.out_dirs]
    if len(labels) != len(args.out_dirs):
        raise UserError(f"{len(labels)} labels for {len(args.out_dirs)} runs; give one label per run")
    runs = [read_run(d) for d in args.out_dirs]
    out_path = args.out or os.path.join(args.out_dirs[0], "loss.png")
    plot(runs, labels, out_path)
    print(f"wrote {out_path}")


if __name__ == "__main__":
    sys.exit(run_cli(main))
