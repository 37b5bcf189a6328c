"""eval.py: bits per byte, multiple-choice scoring, the cloze test, and its bad input."""
import json
import math
import random

import pytest
import torch

import benchmarks as bm
import eval as ev
from conftest import TINY_MODEL, copy_run, one_line_error, prepare_tiny, run_main, snapshot
from model import GPT, GPTConfig
from tokenizer import CharTokenizer, bpe_tokenizer, train_bpe

TEXT = "To be, or not to be: that is the question. Café déjà vu, naïve cœur 🙂\n" * 20


class Uniform(torch.nn.Module):
    """A language model whose logits are the same for every token: each prediction costs log(V) nats."""

    def __init__(self, vocab_size, block_size):
        super().__init__()
        self.config = GPTConfig(vocab_size=vocab_size, block_size=block_size)
        self.w = torch.nn.Parameter(torch.zeros(()))

    def forward(self, idx):
        return torch.zeros(*idx.shape, self.config.vocab_size) + self.w, None


def bpe_of(text, vocab_size=300):
    return bpe_tokenizer(train_bpe([text], vocab_size))


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_a_uniform_model_costs_log2_v_bits_per_predicted_token_over_their_bytes(kind):
    tok = CharTokenizer.from_text(TEXT) if kind == "char" else bpe_of(TEXT)
    ids = tok.encode(TEXT)
    if tok.bos_token is not None:
        ids = [tok.bos_token] + ids  # predicted from the start, the end-of-text itself never
    vocab = tok.vocab_size + 7  # a padded vocabulary: the extra ids have no bytes
    totals = bm.score_stream(Uniform(vocab, 16), ids, bm.token_bytes(tok, vocab), 16, 8, 4)
    predicted = ids[1:]
    nbytes = sum(len(tok.decode_bytes([t])) for t in predicted)
    assert nbytes == len(TEXT.encode("utf-8")) - (0 if tok.bos_token is not None else len(tok.decode_bytes(ids[:1])))
    assert bm.bits_per_byte(totals) == pytest.approx(math.log2(vocab) * len(predicted) / nbytes, rel=1e-7)  # float32 logits
    assert int(totals[2]) == len(predicted)


def test_special_tokens_have_no_bytes_and_padding_ids_none():
    tok = bpe_of(TEXT)
    counts = bm.token_bytes(tok, tok.vocab_size + 3)
    assert counts[tok.eot_token] == 0 and counts[-3:].tolist() == [0, 0, 0]
    assert counts[tok.encode("T")[0]] == 1 and all(c >= 1 for i, c in enumerate(counts[:256].tolist()))


@pytest.mark.parametrize("n, block, stride", [(2, 4, 2), (5, 4, 4), (40, 8, 3), (41, 8, 8), (100, 16, 1), (9, 16, 8)])
def test_sliding_windows_predict_every_token_once_with_at_least_block_minus_stride_of_context(n, block, stride):
    predicted = []
    for i, (start, length, first) in enumerate(bm.stream_windows(n, block, stride)):
        assert 0 <= start and length <= block and start + length <= n - 1 + 1
        assert i == 0 or first >= block - stride
        predicted += range(start + first + 1, start + length + 1)
    assert predicted == list(range(1, n))


def tiny_gpt(vocab_size, block_size=16, seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=vocab_size, block_size=block_size, n_layer=2, n_head=2, n_embd=32,
                         dropout=0.0)).eval()


def test_a_text_in_one_window_costs_the_model_s_own_loss():
    tok = CharTokenizer.from_text(TEXT)
    ids = tok.encode(TEXT[:17])
    model = tiny_gpt(tok.vocab_size)
    totals = bm.score_stream(model, ids, bm.token_bytes(tok, tok.vocab_size), 16, 8, 4)
    x, y = torch.tensor([ids[:-1]]), torch.tensor([ids[1:]])
    with torch.no_grad():
        loss = model(x, y)[1].item()
    assert float(totals[0]) / 16 == pytest.approx(loss, rel=1e-6) and int(totals[2]) == 16


