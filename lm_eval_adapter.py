"""
Our checkpoints as a model of the lm-evaluation-harness (pip install lm-eval), so that any of its
tasks runs on them: `python eval.py --out_dir=OUT --lm_eval_tasks=hellaswag,arc_easy`, or offline
on local task YAMLs with `--lm_eval_include=FOLDER`. Only eval.py imports this file; it builds on benchmarks.py.

Design choices:
- The three requests lm-eval makes, answered as its own `hf` model answers them for a Hugging Face
  export of the same checkpoint (tests/test_lm_eval.py checks it):
  loglikelihood: (context, continuation) split into tokens as benchmarks.encode_pair splits them; an
  empty context is the end-of-text token; the sequence keeps its last block_size + 1 tokens.
  loglikelihood_rolling: the text after the end-of-text token, in disjoint windows of block_size
  predicted tokens (benchmarks.stream_windows with stride block_size), the last with a full context.
  generate_until: on the KV cache (decoding.generate_batch), greedy unless the task samples, the
  context keeping its last block_size - max_gen_toks tokens, each answer cut at its first stop string.
- A tokenizer with a beginning-of-text token of its own (Llama 3's) starts every context with it,
  as hf's tokenizers do; ours (GPT-2's, a BPE trained here) have none.
- Requests are scored longest first, batch_size at a time, right-padded (causal attention: padding
  after a token changes nothing before it), and handed back in lm-eval's order.
"""
from contextlib import nullcontext

import torch

from benchmarks import continuation_logprobs, encode_pair, last_window, stream_windows
from common import UserError, first_line
from decoding import generate_batch
from tasks import utf8_mask
from tokenizer import StopText

try:
    from lm_eval.api.model import LM
    from lm_eval.models.utils import normalize_gen_kwargs
except ImportError as e:
    if e.name and e.name.split(".")[0] == "lm_eval" and "normalize_gen_kwargs" not in str(e):
        raise UserError("--lm_eval_tasks needs the lm-evaluation-harness: pip install lm-eval") from None
    raise UserError(f"the lm-evaluation-harness does not import ({e}); pip install -U lm-eval") from None


class CheckpointLM(LM):
    """One of our models and its tokenizer, answering lm-eval's requests."""

    def __init__(self, model, tokenizer, batch_size=16, autocast=nullcontext, max_gen_toks=256, seed=1337):
        super().__init__()
        if tokenizer.bos_token is None:
            raise UserError("lm-eval needs a tokenizer with an end-of-text token (gpt2 or bpe): it conditions an "
                            "empty context and a rolling text on it")
        self.model, self.tokenizer = model.eval(), tokenizer
        self.block_size = model.config.block_size
        self.batch_size, self.autocast, self.max_gen_toks = batch_size, autocast, max_gen_toks
        self._device = next(model.parameters()).device  # lm-eval's LM.device reads it
        self.generator = torch.Generator(device=self._device).manual_seed(seed)
        # a tokenizer with its own beginning-of-text token (Llama 3's) starts every text with it, as hf's does
        self.begin = [tokenizer.bos_token] if tokenizer.bos_token != tokenizer.eot_token else []

    # -- log-likelihoods ------------------------------------------------------------------------

    def pair_tokens(self, context, continuation):
        """(context ids, continuation ids) as lm-eval's causal models split them."""
        if context.strip():
            ctx, cont = encode_pair(self.tokenizer, context, continuation)
            return self.begin + ctx, cont
        cont = self.tokenizer.encode(context + continuation)  # nothing to condition on but the prefix token
        prefix = self.tokenizer.bos_token
        return ([prefix], cont) if not cont or cont[0] != prefix else (cont[:1], cont[1:])

    def score_pairs(self, pairs):
        """[(summed log-probability of the continuation, whether greedy decoding gives it)] per
        (context ids, continuation ids)."""
        order = sorted(range(len(pairs)), key=lambda i: -len(pairs[i][0]) - len(pairs[i][1]))
        out = [None] * len(pairs)
        for at in range(0, len(order), self.batch_size):
            group = order[at:at + self.batch_size]
            seqs, lengths = zip(*(last_window(*pairs[i], self.block_size) for i in group))
            for i, result in zip(group, continuation_logprobs(self.model, seqs, lengths, self.autocast)):
                out[i] = result
        return out

    def loglikelihood(self, requests, disable_tqdm=False):
        return self.score_pairs([self.pair_tokens(*r.args) for r in requests])

    def loglikelihood_rolling(self, requests, disable_tqdm=False):
        pairs, owner = [], []
        for k, r in enumerate(requests):
            ids = [self.tokenizer.bos_token] + self.tokenizer.encode(r.args[0])
            for start, length, first in stream_windows(len(ids), self.block_size, self.block_size):
                pairs.append((ids[start:start + first + 1], ids[start + first + 1:start + length + 1]))
                owner.append(k)
        totals = [0.0] * len(requests)
        for k, (logprob, _) in zip(owner, self.score_pairs(pairs)):
            totals[k] += logprob
        return totals

    # -- generation ------------------------------------------------------------------------------

    def generate_until(self, requests, disable_tqdm=False):
        out = [None] * len(requests)
        groups = {}  # requests with the same generation settings decode together
        for i, r in enumerate(requests):
            groups.setdefault(repr(sorted(r.args[1].items())), []).append(i)
        for ids in groups.values():
            for at in range(0, len(ids), self.batch_size):
                chunk = ids[at:at + self.batch_size]
                texts = self.generate([requests[i].args[0] for i in chunk], requests[chunk[0]].args[1])
                for i, text in zip(chunk, texts):
                    out[i] = text
        return out

    def generate(self, contexts, gen_kwargs):
        """Answers to contexts under one request's gen_kwargs, read as lm-eval's own models read them
        (normalize_gen_kwargs: until, max_gen_toks and its aliases, do_sample, temperature, top_k, top_p)."""
        kw = normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)
        until = [u for u in kw["until"] if u]
        max_new = kw["max_gen_toks"]
        if max_new >= self.block_size:
            raise UserError(f"the task generates up to {max_new} tokens, which leaves no room for its prompt in this "
                            f"model's context of {self.block_size}")
        temperature = float(kw.get("temperature") or 0.0) if kw["do_sample"] else 0.0
        keep = self.block_size - max_new  # the context's last tokens, as hf's left truncation keeps them
        prompts = [(self.begin + self.tokenizer.encode(c))[-keep:] or [self.tokenizer.bos_token] for c in contexts]
        texts = [StopText(self.tokenizer, until, drop_incomplete=True) for _ in contexts]  # each cut at its first stop string

        def stopped(row, token):
            texts[row].add(token)
            return texts[row].done
        with self.autocast():
            generate_batch(self.model, prompts, max_new, temperature=temperature, top_k=kw.get("top_k"),
                           top_p=kw.get("top_p"), stop_tokens=self.tokenizer.stop_tokens, on_token=stopped,
                           generator=self.generator, utf8=utf8_mask(self.model, self.tokenizer))
        for t in texts:
            t.finish()
        return [t.text for t in texts]


