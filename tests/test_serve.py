"""serve.py: the OpenAI-compatible API over an instruction checkpoint, read by the openai client itself;
bad requests, the API key, a full queue, a client that leaves mid-stream."""
import json
import time

import pytest

from conftest import run_main

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

import serve  # noqa: E402
from hf import load_for_inference  # noqa: E402

PROMPT = "Repeat the word number 3."


def make_server(folder, **settings):
    cfg = {**serve.ServeConfig().__dict__, "out_dir": str(folder / "out"), "device": "cpu", "dtype": "float32",
           **settings}
    ckpt, model, tok = load_for_inference("resume", cfg["out_dir"], "cpu")
    return serve.Server(cfg, ckpt, model, tok)


@pytest.fixture(scope="module")
def running(instruct_run):
    """A server on the loopback over the tiny instruction model: (base URL, Server)."""
    server = make_server(instruct_run)
    base, stop = serve.start_in_thread(server)
    yield base, server
    stop()


@pytest.fixture
def offline_app(instruct_run):
    """The app alone, its engine not running: requests are checked and queued, never decoded."""
    from fastapi.testclient import TestClient

    def make(**settings):
        server = make_server(instruct_run, **settings)
        return TestClient(serve.build_app(server)), server
    return make


def test_the_openai_client_chats_with_the_greedy_text_of_sample_instruct(running, instruct_run):
    openai = pytest.importorskip("openai")
    base, server = running
    client = openai.OpenAI(base_url=base + "/v1", api_key="unused")
    messages = [{"role": "user", "content": PROMPT}]
    reply = client.chat.completions.create(model=server.model_name, messages=messages, temperature=0, max_tokens=30)
    text = reply.choices[0].message.content
    chunks = list(client.chat.completions.create(model=server.model_name, messages=messages, temperature=0,
                                                 max_tokens=30, stream=True))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    sampled = run_main("sample.py", "--out_dir=out", "--instruct", f"--start={PROMPT}", "--temperature=0",
                       "--num_samples=1", "--max_new_tokens=30", "--device=cpu", "--dtype=float32",
                       cwd=instruct_run).stdout.split("\n---------------")[0]
    assert text and text == streamed == sampled
    assert reply.choices[0].finish_reason in ("stop", "length") and reply.usage.completion_tokens >= 1
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    assert [m.id for m in client.models.list().data] == [server.model_name]


def test_completions_give_logprobs_seeded_choices_usage_and_stop_at_a_string(running):
    base, server = running
    body = {"prompt": "Below is an instruction", "max_tokens": 12, "temperature": 1.0, "seed": 5, "n": 2,
            "logprobs": 2}
    a = httpx.post(base + "/v1/completions", json=body, timeout=60).json()
    b = httpx.post(base + "/v1/completions", json=body, timeout=60).json()
    assert [c["text"] for c in a["choices"]] == [c["text"] for c in b["choices"]]  # the seed fixes them
    first = a["choices"][0]
    lp = first["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) >= 1
    assert all(v <= 0 for v in lp["token_logprobs"]) and all(len(t) <= 2 for t in lp["top_logprobs"])
    assert a["usage"]["completion_tokens"] == sum(len(c["logprobs"]["tokens"]) for c in a["choices"])
    word = first["text"].strip().split()[0] if first["text"].strip() else None
    if word:
        cut = httpx.post(base + "/v1/completions", json={**body, "n": 1, "stop": [word]}, timeout=60).json()
        assert word not in cut["choices"][0]["text"] and cut["choices"][0]["finish_reason"] == "stop"


def test_a_stream_is_openai_s_chunks_ending_in_done(running):
    base, _ = running
    body = {"messages": [{"role": "user", "content": PROMPT}], "stream": True, "max_tokens": 8, "logprobs": True,
            "top_logprobs": 2, "temperature": 0}
    with httpx.stream("POST", base + "/v1/chat/completions", json=body, timeout=60) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]" and all(line.startswith("data: ") for line in lines)
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant" and all(c["choices"] for c in chunks)
    finishes = [c["choices"][0]["finish_reason"] for c in chunks]
    assert finishes[-1] in ("stop", "length") and not any(finishes[:-1])
    usage = chunks[-1]["usage"]  # on the chunk that ends the answer
    assert usage["completion_tokens"] >= 1 and not any("usage" in c for c in chunks[:-1])
    entries = [e for c in chunks for e in (c["choices"][0]["logprobs"] or {}).get("content", [])]
    assert len(entries) == usage["completion_tokens"] and all(len(e["top_logprobs"]) == 2 for e in entries)
    body["stream_options"] = {"include_usage": True}  # then OpenAI's extra chunk: usage, no choices
    with httpx.stream("POST", base + "/v1/chat/completions", json=body, timeout=60) as r:
        lines = [line for line in r.iter_lines() if line]
    last = json.loads(lines[-2][6:])
    assert lines[-1] == "data: [DONE]" and last["choices"] == [] and last["usage"] == usage