def test_a_context_s_trailing_space_moves_to_the_continuation():
    tok = bpe_of(TEXT)
    ctx, cont = bm.encode_pair(tok, "To be, or not to ", "be")
    assert ctx == tok.encode("To be, or not to") and cont == tok.encode("To be, or not to be")[len(ctx):]


def test_padded_choices_score_as_each_would_alone():
    tok = bpe_of(TEXT)
    model = tiny_gpt(tok.vocab_size, block_size=64)
    context, choices = "To be, or not", [" to be", " that is the question", " naïve"]
    batch = bm.choice_logprobs(model, tok, context, choices, 64)
    for choice, score in zip(choices, batch):
        ctx, cont = bm.encode_pair(tok, context, choice)
        seq = torch.tensor([ctx + cont])
        with torch.no_grad():
            logp = torch.log_softmax(model(seq[:, :-1])[0], -1)[0]
        alone = sum(logp[len(ctx) - 1 + j, t].item() for j, t in enumerate(cont))
        assert score == pytest.approx(alone, abs=1e-4)


def test_acc_takes_the_best_sum_and_acc_norm_the_best_sum_per_character(monkeypatch):
    # sums -6 and -8: acc picks the first; per character -6/3 = -2 against -8/8 = -1: acc_norm the second
    assert bm.best_choices([-6.0, -8.0], [3, 8]) == (0, 1)
    monkeypatch.setattr(bm, "continuation_logprobs", lambda *a: [(-6.0, False), (-8.0, False)])
    acc, acc_norm = bm.score_choices(None, [(None, None, 1, [3, 8])])
    assert acc == [0] and acc_norm == [1]


def test_cloze_questions_are_fixed_by_the_seed_with_same_length_continuations_from_elsewhere():
    tokens = list(range(10_000))  # every token its own position, so a choice tells where it came from
    a = bm.cloze_questions(tokens, 50, 12, 4, seed=3)
    assert a == bm.cloze_questions(tokens, 50, 12, 4, seed=3) != bm.cloze_questions(tokens, 50, 12, 4, seed=4)
    for context, choices, label in a:
        assert len(context) == 12 and all(len(c) == 4 for c in choices)
        assert choices[label][0] == context[-1] + 1  # the true one follows its context
        starts = sorted(c[0] for c in choices)
        assert all(b - a >= 4 for a, b in zip(starts, starts[1:]))  # four different places
    assert {label for _, _, label in a} == {0, 1, 2, 3}


@pytest.fixture(scope="module")
def trained(tmp_path_factory, corpus_text):
    folder = prepare_tiny(tmp_path_factory.mktemp("eval"), corpus_text)
    run_main("train.py", *TINY_MODEL, "--out_dir=out", "--max_iters=150", "--eval_interval=150", cwd=folder)
    ckpt = torch.load(folder / "out" / "ckpt.pt", weights_only=True)
    untrained = GPT(GPTConfig.from_dict(ckpt["model_config"]))  # the same model at its initial weights
    (folder / "untrained").mkdir()
    torch.save({**ckpt, "model": untrained.state_dict()}, folder / "untrained" / "ckpt.pt")
    return folder


def test_a_trained_model_beats_chance_on_the_cloze_test_and_an_untrained_one_does_not(trained):
    result = {}
    for run in ("out", "untrained"):
        run_main("eval.py", f"--out_dir={run}", "--tasks=cloze", "--cloze_questions=400", "--cloze_tokens=8",
                 "--device=cpu", cwd=trained)
        row, = json.loads((trained / run / "eval.json").read_text())["results"]
        result[run] = row
    low = result["out"]["value"] - 1.96 * result["out"]["stderr"]
    assert low > 0.25, result
    untrained = result["untrained"]
    assert abs(untrained["value"] - 0.25) < 1.96 * math.sqrt(0.25 * 0.75 / 400), result