def task_manager(tasks, include=""):
    """lm-eval's index of its tasks (and of the YAMLs in the include folder), with every name in tasks
    checked: an unknown one is named with the nearest known one."""
    import difflib
    from lm_eval.tasks import TaskManager
    manager = TaskManager(include_path=include or None)
    known = sorted(set(manager.all_tasks))
    for t in tasks:
        if t not in known:
            near = difflib.get_close_matches(t, known, n=1)
            raise UserError(f"lm-eval has no task {t!r}" + (f"; did you mean {near[0]!r}?" if near else "") +
                            (f" (is {include} the folder of its YAML?)" if include else ""))
    return manager


def run_lm_eval(model, tokenizer, tasks, manager=None, limit=0, fewshot=None, batch_size=16, seed=1337,
                autocast=nullcontext, log_samples=False):
    """lm-eval's tasks on the model: result lines [{"task", "metric", "value", "stderr", "examples"}], and
    with log_samples, lm-eval's whole output as a second value."""
    import lm_eval
    lm = CheckpointLM(model, tokenizer, batch_size, autocast, seed=seed)
    try:  # lm-eval's own seeds, so that its few-shot examples are those its hf model draws
        out = lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=manager or task_manager(tasks),
                                      num_fewshot=fewshot, limit=limit or None, log_samples=log_samples)
    except (OSError, ConnectionError) as e:  # a task's data not reachable: the Hub offline, a local file gone
        raise UserError(f"lm-eval could not load its data ({first_line(e)}); its tasks download from the Hugging "
                        f"Face Hub, offline use --lm_eval_include with local task YAMLs") from None
    rows = []
    for task, metrics in out["results"].items():
        examples = out.get("n-samples", {}).get(task, {}).get("effective")
        for key, value in metrics.items():
            if "," not in key or "_stderr" in key or not isinstance(value, (int, float)):
                continue
            metric, filt = key.split(",", 1)
            stderr = metrics.get(f"{metric}_stderr,{filt}")
            rows.append(dict(task=task, metric=metric if filt == "none" else f"{metric} ({filt})", value=float(value),
                             stderr=float(stderr) if isinstance(stderr, (int, float)) else None,
                             examples=examples or 0))
    return (rows, out) if log_samples else rows
