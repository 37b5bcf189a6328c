"""dpo.py's loss against trl's DPOTrainer on the same batch: a tiny GPT of ours and a different reference,
exported to Hugging Face with hf.py, the same preference pairs (of different lengths, so padding counts)
fed to both. Checks, to 1e-5: the sigmoid loss (two betas), the robust loss with label smoothing, the
chosen answers' cross-entropy (our rpo_alpha, trl's "sft" loss beside "sigmoid"), and the implicit rewards
trl logs. trl's sigmoid loss ignores label_smoothing, so our conservative DPO, (1 - e) L(D) + e L(-D), is
checked against (1 - e) times trl's loss on the pairs plus e times its loss on the pairs swapped. Slow:
trl and transformers take seconds to import."""
from dataclasses import asdict

import pytest
import torch

transformers = pytest.importorskip("transformers")
trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")
pytest.importorskip("safetensors")
import dpo  # noqa: E402
import hf  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402
from tokenizer import bpe_tokenizer, train_bpe  # noqa: E402

pytestmark = pytest.mark.slow

VOCAB = 300  # 256 bytes, 43 merges and <|endoftext|>
EOT = VOCAB - 1
SHARPEN = 10  # how much the random models' embeddings are scaled up


def pairs():
    """(prompt, chosen, rejected) token ids of different lengths, each answer ending in <|endoftext|> as
    prepare.py's answers do."""
    g = torch.Generator().manual_seed(3)

    def ids(n):
        return torch.randint(0, EOT, (n,), generator=g).tolist()
    shapes = [(5, 4, 7), (9, 6, 2), (3, 11, 8), (7, 1, 5)]  # prompt, chosen, rejected lengths (before the EOT)
    return [(ids(p), ids(c) + [EOT], ids(r) + [EOT]) for p, c, r in shapes]


def our_batch(examples):
    """(x, y) of 2B rows, chosen then rejected, as tasks.ExampleBatches.get gives them for a preference
    dataset: x = the sequence but its last token, y = the next token where it is an answer's, else -1,
    right-padded with x = 0 and y = -1."""
    rows = [(p + c, len(p)) for p, c, _ in examples] + [(p + r, len(p)) for p, _, r in examples]
    T = max(len(seq) for seq, _ in rows) - 1
    x = torch.zeros(len(rows), T, dtype=torch.long)
    y = torch.full((len(rows), T), -1, dtype=torch.long)
    for i, (seq, n_prompt) in enumerate(rows):
        seq = torch.tensor(seq)
        x[i, :len(seq) - 1] = seq[:-1]
        y[i, n_prompt - 1:len(seq) - 1] = seq[n_prompt:]  # the targets that are answer tokens
    return x, y


def tiny_gpt(seed):
    """A random GPT whose next-token distributions are far from uniform (its embeddings, tied to the head,
    scaled up), so that two of them give answers log-probabilities that differ."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(vocab_size=VOCAB, n_layer=2, n_head=2, n_embd=32, block_size=64, dropout=0.0))
    with torch.no_grad():
        model.transformer.wte.weight.mul_(SHARPEN)
    return model


def export(model, tok, folder):
    """model as a checkpoint of ours, exported by hf.py, with tok's tokenizer.json beside it."""
    folder.mkdir()
    torch.save({"model": model.state_dict(), "model_config": asdict(model.config)}, folder / "ckpt.pt")
    hf.export(folder / "ckpt.pt", folder / "hf")
    hf.write_tokenizer(tok, folder / "hf", model.config.block_size)
    return folder / "hf"


@pytest.fixture(scope="module")
def models(tmp_path_factory, corpus_text):
    """Our policy and reference (two random GPTs), and the folders of their exports."""
    tmp = tmp_path_factory.mktemp("dpo_trl")
    tok = bpe_tokenizer(train_bpe([corpus_text[:20_000]], VOCAB))
    assert tok.eot_token == EOT
    policy, reference = tiny_gpt(0), tiny_gpt(1)
    return policy, reference, export(policy, tok, tmp / "policy"), export(reference, tok, tmp / "reference")


