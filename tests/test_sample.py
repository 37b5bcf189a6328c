"""sample.py as a user runs it: strategies, batches of prompts, streaming, stop strings, bad input."""
import re
import sys

import pytest

import sample
from tokenizer import StopText
from conftest import TINY_MODEL, one_line_error, prepare_tiny, run_main

MULTIBYTE = "Café déjà vu — naïve cœur. 日本語のテキスト 🙂🎭 «fin»\n"


def trained(tmp_path_factory, text, tokenizer, **kw):
    """A folder with a checkpoint in out/, trained briefly on text with this tokenizer."""
    folder = prepare_tiny(tmp_path_factory.mktemp(f"sample_{tokenizer}"), text, tokenizer, **kw)
    run_main("train.py", *TINY_MODEL, "--out_dir=out", "--max_iters=30", "--eval_interval=30", cwd=folder)
    return folder


@pytest.fixture(scope="module")
def char_dir(tmp_path_factory, corpus_text):
    return trained(tmp_path_factory, corpus_text + MULTIBYTE * 200, "char")


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory, corpus_text):
    """A byte-level BPE of 400 tokens: many of its tokens are parts of a multi-byte character."""
    return trained(tmp_path_factory, corpus_text[:20_000] + MULTIBYTE * 400, "bpe", vocab_size=400)


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory, corpus_text, tiktoken_cache):
    return trained(tmp_path_factory, corpus_text + MULTIBYTE * 200, "gpt2")


class Recorder:
    """Stands in for sys.stdout and keeps every write separately."""

    def __init__(self):
        self.writes = []

    def write(self, text):
        self.writes.append(text)
        return len(text)

    def flush(self):
        pass

    @property
    def text(self):
        return "".join(self.writes)


def sample_in_process(folder, monkeypatch, *args):
    """sample.main run in folder; returns the Recorder of its stdout, which keeps each write."""
    monkeypatch.chdir(folder)
    recorder = Recorder()
    monkeypatch.setattr(sys, "stdout", recorder)
    sample.main(["--out_dir=out", "--dtype=float32", "--device=cpu", *args])
    monkeypatch.undo()
    return recorder


def samples_of(stdout):
    """The samples sample.py printed, each ending in its newline."""
    return [s for s in stdout.split("---------------\n") if s]


@pytest.mark.parametrize("kind", ["char", "bpe", pytest.param("gpt2", marks=pytest.mark.slow)])
def test_stream_prints_the_same_text_as_batch_mode_piece_by_piece(kind, request, monkeypatch):
    folder = request.getfixturevalue(f"{kind}_dir")
    args = ["--start=Café 日本", "--num_samples=1", "--max_new_tokens=60", "--temperature=1.0", "--seed=3"]
    streamed = sample_in_process(folder, monkeypatch, *args, "--stream")
    whole = sample_in_process(folder, monkeypatch, *args)  # all new tokens decoded at once at the end
    # equal text means no piece broke a character that the whole decode keeps intact
    assert streamed.text == whole.text and streamed.text.startswith("Café 日本")
    generated = whole.text[len("Café 日本"):]
    assert any(ord(c) > 127 and c != "\ufffd" for c in generated)  # multi-byte characters were streamed
    assert len([w for w in streamed.writes if w]) > 10  # text arrived as generated, not in one write


def test_streaming_a_bpe_token_stream_never_splits_a_character(tiktoken_cache):
    from tokenizer import load_tokenizer
    tokenizer = load_tokenizer({"kind": "gpt2"})
    ids = tokenizer.encode(MULTIBYTE)
    assert any("\ufffd" in tokenizer.decode([i]) for i in ids)  # some tokens hold part of a character
    text = StopText(tokenizer)
    pieces = [text.add(i) for i in ids] + [text.finish()]
    assert "".join(pieces) == MULTIBYTE and not any("\ufffd" in p for p in pieces)