def test_a_client_that_leaves_mid_stream_frees_its_row(running):
    base, server = running
    body = {"prompt": "word", "max_tokens": 1000, "stream": True, "temperature": 1.0, "stop": []}
    with httpx.stream("POST", base + "/v1/completions", json={**body, "max_tokens": 90}, timeout=60) as r:
        next(r.iter_lines())
    deadline = time.time() + 20
    while server.engine.outstanding and time.time() < deadline:
        time.sleep(0.05)
    assert server.engine.outstanding == 0 and httpx.get(base + "/health").json()["status"] == "ok"


BAD = [
    ("not json", "not valid JSON", None),
    ({"messages": []}, "'messages' must be a non-empty list", "messages"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "messages[0] must be an object with a role", "messages"),
    ({"model": "gpt-4", "messages": [{"role": "user", "content": "hi"}]}, "'model' 'gpt-4' is not served", "model"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": "10"}, "'max_tokens' must be an integer",
     "max_tokens"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, "'max_tokens' must be between 1 and",
     "max_tokens"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 10 ** 6}, "'max_tokens' must be between",
     "max_tokens"),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": -0.5}, "'temperature' must be 0 (greedy)",
     "temperature"),
    ({"messages": [{"role": "user", "content": "hi"}], "top_p": 0}, "'top_p' must be in (0, 1]", "top_p"),
    ({"messages": [{"role": "user", "content": "hi"}], "top_p": 1.5}, "'top_p' must be in (0, 1]", "top_p"),
    ({"messages": [{"role": "user", "content": "hi"}], "stream": "yes"}, "'stream' must be a boolean", "stream"),
    ({"messages": [{"role": "user", "content": "hi"}], "stop": ["a", "b", "c", "d", "e"]}, "'stop' must be", "stop"),
    ({"messages": [{"role": "user", "content": "hi " * 400}]}, "more than this model's context of 96", "messages"),
    ('{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', "not valid JSON", None),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": 1e-300}, "'temperature' must be 0 (greedy)",
     "temperature"),
    ({"messages": [{"role": "user", "content": "hi"}], "seed": 2 ** 64}, "'seed' must be between 0", "seed"),
    ({"messages": ["hi"]}, "messages[0] must be an object with a role", "messages"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}, "messages[0].content must be",
     "messages"),
    ({"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}, "'top_logprobs' needs 'logprobs'",
     "top_logprobs"),
    ({"messages": [{"role": "user", "content": "hi"}], "stop": {}}, "'stop' must be", "stop"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 0},
     "'max_completion_tokens' must be between 1", "max_completion_tokens"),
    ({"messages": [{"role": "user", "content": "hi"}], "stream": True, "stream_options": 3},
     "'stream_options' must be an object", "stream_options"),
]


@pytest.mark.parametrize("body, message, param", BAD, ids=[b[1][:30] for b in BAD])
def test_a_bad_request_is_a_400_naming_its_field_and_the_server_goes_on(offline_app, body, message, param):
    client, server = offline_app()
    content = body if isinstance(body, str) else json.dumps(body)
    r = client.post("/v1/chat/completions", content=content, headers={"Content-Type": "application/json"})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert message in error["message"] and error["param"] == param and error["type"] == "invalid_request_error"
    assert server.engine.outstanding == 0 and client.get("/health").status_code == 200


def test_a_long_prompt_is_cut_only_when_the_request_asks(running):
    base, _ = running
    body = {"messages": [{"role": "user", "content": "hi " * 400}], "max_tokens": 2}
    assert httpx.post(base + "/v1/chat/completions", json=body, timeout=60).status_code == 400
    r = httpx.post(base + "/v1/chat/completions", json={**body, "truncate_prompt_tokens": 50}, timeout=60)
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == 50


