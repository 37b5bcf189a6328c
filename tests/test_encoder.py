"""The encoder (BERT): causal=False in model.py, masked language modelling in train.py (objective=mlm),
the mask token of the tokenizers (prepare.py --mask_token), filling masks in sample.py, and
classification by mean pooling; the programs that need a decoder refuse one in a line."""
import json
import re

import numpy as np
import pytest
import torch

import tasks
from conftest import TINY_MODEL, lively_gpt, one_line_error, prepare_tiny, read_metrics, run_main, write_sms
from model import attention_bias
from tokenizer import MASK_TEXT, add_mask_token, dataset_tokenizer, encode_with_masks, gpt2_tokenizer, load_tokenizer
from train import Batches, mlm_corrupt

ENCODER = [*TINY_MODEL, "--causal=False", "--objective=mlm"]


@pytest.fixture
def mlm_run(tmp_path, corpus_text):
    """data/tiny with a mask token, and out/, an encoder trained 40 iterations on it by MLM."""
    prepare_tiny(tmp_path, corpus_text, mask_token=True)
    run_main("train.py", *ENCODER, "--out_dir=out", "--max_iters=40", "--eval_interval=20", cwd=tmp_path)
    return tmp_path


# ------------------------------------------------------------------------------------------- model

@pytest.mark.parametrize("kw", [{}, {"attn_impl": "explicit"}, {"positions": "alibi"}, {"positions": "rope"},
                                {"attn_window": 4}], ids=["fused", "explicit", "alibi", "rope", "window"])
def test_an_encoders_prediction_at_i_changes_when_a_later_token_changes_and_a_decoders_does_not(kw):
    idx = torch.randint(0, 29, (1, 12))
    later = idx.clone()
    later[0, 7] = (idx[0, 7] + 1) % 29
    for causal in (True, False):
        model = lively_gpt(causal=causal, **kw)
        a, b = model(idx)[0][0, 5], model(later)[0][0, 5]
        assert torch.allclose(a, b, atol=1e-6) == causal


@pytest.mark.parametrize("kw", [{}, {"positions": "alibi"}, {"attn_window": 3, "attn_window_pattern": "SL"},
                                {"positions": "alibi", "attn_window": 3}], ids=["full", "alibi", "window", "both"])
def test_an_encoders_two_attention_paths_agree(kw):
    fused, explicit = lively_gpt(causal=False, **kw), lively_gpt(causal=False, attn_impl="explicit", **kw)
    idx = torch.randint(0, 29, (3, 20))
    torch.testing.assert_close(fused(idx)[0], explicit(idx)[0], atol=1e-5, rtol=0)


def test_an_encoders_alibi_and_window_count_distance_both_ways():
    allowed = torch.ones(1, 1, 5, 5, dtype=torch.bool)
    bias = attention_bias(allowed, torch.tensor([0.5]), window=3)[0, 0]  # (5, 5)
    assert bias[2].tolist() == [-1.0, -0.5, 0.0, -0.5, -1.0]  # -m |j - i|, symmetric
    assert bias[0].tolist()[3:] == [-float("inf")] * 2  # three or more positions ahead: outside the window
    model = lively_gpt(causal=False, attn_window=3, n_layer=1)
    idx = torch.randint(0, 29, (1, 12))
    far, near = idx.clone(), idx.clone()
    far[0, 8], near[0, 7] = (idx[0, 8] + 1) % 29, (idx[0, 7] + 1) % 29
    assert torch.allclose(model(far)[0][0, 5], model(idx)[0][0, 5], atol=1e-6)  # 3 ahead: unseen in one layer
    assert not torch.allclose(model(near)[0][0, 5], model(idx)[0][0, 5], atol=1e-6)  # 2 ahead: seen


