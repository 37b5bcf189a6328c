"""visualize.py: what the pictures show is what the model computes. Attention weights are
distributions over the keys a query may see, the logit lens ends in the model's own prediction,
neighbours and analogies come out right on tables built by hand, and surprise adds up to eval.py's
loss and bits per byte; bad input is one line."""
import re

import pytest
import torch

import visualize
from conftest import lively_gpt, one_line_error, run_main

TEXT = "First Citizen:\nBefore we proceed any further, hear me speak."


@pytest.mark.parametrize("kw", [{}, {"positions": "rope", "n_kv_head": 2}, {"positions": "alibi"},
                                {"attn_window": 3, "attn_window_pattern": "SL"}, {"causal": False}])
def test_attention_rows_sum_to_one_and_a_decoder_sees_nothing_above_the_diagonal(kw):
    model = lively_gpt(**kw)
    idx = torch.randint(0, 29, (2, 12), generator=torch.Generator().manual_seed(0))
    maps = model.attention_maps(idx)
    assert len(maps) == model.config.n_layer
    for layer, att in enumerate(maps):
        assert att.shape == (2, 4, 12, 12)
        torch.testing.assert_close(att.sum(-1), torch.ones(2, 4, 12))
        above = torch.ones(12, 12, dtype=torch.bool).triu(1)
        if model.config.causal:
            assert (att[..., above] == 0).all()
        else:  # an encoder looks forward too
            assert (att[..., above] > 0).any()
        if model.config.windowed(layer):  # nor further back than the window
            far = torch.ones(12, 12, dtype=torch.bool).tril(-3)
            assert (att[..., far] == 0).all()


def test_attention_maps_leave_the_model_as_it_was():
    model = lively_gpt()
    idx = torch.arange(10)[None] % 29
    before, _ = model(idx)
    model.attention_maps(idx)
    after, _ = model(idx)
    assert all(block.attn.impl == "fused" and block.attn.weights is None for block in model.transformer.h)
    torch.testing.assert_close(before, after, rtol=0, atol=0)


def test_attention_maps_build_no_autograd_graph():
    model = lively_gpt()
    seen = []
    model.transformer.ln_f.register_forward_hook(lambda module, args, out: seen.append(out.requires_grad))
    model.attention_maps(torch.arange(10)[None] % 29)
    assert seen == [False]


def test_the_logit_lens_last_layer_is_the_models_own_prediction():
    model = lively_gpt(positions="rope")
    ids = [3, 1, 4, 1, 5, 9, 2, 6]
    top, p = visualize.logit_lens(model, ids)
    assert top.shape == p.shape == (model.config.n_layer + 1, len(ids))
    logits, _ = model(torch.tensor([ids]))
    assert top[-1].tolist() == logits[0].argmax(-1).tolist()
    torch.testing.assert_close(p[-1], torch.softmax(logits[0], -1).max(-1).values)
    assert (p > 0).all() and (p <= 1).all()


def test_nearest_neighbours_by_cosine_on_a_table_built_by_hand():
    table = torch.tensor([[1.0, 0.0], [10.0, 1.0], [0.0, 1.0], [-1.0, 0.0], [0.7, 0.7]])
    # the length of a row does not matter, only its direction
    assert [row for row, _ in visualize.nearest(table, table[0], 3, exclude=[0])] == [1, 4, 2]
    (row, cos), = visualize.nearest(table, torch.tensor([0.0, 2.0]), 1)
    assert row == 2 and cos == pytest.approx(1.0)


def test_analogy_finds_the_token_at_the_same_offset():
    g = torch.Generator().manual_seed(0)
    table = torch.nn.functional.normalize(torch.randn(40, 16, generator=g), dim=-1)
    royal = torch.nn.functional.normalize(torch.randn(16, generator=g), dim=0)
    man, woman, king, queen = 5, 6, 7, 8
    table[king] = table[man] + royal
    table[queen] = table[woman] + royal
    table[man], table[woman] = (torch.nn.functional.normalize(table[i], dim=0) for i in (man, woman))
    for i in (king, queen):  # equal lengths, so that unit rows keep the offset
        table[i] = table[i] / table[i].norm() * table[king].norm()
    (best, _), *_ = visualize.analogy(table, king, man, woman, 3)
    assert best == queen
    assert all(row not in (king, man, woman) for row, _ in visualize.analogy(table, king, man, woman, 10))


def test_pca_puts_points_on_a_line_on_the_first_component():
    direction = torch.tensor([3.0, 4.0, 0.0]) / 5
    x = torch.arange(5.0)[:, None] * direction + torch.tensor([1.0, 1.0, 1.0])
    xy, share = visualize.pca_2d(x)
    assert share[0] == pytest.approx(1.0, abs=1e-5)
    torch.testing.assert_close(xy[:, 0].abs(), (torch.arange(5.0) - 2).abs(), atol=1e-5, rtol=0)
    torch.testing.assert_close(xy[:, 1], torch.zeros(5), atol=1e-5, rtol=0)


