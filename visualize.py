"""
Look inside a trained model: what each attention head looks at, what each layer would predict, how
the token vectors lie, and which tokens of a text surprised it. Each view prints a text form and
writes a picture beside the checkpoint.

  python visualize.py attention --out_dir=out-shakespeare-char-cpu --text="ROMEO: But soft" --layers=0,3
  python visualize.py lens --out_dir=out-shakespeare-char-cpu --text="To be, or not to be"
  python visualize.py embeddings --out_dir=out-instruct --tokens=red,blue,green,cat,dog --analogy=king,man,woman
  python visualize.py surprise --out_dir=out-shakespeare-char-cpu --text=FILE:sonnet.txt  # also surprise.html

Design choices:
- The checkpoint is read as sample.py reads it (--out_dir, or --init_from: a checkpoint file or folder,
  a Hugging Face folder, gpt2*), in float32; the picture goes beside it (VIEW.png) unless --out says.
- A text is read as eval.py reads --text: after the end-of-text token where the tokenizer has one, so
  that its first token is predicted too; it must fit in the model's context.
- attention draws the weights of the explicit path, softmax(Q K^T / sqrt(d) + mask) (GPT.attention_maps):
  the numbers the fused path computes too, but does not hand out.
- lens is the logit lens: the residual stream after the embeddings and after each block (read by
  forward hooks on the model's own modules), put through the final norm and the head as the last one
  is, so its last row is the model's own prediction.
- embeddings reads the input table (wte): cosine similarity between unit rows, analogies as
  a - b + c of unit rows (3CosAdd, the three excluded from the answers), and a projection on the two
  principal components of the chosen rows (PCA by SVD).
- surprise is each token's -log2 p under the model, from one forward pass: the same numbers as
  eval.py --text, whose loss per token is the mean in nats, and whose bits per byte are these.
- The functions that compute (nearest, analogy, pca_2d, logit_lens, surprisal) know no checkpoint
  and no picture, so tests check them on tables built by hand.
Needs matplotlib for the pictures (pip install matplotlib); --no_png prints the text form alone.
"""
import argparse
import html
import math
import os
import sys

from common import yield_idle_cores
yield_idle_cores()  # before torch loads OpenMP

import torch
from torch.nn import functional as F

import runtime
from benchmarks import bits_per_byte, nats_and_bytes, token_bytes
from common import ArgumentParser, UserError, description, read_text_file, run_cli
from hf import load_for_inference

SHADES = " .:-=+*#%@"  # the terminal's heatmap, from weight 0 to 1


# -----------------------------------------------------------------------------------------------
# reading the checkpoint and the text

def pyplot():
    """matplotlib's pyplot, drawing into files only."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("visualize.py draws with matplotlib: pip install matplotlib, or pass --no_png "
                        "for the text form alone") from None
    return plt


def picture_path(args, view, ext="png"):
    """--out, or VIEW.png beside the checkpoint (in the folder of a file or folder source; else here)."""
    if args.out:
        return args.out if ext == "png" else os.path.splitext(args.out)[0] + f".{ext}"
    source = args.out_dir if args.init_from == "resume" else args.init_from
    folder = source if os.path.isdir(source) else os.path.dirname(source) if os.path.isfile(source) else "."
    return os.path.join(folder or ".", f"{view}.{ext}")


def load(args, decoder_for=""):
    """(model in eval mode, tokenizer) of the checkpoint the arguments name, on --device, in float32."""
    rt = runtime.local(args.device, "float32")
    _, model, tokenizer = load_for_inference(args.init_from, args.out_dir, rt.device, decoder_for)
    return model, tokenizer


def read_text(text):
    return read_text_file(text[5:], "--text file") if text.startswith("FILE:") else text


def text_ids(tokenizer, text, block_size):
    """The text's token ids, after the end-of-text token where there is one; checked to fit the context."""
    if not text:
        raise UserError("--text is empty; pass --text=TEXT or --text=FILE:path")
    ids = tokenizer.encode(text)
    if tokenizer.bos_token is not None:
        ids = [tokenizer.bos_token] + ids
    if len(ids) > block_size:
        raise UserError(f"the text is {len(ids)} tokens and the model reads at most {block_size}: shorten it "
                        f"(eval.py --text measures a long text in sliding windows)")
    return ids