def test_an_encoder_classifier_reads_the_mean_of_the_real_tokens_whatever_the_padding():
    model = lively_gpt(causal=False, n_classes=2)
    text = torch.randint(1, 29, (1, 7))
    short, _ = model.classify(text, torch.tensor([7]))
    for pad_len, pad_id in [(3, 0), (10, 28), (16, 5)]:
        padded = torch.cat([text, torch.full((1, pad_len), pad_id)], dim=1)
        torch.testing.assert_close(model.classify(padded, torch.tensor([7]))[0], short, atol=1e-5, rtol=0)
    batch = torch.cat([torch.cat([text, torch.zeros(1, 3, dtype=torch.long)], 1), torch.randint(1, 29, (1, 10))])
    torch.testing.assert_close(model.classify(batch, torch.tensor([7, 10]))[0][:1], short, atol=1e-5, rtol=0)
    first = text.clone()
    first[0, 0] = (text[0, 0] % 28) + 1  # the first token counts as much as the last
    assert not torch.allclose(model.classify(first, torch.tensor([7]))[0], short)
    with pytest.raises(ValueError, match="next-token loss"):
        model.classify(text, torch.tensor([7]), torch.tensor([1]), lm_weight=0.5)


def test_an_encoder_has_no_kv_cache_and_does_not_generate():
    from decoding import KVCache
    model = lively_gpt(causal=False)
    with pytest.raises(ValueError, match="no KV cache"):
        model(torch.randint(0, 29, (1, 4)), cache=KVCache.for_model(model, batch_size=1))
    with pytest.raises(ValueError, match="does not generate"):
        model.generate(torch.randint(0, 29, (1, 4)), 2)


# ------------------------------------------------------------------------------------------- masking

def test_mlm_chooses_15_percent_and_masks_80_randomises_10_keeps_10_of_them():
    x = torch.randint(0, 50, (200, 500))
    inputs, targets = mlm_corrupt(x, 50, 0.15, torch.Generator().manual_seed(0))
    chosen = targets != -1
    assert chosen.float().mean().item() == pytest.approx(0.15, abs=0.003)
    assert (targets[chosen] == x[chosen]).all() and (inputs[~chosen] == x[~chosen]).all()
    masked = (inputs == 50) & chosen
    random_ = chosen & (inputs != 50) & (inputs != x)
    n = int(chosen.sum())
    assert masked.sum().item() / n == pytest.approx(0.8, abs=0.01)
    assert (chosen & (inputs != 50)).sum().item() / n == pytest.approx(0.2, abs=0.01)  # 10% random + 10% kept
    assert random_.sum().item() / n == pytest.approx(0.1 * 49 / 50, abs=0.01)  # a random token may be the same one
    assert inputs.max() <= 50 and (inputs[random_] < 50).all()  # random tokens are real ones, never the mask
    assert (inputs == 50).sum() == masked.sum()  # the mask id appears only where chosen


def test_the_mlm_loss_is_the_cross_entropy_of_the_chosen_positions_only():
    model = lively_gpt(causal=False)
    x = torch.randint(0, 28, (4, 20))
    inputs, targets = mlm_corrupt(x, 28, 0.15, torch.Generator().manual_seed(2))
    logits, loss = model(inputs, targets)
    chosen = targets != -1
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(logits[chosen], x[chosen]))
    other = targets.clone()
    other[~chosen] = (x[~chosen] + 1) % 28  # targets at the other positions would change it
    assert not torch.isclose(model(inputs, other)[1], loss)


def test_every_row_has_a_masked_target_even_when_short():
    _, targets = mlm_corrupt(torch.randint(0, 9, (400, 3)), 9, 0.15, torch.Generator().manual_seed(1))
    assert ((targets != -1).sum(1) >= 1).all()


def test_mlm_masks_depend_on_the_batch_only_so_resumes_and_evaluations_see_the_same(tmp_path):
    np.arange(2000, dtype=np.uint16).tofile(tmp_path / "t.bin")
    a, b = (Batches(str(tmp_path / "t.bin"), "uint16", 16, 4, "cpu", seed=3, mlm=(2000, 0.15)) for _ in range(2))
    starts = np.array([5, 100, 700, 1500])
    b.draw(7)  # another position in the sampler's stream does not change a batch's masks
    xa, ya = a.get(starts)
    xb, yb = b.get(starts)
    assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert not torch.equal(a.get(starts + 1)[1] != -1, ya != -1)
    other = Batches(str(tmp_path / "t.bin"), "uint16", 16, 4, "cpu", seed=4, mlm=(2000, 0.15))
    assert not torch.equal(other.get(starts)[1] != -1, ya != -1)  # the seed changes them


