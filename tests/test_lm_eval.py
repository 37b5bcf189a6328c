"""eval.py's multiple-choice scores against the lm-evaluation-harness's own: its `hf` model, its HellaSwag
preprocessing, on one local HellaSwag-format file, for a tiny random GPT-2 and a tiny random Llama built
by transformers. Slow: lm-eval and its datasets stack take seconds to import."""
import json
import random

import pytest

from conftest import TINY_MODEL, one_line_error, prepare_tiny, run_main
from hf import write_tokenizer

lm_eval = pytest.importorskip("lm_eval")
transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.slow

WORDS = ("the king shall speak of love and war to thee my lord good night sweet prince a woman man dog "
         "runs jumps eats cake bowl water ball river house").split()


def hellaswag_file(path, n, seed):
    """n records in HellaSwag's own shape, with its WikiHow markup now and then."""
    rng = random.Random(seed)

    def words(k):
        return " ".join(rng.choice(WORDS) for _ in range(k))
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            ctx_b = words(rng.randint(1, 5)) + (" [title]" + words(2) if i % 5 == 0 else "")
            endings = [words(rng.randint(1, 8)) + ("." if rng.random() < 0.5 else "") for _ in range(4)]
            f.write(json.dumps({"activity_label": words(2).capitalize(), "ctx_a": words(rng.randint(3, 12)) + ".",
                                "ctx_b": ctx_b, "endings": endings, "label": str(rng.randrange(4))}) + "\n")
    return path


TASK = """task: local_hellaswag
dataset_path: json
dataset_kwargs:
  data_files:
    validation: {data}
output_type: multiple_choice
validation_split: validation
process_docs: !function utils.process_docs
doc_to_text: "{{{{query}}}}"
doc_to_target: "{{{{label}}}}"
doc_to_choice: "choices"
metric_list:
  - metric: acc
    aggregation: mean
  - metric: acc_norm
    aggregation: mean
"""


def lm_eval_scores(model_dir, data, tmp_path, monkeypatch):
    """acc and acc_norm of lm-eval's hf model on data, through a local task that uses lm-eval's own
    HellaSwag preprocessing."""
    from lm_eval.tasks import TaskManager
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "local_hellaswag.yaml").write_text(TASK.format(data=data))
    (tasks / "utils.py").write_text("from lm_eval.tasks.hellaswag.utils import process_docs  # noqa: F401\n")
    out = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={model_dir},dtype=float32",
                                  tasks=["local_hellaswag"], task_manager=TaskManager(include_path=str(tasks)),
                                  batch_size=1, device="cpu", log_samples=True)
    r = out["results"]["local_hellaswag"]
    samples = sorted(out["samples"]["local_hellaswag"], key=lambda d: d["doc_id"])
    return (r["acc,none"], r["acc_norm,none"]), [[float(ll) for ll, _ in d["filtered_resps"]] for d in samples]


def ours(model_dir, data, tmp_path):
    (tmp_path / "data" / "hellaswag").mkdir(parents=True)
    (tmp_path / "data" / "hellaswag" / "hellaswag_val.jsonl").write_text(data.read_text())
    run_main("eval.py", f"--init_from={model_dir}", "--tasks=hellaswag", "--out=ours.json", "--device=cpu",
             "--dtype=float32", cwd=tmp_path)
    rows = json.loads((tmp_path / "ours.json").read_text())["results"]
    assert all(r["examples"] == 60 for r in rows)
    return tuple(r["value"] for r in rows)


def tiny_gpt2(folder):
    """GPT-2's shape at a tiny size, random weights, and GPT-2's own tokenizer (from ../shared's files)."""
    import torch
    from tokenizer import gpt2_tokenizer
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=128, vocab_size=50257)
    transformers.GPT2LMHeadModel(config).save_pretrained(folder)
    write_tokenizer(gpt2_tokenizer(), folder, 128)
    return folder