def token_texts(tokenizer, ids):
    """Each token's own text (a byte-level token that is part of a character shows as U+FFFD)."""
    return [tokenizer.decode_bytes([i]).decode("utf-8", errors="replace") for i in ids]


def label(text):
    """A token's text as an axis label: spaces and line breaks made visible."""
    return text.replace(" ", "·").replace("\n", "\\n").replace("\t", "\\t") or "∅"


def indices(spec, n, what):
    """A comma-separated list of indices in [0, n) ("" or "all": every one)."""
    if spec.strip() in ("", "all"):
        return list(range(n))
    out = []
    for part in spec.split(","):
        try:
            i = int(part)
        except ValueError:
            raise UserError(f"--{what}s={spec!r}: {part!r} is not a number; e.g. --{what}s=0,2") from None
        if not 0 <= i < n:
            raise UserError(f"{what} {i} is out of range: the model has {n} {what}s, 0 to {n - 1}")
        out.append(i)
    return out


def token_id(tokenizer, word):
    """The one token that writes word: as it reads after a space (" word", where BPE vocabularies keep
    whole words) if that is one token, else as written."""
    for form in (" " + word, word):
        try:
            ids = tokenizer.encode(form)
        except UserError:  # a char vocabulary without the space, or without a letter
            continue
        if len(ids) == 1:
            return ids[0]
    try:
        pieces = [" + ".join(repr(t) for t in token_texts(tokenizer, tokenizer.encode(form)))
                  for form in (" " + word, word)]
    except UserError as e:
        raise UserError(f"{word!r} is not in the vocabulary: {e}") from None
    raise UserError(f"{word!r} is not one token of this vocabulary ({' ' + word!r} is {pieces[0]}, {word!r} is "
                    f"{pieces[1]}); choose words that are")


# -----------------------------------------------------------------------------------------------
# what is computed

@torch.no_grad()
def logit_lens(model, ids):
    """The most likely next token after each layer: (layers + 1, T) ids and their probabilities, row 0
    read after the embeddings, row l after block l, each through the final norm and the head."""
    stream = []
    keep = lambda module, inputs, output: stream.append(output)  # noqa: E731
    modules = [model.transformer.drop, *model.transformer.h]  # drop's output: the embeddings' sum
    hooks = [m.register_forward_hook(keep) for m in modules]
    try:
        model(torch.tensor([ids], device=model.lm_head.weight.device))
    finally:
        for h in hooks:
            h.remove()
    residual = torch.cat(stream)  # (layers + 1, T, C)
    probs = F.softmax(model.logits(model.transformer.ln_f(residual)).float(), dim=-1)  # (layers + 1, T, V)
    p, top = probs.max(dim=-1)
    return top.cpu(), p.cpu()


def unit_rows(table):
    return F.normalize(table.float(), dim=-1)


def nearest(table, vector, k, exclude=()):
    """The k rows of table (V, C) closest to vector (C,) by cosine similarity: [(row, cosine)]."""
    cos = unit_rows(table) @ F.normalize(vector.float(), dim=0)  # (V,)
    cos[list(exclude)] = float("-inf")
    values, rows = cos.topk(min(k, len(cos) - len(set(exclude))))
    return list(zip(rows.tolist(), values.tolist()))


def analogy(table, a, b, c, k):
    """a is to b as ? is to c: the rows nearest to a - b + c of the unit rows, a, b and c excluded."""
    u = unit_rows(table)
    return nearest(table, u[a] - u[b] + u[c], k, exclude=(a, b, c))


def pca_2d(x):
    """x (N, C) -> its coordinates (N, 2) on the two principal components, and the share of the
    variance each holds."""
    centred = x.float() - x.float().mean(dim=0)
    _, s, vh = torch.linalg.svd(centred, full_matrices=False)
    var = s.square()
    return centred @ vh[:2].T, (var[:2] / var.sum()).tolist()