# ------------------------------------------------------------------------------------------- tokenizers

def test_a_mask_token_is_the_id_after_the_vocabulary_recorded_in_meta_and_never_encoded(tmp_path, corpus_text):
    prepare_tiny(tmp_path, corpus_text, mask_token=True)
    meta = json.loads((tmp_path / "data" / "tiny" / "meta.json").read_text())
    chars = meta["tokenizer"]["chars"]
    assert meta["tokenizer"]["mask_token"] == len(chars) and meta["vocab_size"] == len(chars) + 1
    tok = dataset_tokenizer(tmp_path / "data" / "tiny")
    ids = encode_with_masks(tok, f"the {MASK_TEXT} king")
    assert ids.count(tok.mask_token) == 1 and tok.decode(ids) == f"the {MASK_TEXT} king"
    assert tok.mask_token not in tok.encode("the king")
    bins = np.fromfile(tmp_path / "data" / "tiny" / "train.bin", dtype=meta["dtype"])
    assert tok.mask_token not in set(bins.tolist())
    run_main("prepare.py", "--input", "input.txt", "--tokenizer_from", "data/tiny", "--out", "data/again",
             cwd=tmp_path)  # a dataset made with its tokenizer keeps the mask
    assert json.loads((tmp_path / "data" / "again" / "meta.json").read_text())["tokenizer"] == meta["tokenizer"]
    plain = load_tokenizer({"kind": "char", "chars": chars})
    with pytest.raises(Exception, match="no mask token"):
        encode_with_masks(plain, MASK_TEXT)


def test_bpe_and_gpt2_tokenizers_take_a_mask_token_too(tmp_path, tiktoken_cache):
    write_sms(tmp_path / "sms.tsv", n=100)
    meta, tok = tasks.prepare_task("classify", str(tmp_path / "sms.tsv"), "bpe", str(tmp_path / "d"),
                                   vocab_size=300, mask_token=True)
    assert meta["tokenizer"]["mask_token"] == 300 and meta["vocab_size"] == 301
    again = dataset_tokenizer(tmp_path / "d")
    assert again.vocab_size == 301 and again.decode(encode_with_masks(again, "win [MASK] now")) == "win [MASK] now"
    gpt2 = add_mask_token(gpt2_tokenizer())
    assert gpt2.mask_token == 50257 and gpt2.vocab_size == 50258
    assert load_tokenizer(gpt2.meta()).decode([1169, 50257, 318]) == f"the{MASK_TEXT} is"


# ------------------------------------------------------------------------------------------- runs

def test_an_mlm_run_learns_and_sample_fills_the_masks(mlm_run):
    records = read_metrics(mlm_run / "out")
    val = [r["val/loss"] for r in records if "val/loss" in r]
    assert val[-1] < val[0] - 0.5  # from about ln(vocab) to well below it
    assert not any("val/bpb" in r for r in records)  # a masked loss is not the decoder's bits per byte
    ckpt = torch.load(mlm_run / "out" / "ckpt.pt", weights_only=True)
    assert ckpt["model_config"]["causal"] is False and ckpt["config"]["objective"] == "mlm"
    proc = run_main("sample.py", "--out_dir=out", "--start=the k[MASK]ng shall sp[MASK]ak", "--top_k=3", cwd=mlm_run)
    filled, first, second = proc.stdout.strip().splitlines()
    assert len(filled) == len("the king shall speak") and MASK_TEXT not in filled
    assert first.startswith(f"{MASK_TEXT} 1 (token 5): ") and second.startswith(f"{MASK_TEXT} 2 (token 17): ")
    probs = [float(p) for p in re.findall(r" (\d\.\d{3})(?:  |$)", first)]
    assert len(probs) == 3 and probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1.0001
    one_line_error(run_main("sample.py", "--out_dir=out", "--start=the king", cwd=mlm_run, check=False),
                   f"put {MASK_TEXT} in --start")