def eval_text(folder, text):
    """eval.py's loss per token and bits per byte of --text."""
    out = run_main("eval.py", "--out_dir=out", "--tasks=bpb", f"--text={text}", "--device=cpu", "--dtype=float32",
                   "--out=eval.json", cwd=folder).stdout
    return (float(re.search(r"loss/token\s+([\d.]+)", out).group(1)),
            float(re.search(r"bits/byte\s+([\d.]+)", out).group(1)))


@pytest.mark.parametrize("run", ["tiny_run", "instruct_run"])  # characters; a BPE with end-of-text first
def test_surprise_adds_up_to_eval_py_loss_and_bits_per_byte(run, request, tmp_path):
    folder = request.getfixturevalue(run)
    text = TEXT[:28] if run == "tiny_run" else "Give three tips for staying healthy."
    out = run_main("visualize.py", "surprise", "--out_dir=out", f"--text={text}", f"--out={tmp_path}/s.png",
                   cwd=folder).stdout
    nats = float(re.search(r"mean surprise ([\d.]+) nats", out).group(1))
    bpb = float(re.search(r"([\d.]+) bits per byte", out).group(1))
    loss, eval_bpb = eval_text(folder, text)
    assert nats == pytest.approx(loss, abs=1e-4) and bpb == pytest.approx(eval_bpb, abs=1e-4)
    assert (tmp_path / "s.png").stat().st_size > 0
    predicted = int(re.search(r"(\d+) tokens predicted", out).group(1))
    shown = predicted + (run == "tiny_run")  # a char model's first token is shown, not predicted
    assert (tmp_path / "s.html").read_text(encoding="utf-8").count("<span") == shown


def test_every_view_writes_its_picture_beside_the_checkpoint(tiny_run, tmp_path):
    for view, args in (("attention", ["--text=First", "--layers=1", "--heads=0,1"]),
                       ("lens", ["--text=First Citizen"]),
                       ("embeddings", ["--tokens=a,e,i,o,u,t", "--analogy=a,e,i", "--k=3"]),
                       ("surprise", ["--text=First Citizen"])):
        out = run_main("visualize.py", view, f"--out_dir={tiny_run / 'out'}", *args, cwd=tmp_path).stdout
        assert (tiny_run / "out" / f"{view}.png").stat().st_size > 0, out
    lines = run_main("visualize.py", "attention", "--out_dir=out", "--text=Fir", "--layers=0", "--heads=1",
                     "--no_png", cwd=tiny_run).stdout.splitlines()
    assert lines[1].endswith("|") and lines[1].split("|")[1][1:] == "  "  # the first token sees itself alone
    assert lines[1].split("|")[1][0] == visualize.SHADES[-1]


def test_the_text_form_of_the_lens_and_the_embeddings(tiny_run):
    out = run_main("visualize.py", "lens", "--out_dir=out", "--text=First", "--no_png", cwd=tiny_run).stdout
    assert len(out.splitlines()) == 2 + len("First")
    out = run_main("visualize.py", "embeddings", "--out_dir=out", "--no_png", cwd=tiny_run).stdout
    assert re.search(r"PCA of \d+ tokens", out)  # a char vocabulary is shown whole


@pytest.mark.parametrize("args, message", [
    (["attention", "--text=First", "--layers=2"], "layer 2 is out of range: the model has 2 layers"),
    (["attention", "--text=First", "--heads=0,7"], "head 7 is out of range: the model has 2 heads"),
    (["attention", "--text=First", "--layers=x"], "is not a number"),
    (["embeddings", "--tokens=a,%"], "not in the vocabulary"),
    (["embeddings", "--tokens=ab"], "is not one token of this vocabulary"),
    (["embeddings", "--analogy=a,e"], "needs three tokens"),
    (["lens", "--text=" + TEXT], "the model reads at most 32"),
    (["surprise", "--text="], "--text is empty"),
    (["surprise", "--text=FILE:missing.txt"], "not found"),
    (["lens"], "--text"),
])
def test_bad_input_is_one_line(tiny_run, args, message):
    result = run_main("visualize.py", *args, "--out_dir=out", "--no_png", cwd=tiny_run, check=False)
    one_line_error(result, message)


def test_the_views_that_read_next_token_probabilities_refuse_an_encoder(tmp_path, corpus_text):
    from conftest import TINY_MODEL, prepare_tiny
    folder = prepare_tiny(tmp_path, corpus_text, mask_token=True)
    run_main("train.py", *TINY_MODEL, "--causal=False", "--objective=mlm", "--out_dir=out", "--max_iters=2",
             "--eval_interval=2", cwd=folder)
    for view in ("lens", "surprise"):
        result = run_main("visualize.py", view, "--out_dir=out", "--text=First", "--no_png", cwd=folder, check=False)
        one_line_error(result, "encoder")
    run_main("visualize.py", "attention", "--out_dir=out", "--text=First", "--no_png", cwd=folder)