@torch.no_grad()
def surprisal(model, ids, nbytes):
    """Each predicted token's surprise -log2 p (len(ids) - 1,), its likeliest alternative, and the text's
    summed (nats, bytes, tokens) as eval.py counts them."""
    x = torch.tensor([ids], device=model.lm_head.weight.device)
    logits, _ = model(x[:, :-1])  # (1, T - 1, V)
    logp = F.log_softmax(logits[0].float(), dim=-1)
    nats = -logp.gather(1, x[0, 1:, None])[:, 0]  # (T - 1,)
    return (nats / math.log(2)).cpu(), logp.argmax(dim=-1).cpu(), nats_and_bytes(logits, x[:, 1:], nbytes).cpu()


# -----------------------------------------------------------------------------------------------
# the views

def shaded(weights, labels):
    """A (T, S) matrix of weights in [0, 1] as text: a row per query, one shade per key."""
    width = max(len(s) for s in labels)
    return [f"{labels[t]:>{width}} |" + "".join(SHADES[min(len(SHADES) - 1, int(w * len(SHADES)))]
                                               for w in row.tolist()) + "|"
            for t, row in enumerate(weights)]


def attention_view(args):
    plt = None if args.no_png else pyplot()
    model, tokenizer = load(args)
    cfg = model.config
    ids = text_ids(tokenizer, read_text(args.text), cfg.block_size)
    layers, heads = indices(args.layers, cfg.n_layer, "layer"), indices(args.heads, cfg.n_head, "head")
    maps = model.attention_maps(torch.tensor([ids], device=model.lm_head.weight.device))  # [(1, H, T, T)]
    chosen = {(layer, head): maps[layer][0, head].cpu() for layer in layers for head in heads}
    labels = [label(t) for t in token_texts(tokenizer, ids)]
    for (layer, head), weights in chosen.items():
        print(f"layer {layer}, head {head} (a row per token, a column per token it may look at; "
              f"'{SHADES[1]}' little weight, '{SHADES[-1]}' all of it)")
        print("\n".join(shaded(weights, labels)))
    if plt is not None:
        draw_attention(plt, chosen, layers, heads, labels, picture_path(args, "attention"))


def draw_attention(plt, chosen, layers, heads, labels, path):
    """A grid of heatmaps, a row of heads per layer, the tokens on both axes."""
    side, n = max(2.5, 0.16 * len(labels) + 1), len(labels)
    fig, axes = plt.subplots(len(layers), len(heads), figsize=(side * len(heads), side * len(layers)),
                             squeeze=False)
    for r, layer in enumerate(layers):
        for c, head in enumerate(heads):
            ax = axes[r][c]
            image = ax.imshow(chosen[layer, head].numpy(), cmap="viridis", vmin=0, vmax=1)
            ax.set_title(f"layer {layer}, head {head}", fontsize=9)
            ax.set_xticks(range(n), labels, rotation=90, fontsize=7)
            ax.set_yticks(range(n), labels, fontsize=7)
    fig.colorbar(image, ax=axes, shrink=0.6, label="attention weight (a row sums to 1)")
    fig.suptitle("attention: a row per query token, a column per key token")
    save(fig, plt, path)


def lens_view(args):
    plt = None if args.no_png else pyplot()
    model, tokenizer = load(args, "visualize.py lens")
    ids = text_ids(tokenizer, read_text(args.text), model.config.block_size)
    top, p = logit_lens(model, ids)
    rows = ["embeddings"] + [f"block {i}" for i in range(model.config.n_layer)]
    inputs = [label(t) for t in token_texts(tokenizer, ids)]
    guess = [[label(t) for t in token_texts(tokenizer, row.tolist())] for row in top]  # (layers + 1, T)
    nexts = inputs[1:] + [""]  # the token that actually came next
    print("the likeliest next token after each layer (its probability); the last column is the model's prediction")
    w = max(8, *(len(g) for row in guess for g in row), *(len(i) for i in inputs))  # a BPE token may be long
    print(f"{'pos':>4} {'token':>{w}} {'next':>{w}}  " + "".join(f"{r:>{w + 5}} " for r in rows))
    for t in range(len(ids)):
        cells = "".join(f"{guess[l][t]:>{w}} {p[l, t]:.2f} " for l in range(len(rows)))
        print(f"{t:>4} {inputs[t]:>{w}} {nexts[t]:>{w}}  {cells}")
    if plt is not None:
        draw_lens(plt, rows, inputs, guess, nexts, p, picture_path(args, "lens"))