def test_stop_text_holds_back_a_possible_stop_string_and_cuts_at_it(tiktoken_cache):
    from tokenizer import load_tokenizer
    tokenizer = load_tokenizer({"kind": "gpt2"})
    text = StopText(tokenizer, ["vu —"])
    shown = "".join(text.add(i) for i in tokenizer.encode(MULTIBYTE) if not text.done) + text.finish()
    assert shown == "Café déjà " and text.done
    text = StopText(tokenizer, ["zzz", "déj", "vu"])  # several: cut at the earliest
    shown = "".join(text.add(i) for i in tokenizer.encode(MULTIBYTE) if not text.done) + text.finish()
    assert shown == "Café " and text.done


@pytest.mark.parametrize("stream", [False, True])
def test_a_stop_string_ends_each_sample_just_before_it(char_dir, monkeypatch, stream):
    base = ["--start=ROMEO:", "--num_samples=1", "--max_new_tokens=60", "--temperature=0"]
    free = samples_of(sample_in_process(char_dir, monkeypatch, *base).text)[0]
    generated = free[len("ROMEO:"):]
    stop = generated[12:14]
    expected = "ROMEO:" + generated[:generated.index(stop)]
    flags = [f"--stop={stop}"] + (["--stream"] if stream else [])
    cut = samples_of(sample_in_process(char_dir, monkeypatch, *base, *flags).text)[0]
    assert cut == expected + "\n"


def test_prompts_from_a_file_are_batched_and_match_prompt_by_prompt(char_dir):
    (char_dir / "prompts.txt").write_text("To be\nKING RICHARD:\n\nO\n", encoding="utf-8")
    proc = run_main("sample.py", "--out_dir=out", "--dtype=float32", "--prompts_file=prompts.txt", "--num_samples=1",
                    "--max_new_tokens=30", "--temperature=0", cwd=char_dir)
    samples = samples_of(proc.stdout)
    assert len(samples) == 3 and all(s.startswith(p) for s, p in zip(samples, ["To be", "KING RICHARD:", "O"]))
    for prompt, batched in zip(["To be", "KING RICHARD:", "O"], samples):
        alone = run_main("sample.py", "--out_dir=out", "--dtype=float32", f"--start={prompt}", "--num_samples=1",
                         "--max_new_tokens=30", "--temperature=0", cwd=char_dir)
        assert samples_of(alone.stdout) == [batched]
    assert re.search(r"^90 tokens in [\d.]+ s: [\d.]+ tokens/s$", proc.stderr.strip())


def test_greedy_decoding_prints_one_sample_per_prompt_and_says_why(char_dir):
    proc = run_main("sample.py", "--out_dir=out", "--dtype=float32", "--start=To be", "--num_samples=3",
                    "--max_new_tokens=10", "--temperature=0", cwd=char_dir)
    assert len(samples_of(proc.stdout)) == 1
    assert "temperature=0 is greedy, so one sample per prompt (its 3 samples would be the same text)" in proc.stderr
    sampled = run_main("sample.py", "--out_dir=out", "--dtype=float32", "--start=To be", "--num_samples=3",
                       "--max_new_tokens=10", "--temperature=1.0", cwd=char_dir)
    assert len(samples_of(sampled.stdout)) == 3 and "note:" not in sampled.stderr


def test_beam_search_prints_the_best_beams(char_dir):
    proc = run_main("sample.py", "--out_dir=out", "--dtype=float32", "--start=To be", "--beam_width=3", "--num_samples=2",
                    "--max_new_tokens=20", cwd=char_dir)
    samples = samples_of(proc.stdout)
    assert len(samples) == 2 and samples[0] != samples[1] and all(s.startswith("To be") for s in samples)


def test_without_the_cache_the_text_is_the_same(char_dir):
    args = ["--out_dir=out", "--dtype=float32", "--start=To be", "--num_samples=2", "--max_new_tokens=80", "--seed=5"]
    cached = run_main("sample.py", *args, cwd=char_dir)
    uncached = run_main("sample.py", *args, "--use_cache=False", cwd=char_dir)
    assert cached.stdout == uncached.stdout