def test_bpb_of_the_split_and_of_a_text_file_are_written_to_eval_json(trained, corpus_text):
    (trained / "sample.txt").write_text(corpus_text[1000:1500], encoding="utf-8")
    result = run_main("eval.py", "--out_dir=out", "--tasks=bpb", "--max_tokens=2000", "--device=cpu", cwd=trained)
    assert "bits/byte" in result.stdout
    split = next(r for r in json.loads((trained / "out" / "eval.json").read_text())["results"]
                 if r["metric"] == "bits/byte")
    assert split["task"] == "bpb (val)" and 0.5 < split["value"] < 6 and split["examples"] == 1999
    run_main("eval.py", "--out_dir=out", "--tasks=bpb", "--text=FILE:sample.txt", "--out=text.json", "--device=cpu",
             cwd=trained)
    text = json.loads((trained / "text.json").read_text())["results"][0]
    assert text["task"] == "bpb (text)" and 0.5 < text["value"] < 6


def write_lines(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records), encoding="utf-8")
    return path


def test_multiple_choice_from_a_jsonl_file(trained):
    rng = random.Random(0)
    lines = [{"context": "ROMEO: ", "choices": ["the", "qx zv", "and"], "label": rng.randrange(3)} for _ in range(5)]
    write_lines(trained / "mc.jsonl", lines)
    run_main("eval.py", "--out_dir=out", "--tasks=mc", "--mc_file=mc.jsonl", "--out=mc.json", "--device=cpu",
             cwd=trained)
    rows = json.loads((trained / "mc.json").read_text())["results"]
    assert [r["metric"] for r in rows] == ["acc", "acc_norm"] and all(r["examples"] == 5 for r in rows)


GOOD = {"context": "a", "choices": ["b", "c"], "label": 0}


@pytest.mark.parametrize("lines, message", [
    ([GOOD, "{not json"], "q.jsonl line 2 is not JSON"),
    ([GOOD, {"context": "a", "choices": ["b", "c"]}], "q.jsonl line 2 has no 'label'"),
    ([{"context": "a", "choices": ["b", "c"], "label": 2}], "label 2 is not the index of one of its 2 choices"),
    ([], "has no questions"),
    ([{"context": "a", "choices": "bc", "label": 0}], "choices must be a list of two or more strings")])
def test_a_bad_question_file_is_one_line_naming_file_and_line(trained, tmp_path, lines, message):
    folder = copy_run(trained, tmp_path / "run")
    write_lines(folder / "q.jsonl", lines)
    before = snapshot(folder / "out")
    result = run_main("eval.py", "--out_dir=out", "--tasks=mc", "--mc_file=q.jsonl", "--device=cpu", cwd=folder,
                      check=False)
    one_line_error(result, message)
    assert snapshot(folder / "out") == before


@pytest.mark.parametrize("args, message", [
    (["--tasks=clozee"], "unknown task 'clozee' in --tasks; did you mean 'cloze'?"),
    (["--tasks=mc"], "--tasks=mc needs --mc_file=FILE"),
    (["--cloze_tokens=32", "--tasks=cloze"], "cloze continuations of 32 tokens need a block_size above 32, not 32"),
    (["--split=tset"], "split must be train, val or test"),
    (["--split=test"], "language-model datasets have train and val splits only"),
    (["--tasks=instruct"], "is not an instruct dataset"),
    (["--lm_eval_include=nowhere", "--lm_eval_tasks=x"], "--lm_eval_include=nowhere is not a folder")])
def test_bad_settings_are_one_line(trained, tmp_path, args, message):
    folder = copy_run(trained, tmp_path / "run")
    before = snapshot(folder / "out")
    one_line_error(run_main("eval.py", "--out_dir=out", "--device=cpu", *args, cwd=folder, check=False), message)
    assert snapshot(folder / "out") == before


def test_a_classifier_is_refused_a_language_model_metric(tmp_path):
    model = GPT(GPTConfig(block_size=16, vocab_size=20, n_layer=1, n_head=2, n_embd=16, n_classes=2))
    from dataclasses import asdict
    torch.save({"model": model.state_dict(), "model_config": asdict(model.config),
                "tokenizer": {"kind": "char", "chars": "abcdefghijklmnopqrst"}}, tmp_path / "ckpt.pt")
    result = run_main("eval.py", f"--init_from={tmp_path / 'ckpt.pt'}", "--device=cpu", cwd=tmp_path, check=False)
    one_line_error(result, "is a classifier")
    assert not (tmp_path / "eval.json").exists()


