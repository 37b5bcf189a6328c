"""Valid UTF-8 from byte-level tokenizers: tokenizer.utf8_step is RFC 3629's decoder, one byte at a time
(checked against Python's own decoder); utf8_tables allows a token in a state exactly when its bytes keep
the text a valid prefix; decoding with the mask (generate_batch, speculative_generate, the engine,
sample.py) never produces U+FFFD, where the same model without it does, and drops a character that
max_new_tokens cut short."""
import codecs
import copy
import itertools
import random

import pytest
import torch
import torch.nn as nn

from conftest import TINY_MODEL, prepare_tiny, run_main
from decoding import Utf8Mask, generate_batch, speculative_generate
from engine import Engine, Request
from model import GPT, GPTConfig
from tasks import utf8_mask
from tokenizer import UTF8_STATES, CharTokenizer, StopText, bpe_tokenizer, train_bpe, utf8_step, utf8_tables

MIXED = ("Hello world, naïve café. 日本語のテキストと中文的句子。 Emoji 🙂🎭👍🏽 and Ελληνικά, русский, 한국어! "
         "“Quotes” — dashes… €100 ¥200\n")
# one byte string per state that leaves the decoder in it: 1-3 continuation bytes due, 4-7 the first restricted
IN_STATE = {0: b"", 1: b"\xc3", 2: b"\xe4", 3: b"\xf1", 4: b"\xe0", 5: b"\xed", 6: b"\xf0", 7: b"\xf4"}


def walk(data, state=0):
    """utf8_step over data: the final state, or None at the first byte it refuses."""
    for byte in data:
        state = utf8_step(state, byte)
        if state is None:
            return None
    return state


def python_verdict(data):
    """Python's strict decoder on data: None if no continuation makes it valid UTF-8, else the state of the
    character still open at the end (0: none), worked out from the bytes Python holds back. (Python's
    incremental decoder holds back a surrogate's first two bytes, ED A0, before refusing them; trying the
    completions settles it.)"""
    decoder = codecs.getincrementaldecoder("utf-8")("strict")
    try:
        decoder.decode(data, final=False)
    except UnicodeDecodeError:
        return None
    held = decoder.getstate()[0]
    if not held:
        return 0
    lead, total = held[0], 2 if held[0] < 0xE0 else 3 if held[0] < 0xF0 else 4
    due = total - len(held)
    edges = [0x80, 0x8F, 0x90, 0x9F, 0xA0, 0xBF]  # the ends of every range a continuation byte may be held to
    if not any(is_utf8(held + bytes(c)) for c in itertools.product(edges, repeat=due)):
        return None
    if len(held) == 1 and lead in (0xE0, 0xED, 0xF0, 0xF4):
        return {0xE0: 4, 0xED: 5, 0xF0: 6, 0xF4: 7}[lead]
    return due


def is_utf8(data):
    try:
        data.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


# ----------------------------------------------------------------------------------------------
# the decoder's states

def tricky_bytes(rng, n):
    """n random byte strings that mix valid characters of every length with the bytes UTF-8 forbids or
    restricts: overlong leads (C0, C1, E0 80-9F, F0 80-8F), surrogates (ED A0-BF), past U+10FFFF (F4 90+, F5-FF),
    stray continuation bytes, and characters cut short."""
    pieces = [b"a", b"\n", "é".encode(), "中".encode(), "🙂".encode(), "\U0010ffff".encode(), "\ud7ff".encode(),
              "\ue000".encode(), b"\xc0\xaf", b"\xc1\xbf", b"\xe0\x80\xaf", b"\xe0\x9f\xbf", b"\xed\xa0\x80",
              b"\xed\xbf\xbf", b"\xf0\x80\x80\xaf", b"\xf0\x8f\xbf\xbf", b"\xf4\x90\x80\x80", b"\xf5\x80\x80\x80",
              b"\xff", b"\xfe", b"\x80", b"\xbf", b"\xe4\xb8", b"\xf0\x9f", b"\xf0\x9f\x99", b"\xe0", b"\xed",
              b"\xf0", b"\xf4", b"\xf1", b"\xc3"]
    out = []
    for _ in range(n):
        parts = [rng.choice(pieces) if rng.random() < 0.7 else bytes([rng.randrange(256)])
                 for _ in range(rng.randint(1, 5))]
        out.append(b"".join(parts))
    return out