def trl_trainer(policy_dir, reference_dir, tmp_path, **settings):
    """trl's DPOTrainer on the exports (float32, CPU), in training mode as ours is."""
    load = transformers.AutoModelForCausalLM.from_pretrained
    policy, reference = load(policy_dir, dtype=torch.float32), load(reference_dir, dtype=torch.float32)
    tokenizer = transformers.AutoTokenizer.from_pretrained(policy_dir)
    data = datasets.Dataset.from_list([{"prompt": "The king", "chosen": " shall speak.", "rejected": " is."}])
    args = trl.DPOConfig(output_dir=str(tmp_path / "trl"), report_to=[], use_cpu=True, bf16=False,
                         per_device_train_batch_size=4, max_length=None, **settings)
    trainer = trl.DPOTrainer(model=policy, ref_model=reference, args=args, train_dataset=data,
                             processing_class=tokenizer)
    trainer.model.train()
    return trainer


def trl_loss(trainer, examples):
    """trl's loss for the pairs, through its own collator, and its logged mean rewards (chosen, rejected)."""
    batch = trainer.data_collator([{"prompt_ids": p, "chosen_ids": c, "rejected_ids": r} for p, c, r in examples])
    with torch.no_grad():
        loss = trainer._compute_loss(trainer.model, batch, return_outputs=False)
    metrics = trainer._metrics["train"]
    return loss.item(), (metrics["rewards/chosen"][-1], metrics["rewards/rejected"][-1])


def our_loss(models, examples, beta, label_smoothing=0.0, kind="sigmoid", rpo_alpha=0.0):
    """dpo.pair_loss for the pairs, the mean rewards (chosen, rejected) and the per-pair margins."""
    policy, reference = models[0].train(), dpo.Reference(models[0], models[1])
    cfg = {"dpo_beta": beta, "dpo_label_smoothing": label_smoothing, "dpo_loss": kind, "rpo_alpha": rpo_alpha}
    with torch.no_grad():
        loss, figures = dpo.pair_loss(policy, reference, our_batch(examples), cfg, torch.autocast("cpu", enabled=False))
    margins = figures["chosen"] - figures["rejected"]
    return loss.item(), (figures["chosen"].mean().item(), figures["rejected"].mean().item()), margins


CASES = {  # name: (our settings, trl's DPOConfig settings)
    "sigmoid, beta 0.1": (dict(beta=0.1), dict(beta=0.1, loss_type=["sigmoid"])),
    "sigmoid, beta 0.5": (dict(beta=0.5), dict(beta=0.5, loss_type=["sigmoid"])),
    "robust, beta 0.1, e 0.1": (dict(beta=0.1, label_smoothing=0.1, kind="robust"),
                                dict(beta=0.1, loss_type=["robust"], label_smoothing=0.1)),
    "sigmoid + rpo_alpha 0.3": (dict(beta=0.1, rpo_alpha=0.3),
                                dict(beta=0.1, loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.3])),
}


@pytest.mark.parametrize("case", CASES)
def test_our_dpo_loss_and_rewards_are_trls_on_the_same_pairs(case, models, tmp_path):
    ours, theirs = CASES[case]
    trainer = trl_trainer(models[2], models[3], tmp_path, **theirs)
    their_loss, their_rewards = trl_loss(trainer, pairs())
    my_loss, my_rewards, margins = our_loss(models, pairs(), **ours)
    assert (margins.abs() > 0.01).all()  # the policy is not the reference: every pair's margin counts
    assert my_loss == pytest.approx(their_loss, abs=1e-5)
    # the rewards too: a prompt token counted by mistake cancels in the loss (both answers share the prompt)
    assert my_rewards == pytest.approx(their_rewards, abs=1e-5)


def test_our_conservative_dpo_is_the_mixture_of_trls_sigmoid_loss_on_the_pairs_and_on_them_swapped(models, tmp_path):
    e = 0.2
    trainer = trl_trainer(models[2], models[3], tmp_path, beta=0.1, loss_type=["sigmoid"])
    straight, _ = trl_loss(trainer, pairs())
    swapped, _ = trl_loss(trainer, [(p, r, c) for p, c, r in pairs()])
    my_loss, _, _ = our_loss(models, pairs(), beta=0.1, label_smoothing=e)
    assert my_loss == pytest.approx((1 - e) * straight + e * swapped, abs=1e-5)
    assert abs(straight - swapped) > 1e-3  # the smoothing changes the loss: the check has teeth