def draw_lens(plt, rows, inputs, guess, nexts, p, path):
    """A table: a row per layer, a column per position, each cell the guess shaded by its probability."""
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(inputs) + 2), 0.45 * len(rows) + 1.5))
    ax.imshow(p.numpy(), cmap="Blues", vmin=0, vmax=1, aspect="auto")
    for l in range(len(rows)):
        for t in range(len(inputs)):
            ax.text(t, l, guess[l][t], ha="center", va="center", fontsize=8,
                    color="white" if p[l, t] > 0.6 else "black",
                    fontweight="bold" if guess[l][t] == nexts[t] else "normal")
    ax.set_yticks(range(len(rows)), rows, fontsize=8)
    ax.set_xticks(range(len(inputs)), inputs, fontsize=8)
    ax.set_xlabel("input token (bold: the layer's guess is the token that came next)")
    ax.set_title("logit lens: the likeliest next token after each layer (shade: its probability)")
    save(fig, plt, path)


def chosen_tokens(args, tokenizer):
    """The ids of --tokens (the whole vocabulary of a small one by default) and of --analogy's a, b, c."""
    words = [w.strip() for w in args.tokens.split(",") if w.strip()]
    trio = [w.strip() for w in args.analogy.split(",") if w.strip()]
    if args.analogy and len(trio) != 3:
        raise UserError(f"--analogy={args.analogy!r} needs three tokens a,b,c (a - b + c: king,man,woman)")
    if words or trio:
        return [token_id(tokenizer, w) for w in words], [token_id(tokenizer, w) for w in trio]
    if tokenizer.vocab_size > 128:
        raise UserError("pass --tokens=a,b,c (words of the vocabulary) or --analogy=a,b,c; only a vocabulary "
                        "of at most 128 tokens is shown whole")
    return list(range(tokenizer.vocab_size)), []


def embeddings_view(args):
    plt = None if args.no_png else pyplot()
    model, tokenizer = load(args)
    table = model.transformer.wte.weight.detach()[:tokenizer.vocab_size].cpu()  # padding rows never trained
    chosen, trio = chosen_tokens(args, tokenizer)
    show = lambda i: repr(token_texts(tokenizer, [i])[0])  # noqa: E731
    for i in chosen:
        print(f"{show(i):>12}: " + ", ".join(f"{show(j)} {c:.2f}" for j, c in nearest(table, table[i], args.k, [i])))
    answer = []
    if trio:
        answers = analogy(table, *trio, args.k)
        answer = [answers[0][0]]
        print(" - ".join(map(show, trio[:2])) + f" + {show(trio[2])} = " +
              ", ".join(f"{show(j)} {s:.2f}" for j, s in answers))
    points = list(dict.fromkeys(chosen + trio + answer))
    xy, share = pca_2d(table[points])
    print(f"PCA of {len(points)} tokens: the two components hold {share[0]:.0%} and {share[1]:.0%} of their variance")
    if plt is not None:
        names = {i: label(token_texts(tokenizer, [i])[0]) for i in points}
        draw_embeddings(plt, points, xy, share, names, trio + answer, picture_path(args, "embeddings"))