def test_utf8_step_accepts_exactly_the_byte_strings_python_decodes():
    rng = random.Random(0)
    strings = tricky_bytes(rng, 4000)
    for data in strings:
        assert walk(data) == python_verdict(data), data
    whole = [d for d in strings if walk(d) == 0]
    assert all(is_utf8(d) for d in whole) and not any(is_utf8(d) for d in strings if walk(d) != 0)
    # the sample has every verdict: valid, refused, and left inside a character
    verdicts = {walk(d) for d in strings}
    assert {None, 0} <= verdicts and len(verdicts - {None, 0}) >= 4


def test_every_short_byte_string_gets_pythons_verdict():
    """All 1- and 2-byte strings, and 3- and 4-byte ones from every lead byte with continuation bytes at
    the edges of each restricted range."""
    edges = [0x00, 0x7F, 0x80, 0x8F, 0x90, 0x9F, 0xA0, 0xBF, 0xC0, 0xC2, 0xE0, 0xF4, 0xFF]
    for a in range(256):
        assert walk(bytes([a])) == python_verdict(bytes([a])), hex(a)
        for b in range(256):
            data = bytes([a, b])
            assert walk(data) == python_verdict(data), data
            if a >= 0xE0:
                for c in edges:
                    assert walk(data + bytes([c])) == python_verdict(data + bytes([c])), data + bytes([c])
                    if a >= 0xF0 and b in edges:
                        for d in edges:
                            four = bytes([a, b, c, d])
                            assert walk(four) == python_verdict(four), four


@pytest.mark.parametrize("data, why", [
    (b"\xc0\xaf", "overlong /"), (b"\xe0\x80\xaf", "overlong / in 3 bytes"), (b"\xf0\x80\x80\xaf", "in 4 bytes"),
    (b"\xed\xa0\x80", "surrogate U+D800"), (b"\xed\xbf\xbf", "surrogate U+DFFF"),
    (b"\xf4\x90\x80\x80", "U+110000"), (b"\xf5\x80\x80\x80", "past the last plane"), (b"\x80", "stray continuation"),
])
def test_utf8_step_refuses_what_rfc_3629_forbids(data, why):
    assert walk(data) is None, why


@pytest.mark.parametrize("char", ["\x7f", "\x80", "\u07ff", "\u0800", "\ud7ff", "\ue000", "\uffff", "\U00010000",
                                  "\U0010ffff"])
def test_utf8_step_accepts_the_first_and_last_code_points_of_each_range(char):
    assert walk(char.encode("utf-8")) == 0


def test_there_are_eight_states_and_each_is_reachable():
    assert UTF8_STATES == 8
    assert {walk(data) for data in IN_STATE.values()} == set(range(UTF8_STATES))
    assert all(walk(data) == s for s, data in IN_STATE.items())


# ----------------------------------------------------------------------------------------------
# the tables of a tokenizer

@pytest.fixture(scope="module")
def tok():
    """A byte-level BPE of 400 tokens trained on mixed text: many of its tokens are parts of a character."""
    rng = random.Random(0)
    words = MIXED.split()
    text = " ".join(rng.choice(words) for _ in range(3000))
    return bpe_tokenizer(train_bpe([text, MIXED], 400))


def token_bytes(tok, t):
    return tok.enc.decode_single_token_bytes(t)


def test_the_tokenizer_has_tokens_that_cut_characters(tok):
    cut = [t for t in range(256, tok.vocab_size - 1) if not is_utf8(token_bytes(tok, t))]
    assert len(cut) > 10  # merged tokens that are part of a character: what the mask is for