def test_an_api_key_is_needed_when_set(offline_app):
    client, _ = offline_app(api_key="s3cret")
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}
    assert client.post("/v1/chat/completions", json=body).status_code == 401
    assert client.get("/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
    ok = client.get("/v1/models", headers={"Authorization": "Bearer s3cret"})
    assert ok.status_code == 200 and client.get("/health").status_code == 200  # health and the page stay open


def test_a_full_queue_is_a_503_with_retry_after(offline_app):
    from engine import Request
    client, server = offline_app(max_batch=1, max_queue=1)
    assert server.engine.submit(Request([1], 5)) and server.engine.submit(Request([1], 5))
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 503 and r.headers["retry-after"] == "1" and "capacity" in r.json()["error"]["message"]


def test_the_chat_page_is_one_file_that_fetches_nothing_from_elsewhere(offline_app):
    client, _ = offline_app()
    page = client.get("/")
    assert page.status_code == 200 and "/v1/chat/completions" in page.text
    assert "http://" not in page.text and "https://" not in page.text and "<script src" not in page.text


def test_bad_settings_are_one_line(instruct_run):
    from conftest import one_line_error
    one_line_error(run_main("serve.py", "out", "--max_batch=0", cwd=instruct_run, check=False), "max_batch must be >= 1")


# -----------------------------------------------------------------------------------------------
# slow: a real browser, a load test, SIGTERM, the benchmark

def server_process(folder, *args):
    """serve.py in a process of its own on a free port: (Popen, base URL), once /health answers."""
    import socket
    import subprocess
    import sys
    from conftest import REPO
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, str(REPO / "serve.py"), "out", f"--port={port}", "--device=cpu",
                             "--dtype=float32", *args], cwd=folder, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            if httpx.get(base + "/health", timeout=1).status_code == 200:
                return proc, base
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise AssertionError("serve.py did not start: " + proc.communicate()[1])


@pytest.mark.slow
def test_the_chat_page_in_a_real_browser_streams_the_answer(running, tmp_path):
    import shutil
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    chromium, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver_path):
        pytest.skip("needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)")
    base, server = running
    options = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1100,700"):
        options.add_argument(arg)
    options.binary_location = chromium
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        driver.get(base + "/")
        WebDriverWait(driver, 20).until(lambda d: d.find_element(By.ID, "model").text == server.model_name)
        driver.execute_script("document.getElementById('temperature').value = '0';")
        driver.find_element(By.ID, "input").send_keys(PROMPT)
        driver.find_element(By.ID, "send").click()
        WebDriverWait(driver, 60).until(lambda d: "(" in d.find_element(By.CLASS_NAME, "meta").text)
        answer = driver.find_element(By.CSS_SELECTOR, ".msg.assistant")
        spans = answer.find_elements(By.TAG_NAME, "span")
        greedy = httpx.post(base + "/v1/chat/completions", json={"messages": [{"role": "user", "content": PROMPT}],
                                                                  "temperature": 0, "max_tokens": 128}).json()
        assert answer.text and answer.text == greedy["choices"][0]["message"]["content"].strip()
        assert spans and all("%" in s.get_attribute("title") for s in spans)  # each piece's probability on hover
        assert "tokens/s" in driver.find_element(By.CLASS_NAME, "meta").text
        shot = tmp_path / "chat.png"
        driver.save_screenshot(str(shot))
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    finally:
        driver.quit()


def read_rss(pid):
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