def test_eval_json_keeps_other_tasks_of_the_same_checkpoint_and_replaces_a_rerun_one(tmp_path):
    path = tmp_path / "eval.json"
    first = [{"task": "cloze", "metric": "acc", "value": 0.5, "stderr": 0.1, "examples": 10}]
    path.write_text(json.dumps(ev.merged_results(path, "out", 30, first)))
    again = [{**first[0], "value": 0.6}]
    bpb = [{"task": "bpb (val)", "metric": "bits/byte", "value": 2.0, "stderr": None, "examples": 99}]
    assert ev.merged_results(path, "out", 30, bpb)["results"] == first + bpb
    assert ev.merged_results(path, "out", 30, again)["results"] == again
    assert ev.merged_results(path, "out", 40, bpb)["results"] == bpb  # trained on since: the old rows are stale


def test_train_s_val_bpb_is_what_eval_computes_on_the_same_windows(tiny_run):
    """train.py evaluates eval_iters batches drawn by a generator seeded seed + 2 (Run.evaluate)."""
    import numpy as np
    from checkpoint import load_checkpoint, model_from_checkpoint
    from conftest import evals
    from tokenizer import dataset_tokenizer
    ckpt = load_checkpoint(str(tiny_run / "out"))
    model = model_from_checkpoint(ckpt).eval()
    cfg = ckpt["config"]
    tokens = np.memmap(tiny_run / "data" / "tiny" / "val.bin", dtype=np.uint16, mode="r")
    g = torch.Generator().manual_seed(cfg["seed"] + 2)
    starts = torch.randint(len(tokens) - 32, (cfg["eval_iters"], cfg["batch_size"]), generator=g).numpy()
    nbytes = bm.token_bytes(dataset_tokenizer(tiny_run / "data" / "tiny"), model.config.vocab_size)
    logged = next(r for r in evals(tiny_run / "out") if r["iter"] == ckpt["iter_num"])
    assert bm.bits_per_byte(bm.score_windows(model, tokens, starts, 32, nbytes)) == pytest.approx(logged["val/bpb"],
                                                                                                 rel=1e-6)


def hellaswag_record(label=2):
    return {"activity_label": "Making a cake", "ctx_a": "A woman cracks eggs into a bowl.",
            "ctx_b": "she [title] whisks them", "endings": ["bakes it.", "eats [step] the bowl.", "adds flour.",
                                                         "sings."], "label": label}


def test_hellaswag_records_are_cleaned_and_joined_as_lm_eval_does(tmp_path):
    path = write_lines(tmp_path / "hs.jsonl", [hellaswag_record(), hellaswag_record(0)])
    (context, choices, label), second = bm.hellaswag_questions(str(path))
    assert context == "Making a cake: A woman cracks eggs into a bowl. She. whisks them"
    assert choices == ["bakes it.", "eats the bowl.", "adds flour.", "sings."] and label == 2 and second[2] == 0
    assert len(bm.hellaswag_questions(str(path), limit=1)) == 1


def test_hellaswag_offline_is_one_line_and_leaves_no_file(trained, tmp_path, monkeypatch):
    import urllib.request

    def offline(*a, **kw):
        raise OSError("network unreachable")
    monkeypatch.setattr(urllib.request, "urlopen", offline)
    folder = copy_run(trained, tmp_path / "run")
    result = run_main("eval.py", "--out_dir=out", "--tasks=hellaswag", "--device=cpu", cwd=folder, check=False)
    assert result.returncode == 2 and f"could not download {bm.HELLASWAG_URL.format(split='val')}" in result.stderr
    assert "data/hellaswag/" in result.stderr and not (folder / "data" / "hellaswag" / "hellaswag_val.jsonl").exists()


@pytest.mark.slow
def test_bench_reports_scoring_speed_for_both_shapes(tmp_path):
    out = run_main("eval.py", "--bench", "--device=cpu", cwd=tmp_path).stdout.splitlines()
    rows = [line for line in out if "questions/s" in line]
    assert [r.split(":")[0] for r in rows] == ["4x128, block 64 (the CPU config)", "6x384, block 256"]
    for r in rows:
        numbers = [float(w.replace(",", "")) for w in r.split() if w.replace(",", "").replace(".", "").isdigit()]
        assert len(numbers) >= 3 and all(n > 0 for n in numbers)
    assert not any(tmp_path.iterdir())  # a benchmark writes nothing