@pytest.mark.parametrize("args, message", [
    (["--top_p=0"], "top_p must be in (0, 1]"),
    (["--top_p=1.5"], "top_p must be in (0, 1]"),
    (["--top_k=0"], "top_k must be >= 1"),
    (["--temperature=-0.5"], "temperature must be >= 0"),
    (["--max_new_tokens=0"], "max_new_tokens must be >= 1"),
    (["--beam_width=0"], "beam_width must be >= 1"),
    (["--repetition_penalty=0"], "repetition_penalty must be > 0"),
    (["--beam_width=2", "--num_samples=3"], "num_samples (3) must be <= beam_width (2)"),
    (["--beam_width=2", "--num_samples=1", "--stream"], "--stream cannot show beam search"),
    (["--start=Ωmega"], "characters not in this char-level vocabulary: 'Ω'"),
    (["--prompts_file=nowhere.txt"], "prompts file nowhere.txt not found"),
    (["--prompts_file=data"], "prompts file data is a folder, not a file"),
    (["--start=FILE:data"], "prompt file data is a folder, not a file"),
    (["--start=FILE:latin1.txt"], "prompt file latin1.txt is not UTF-8 text"),
    (["--threads=-1"], "threads must be >= 1"),
])
def test_bad_sampling_arguments_end_with_one_line_and_exit_code_2(char_dir, args, message):
    (char_dir / "latin1.txt").write_bytes("café".encode("latin-1"))
    one_line_error(run_main("sample.py", "--out_dir=out", "--dtype=float32", *args, cwd=char_dir, check=False), message)


def test_bench_reports_tokens_per_second_and_bandwidth_utilisation_of_each_way_to_decode(tmp_path):
    proc = run_main("sample.py", "--bench", "--max_new_tokens=20", "--device=cpu", cwd=tmp_path)
    bandwidth = float(re.search(r"copy bandwidth ([\d.]+) GB/s", proc.stdout).group(1))
    rows = {name: [float(x) for x in nums] for name, *nums in
            re.findall(r"^\s*(.+?)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)%\s+(\d+)%$", proc.stdout, re.M)}
    names = {n.split(" (")[0] for n in rows}
    assert names == {"kv cache", "kv cache, int8", "kv cache, int8_all", "full recompute"}, proc.stdout
    for name, (rate, mb, gbs, mbu, same) in rows.items():
        assert rate > 0 and mb > 0
        assert gbs == pytest.approx(rate * mb / 1e3, abs=0.06)  # GB/s is MB/token x tokens/s
        assert mbu == pytest.approx(100 * gbs / bandwidth, abs=1.5) and 0 <= same <= 100
    fp32 = rows["kv cache"][1]
    int8 = next(v for n, v in rows.items() if n.startswith("kv cache, int8 "))[1]
    assert 3.0 < fp32 / int8 < 4.2  # int8 matrices read a quarter of float32's bytes, plus their scales
    assert "speed-up of the cache over full recompute" in proc.stdout


@pytest.mark.parametrize("args, one", [
    ([], False),                                        # 3 samples decoded side by side
    (["--num_samples=1"], True), (["--temperature=0"], True), (["--stream"], True), (["--instruct"], True),
    (["--num_samples=1", "--prompts_file=p.txt"], False), (["--beam_width=2", "--num_samples=1"], False),
    (["--instruct_eval=val"], False)])
def test_auto_threads_take_one_cpu_thread_only_when_one_sequence_is_decoded_at_a_time(args, one):
    from configurator import parse_args
    from model import GPT, GPTConfig
    cfg, _ = parse_args(args, [sample.SampleConfig], "sample.py", "")
    model = GPT(GPTConfig(block_size=8, vocab_size=10, n_layer=1, n_head=1, n_embd=8))
    assert sample.decode_threads(cfg, model, "cpu") == (1 if one else 0)
    assert sample.decode_threads(cfg, model, "cuda") == 0
    assert sample.decode_threads({**cfg, "threads": 3}, model, "cpu") == 3


def test_the_thread_count_is_put_back_after_decoding():
    import torch
    before = torch.get_num_threads()
    with sample.cpu_threads(before + 1):
        assert torch.get_num_threads() == before + 1
    with sample.cpu_threads(0):
        assert torch.get_num_threads() == before
    assert torch.get_num_threads() == before


