"""Fine-tuning: classification, instruction data, LoRA, label smoothing (tasks.py, model.py, train.py)."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import tasks
from conftest import SHARED, TINY_MODEL, CountingForward, one_line_error, read_metrics, run_main, write_alpaca, write_sms
from model import GPT, GPTConfig
from train import adapt_model


def tiny(**kw):
    torch.manual_seed(0)
    return GPT(GPTConfig(block_size=24, vocab_size=40, n_layer=2, n_head=2, n_embd=16, **kw)).eval()


# ------------------------------------------------------------------------------------------- model

def test_label_smoothing_zero_equals_plain_cross_entropy():
    model = tiny(n_classes=3)
    idx = torch.randint(0, 40, (4, 10))
    targets = torch.randint(0, 40, (4, 10))
    logits, loss = model(idx, targets, label_smoothing=0.0)
    torch.testing.assert_close(loss, F.cross_entropy(logits.view(-1, 40), targets.view(-1)))
    lengths, labels = torch.tensor([10, 3, 7, 1]), torch.tensor([0, 2, 1, 1])
    cls_logits, cls_loss = model.classify(idx, lengths, labels, label_smoothing=0.0)
    torch.testing.assert_close(cls_loss, F.cross_entropy(cls_logits, labels))
    _, smoothed = model.classify(idx, lengths, labels, label_smoothing=0.1)
    torch.testing.assert_close(smoothed, F.cross_entropy(cls_logits, labels, label_smoothing=0.1))
    assert not torch.isclose(smoothed, cls_loss)


def test_classifier_reads_the_last_real_token_whatever_the_padding():
    model = tiny(n_classes=2)
    text = torch.randint(1, 40, (1, 7))
    short, _ = model.classify(text, torch.tensor([7]))
    for pad_len, pad_id in [(3, 0), (10, 39), (17, 5)]:
        padded = torch.cat([text, torch.full((1, pad_len), pad_id)], dim=1)
        logits, _ = model.classify(padded, torch.tensor([7]))
        torch.testing.assert_close(logits, short, atol=1e-6, rtol=0)
    changed = text.clone()
    changed[0, 6] = (text[0, 6] % 39) + 1  # the last real token is the one read
    other, _ = model.classify(changed, torch.tensor([7]))
    assert not torch.allclose(other, short)


def test_padding_never_contributes_to_the_auxiliary_lm_loss():
    model = tiny(n_classes=2)
    x = torch.randint(1, 40, (2, 12))
    lengths, labels = torch.tensor([5, 12]), torch.tensor([1, 0])
    _, a = model.classify(x, lengths, labels, lm_weight=0.7)
    y = x.clone()
    y[0, 5:] = torch.randint(0, 40, (7,))  # different padding tokens in row 0
    _, b = model.classify(y, lengths, labels, lm_weight=0.7)
    torch.testing.assert_close(a, b)
    _, plain = model.classify(x, lengths, labels)
    assert a > plain  # the LM term is there


def test_lora_with_b_zero_leaves_outputs_unchanged_and_merged_equals_unmerged():
    model = tiny(n_classes=2)
    idx = torch.randint(0, 40, (2, 9))
    before, _ = model(idx)
    model.add_lora(rank=4, alpha=8.0)
    after, _ = model(idx)
    torch.testing.assert_close(after, before, atol=0, rtol=0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(0, 0.5)
    adapted, _ = model(idx)
    adapted_cls, _ = model.classify(idx, torch.tensor([9, 4]))
    assert not torch.allclose(adapted, before, atol=1e-3)
    model.merge_lora()
    assert not any(".lora_" in k for k in model.state_dict()) and model.config.lora_rank == 0
    merged, _ = model(idx)
    merged_cls, _ = model.classify(idx, torch.tensor([9, 4]))
    torch.testing.assert_close(merged, adapted, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(merged_cls, adapted_cls, atol=1e-5, rtol=1e-5)


def test_lora_trains_only_adapters_and_head_and_a_base_checkpoint_still_loads():
    base = tiny()
    cfg = {"trainable": "lora", "trainable_blocks": 1, "lora_rank": 2, "lora_alpha": 4.0, "lora_dropout": 0.0,
           "lora_targets": "attn.c_attn,mlp.c_fc"}
    model = tiny()
    line = adapt_model(model, cfg, "classify", n_classes=2)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n or n.startswith("cls_head.") for n in trainable)
    assert any("c_attn.lora_A" in n for n in trainable) and not any("c_proj.lora" in n for n in trainable)
    assert "trainable=lora" in line
    missing, unexpected = model.load_state_dict(base.state_dict(), strict=False)  # base keys are unchanged
    assert not unexpected and all(".lora_" in k or k.startswith("cls_head.") for k in missing)


def test_last_blocks_trains_the_top_blocks_final_norm_and_head_only():
    model = tiny(n_classes=2)
    cfg = {"trainable": "last_blocks", "trainable_blocks": 1, "lora_rank": 0, "lora_alpha": 16.0, "lora_dropout": 0.0,
           "lora_targets": "attn.c_attn"}
    adapt_model(model, cfg, "classify", n_classes=2)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("transformer.h.1.", "transformer.ln_f.", "cls_head.")) for n in trainable)
    assert "cls_head.weight" in trainable and "transformer.wte.weight" not in trainable


# ------------------------------------------------------------------------------------------- data

def test_classification_data_is_stratified_truncated_and_pickle_free(tmp_path):
    write_sms(tmp_path / "sms.tsv", n=300)
    meta, tok = tasks.prepare_task("classify", str(tmp_path / "sms.tsv"), "char", str(tmp_path / "d"),
                                   val_fraction=0.1, test_fraction=0.2, max_length=20)
    assert meta["label_names"] == ["ham", "spam"] and meta["positive_class"] == "spam"
    assert meta["splits"] == {"train": 210, "val": 30, "test": 60}  # 300 rows, header dropped
    for split, n in meta["splits"].items():
        tokens, arrays = tasks.read_examples(str(tmp_path / "d"), split, meta["dtype"])
        assert set(arrays) == {"offsets", "labels", "full_lengths"}
        assert arrays["labels"].mean() == pytest.approx(0.2)  # every split keeps the 1-in-5 spam rate
        lengths = np.diff(arrays["offsets"])
        assert (lengths == np.minimum(arrays["full_lengths"], 20)).all() and (arrays["full_lengths"] > 20).any()
    with np.load(tmp_path / "d" / "train.index.npz", allow_pickle=False) as z:
        assert z["offsets"][-1] == len(np.fromfile(tmp_path / "d" / "train.bin", dtype=meta["dtype"]))


def test_loss_mask_is_zero_exactly_on_prompt_tokens_and_padding(tmp_path):
    records = write_alpaca(tmp_path / "a.json", n=40)
    meta, tok = tasks.prepare_task("instruct", str(tmp_path / "a.json"), "bpe", str(tmp_path / "d"),
                                   val_fraction=0.2, test_fraction=0.2, vocab_size=300)
    tokens, arrays = tasks.read_examples(str(tmp_path / "d"), "train", meta["dtype"])
    offsets, mask = arrays["offsets"], arrays["mask"]
    prompts = {tasks.instruct_prompt(r["instruction"], r["input"]): r["output"] for r in records}
    for i in range(len(offsets) - 1):
        seq, m = tokens[offsets[i]:offsets[i + 1]].tolist(), mask[offsets[i]:offsets[i + 1]]
        n_prompt = int((m == 0).sum())
        assert (m[:n_prompt] == 0).all() and (m[n_prompt:] == 1).all()
        prompt = tok.decode(seq[:n_prompt])
        assert prompt.endswith("### Response:\n") and seq[-1] == tok.eot_token
        assert tok.decode(seq[n_prompt:-1]) == prompts[prompt]
    batches = tasks.ExampleBatches(str(tmp_path / "d"), "train", meta, 128, 4, "cpu", 0)
    ids = np.array([0, 1, 2, 3])
    x, y = batches.get(ids)
    for r, i in enumerate(ids):
        seq, m = tokens[offsets[i]:offsets[i + 1]].astype(np.int64), mask[offsets[i]:offsets[i + 1]]
        expected = np.full(x.shape[1], -1)
        expected[:len(seq) - 1] = np.where(m[1:] == 1, seq[1:], -1)  # prompt and padding: -1
        assert (y[r].numpy() == expected).all()
        assert (y[r] != -1).sum() == m.sum()  # every response token and the end-of-text, nothing else


def test_padding_never_contributes_to_the_instruction_loss(tmp_path):
    write_alpaca(tmp_path / "a.json", n=40)
    meta, tok = tasks.prepare_task("instruct", str(tmp_path / "a.json"), "bpe", str(tmp_path / "d"),
                                   val_fraction=0.2, test_fraction=0.2, vocab_size=300)
    model = GPT(GPTConfig(block_size=128, vocab_size=meta["vocab_size"], n_layer=1, n_head=2, n_embd=16)).eval()
    batches = tasks.ExampleBatches(str(tmp_path / "d"), "train", meta, 128, 4, "cpu", 0)
    ids = np.array([3, 7, 1, 12])
    x, y = batches.get(ids)
    _, batch_loss = model(x, y)
    total, count = 0.0, 0
    for i in ids:  # each example alone: no padding at all
        xi, yi = batches.get(np.array([i]))
        _, li = model(xi, yi)
        k = int((yi != -1).sum())
        total, count = total + li.item() * k, count + k
    assert batch_loss.item() == pytest.approx(total / count, rel=1e-5)


def test_packing_puts_whole_examples_in_rows_and_masks_their_prompts(tmp_path):
    write_alpaca(tmp_path / "a.json", n=40)
    meta, tok = tasks.prepare_task("instruct", str(tmp_path / "a.json"), "bpe", str(tmp_path / "d"),
                                   val_fraction=0.2, test_fraction=0.2, vocab_size=300)
    packed = tasks.ExampleBatches(str(tmp_path / "d"), "train", meta, 400, 2, "cpu", 0, pack=True)
    x, y = packed.get(packed.draw(1)[0])
    eot_targets = int((y == tok.eot_token).sum())
    assert x.shape[0] == 2 and x.shape[1] > 300 and eot_targets > 4  # several examples per row, each ending in end-of-text
    assert (y != -1).sum() < (x != 0).sum()  # prompts are masked inside the rows too


@pytest.mark.parametrize("content, message", [
    ("ham\thello\nham\tbye\n", "single label"),
    ("just one field\n", "need 2"),
])
def test_bad_classification_input_ends_with_one_line(tmp_path, content, message):
    (tmp_path / "bad.tsv").write_text(content, encoding="utf-8")
    one_line_error(run_main("prepare.py", "--input", "bad.tsv", "--task", "classify", "--out", "d", cwd=tmp_path,
                            check=False), message)


def test_instruction_data_needs_an_end_of_text_token(tmp_path):
    write_alpaca(tmp_path / "a.json", n=10)
    one_line_error(run_main("prepare.py", "--input", "a.json", "--task", "instruct", "--tokenizer", "char", "--out",
                            "d", cwd=tmp_path, check=False), "end-of-text")


# ------------------------------------------------------------------------------------------- runs

CLS_MODEL = [a for a in TINY_MODEL if not a.startswith("--dataset")] + ["--dataset=sms"]


def test_a_classification_run_logs_val_and_test_metrics_and_sample_labels_text(tmp_path):
    write_sms(tmp_path / "sms.tsv", n=300)
    run_main("prepare.py", "--input", "sms.tsv", "--task", "classify", "--max_length", "32", "--out", "data/sms",
               cwd=tmp_path)
    run_main("train.py", *CLS_MODEL, "--out_dir=out", "--max_iters=40", "--eval_interval=20",
               "--cls_lm_weight=0.5", "--class_weights=True", cwd=tmp_path)
    records = read_metrics(tmp_path / "out")
    evals = [r for r in records if "val/acc" in r]
    assert [r["iter"] for r in evals] == [0, 20, 40]
    assert all(k in evals[-1] for k in ("val/precision", "val/recall", "val/f1"))
    test = records[-1]
    assert test["iter"] == 40 and test["test/acc"] >= 0.9 and test["test/f1"] > 0.5  # an easy task
    proc = run_main("sample.py", "--out_dir=out", "--start=win free prize cash claim now", "--device=cpu",
                      cwd=tmp_path)
    label, prob, text = proc.stdout.strip().split("\t")
    assert label == "spam" and 0.5 < float(prob) <= 1 and text == "win free prize cash claim now"


def test_lora_run_saves_small_adapters_that_merge_into_the_base(tmp_path):
    write_sms(tmp_path / "sms.tsv", n=200)
    run_main("prepare.py", "--input", "sms.tsv", "--task", "classify", "--max_length", "32", "--out", "data/sms",
               cwd=tmp_path)
    run_main("prepare.py", "--input", "data/sms/train_text.txt", "--tokenizer_from", "data/sms", "--out",
               "data/smslm", cwd=tmp_path)
    lm = [a for a in CLS_MODEL if not a.startswith("--dataset")]
    run_main("train.py", *lm, "--dataset=smslm", "--out_dir=base", "--max_iters=10", "--eval_interval=10",
               cwd=tmp_path)
    proc = run_main("train.py", *CLS_MODEL, "--out_dir=lora", "--init_from=base", "--max_iters=10",
                      "--eval_interval=10", "--trainable=lora", "--lora_rank=2", cwd=tmp_path)
    assert "trainable=lora" in proc.stdout
    adapters = torch.load(tmp_path / "lora" / "adapters.pt", weights_only=True)
    assert all(".lora_" in k or k.startswith("cls_head.") for k in adapters["adapters"])
    run_main("merge_lora.py", "lora", cwd=tmp_path)
    merged = torch.load(tmp_path / "lora" / "merged.pt", weights_only=True)
    assert merged["model_config"]["lora_rank"] == 0 and not any(".lora_" in k for k in merged["model"])
    a = run_main("sample.py", "--out_dir=lora", "--start=claim your prize", "--device=cpu", "--dtype=float32",
                 cwd=tmp_path)
    b = run_main("sample.py", "--init_from=lora/merged.pt", "--start=claim your prize", "--device=cpu", "--dtype=float32",
                   cwd=tmp_path)
    assert a.stdout == b.stdout and a.stdout.count("\t") == 2
    assert json.loads((tmp_path / "lora" / "merged.json").read_text())["model_config"]["lora_rank"] == 0
    # a resumed LoRA run still names the checkpoint its adapters apply to
    run_main("train.py", *CLS_MODEL, "--out_dir=lora", "--init_from=resume", "--max_iters=20", "--eval_interval=10",
             "--trainable=lora", "--lora_rank=2", cwd=tmp_path)
    resumed = torch.load(tmp_path / "lora" / "adapters.pt", weights_only=True)
    assert resumed["base"] == adapters["base"] == str(tmp_path / "base" / "ckpt.pt")
    one_line_error(run_main("merge_lora.py", "base", cwd=tmp_path, check=False), "no adapters at")


def test_an_instruct_run_lowers_the_response_loss_and_answers_in_the_template(instruct_run):
    evals = [r for r in read_metrics(instruct_run / "out") if "val/loss" in r]
    assert evals[-1]["val/loss"] < evals[0]["val/loss"] - 1.0
    proc = run_main("sample.py", "--out_dir=out", "--instruct", "--start=Repeat the word number 3.",
                    "--temperature=0", "--num_samples=1", "--max_new_tokens=30", "--device=cpu", cwd=instruct_run)
    answer = proc.stdout.split("---------------")[0].strip()
    assert answer and "###" not in answer and "Below is an instruction" not in answer  # the answer only
    report = run_main("sample.py", "--out_dir=out", "--instruct_eval=val", "--max_new_tokens=30", "--device=cpu",
                      cwd=instruct_run)
    rate = report.stdout.strip().splitlines()[-1]
    assert rate.startswith("val: ") and "of answers stay in the template" in rate
    assert 0 <= float(rate.split()[1].rstrip("%")) <= 100


def test_eval_reports_an_instruct_model_s_response_loss_perplexity_and_end_of_text_share(instruct_run):
    import math
    from checkpoint import load_checkpoint
    run_main("eval.py", "--out_dir=out", "--max_new_tokens=30", "--device=cpu", "--dtype=float32",
             cwd=instruct_run)  # auto: instruct; train.py's dtype, so the losses can agree to 1e-5
    rows = {r["metric"]: r for r in json.loads((instruct_run / "out" / "eval.json").read_text())["results"]}
    assert {r["task"] for r in rows.values()} == {"instruct (val)"}
    iter_num = load_checkpoint(str(instruct_run / "out"))["iter_num"]
    logged = next(r for r in read_metrics(instruct_run / "out") if r.get("iter") == iter_num and "val/loss" in r)
    assert rows["loss/token"]["value"] == pytest.approx(logged["val/loss"], rel=1e-5)  # train.py's: all of val
    assert rows["perplexity"]["value"] == pytest.approx(math.exp(logged["val/loss"]), rel=1e-5)
    report = run_main("sample.py", "--out_dir=out", "--instruct_eval=val", "--max_new_tokens=30", "--device=cpu",
                      cwd=instruct_run).stdout.strip().splitlines()[-1]
    assert f"{rows['ends_eot']['value']:.1%}" == report.split()[1]  # the same answers as sample.py's
    assert "eval.py --tasks=instruct" in report
    run_main("eval.py", "--out_dir=out", "--tasks=instruct", "--split=test", "--out=test.json", "--device=cpu",
             cwd=instruct_run)
    test = json.loads((instruct_run / "test.json").read_text())["results"]
    assert {r["task"] for r in test} == {"instruct (test)"} and all(r["examples"] >= 1 for r in test)
    one_line_error(run_main("eval.py", "--out_dir=out", "--tasks=bpb", "--device=cpu", cwd=instruct_run, check=False),
                   "--tasks=instruct measures an instruct dataset")


def test_eval_tasks_refuse_a_classifier_and_the_cloze_test_of_an_instruct_dataset(instruct_run, tmp_path):
    args = [a for a in TINY_MODEL if not a.startswith(("--dataset", "--block_size"))]
    one_line_error(run_main("train.py", *args, "--dataset=alp", "--block_size=96", "--out_dir=other",
                            "--max_iters=5", "--eval_tasks=cloze", cwd=instruct_run, check=False),
                   "eval_tasks=cloze draws its questions from a language-model dataset")
    write_sms(tmp_path / "sms.tsv", n=100)
    run_main("prepare.py", "--input", "sms.tsv", "--task", "classify", "--max_length", "32", "--out", "data/sms",
             cwd=tmp_path)
    one_line_error(run_main("train.py", *CLS_MODEL, "--out_dir=cls", "--max_iters=5", "--eval_tasks=hellaswag",
                            cwd=tmp_path, check=False), "eval_tasks score language models")


def counted_model(monkeypatch):
    """Makes sample.py's model (built by hf.load_for_inference) count its forwards; returns the list the
    counter will be put in."""
    import hf
    counters, build = [], hf.load_model

    def counting(ckpt):
        model = build(ckpt)
        counters.append(CountingForward(model))
        return model

    monkeypatch.setattr(hf, "load_model", counting)
    return counters


@pytest.mark.parametrize("mode", [["--instruct", "--start=Repeat the word number 3."], ["--interactive"],
                                  ["--instruct_eval=val"]], ids=["instruct", "interactive", "instruct_eval"])
def test_instruct_modes_decode_on_the_kv_cache_one_position_per_new_token(instruct_run, monkeypatch, mode):
    counters = counted_model(monkeypatch)
    result = run_main("sample.py", "--out_dir=out", *mode, "--temperature=0", "--num_samples=1",
                      "--max_new_tokens=12", "--device=cpu", cwd=instruct_run,
                      stdin="Repeat the word number 3.\nRepeat the word number 8.\n\n")
    lengths = counters[0].lengths
    prefills = [i for i, n in enumerate(lengths) if n > 1]  # one per answer (per batch with instruct_eval)
    assert prefills and prefills[0] == 0 and all(lengths[i] > 40 for i in prefills)  # the template's prompt
    assert lengths.count(1) == len(lengths) - len(prefills) > 0  # every other forward: one new position
    generated = int(result.stderr.split(" tokens in ")[0])
    assert len(lengths) <= generated + len(prefills)  # no forward beyond the tokens generated
    if mode == ["--interactive"]:
        assert len(prefills) == 2  # two instructions typed, then an empty line


@pytest.mark.skipif(not (SHARED / "data" / "sms_spam" / "SMSSpamCollection").exists(), reason="no ../shared data")
def test_the_real_spam_collection_prepares_with_its_header_dropped(tmp_path):
    meta, _ = tasks.prepare_task("classify", str(SHARED / "data" / "sms_spam" / "SMSSpamCollection"), "char",
                                 str(tmp_path / "d"), max_length=64)
    assert meta["label_counts"] == {"ham": 4827, "spam": 747} and meta["positive_class"] == "spam"