def test_a_token_is_allowed_in_a_state_exactly_when_its_bytes_keep_the_text_valid(tok):
    allowed, after = utf8_tables(tok, tok.vocab_size)
    assert len(allowed) == len(after) == UTF8_STATES and all(len(row) == tok.vocab_size for row in allowed)
    specials = set(tok.enc.special_tokens_set)
    special_ids = {tok.enc.encode_single_token(s) for s in specials}
    for t in range(tok.vocab_size):
        if t in special_ids:
            continue
        data = token_bytes(tok, t)
        for s, prefix in IN_STATE.items():
            verdict = python_verdict(prefix + data)
            assert allowed[s][t] == (verdict is not None), (s, t, data)
            if verdict is not None:
                assert after[s][t] == verdict, (s, t, data)
    # every state has a way on: decoding can never be stuck
    assert all(any(row) for row in allowed)


def test_special_tokens_may_come_only_between_characters(tok):
    allowed, after = utf8_tables(tok, tok.vocab_size)
    eot = tok.eot_token
    assert eot is not None and allowed[0][eot] and after[0][eot] == 0
    assert not any(allowed[s][eot] for s in range(1, UTF8_STATES))


def test_ids_past_the_tokenizers_vocabulary_are_never_allowed(tok):
    allowed, _ = utf8_tables(tok, tok.vocab_size + 5)  # a padded vocabulary, e.g. 50304 for GPT-2's 50257
    assert not any(row[t] for row in allowed for t in range(tok.vocab_size, tok.vocab_size + 5))


def test_a_char_tokenizer_needs_no_tables():
    char = CharTokenizer.from_text("日本語 and text")
    assert utf8_tables(char, char.vocab_size) is None
    model = GPT(GPTConfig(vocab_size=char.vocab_size, block_size=8, n_layer=1, n_head=1, n_embd=8))
    assert utf8_mask(model, char) is None


def test_the_mask_knows_the_state_at_the_end_of_each_prompt(tok):
    mask = Utf8Mask(utf8_tables(tok, tok.vocab_size))
    text = tok.encode("ab 中文")
    prompts = [text, text + [0xE4], text + [0xF0, 0x9F], [0x80] + text, [0xE4, 0x41]]  # ids 0-255 are the bytes
    assert mask.states_after(prompts).tolist() == [0, 2, 2, 0, 0]  # bytes that break UTF-8 start afresh
    logits = torch.zeros(2, tok.vocab_size)
    masked = mask.apply(logits, torch.tensor([0, 2]))
    assert torch.isinf(masked[0, 0x80]) and masked[0, ord("a")] == 0  # between characters: no continuation byte
    assert torch.isinf(masked[1, ord("a")]) and masked[1, 0x80] == 0  # inside one: only a continuation byte
    assert mask.advance(torch.tensor([0, 2]), torch.tensor([0xE4, 0x80])).tolist() == [2, 1]


# ----------------------------------------------------------------------------------------------
# decoding with the mask

@pytest.fixture(scope="module")
def random_model(tok):
    """A randomly initialised model over tok: nearly uniform, so unmasked samples break UTF-8 all the time."""
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=64, n_layer=1, n_head=2, n_embd=32)).eval()


def samples(model, tok, prompt, n=20, length=200, masked=True, seed=0, **kw):
    mask = utf8_mask(model, tok) if masked else None
    gen = torch.Generator().manual_seed(seed)
    return generate_batch(model, [prompt] * n, length, temperature=1.0, generator=gen, utf8=mask, **kw)


def test_masked_samples_of_a_random_model_are_valid_utf8_and_unmasked_ones_are_not(tok, random_model):
    prompt = tok.encode("Hello ")
    masked = samples(random_model, tok, prompt)
    assert all(is_utf8(tok.decode_bytes(s)) and "\ufffd" not in tok.decode(s) for s in masked)
    assert sum(len(s) for s in masked) > 20 * 150  # long samples, not cut to nothing
    assert any(not is_utf8(token_bytes(tok, t)) for s in masked for t in s)  # partial tokens were chosen, and fit
    unmasked = samples(random_model, tok, prompt, masked=False)
    assert sum("\ufffd" in tok.decode(s) for s in unmasked) >= 15