def test_an_mlm_run_resumed_midway_equals_an_uninterrupted_one(mlm_run):
    run_main("train.py", *ENCODER, "--out_dir=half", "--max_iters=20", "--lr_decay_iters=40", "--eval_interval=20",
             cwd=mlm_run)  # the schedule of the 40-iteration run
    run_main("train.py", *ENCODER, "--out_dir=half", "--init_from=resume", "--max_iters=40", "--eval_interval=20",
             cwd=mlm_run)
    whole = [r for r in read_metrics(mlm_run / "out") if "val/loss" in r]
    resumed = [r for r in read_metrics(mlm_run / "half") if "val/loss" in r]
    assert [(r["iter"], r["val/loss"]) for r in resumed] == [(r["iter"], r["val/loss"]) for r in whole]


def test_an_encoder_pretrained_by_mlm_fine_tunes_to_classify(tmp_path):
    write_sms(tmp_path / "sms.tsv", n=300)
    run_main("prepare.py", "--input", "sms.tsv", "--task", "classify", "--max_length", "32", "--mask_token",
             "--out", "data/sms", cwd=tmp_path)
    run_main("prepare.py", "--input", "data/sms/train_text.txt", "--tokenizer_from", "data/sms", "--out",
             "data/smslm", cwd=tmp_path)
    lm = [a for a in ENCODER if not a.startswith("--dataset")]
    run_main("train.py", *lm, "--dataset=smslm", "--out_dir=base", "--max_iters=20", "--eval_interval=20",
             cwd=tmp_path)
    cls = [a for a in TINY_MODEL if not a.startswith("--dataset")]
    run_main("train.py", *cls, "--dataset=sms", "--out_dir=cls", "--init_from=base", "--max_iters=40",
             "--eval_interval=20", cwd=tmp_path)
    ckpt = torch.load(tmp_path / "cls" / "ckpt.pt", weights_only=True)
    assert ckpt["model_config"]["causal"] is False and ckpt["model_config"]["n_classes"] == 2  # kept from base
    assert read_metrics(tmp_path / "cls")[-1]["test/acc"] >= 0.9  # an easy task
    label, prob, text = run_main("sample.py", "--out_dir=cls", "--start=win free prize cash claim now",
                                 cwd=tmp_path).stdout.strip().split("\t")
    assert label == "spam" and float(prob) > 0.5


# ------------------------------------------------------------------------------------------- refusals

@pytest.mark.parametrize("args, message", [
    (["--objective=mlm"], "objective=mlm trains an encoder: set causal=False"),
    (["--causal=False"], "next-token prediction would teach it to copy; set objective=mlm"),
    ([*ENCODER[-2:], "--mlm_prob=1.0"], "mlm_prob must be between 0 and 1"),
    ([*ENCODER[-2:], "--eval_tasks=cloze"], "eval_tasks scores next tokens"),
    ([*ENCODER[-2:], "--dataset=plain"], "has no mask token; prepare it again with --mask_token"),
])
def test_an_objective_that_does_not_fit_the_model_or_data_is_one_line(tmp_path, corpus_text, args, message):
    prepare_tiny(tmp_path, corpus_text, mask_token=True)
    prepare_tiny(tmp_path, corpus_text, name="plain")
    one_line_error(run_main("train.py", *TINY_MODEL, *args, "--out_dir=out", "--max_iters=2", cwd=tmp_path,
                            check=False), message)
    assert not (tmp_path / "out" / "ckpt.pt").exists()


def test_programs_that_read_next_token_probabilities_refuse_an_encoder_in_one_line(mlm_run):
    for script, args in (("eval.py", ["--out_dir=out"]), ("serve.py", ["out", "--device=cpu"])):
        one_line_error(run_main(script, *args, cwd=mlm_run, check=False),
                       f"{script} reads a decoder's next-token probabilities, and this checkpoint is an encoder")
    one_line_error(run_main("hf.py", "export", "--ckpt", "out", "--out", "hf", cwd=mlm_run, check=False),
                   "causal=False cannot be written as a Hugging Face")
    assert not (mlm_run / "hf").exists()