# -----------------------------------------------------------------------------------------------
# evaluation during training: train.py's eval_tasks

def test_eval_tasks_log_the_cloze_score_at_every_evaluation_on_the_same_questions(workdir):
    import numpy as np
    from checkpoint import load_checkpoint, model_from_checkpoint
    from conftest import evals
    run_main("train.py", *TINY_MODEL, "--out_dir=out", "--max_iters=40", "--eval_interval=20", "--eval_tasks=cloze",
             "--eval_examples=60", cwd=workdir)
    logged = evals(workdir / "out")
    assert [r["iter"] for r in logged] == [0, 20, 40] and all(0 <= r["cloze/acc"] <= 1 for r in logged)
    ckpt = load_checkpoint(str(workdir / "out"))
    assert ckpt["iter_num"] == 40
    tokens = np.memmap(workdir / "data" / "tiny" / "val.bin", dtype=np.uint16, mode="r")
    questions = bm.benchmark_questions("cloze", 32, 60, ckpt["config"]["seed"], tokens)  # what eval.py would ask
    scores = bm.benchmark_scores("cloze", model_from_checkpoint(ckpt).eval(), questions)
    assert logged[-1]["cloze/acc"] == pytest.approx(sum(scores["acc"]) / 60)


def test_eval_tasks_score_a_multiple_choice_file_with_acc_and_acc_norm(workdir):
    write_lines(workdir / "mc.jsonl", [{"context": "ROMEO: ", "choices": ["the", "qx zv", "and"], "label": i % 3}
                                       for i in range(6)])
    result = run_main("train.py", *TINY_MODEL, "--out_dir=out", "--max_iters=10", "--eval_interval=10",
                      "--eval_tasks=mc", "--eval_mc_file=mc.jsonl", "--eval_examples=4", cwd=workdir)
    assert "mc/acc " in result.stdout and "mc/acc_norm " in result.stdout
    from conftest import evals
    last = evals(workdir / "out")[-1]
    assert {"mc/acc", "mc/acc_norm"} <= set(last) and last["mc/acc"] in (0, 0.25, 0.5, 0.75, 1)


@pytest.mark.parametrize("args, message", [
    (["--eval_tasks=clozee"], "unknown task 'clozee' in eval_tasks; did you mean 'cloze'?"),
    (["--eval_tasks=bpb"], "unknown task 'bpb' in eval_tasks"),
    (["--eval_tasks=mc"], "eval_tasks=mc needs eval_mc_file=FILE"),
    (["--eval_tasks=mc", "--eval_mc_file=missing.jsonl"], "missing.jsonl not found"),
    (["--eval_tasks=cloze", "--eval_examples=0"], "eval_examples must be >= 1")])
def test_bad_eval_tasks_are_one_line_before_training(workdir, args, message):
    one_line_error(run_main("train.py", *TINY_MODEL, "--out_dir=out", "--max_iters=10", *args, cwd=workdir,
                            check=False), message)
    assert not (workdir / "out" / "ckpt.pt").exists()


def test_lm_eval_tasks_without_the_harness_installed_are_one_line(trained, monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as if not installed
    monkeypatch.delitem(sys.modules, "lm_eval_adapter", raising=False)
    result = run_main("eval.py", "--out_dir=out", "--lm_eval_tasks=hellaswag", "--device=cpu", cwd=trained,
                      check=False)
    one_line_error(result, "--lm_eval_tasks needs the lm-evaluation-harness: pip install lm-eval")


def test_eval_tasks_questions_the_tokenizer_cannot_encode_fail_before_training(workdir):
    write_lines(workdir / "mc.jsonl", [{"context": "ROMEO: ", "choices": ["the", "\u20ac 5"], "label": 0}])
    result = run_main("train.py", *TINY_MODEL, "--out_dir=out", "--max_iters=10", "--eval_tasks=mc",
                      "--eval_mc_file=mc.jsonl", cwd=workdir, check=False)
    one_line_error(result, "characters not in this char-level vocabulary")
    assert "step 0" not in result.stdout and not (workdir / "out" / "ckpt.pt").exists()