def draw_embeddings(plt, points, xy, share, names, analogy_ids, path):
    """The chosen tokens on the plane of their two principal components; an analogy a, b, c, answer as
    two arrows, b to a and c to the answer."""
    fig, ax = plt.subplots(figsize=(8, 7))
    ax.scatter(xy[:, 0], xy[:, 1], s=12, color="tab:blue")
    for (x, y), i in zip(xy.tolist(), points):
        ax.annotate(names[i], (x, y), fontsize=9, xytext=(3, 3), textcoords="offset points")
    if analogy_ids:
        a, b, c, answer = analogy_ids
        at = {i: xy[n].tolist() for n, i in enumerate(points)}
        for start, end, colour in ((b, a, "tab:green"), (c, answer, "tab:orange")):
            ax.annotate("", at[end], at[start], arrowprops=dict(arrowstyle="->", color=colour))
        ax.set_title(f"a - b + c: {names[a]} - {names[b]} + {names[c]} = {names[answer]} "
                     f"(green: b to a; orange: c to the answer)", fontsize=9)
    ax.set_xlabel(f"first principal component ({share[0]:.0%} of the variance)")
    ax.set_ylabel(f"second principal component ({share[1]:.0%})")
    fig.suptitle("token embeddings (wte), projected on their two principal components")
    save(fig, plt, path)


def surprise_colour(bits, max_bits):
    """White at 0 bits, deep red at max_bits and beyond: (r, g, b) in [0, 1]."""
    s = min(1.0, bits / max_bits)
    return 1.0, 1.0 - 0.75 * s, 1.0 - 0.85 * s


def surprise_html(pieces, bits, expected, max_bits, summary):
    spans = []
    for text, b, e in zip(pieces, bits, expected):
        r, g, bl = (int(255 * v) for v in surprise_colour(b, max_bits)) if b is not None else (238, 238, 238)
        tip = "not predicted (the first token)" if b is None else f"{b:.2f} bits; the model expected {e!r}"
        body = html.escape(text).replace("\n", "<br>")
        spans.append(f'<span style="background: rgb({r},{g},{bl})" title="{html.escape(tip)}">{body}</span>')
    return ("<!doctype html><meta charset=\"utf-8\"><title>surprise</title>"
            "<body style=\"font-family: monospace; white-space: pre-wrap; max-width: 60em\">"
            f"<p>{html.escape(summary)} White: no surprise; red: {max_bits:g} bits or more. Hover a token for "
            f"its bits and the model's guess.</p><p>{''.join(spans)}</p></body>\n")


def surprise_view(args):
    plt = None if args.no_png else pyplot()
    model, tokenizer = load(args, "visualize.py surprise")
    ids = text_ids(tokenizer, read_text(args.text), model.config.block_size)
    if len(ids) < 2:
        raise UserError("--text is too short: it needs at least two tokens, one to predict")
    nbytes = token_bytes(tokenizer, model.config.vocab_size)
    bits, expected, totals = surprisal(model, ids, nbytes)
    pieces = token_texts(tokenizer, ids)
    first = 1 if tokenizer.bos_token is not None else 0  # the end-of-text token we put first is not shown
    shown_bits = [None] + bits.tolist()
    guesses = [None] + token_texts(tokenizer, expected.tolist())
    summary = (f"{int(totals[2])} tokens predicted: mean surprise {float(totals[0] / totals[2]):.4f} nats "
               f"({float(totals[0] / totals[2]) / math.log(2):.3f} bits) per token, "
               f"{bits_per_byte(totals):.4f} bits per byte.")
    for text, b, e in list(zip(pieces, shown_bits, guesses))[first:]:
        bits_text = "" if b is None else f"{b:6.2f} bits"
        print(f"{label(text):>12} {bits_text:>11}  {'' if e is None else 'expected ' + label(e)}")
    print(summary)
    path = picture_path(args, "surprise", "html")
    with open(path, "w", encoding="utf-8") as f:
        f.write(surprise_html(pieces[first:], shown_bits[first:], guesses[first:], args.max_bits, summary))
    print(f"wrote {path}")
    if plt is None:
        return
    draw_surprise(plt, pieces[first:], shown_bits[first:], args.max_bits, summary, picture_path(args, "surprise"))


