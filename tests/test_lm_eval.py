"""eval.py's multiple-choice scores against the lm-evaluation-harness's own: its `hf` model, its HellaSwag
preprocessing, on one local HellaSwag-format file, for a tiny random GPT-2 and a tiny random Llama built
by transformers. Slow: lm-eval and its datasets stack take seconds to import."""
import json
import random

import pytest

from conftest import run_main
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
    import eval as ev
    from hf import load_for_inference
    _, model, tok = load_for_inference(str(folder), None, "cpu")
    for (context, choices, _), lls in zip(ev.hellaswag_questions(str(data)), their_lls, strict=True):
        mine = ev.choice_logprobs(model, tok, context, [" " + c for c in choices], model.config.block_size)
        assert mine == pytest.approx(lls, abs=1e-4)