@pytest.mark.slow
def test_a_load_of_64_clients_gets_no_5xx_and_well_formed_answers_in_steady_memory(instruct_run):
    import asyncio
    import random
    proc, base = server_process(instruct_run, "--max_batch=8", "--max_queue=64")
    rss, statuses, problems = [], [], []

    async def one(client, rng, k):
        body = {"messages": [{"role": "user", "content": f"Repeat the word number {k % 50}."}],
                "max_tokens": rng.choice([4, 8, 16]), "temperature": rng.choice([0, 0.8])}
        if rng.random() < 0.5:
            r = await client.post(base + "/v1/chat/completions", json=body)
            statuses.append(r.status_code)
            data = r.json()
            if r.status_code == 200 and not (data["choices"][0]["message"]["role"] == "assistant"
                                             and data["usage"]["total_tokens"] >= 1):
                problems.append(data)
            return
        leave = rng.random() < 0.2  # some leave after the first chunk
        async with client.stream("POST", base + "/v1/chat/completions", json={**body, "stream": True}) as r:
            statuses.append(r.status_code)
            lines = []
            async for line in r.aiter_lines():
                if line:
                    lines.append(line)
                    if leave:
                        break
            if not leave and (lines[-1] != "data: [DONE]" or not all(json.loads(x[6:]) for x in lines[:-1])):
                problems.append(lines)

    async def clients():
        # a connection per request: a pooled one the server closes as idle (keep-alive) at the moment the
        # client picks it is a race of HTTP itself, not of the server under test
        limits = httpx.Limits(max_connections=64, max_keepalive_connections=0)
        async with httpx.AsyncClient(timeout=120, limits=limits) as client:
            async def worker(i):
                rng = random.Random(i)
                for k in range(20):
                    await one(client, rng, i * 20 + k)
            tasks = [asyncio.create_task(worker(i)) for i in range(64)]
            while not all(t.done() for t in tasks):
                rss.append(read_rss(proc.pid))
                await asyncio.sleep(0.1)
            await asyncio.gather(*tasks)
    try:
        asyncio.run(clients())
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert len(statuses) == 64 * 20 and not [s for s in statuses if s >= 500] and not problems
    quarter = max(1, len(rss) // 4)
    first, last = sum(rss[:quarter]) / quarter, sum(rss[-quarter:]) / quarter
    print(f"{len(statuses)} answers; resident memory {first / 1024:.1f} MiB in the first quarter, {last / 1024:.1f} MiB in the last")
    assert abs(last - first) <= 0.1 * first, (first, last)


@pytest.mark.slow
def test_sigterm_ends_the_in_flight_requests_and_exits_cleanly(instruct_run):
    import signal
    proc, base = server_process(instruct_run)
    body = {"prompt": "word", "max_tokens": 90, "stream": True, "temperature": 1.0}
    with httpx.stream("POST", base + "/v1/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        next(lines)
        proc.send_signal(signal.SIGTERM)
        rest = [line for line in lines if line]
    assert proc.wait(timeout=30) in (0, -signal.SIGTERM)
    assert not rest or rest[-1] == "data: [DONE]"  # finished, or cut off; never a half-written event
    assert "Traceback" not in proc.stderr.read()


@pytest.mark.slow
def test_bench_reports_tokens_per_second_for_1_4_and_8_clients(tmp_path):
    out = run_main("serve.py", "--bench", "--device=cpu", "--dtype=float32", cwd=tmp_path).stdout
    rows = [line for line in out.splitlines() if "client(s):" in line]
    assert [r.split()[0] for r in rows] == ["1", "4", "8"]
    assert all(float(r.split()[2].replace(",", "")) > 0 for r in rows)


def test_an_int8_server_answers_with_the_greedy_text_of_sample_py_with_int8(instruct_run):
    httpx = pytest.importorskip("httpx")
    import quantize
    cfg = {**serve.ServeConfig().__dict__, "out_dir": str(instruct_run / "out"), "device": "cpu", "dtype": "float32",
           "quantize": "int8"}
    ckpt, model, tok = load_for_inference("resume", cfg["out_dir"], "cpu")
    assert "int8" in quantize.prepare(model, cfg["quantize"])  # what serve.main does with --quantize=int8
    server = serve.Server(cfg, ckpt, model, tok)
    base, stop = serve.start_in_thread(server)
    try:
        reply = httpx.post(base + "/v1/chat/completions", timeout=60, json={
            "model": server.model_name, "messages": [{"role": "user", "content": PROMPT}], "temperature": 0, "max_tokens": 30})
    finally:
        stop()
    sampled = run_main("sample.py", "--out_dir=out", "--instruct", f"--start={PROMPT}", "--temperature=0",
                       "--num_samples=1", "--max_new_tokens=30", "--device=cpu", "--dtype=float32", "--quantize=int8",
                       cwd=instruct_run).stdout.split("\n---------------")[0]
    assert reply.status_code == 200 and reply.json()["choices"][0]["message"]["content"] == sampled