def test_a_busy_cpu_is_named_after_the_speed_line(char_dir, monkeypatch):
    monkeypatch.setattr("os.getloadavg", lambda: (9.0, 9.0, 9.0))
    result = run_main("sample.py", "--out_dir=out", "--max_new_tokens=4", "--num_samples=1", cwd=char_dir)
    speed, note = result.stderr.strip().splitlines()
    assert " tokens in " in speed and note.startswith("note: the load average is 9.0 on ") and "A busy CPU" in note


@pytest.fixture(scope="module")
def draft_dir(bpe_dir):
    """bpe_dir with a second, smaller model trained on the same dataset in draft/: a draft for out/."""
    run_main("train.py", *TINY_MODEL, "--n_layer=1", "--n_embd=16", "--out_dir=draft", "--max_iters=30",
             "--eval_interval=30", cwd=bpe_dir)
    return bpe_dir


def test_a_draft_model_leaves_the_greedy_text_unchanged_and_reports_its_acceptance(draft_dir, capsys, monkeypatch):
    args = ["--start=The ", "--num_samples=1", "--max_new_tokens=40", "--temperature=0"]
    alone = sample_in_process(draft_dir, monkeypatch, *args).text
    capsys.readouterr()
    with_draft = sample_in_process(draft_dir, monkeypatch, *args, "--draft=draft", "--draft_k=3").text
    assert with_draft == alone and len(alone) > len("The ") + 10
    accepted, proposed = map(int, re.search(r"draft: (\d+) of (\d+) guesses accepted", capsys.readouterr().err).groups())
    assert 0 <= accepted <= proposed and proposed > 0


def test_a_draft_with_another_tokenizer_is_refused_in_one_line(draft_dir, char_dir):
    result = run_main("sample.py", "--out_dir=out", f"--draft={char_dir / 'out'}", "--device=cpu", cwd=draft_dir,
                      check=False)
    one_line_error(result, "another tokenizer")


def test_compile_decodes_on_the_static_cache_with_the_same_text(draft_dir, monkeypatch):
    import decoding
    calls = []
    monkeypatch.setattr(decoding, "compiled_step", lambda device_type: calls.append(device_type) or decoding._step)
    args = ["--start=The ", "--num_samples=2", "--max_new_tokens=40", "--temperature=1.0", "--seed=5"]
    eager = sample_in_process(draft_dir, monkeypatch, *args).text
    monkeypatch.setattr(decoding, "compiled_step", lambda device_type: calls.append(device_type) or decoding._step)
    static = sample_in_process(draft_dir, monkeypatch, *args, "--compile").text
    assert static == eager and calls == ["cpu"]


@pytest.mark.slow
def test_compile_with_inductor_gives_the_greedy_text_of_eager(draft_dir, monkeypatch):
    args = ["--start=The ", "--num_samples=1", "--max_new_tokens=60", "--temperature=0"]
    eager = sample_in_process(draft_dir, monkeypatch, *args).text
    assert sample_in_process(draft_dir, monkeypatch, *args, "--compile", "--quantize=int8").text == \
        sample_in_process(draft_dir, monkeypatch, *args, "--quantize=int8").text
    assert sample_in_process(draft_dir, monkeypatch, *args, "--compile").text == eager


@pytest.mark.parametrize("flag", ["--stream", "--repetition_penalty=1.3", "--use_cache=False", "--compile"])
def test_a_draft_refuses_the_settings_it_cannot_honour(draft_dir, flag):
    result = run_main("sample.py", "--out_dir=out", "--draft=draft", flag, "--device=cpu", cwd=draft_dir, check=False)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1 and "--draft" in result.stderr


def test_a_draft_stops_at_a_stop_string_as_the_target_alone_does(draft_dir, monkeypatch):
    args = ["--start=The ", "--num_samples=1", "--max_new_tokens=60", "--temperature=0", "--stop=e"]
    alone = sample_in_process(draft_dir, monkeypatch, *args).text
    assert sample_in_process(draft_dir, monkeypatch, *args, "--draft=draft").text == alone