def tiny_llama(folder, corpus_text):
    """Llama's shape (grouped-query attention, untied head) at a tiny size, with a BPE trained here."""
    import torch
    from tokenizer import bpe_tokenizer, train_bpe
    tok = bpe_tokenizer(train_bpe([corpus_text[:30_000] + " ".join(WORDS)], 400))
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                      max_position_embeddings=128, tie_word_embeddings=False,
                                      bos_token_id=tok.eot_token, eos_token_id=tok.eot_token)
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    write_tokenizer(tok, folder, 128)
    return folder


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_our_multiple_choice_scores_are_lm_eval_s_on_the_same_hellaswag_file(family, tmp_path, monkeypatch,
                                                                             corpus_text, tiktoken_cache):
    folder = tmp_path / family
    tiny_gpt2(folder) if family == "gpt2" else tiny_llama(folder, corpus_text)
    data = hellaswag_file(tmp_path / "hs.jsonl", 60, seed=1)
    theirs, their_lls = lm_eval_scores(folder, data, tmp_path, monkeypatch)
    assert ours(folder, data, tmp_path) == theirs
    import benchmarks as bm
    from hf import load_for_inference
    _, model, tok = load_for_inference(str(folder), None, "cpu")
    for (context, choices, _), lls in zip(bm.hellaswag_questions(str(data)), their_lls, strict=True):
        mine = bm.choice_logprobs(model, tok, context, [" " + c for c in choices], model.config.block_size)
        assert mine == pytest.approx(lls, abs=1e-4)


# -----------------------------------------------------------------------------------------------
# lm_eval_adapter.py: lm-eval on our checkpoints, against its hf model on their exports

LOCAL_TASKS = {
    "local_choice": TASK.replace("task: local_hellaswag", "task: local_choice").replace("{data}", "{choice}"),
    "local_rolling": """task: local_rolling
dataset_path: json
dataset_kwargs:
  data_files:
    test: {rolling}
output_type: loglikelihood_rolling
test_split: test
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
""",
    "local_generate": """task: local_generate
dataset_path: json
dataset_kwargs:
  data_files:
    test: {generate}
output_type: generate_until
test_split: test
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n", "."]
  max_gen_toks: 12
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""}


def local_tasks(folder, corpus_text):
    """Three local lm-eval tasks, one per kind of request: multiple choice (loglikelihood), whole texts
    (loglikelihood_rolling, some longer than the context) and short answers (generate_until)."""
    rng = random.Random(3)
    lines = [s for s in corpus_text.splitlines() if len(s) > 20]
    folder.mkdir()
    files = {"choice": hellaswag_file(folder / "choice.jsonl", 30, seed=2), "rolling": folder / "rolling.jsonl",
             "generate": folder / "generate.jsonl"}
    with open(files["rolling"], "w", encoding="utf-8") as f:
        for i in range(12):
            start = rng.randrange(len(corpus_text) - 2000)
            f.write(json.dumps({"text": corpus_text[start:start + rng.choice([30, 150, 600, 1500])]}) + "\n")
    with open(files["generate"], "w", encoding="utf-8") as f:
        for line in rng.sample(lines, 20):
            cut = len(line) // 2
            f.write(json.dumps({"question": line[:cut], "answer": line[cut:]}) + "\n")
    for name, text in LOCAL_TASKS.items():
        (folder / f"{name}.yaml").write_text(text.format(**files))
    (folder / "utils.py").write_text("from lm_eval.tasks.hellaswag.utils import process_docs  # noqa: F401\n")
    return folder


def responses(out):
    """Per task, each document's filtered responses in document order."""
    return {task: [d["filtered_resps"] for d in sorted(docs, key=lambda d: d["doc_id"])]
            for task, docs in out["samples"].items()}


def test_lm_eval_through_our_adapter_matches_its_hf_model_on_our_export(tmp_path, monkeypatch, corpus_text):
    from lm_eval.tasks import TaskManager
    from hf import load_for_inference
    from lm_eval_adapter import run_lm_eval, task_manager
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder = prepare_tiny(tmp_path, corpus_text[:60_000], "bpe", vocab_size=400)
    run_main("train.py", *TINY_MODEL, "--block_size=64", "--out_dir=out", "--max_iters=400", "--eval_interval=400",
             cwd=folder)
    run_main("hf.py", "export", "--ckpt", "out", "--out", "exported", cwd=folder)
    tasks = local_tasks(folder / "tasks", corpus_text)
    names = sorted(LOCAL_TASKS)

    theirs = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={folder / 'exported'},dtype=float32",
                                     tasks=names, task_manager=TaskManager(include_path=str(tasks)), batch_size=1,
                                     device="cpu", log_samples=True)
    _, model, tok = load_for_inference("resume", str(folder / "out"), "cpu")
    rows, ours = run_lm_eval(model, tok, names, task_manager(names, str(tasks)), batch_size=4, log_samples=True)

    for task in names:
        for key, value in theirs["results"][task].items():
            if isinstance(value, float) and "_stderr" not in key:
                assert ours["results"][task][key] == pytest.approx(value, rel=1e-5), (task, key)
    mine, reference = responses(ours), responses(theirs)
    for (ll, greedy), (their_ll, their_greedy) in zip(sum(mine["local_choice"], []), sum(reference["local_choice"], []),
                                                      strict=True):
        assert ll == pytest.approx(float(their_ll), abs=1e-4) and greedy == their_greedy
    assert [r[0] for r in mine["local_rolling"]] == pytest.approx([r[0] for r in reference["local_rolling"]], abs=1e-4)
    assert mine["local_generate"] == reference["local_generate"]
    assert any(r[0] for r in mine["local_generate"])  # the model says something, so the comparison means something
    assert {(r["task"], r["metric"]) for r in rows} >= {("local_choice", "acc"), ("local_choice", "acc_norm"),
                                                        ("local_rolling", "bits_per_byte"),
                                                        ("local_generate", "exact_match")}

    # and the same through eval.py: a table row per metric, into eval.json
    run_main("eval.py", "--out_dir=out", "--lm_eval_tasks=" + ",".join(names), f"--lm_eval_include={tasks}",
             "--device=cpu", "--dtype=float32", cwd=folder)
    written = {(r["task"], r["metric"]): r["value"] for r in json.loads((folder / "out" / "eval.json").read_text())["results"]}
    assert written[("local_choice", "acc_norm")] == theirs["results"]["local_choice"]["acc_norm,none"]
    assert written[("local_rolling", "bits_per_byte")] == pytest.approx(
        theirs["results"]["local_rolling"]["bits_per_byte,none"], rel=1e-5)