def test_a_sample_cut_inside_a_character_drops_its_unfinished_tail(tok, random_model):
    recorded = [[] for _ in range(20)]

    def record(row, token):
        recorded[row].append(token)
        return False
    out = samples(random_model, tok, tok.encode("Hi"), length=30, on_token=record)
    cut = 0
    for tokens, seen in zip(out, recorded):
        assert python_verdict(tok.decode_bytes(seen)) is not None  # what was sampled is a valid prefix
        assert seen[:len(tokens)] == tokens and is_utf8(tok.decode_bytes(tokens))
        # the tail dropped is exactly the tokens after the last one that ends between characters
        whole = max(i for i in range(len(seen) + 1) if python_verdict(tok.decode_bytes(seen[:i])) == 0)
        assert len(tokens) == whole
        cut += whole < len(seen)
    assert cut >= 2  # some samples did end inside a character


def test_a_prompt_ending_inside_a_character_is_continued_by_the_bytes_that_complete_it(tok, random_model):
    prompt = tok.encode("ab") + [0xF0, 0x9F]  # the first two bytes of an emoji
    for s in samples(random_model, tok, prompt, n=10, length=20):
        data = tok.decode_bytes(prompt + s)
        assert is_utf8(data) and data.decode("utf-8")[2] >= "\U0001f000"
        assert not is_utf8(tok.decode_bytes(s)[:1])  # the sample itself begins with a continuation byte


def test_special_tokens_are_sampled_only_between_characters(tok, random_model):
    eot = tok.eot_token
    model = copy.deepcopy(random_model)
    head = nn.Linear(model.config.n_embd, model.config.vocab_size, bias=True)
    head.weight = model.lm_head.weight
    with torch.no_grad():
        head.bias.zero_()
        head.bias[eot] = 4.0  # end-of-text about one token in ten wherever it is allowed
    model.lm_head = head
    recorded = [[] for _ in range(20)]

    def record(row, token):
        recorded[row].append(token)
        return False
    prompt = tok.encode("x")
    samples(model, tok, prompt, length=60, on_token=record)
    inside = 0
    for tokens in recorded:
        states = [python_verdict(tok.decode_bytes(prompt + tokens[:i])) for i in range(len(tokens))]
        assert all(s == 0 for s, t in zip(states, tokens) if t == eot)
        inside += sum(s != 0 for s in states)
    assert sum(t == eot for tokens in recorded for t in tokens) >= 20 and inside >= 100  # both kinds of places


def test_greedy_and_sampled_speculative_decoding_keep_the_mask(tok, random_model):
    torch.manual_seed(1)
    draft = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=64, n_layer=1, n_head=2, n_embd=16)).eval()
    mask = utf8_mask(random_model, tok)
    prompt = tok.encode("Hi ") + [0xE4]  # inside a character
    greedy, _ = speculative_generate(random_model, draft, prompt, 40, k=3, temperature=0, utf8=mask)
    assert greedy == generate_batch(random_model, [prompt], 40, temperature=0, utf8=mask)[0]
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        tokens, _ = speculative_generate(random_model, draft, prompt, 60, k=3, temperature=1.0, generator=gen,
                                         utf8=mask)
        assert is_utf8(tok.decode_bytes(prompt + tokens)) and len(tokens) > 20


def test_the_engine_keeps_every_row_valid_utf8(tok, random_model):
    prompts = [tok.encode("Hello") + ([0xE4] if i % 2 else []) for i in range(6)]  # half inside a character

    def run(mask):
        engine = Engine(random_model, max_batch=4, max_queue=8, utf8=mask)  # 6 requests: two wait, then join
        rows, ended = [[] for _ in prompts], []
        for prompt, row, seed in zip(prompts, rows, range(6)):
            assert engine.submit(Request(prompt, 80, seed=seed, on_token=lambda t, lp, top, row=row: row.append(t),
                                         on_end=ended.append))
        while len(ended) < len(prompts):
            engine.admit(wait=False)
            if engine.rows:
                engine.step()
        assert set(ended) == {"length"}
        return [tok.decode_bytes(prompt + row) for prompt, row in zip(prompts, rows)]
    masked = run(utf8_mask(random_model, tok))
    assert all(python_verdict(data) is not None for data in masked)  # valid, perhaps ending inside a character
    assert all(len(data) > 40 for data in masked)
    unmasked = run(None)
    assert sum(python_verdict(data) is None for data in unmasked) >= 4