def draw_surprise(plt, pieces, bits, max_bits, summary, path, width=80):
    """The text in a grid of width character cells, each character on a patch of its token's colour
    (a line break shows as an arrow at the end of its line)."""
    cells, x, y = [], 0, 0  # (x, y, character, bits): one cell each
    for text, b in zip(pieces, bits):
        for ch in text:
            if x == width:
                x, y = 0, y + 1
            cells.append((x, y, "↵" if ch == "\n" else ch, b))
            x, y = (0, y + 1) if ch == "\n" else (x + 1, y)
    lines, columns = y + 1, max(cx for cx, _, _, _ in cells) + 1
    fig, ax = plt.subplots(figsize=(columns * 0.15 + 0.4, lines * 0.27 + 0.9))
    for cx, cy, ch, b in cells:
        colour = (0.93, 0.93, 0.93) if b is None else surprise_colour(b, max_bits)
        ax.add_patch(plt.Rectangle((cx, cy - 0.45), 1, 0.9, color=colour, linewidth=0))
        ax.text(cx + 0.5, cy, ch, family="monospace", fontsize=14, va="center", ha="center",
                color="grey" if ch == "↵" else "black")
    ax.set_xlim(0, columns)
    ax.set_ylim(lines - 0.5, -0.5)
    ax.set_aspect(1.7)  # a line is about 1.7 characters' width tall
    ax.axis("off")
    ax.set_title(f"surprise: white 0 bits, red {max_bits:g} or more\n{summary}", fontsize=11)
    save(fig, plt, path)


def save(fig, plt, path):
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    print(f"wrote {path}")


# -----------------------------------------------------------------------------------------------
# the command line

def main(argv):
    parser = ArgumentParser(prog="visualize.py", description=description(__doc__))
    shared = argparse.ArgumentParser(add_help=False)  # the options every view takes
    shared.add_argument("--out_dir", default="out", help="folder of the checkpoint (its ckpt.pt)")
    shared.add_argument("--init_from", default="resume", help="resume (out_dir/ckpt.pt) | PATH of a checkpoint "
                        "file or folder, or a Hugging Face folder | gpt2*")
    shared.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N | mps | auto")
    shared.add_argument("--out", default="", help="the picture's path (default: VIEW.png beside the checkpoint)")
    shared.add_argument("--no_png", action="store_true", help="print the text form only (no matplotlib needed)")
    sub = parser.add_subparsers(dest="view", required=True)
    views = {}
    for name, run, what in (("attention", attention_view, "every head's attention weights over a text"),
                            ("lens", lens_view, "the logit lens: the likeliest next token after each layer"),
                            ("embeddings", embeddings_view, "nearest tokens, analogies, a PCA of token vectors"),
                            ("surprise", surprise_view, "each token coloured by its surprise, and bits per byte")):
        views[name] = run
        p = sub.add_parser(name, help=what, parents=[shared])
        if name != "embeddings":
            p.add_argument("--text", required=True, help="the text (FILE:path reads a file)")
    sub.choices["attention"].add_argument("--layers", default="all", help="comma-separated layers, from 0")
    sub.choices["attention"].add_argument("--heads", default="all", help="comma-separated heads, from 0")
    sub.choices["embeddings"].add_argument("--tokens", default="", help="comma-separated tokens (words); "
                                           "default: the whole vocabulary when it has at most 128 tokens")
    sub.choices["embeddings"].add_argument("--analogy", default="", help="a,b,c: the tokens nearest a - b + c")
    sub.choices["embeddings"].add_argument("--k", type=int, default=5, help="neighbours shown per token")
    sub.choices["surprise"].add_argument("--max_bits", type=float, default=8.0, help="surprise of the deepest red")
    args = parser.parse_args(argv)
    if getattr(args, "k", 1) < 1:
        raise UserError(f"--k must be >= 1, got {args.k}")
    if getattr(args, "max_bits", 1) <= 0:
        raise UserError(f"--max_bits must be > 0, got {args.max_bits}")
    views[args.view](args)


if __name__ == "__main__":
    sys.exit(run_cli(main))