def test_an_unknown_lm_eval_task_is_one_line_naming_the_nearest(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    local_tasks(tmp_path / "tasks", "To be, or not to be, that is the question:\n" * 100)
    result = run_main("eval.py", "--init_from=gpt2", "--lm_eval_tasks=local_rollin", "--lm_eval_include=tasks",
                      cwd=tmp_path, check=False)
    one_line_error(result, "lm-eval has no task 'local_rollin'; did you mean 'local_rolling'?")
    assert not any(p.name == "eval.json" for p in tmp_path.rglob("*"))


def test_generation_settings_are_read_as_lm_eval_reads_them(corpus_text):
    import torch
    from common import UserError
    from lm_eval_adapter import CheckpointLM
    from model import GPT, GPTConfig
    from tokenizer import bpe_tokenizer, train_bpe
    tok = bpe_tokenizer(train_bpe([corpus_text[:20_000]], 300))
    torch.manual_seed(0)
    lm = CheckpointLM(GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=32, n_layer=1, n_head=2, n_embd=16)), tok)
    greedy = lm.generate(["ROMEO:", "ROMEO:"], {"until": [""], "max_new_tokens": 6})  # an alias; an empty stop skipped
    assert greedy[0] == greedy[1] != "" and greedy == lm.generate(["ROMEO:"] * 2, {"max_gen_toks": 6, "do_sample": False})
    sampled = lm.generate(["ROMEO:"] * 4, {"temperature": 1.0, "max_gen_toks": 6})  # temperature alone samples
    assert len(set(sampled)) > 1
    with pytest.raises(UserError, match="leaves no room for its prompt"):
        lm.generate(["ROMEO:"], {"max_gen_toks": 32})