# ----------------------------------------------------------------------------------------------
# streamed text

def test_stop_text_drops_an_unfinished_character_only_when_asked(tok):
    ids = tok.encode("OK 中") + [0xE6, 0x96]  # "文" without its last byte
    shown = StopText(tok, drop_incomplete=True)
    text = "".join(shown.add(t) for t in ids) + shown.finish()
    assert text == "OK 中"
    plain = StopText(tok)
    assert "".join(plain.add(t) for t in ids) + plain.finish() == "OK 中\ufffd"


def shown_until_done(text, ids):
    """What a caller shows: the text of each token until done (sample.py and serve.py stop the row there)."""
    out = ""
    for t in ids:
        out += text.add(t)
        if text.done:
            break
    return out + text.finish()


def test_stop_text_with_a_stop_string_and_drop_incomplete(tok):
    ids = tok.encode("ab END cd") + [0xE6]
    shown = StopText(tok, ["END"], drop_incomplete=True)
    assert shown_until_done(shown, ids) == "ab " and shown.done
    unfinished = StopText(tok, ["zz"], drop_incomplete=True)
    assert shown_until_done(unfinished, ids) == "ab END cd" and not unfinished.done


# ----------------------------------------------------------------------------------------------
# the command line: a BPE trained on Chinese, a tiny model, sample.py

COMMON_HANZI = ("的一是不了人我在有他这中大来上国个到说们为子和你地出道也时年得就那要下以生会自着去之过家学对可她里后小"
                "么心多天而能好都然没日于起还发成事只作当想看文无开手十用主行方又如前所本见经头面公同三已老从动两长知民"
                "样现分将外但身些与高意进把法此实回二理美点月明其种声全工己话儿者向情部正名定女问力机给等几很业最间新什"
                "打便位因重被走电四第门相次东政海口使教西再平真听世气信北少关并内加化由却代军产入先山五太水万市眼体别处"
                "总才场师书比住员九笑性通目华报立马命张活难神数件安表原车白应路期叫死常提感金何更反合放做系计或司利受光")


def chinese_text(n_sentences=3000, seed=0):
    """Sentences of random common characters: clauses joined by ，and ended by 。！？, some paragraphs."""
    rng = random.Random(seed)
    parts = []
    for _ in range(n_sentences):
        clauses = ["".join(rng.choice(COMMON_HANZI) for _ in range(rng.randint(2, 8))) for _ in range(rng.randint(1, 3))]
        parts.append("，".join(clauses) + rng.choice("。！？") + ("\n" if rng.random() < 0.2 else ""))
    return "".join(parts)


@pytest.fixture(scope="module")
def chinese_run(tmp_path_factory):
    """A byte-level BPE of 600 tokens prepared on Chinese text (3 bytes a character), a tiny model trained
    30 iterations on it."""
    folder = prepare_tiny(tmp_path_factory.mktemp("chinese"), chinese_text(), "bpe", vocab_size=600)
    run_main("train.py", *TINY_MODEL, "--out_dir=out", "--max_iters=30", "--eval_interval=30", cwd=folder)
    return folder


def sample_texts(folder, *args):
    result = run_main("sample.py", "--out_dir=out", "--num_samples=20", "--max_new_tokens=200", "--device=cpu",
                      "--dtype=float32", *args, cwd=folder)
    texts = [s for s in result.stdout.split("---------------") if s.strip()]
    assert len(texts) == 20
    return texts


def test_sample_prints_no_replacement_character_from_a_chinese_bpe_model(chinese_run):
    texts = sample_texts(chinese_run)
    assert not any("\ufffd" in t for t in texts)
    hanzi = sum(ch in COMMON_HANZI for t in texts for ch in t)
    assert hanzi > 20 * 50  # real text came out, mostly characters of the corpus
    unmasked = sample_texts(chinese_run, "--utf8=False")
    assert sum("\ufffd" in t for t in unmasked) >= 10
