"""
Serve a checkpoint the way people use models: an OpenAI-compatible HTTP API (the openai client,
curl, any tool that speaks it) with streaming and continuous batching, and a chat page.

  python serve.py out-instruct                      # http://127.0.0.1:8000/ the chat page, /v1/... the API
  python serve.py --init_from=gpt2 --port=8001      # any checkpoint sample.py takes
  SERVE_API_KEY=secret python serve.py out          # requests need "Authorization: Bearer secret"
  python serve.py --bench                           # tokens/s with 1, 4 and 8 concurrent streaming clients

Endpoints: GET /v1/models, POST /v1/completions, POST /v1/chat/completions, GET /health, GET / (the
page). Needs fastapi and uvicorn (pip install fastapi uvicorn); nothing else in the repository does.

Design choices:
- engine.py decodes: one thread owns the model; requests join the running batch at the next step
  and leave it when they end. This file only turns HTTP into token ids and back.
- Requests are checked field by field before anything is queued (types, ranges, finite numbers, a
  seed a generator takes): a bad one is a 400 in OpenAI's error shape naming the field; a full queue
  is a 503 with Retry-After, not an ever-growing backlog.
- Text leaves through tokenizer.StopText, so a stream's text never shows a stop string or half a
  character (the logprobs' token fields are each token's own bytes, whole or not).
- A chat is rendered with the checkpoint's training template when it was trained on an instruct
  dataset (each user turn an instruction, each assistant turn its response and end-of-text, as
  packed training rows look); a base model reads the messages' contents, one per line.
- Listens on 127.0.0.1 unless --host says otherwise; with an API key every /v1 request needs it.
"""
import asyncio
import hmac
import json
import os
import sys
import threading
import time
import uuid
from dataclasses import dataclass

from common import yield_idle_cores
yield_idle_cores()  # before torch loads OpenMP

import torch  # noqa: E402

import runtime  # noqa: E402
from common import UserError, description, run_cli  # noqa: E402
from configurator import parse_args  # noqa: E402
from engine import Engine, Request  # noqa: E402
from tokenizer import StopText  # noqa: E402

PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "chat.html")


@dataclass
class ServeConfig:
    out_dir: str = "out"           # folder of the checkpoint to serve (its ckpt.pt)
    init_from: str = "resume"      # resume (out_dir/ckpt.pt) | PATH of a checkpoint or Hugging Face folder | gpt2*
    host: str = "127.0.0.1"        # the address to listen on (0.0.0.0: every interface; set an api_key then)
    port: int = 8000               # the port to listen on
    api_key: str = ""              # requests need "Authorization: Bearer KEY" ("" : $SERVE_API_KEY, if set)
    model_name: str = ""           # the model id /v1/models lists ("" : the checkpoint folder's name)
    max_tokens: int = 1024         # the most tokens one request may ask for
    max_n: int = 8                 # the most choices (n) one request may ask for
    max_batch: int = 8             # rows decoded together
    max_queue: int = 64            # requests waiting beyond those; more are answered 503
    device: str = "auto"           # auto | cpu | cuda | cuda:N | mps
    dtype: str = "auto"            # auto | float32 | bfloat16 | float16
    utf8: bool = True              # byte-level tokenizers: never sample a token that breaks UTF-8 (no U+FFFD in answers)
    quantize: str = ""             # int8 | int8_all: weight-only int8 (quantize.py): a quarter of the weight bytes per token; "" none
    bench: bool = False            # tokens/s with 1, 4 and 8 concurrent streaming clients, on a random 6x384 model


class BadRequest(Exception):
    """An answer in OpenAI's error shape: status, message, the field at fault."""

    def __init__(self, message, param=None, status=400, kind="invalid_request_error", code=None):
        super().__init__(message)
        self.message, self.param, self.status, self.kind, self.code = message, param, status, kind, code

    def body(self):
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


# -----------------------------------------------------------------------------------------------
# reading a request

TYPE_NAMES = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list",
              dict: "an object"}


def field(body, name, kind, default=None):
    """body[name] if it is of kind (float accepts integers; int refuses booleans), else default; a
    value of another type is a 400 naming the field."""
    value = body.get(name)
    if value is None:
        return default
    ok = isinstance(value, kind) and not (kind in (int, float) and isinstance(value, bool))
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        ok, value = abs(value) < 1e300, float(value) if abs(value) < 1e300 else value
    if not ok:
        raise BadRequest(f"'{name}' must be {TYPE_NAMES[kind]}, got {json.dumps(value)[:40]}", name)
    return value


def sampling(body, cfg, default_max_tokens):
    """The sampling settings of a request, each checked: a dict of Request's fields, and n, stops."""
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = field(body, key, int, default_max_tokens)
    if not 1 <= max_tokens <= cfg["max_tokens"]:
        raise BadRequest(f"'{key}' must be between 1 and {cfg['max_tokens']}, got {max_tokens}", key)
    temperature = field(body, "temperature", float, 1.0)
    if not (temperature == 0 or 0.01 <= temperature <= 100):  # tiny ones overflow the logits
        raise BadRequest(f"'temperature' must be 0 (greedy) or between 0.01 and 100, got {temperature}", "temperature")
    top_p = field(body, "top_p", float, 1.0)
    if not 0 < top_p <= 1:
        raise BadRequest(f"'top_p' must be in (0, 1], got {top_p}", "top_p")
    top_k = field(body, "top_k", int, -1)
    if top_k == 0 or top_k < -1:
        raise BadRequest(f"'top_k' must be >= 1, or -1 for all tokens; got {top_k}", "top_k")
    n = field(body, "n", int, 1)
    if not 1 <= n <= cfg["max_n"]:
        raise BadRequest(f"'n' must be between 1 and {cfg['max_n']}, got {n}", "n")
    seed = field(body, "seed", int)
    if seed is not None and not 0 <= seed < 2 ** 63 - cfg["max_n"]:
        raise BadRequest(f"'seed' must be between 0 and 2**63 - {cfg['max_n'] + 1}, got {seed}", "seed")
    stop = body.get("stop")
    stops = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or len(stops) > 4 or not all(isinstance(s, str) for s in stops):
        raise BadRequest("'stop' must be a string or a list of up to 4 strings", "stop")
    return dict(max_new_tokens=max_tokens, temperature=temperature, top_p=None if top_p == 1 else top_p,
                top_k=None if top_k == -1 else top_k, seed=seed), n, stops


def not_json(constant):
    """NaN and Infinity, which Python's json reads but JSON has not: refused."""
    raise ValueError(f"{constant} is not JSON")


def message_text(m, i):
    """A message's content as text: a string, or the text parts of a list of parts."""
    if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
        raise BadRequest(f"messages[{i}] must be an object with a role of system, user or assistant", "messages")
    content = m.get("content")
    if isinstance(content, list):
        parts = [p.get("text") for p in content if isinstance(p, dict) and p.get("type") == "text"]
        content = "".join(parts) if all(isinstance(t, str) for t in parts) else None
    if not isinstance(content, str):
        raise BadRequest(f"messages[{i}].content must be a string", "messages")
    return content


def encode_text(tokenizer, text, what):
    """Token ids of a prompt; characters a char-level vocabulary lacks are a 400 naming what."""
    try:
        return tokenizer.encode(text)
    except UserError as e:
        raise BadRequest(str(e), what) from None


class Server:
    """What the endpoints share: the settings, the model's tokenizer and engine, the chat template."""

    def __init__(self, cfg, ckpt, model, tokenizer):
        self.cfg, self.tokenizer = cfg, tokenizer
        from tasks import utf8_mask
        self.utf8 = utf8_mask(model, tokenizer) if cfg["utf8"] else None  # None for a char tokenizer
        self.engine = Engine(model, cfg["max_batch"], cfg["max_queue"], self.utf8)
        self.block_size = model.config.block_size
        self.instruct = ckpt.get("config", {}).get("task") == "instruct"
        source = cfg["out_dir"] if cfg["init_from"] == "resume" else cfg["init_from"]
        self.model_name = cfg["model_name"] or os.path.basename(os.path.normpath(source)) or "model"
        self.api_key = cfg["api_key"] or os.environ.get("SERVE_API_KEY", "")
        self.created = int(time.time())

    def chat_ids(self, messages):
        """The prompt of a chat as token ids (see the module docstring for the rendering)."""
        if not isinstance(messages, list) or not messages:
            raise BadRequest("'messages' must be a non-empty list of {role, content}", "messages")
        texts = []
        for i, m in enumerate(messages):
            text = message_text(m, i)  # checks the role too
            texts.append((m["role"], text))
        if not self.instruct:
            return encode_text(self.tokenizer, "\n".join(t for _, t in texts) + "\n", "messages")
        if texts[-1][0] != "user":
            raise BadRequest("the last message must be the user's, for the model to answer", "messages")
        from tasks import INSTRUCT_HEAD, instruct_prompt
        system = " ".join(t for role, t in texts if role == "system")
        ids = []
        for role, text in texts:
            if role == "user":
                prompt = instruct_prompt(text).replace(INSTRUCT_HEAD, system or INSTRUCT_HEAD, 1)
                ids += encode_text(self.tokenizer, prompt, "messages")
            elif role == "assistant":
                ids += encode_text(self.tokenizer, text, "messages") + [self.tokenizer.eot_token]
        return ids

    def prompt_ids(self, ids, body, what):
        """The prompt's token ids within the context: too long is a 400 unless the request asks to cut it."""
        if not ids:
            if self.tokenizer.bos_token is None:
                raise BadRequest(f"'{what}' is empty", what)
            ids = [self.tokenizer.bos_token]
        keep = field(body, "truncate_prompt_tokens", int)
        if keep is not None:
            if not 1 <= keep <= self.block_size:
                raise BadRequest(f"'truncate_prompt_tokens' must be between 1 and {self.block_size}",
                                 "truncate_prompt_tokens")
            ids = ids[-keep:]
        if len(ids) > self.block_size:
            raise BadRequest(f"'{what}' is {len(ids)} tokens, more than this model's context of {self.block_size}; "
                             f"shorten it, or set truncate_prompt_tokens to keep its last tokens", what)
        return ids

    def check(self, body):
        model = body.get("model")
        if model is not None and model != self.model_name:
            raise BadRequest(f"'model' {model!r} is not served here; this server has {self.model_name!r}", "model",
                             code="model_not_found")


# -----------------------------------------------------------------------------------------------
# one answer: its choices decoding in the engine, their events arriving on the server's event loop

class Choice:
    """One of a request's n answers: its engine Request and its text (through the stop strings); each
    token's text and log-probabilities go to the answer's asyncio queue."""

    def __init__(self, index, server, prompt, settings, stops, top_logprobs, events, loop):
        self.index, self.tokenizer, self.events, self.loop = index, server.tokenizer, events, loop
        self.text, self.reason = StopText(server.tokenizer, stops, drop_incomplete=server.utf8 is not None), None
        if settings["seed"] is not None:
            settings = {**settings, "seed": settings["seed"] + index}  # n choices with one seed still differ
        self.request = Request(prompt, stop_tokens=server.tokenizer.stop_tokens, top_logprobs=top_logprobs,
                               on_token=self.on_token, on_end=self.on_end, **settings)

    def token_entry(self, token, logprob):
        data = self.tokenizer.decode_bytes([token])
        return {"token": data.decode("utf-8", errors="replace"), "logprob": logprob, "bytes": list(data)}

    def on_token(self, token, logprob, top):  # on the engine's thread
        piece = self.text.add(token)
        entry = {**self.token_entry(token, logprob), "top_logprobs": [self.token_entry(t, lp) for t, lp in top]}
        self.loop.call_soon_threadsafe(self.events.put_nowait, (self.index, piece, entry, None))
        return self.text.done

    def on_end(self, reason):  # on the engine's thread
        self.loop.call_soon_threadsafe(self.events.put_nowait, (self.index, self.text.finish(), None, reason))


class Answer:
    """A request's n choices, submitted together; iterate for (index, text, logprob entry, finish reason)."""

    def __init__(self, server, prompt, settings, n, stops, top_logprobs):
        self.prompt = prompt
        self.events = asyncio.Queue()
        loop = asyncio.get_running_loop()
        self.choices = [Choice(i, server, prompt, dict(settings), stops, top_logprobs, self.events, loop)
                        for i in range(n)]
        for c in self.choices:
            if not server.engine.submit(c.request):
                self.cancel()
                raise BadRequest("the server is at capacity; retry shortly", status=503, kind="server_error",
                                 code="overloaded")
        self.open = n

    async def __aiter__(self):
        while self.open:
            index, piece, entry, reason = await self.events.get()
            if reason is not None:
                self.open -= 1
                self.choices[index].reason = reason
            yield index, piece, entry, reason

    def cancel(self):
        for c in self.choices:
            c.request.cancelled = True

    def usage(self):
        completion = sum(c.request.generated for c in self.choices)
        return {"prompt_tokens": len(self.prompt), "completion_tokens": completion,
                "total_tokens": len(self.prompt) + completion}


FINISH = {"stop": "stop", "length": "length", "cancelled": "stop", "error": "error"}


def completion_logprobs(entries, offset):
    """The completions endpoint's logprobs: tokens, their log-probabilities, the alternatives, offsets."""
    offsets, at = [], offset
    for e in entries:
        offsets.append(at)
        at += len(e["token"])
    return {"tokens": [e["token"] for e in entries], "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [{t["token"]: t["logprob"] for t in e["top_logprobs"]} for e in entries],
            "text_offset": offsets}


def completion_answer(server, body):
    """A /v1/completions request, checked and submitted: (Answer, stream_settings', logprobs wanted)."""
    prompt = body.get("prompt", "")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise BadRequest("'prompt' must be a string", "prompt")
    settings, n, stops = sampling(body, server.cfg, 16)
    logprobs = field(body, "logprobs", int, None)
    if logprobs is not None and not 0 <= logprobs <= 20:
        raise BadRequest(f"'logprobs' must be between 0 and 20, got {logprobs}", "logprobs")
    ids = server.prompt_ids(encode_text(server.tokenizer, prompt, "prompt"), body, "prompt")
    stream = stream_settings(body)
    return Answer(server, ids, settings, n, stops, logprobs or 0), stream, logprobs is not None


def chat_answer(server, body):
    """A /v1/chat/completions request, checked and submitted: (Answer, stream_settings', logprobs wanted)."""
    prompt = server.prompt_ids(server.chat_ids(body.get("messages")), body, "messages")
    settings, n, stops = sampling(body, server.cfg, min(server.cfg["max_tokens"], server.block_size))
    want = field(body, "logprobs", bool, False)
    top = field(body, "top_logprobs", int, 0)
    if not 0 <= top <= 20:
        raise BadRequest(f"'top_logprobs' must be between 0 and 20, got {top}", "top_logprobs")
    if top and not want:
        raise BadRequest("'top_logprobs' needs 'logprobs': true", "top_logprobs")
    stream = stream_settings(body)
    return Answer(server, prompt, settings, n, stops, top if want else 0), stream, want


def stream_settings(body):
    """(stream, include_usage): whether to answer in server-sent events, and whether to end them with
    OpenAI's extra usage chunk (stream_options.include_usage)."""
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise BadRequest("'stream_options' must be an object", "stream_options")
    return field(body, "stream", bool, False), field(options, "include_usage", bool, False)


async def respond(server, answer, stream, chat, want_logprobs):
    """The answer whole, or as server-sent events (stream: stream_settings'); everything about the
    request is checked before it gets here."""
    head = {"id": ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex, "created": int(time.time()),
            "model": server.model_name}
    streaming, include_usage = stream
    if streaming:
        from fastapi.responses import StreamingResponse
        return StreamingResponse(events(answer, head, chat, want_logprobs, include_usage),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    texts, entries = [""] * len(answer.choices), [[] for _ in answer.choices]
    try:
        async for index, piece, entry, _ in answer:
            texts[index] += piece
            if entry is not None:
                entries[index].append(entry)
    finally:  # the handler cancelled (shutdown): free the rows
        answer.cancel()
    if any(c.reason == "error" for c in answer.choices):
        raise BadRequest("decoding failed on the server", status=500, kind="server_error")
    choices = []
    for c, text, e in zip(answer.choices, texts, entries):
        if chat:
            choices.append({"index": c.index, "message": {"role": "assistant", "content": text},
                            "logprobs": {"content": e} if want_logprobs else None,
                            "finish_reason": FINISH[c.reason]})
        else:
            choices.append({"index": c.index, "text": text, "finish_reason": FINISH[c.reason],
                            "logprobs": completion_logprobs(e, 0) if want_logprobs else None})
    return {**head, "object": "chat.completion" if chat else "text_completion", "choices": choices,
            "usage": answer.usage()}


async def events(answer, head, chat, want_logprobs, include_usage):
    """The answer as server-sent events in OpenAI's chunk format: the chunk that ends the last choice
    carries usage; with include_usage a chunk of usage alone (no choices) follows, as OpenAI sends it;
    then [DONE]. A decoding failure is an error event instead."""
    kind = "chat.completion.chunk" if chat else "text_completion"

    def event(choices, **extra):
        return f"data: {json.dumps({**head, 'object': kind, 'choices': choices, **extra})}\n\n"
    offsets = [0] * len(answer.choices)
    try:
        if chat:
            yield event([{"index": c.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                          "finish_reason": None} for c in answer.choices])
        async for index, piece, entry, reason in answer:
            if reason == "error":
                yield f"data: {json.dumps(BadRequest('decoding failed on the server', kind='server_error').body())}\n\n"
                return
            if not piece and reason is None and not (want_logprobs and entry):
                continue
            lp = None
            if want_logprobs and entry is not None:
                lp = {"content": [entry]} if chat else completion_logprobs([entry], offsets[index])
            finish = FINISH[reason] if reason else None
            extra = {"usage": answer.usage()} if reason and not answer.open else {}
            if chat:
                delta = {"content": piece} if piece or reason is None else {}
                yield event([{"index": index, "delta": delta, "logprobs": lp, "finish_reason": finish}], **extra)
            else:
                yield event([{"index": index, "text": piece, "logprobs": lp, "finish_reason": finish}], **extra)
            offsets[index] += len(piece)
        if include_usage:
            yield event([], usage=answer.usage())
        yield "data: [DONE]\n\n"
    finally:  # the client went away, or the stream is done: free any row still decoding
        answer.cancel()


# -----------------------------------------------------------------------------------------------
# the HTTP layer

def build_app(server):
    """The FastAPI application over a Server."""
    try:
        from fastapi import FastAPI, Request as HTTPRequest
        from fastapi.responses import HTMLResponse, JSONResponse
    except ImportError:
        raise UserError("serve.py needs FastAPI and uvicorn: pip install fastapi uvicorn") from None
    app = FastAPI(title="gpt-from-scratch", docs_url=None, redoc_url=None)

    @app.exception_handler(BadRequest)
    async def bad_request(request, e):
        headers = {"Retry-After": "1"} if e.status == 503 else None
        return JSONResponse(e.body(), status_code=e.status, headers=headers)

    @app.middleware("http")
    async def authorize(request, call_next):
        if server.api_key and request.url.path.startswith("/v1/"):
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {server.api_key}".encode()):
                return JSONResponse(BadRequest("a valid API key is needed: Authorization: Bearer KEY",
                                               status=401, code="invalid_api_key").body(), status_code=401)
        return await call_next(request)

    async def read_body(request):
        try:
            body = json.loads(await request.body(), parse_constant=not_json)
        except (ValueError, UnicodeDecodeError):
            raise BadRequest("the request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise BadRequest("the request body must be a JSON object")
        server.check(body)
        return body

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": server.model_name, "decoding": len(server.engine.rows),
                "outstanding": server.engine.outstanding}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": server.model_name, "object": "model", "created": server.created,
                                            "owned_by": "gpt-from-scratch"}]}

    @app.get("/")
    async def page():
        with open(PAGE, encoding="utf-8") as f:
            return HTMLResponse(f.read())

    @app.post("/v1/completions")
    async def completions(request: HTTPRequest):
        answer, stream, logprobs = completion_answer(server, await read_body(request))
        return await respond(server, answer, stream, chat=False, want_logprobs=logprobs)

    @app.post("/v1/chat/completions")
    async def chat(request: HTTPRequest):
        answer, stream, logprobs = chat_answer(server, await read_body(request))
        return await respond(server, answer, stream, chat=True, want_logprobs=logprobs)

    return app


# -----------------------------------------------------------------------------------------------
# running it

def serve(server, host, port, ready=None):
    """Run the engine's thread and the HTTP server until SIGTERM/SIGINT (or ready's server.should_exit)."""
    import uvicorn
    app = build_app(server)
    sys.setswitchinterval(0.0005)  # the engine's thread gets the interpreter back soon after each torch op
    thread = threading.Thread(target=server.engine.run, name="engine", daemon=True)
    thread.start()
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=5,
                            timeout_keep_alive=30)  # idle connections stay open longer than most clients' pauses
    http = uvicorn.Server(config)
    if ready is not None:
        ready(http)
    try:
        http.run()  # on SIGTERM uvicorn lets requests finish for 5 s, then re-raises the signal: the process ends
    finally:
        server.engine.stop()  # stopped from a test or by Ctrl-C: what is still decoding is cancelled
        thread.join(timeout=10)


def start_in_thread(server, host="127.0.0.1"):
    """serve() on a thread of its own, on a free port: (base URL, a function that stops it). For tests
    and the benchmark."""
    import socket
    with socket.socket() as s:
        s.bind((host, 0))
        port = s.getsockname()[1]
    box = {}
    thread = threading.Thread(target=serve, args=(server, host, port, lambda http: box.setdefault("http", http)),
                              daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not (box.get("http") and box["http"].started):
        if time.time() > deadline or not thread.is_alive():
            raise RuntimeError("the server did not start")
        time.sleep(0.02)

    def stop():
        box["http"].should_exit = True
        thread.join(timeout=20)
    return f"http://{host}:{port}", stop


BENCH_CLIENTS = """
import http.client, json, sys, time
from concurrent.futures import ThreadPoolExecutor
host, port, clients, per_client, body = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
def one(_):
    conn = http.client.HTTPConnection(host, port, timeout=600)
    conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
    lines = conn.getresponse().read().decode().splitlines()
    conn.close()
    return next(json.loads(x[6:])["usage"]["completion_tokens"] for x in lines if '"usage"' in x)
t0 = time.perf_counter()
with ThreadPoolExecutor(clients) as pool:
    tokens = sum(pool.map(one, range(clients * per_client)))
print(tokens, time.perf_counter() - t0)
"""


def bench(cfg, rt):
    """Aggregate tokens/s of 1, 4 and 8 concurrent streaming clients on a random 6x384 block-256
    model (65-character vocabulary), through HTTP on the loopback; the clients run in a process of
    their own, as clients do."""
    import subprocess
    from model import GPT, GPTConfig
    from tokenizer import CharTokenizer
    torch.manual_seed(0)
    tok = CharTokenizer("".join(chr(c) for c in range(32, 97)))
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, n_layer=6, n_head=6, n_embd=384, block_size=256,
                          dropout=0.0)).to(rt.device)
    server = Server({**cfg, "max_batch": 8}, {}, model, tok)
    base, stop = start_in_thread(server)
    host, port = base[len("http://"):].split(":")
    body = json.dumps({"prompt": "ROMEO: " * 4, "max_tokens": 96, "temperature": 1.0, "stream": True})

    def run(clients, per_client):  # (completion tokens, seconds)
        out = subprocess.run([sys.executable, "-c", BENCH_CLIENTS, host, port, str(clients), str(per_client), body],
                             capture_output=True, text=True, check=True).stdout.split()
        return int(out[0]), float(out[1])
    print(f"on {rt.device}, {torch.get_num_threads()} threads; 6x384 block 256, 96 new tokens per request, "
          f"3 requests per client")
    try:
        run(1, 1)  # warm-up
        one = None
        for clients in (1, 4, 8):
            tokens, seconds = run(clients, 3)
            rate = tokens / seconds
            one = one or rate
            print(f"{clients} client(s): {rate:,.1f} tokens/s ({rate / one:.2f}x one)", flush=True)
    finally:
        stop()


def check_settings(cfg):
    for key, low in (("port", 0), ("max_tokens", 1), ("max_n", 1), ("max_batch", 1), ("max_queue", 0)):
        if cfg[key] < low:
            raise UserError(f"{key} must be >= {low}, got {cfg[key]}")
    if cfg["max_n"] > cfg["max_batch"] + cfg["max_queue"]:  # such a request could never be taken
        raise UserError(f"max_n ({cfg['max_n']}) must be at most max_batch + max_queue "
                        f"({cfg['max_batch'] + cfg['max_queue']})")
    import importlib.util
    if not all(importlib.util.find_spec(m) for m in ("fastapi", "uvicorn")):
        raise UserError("serve.py needs FastAPI and uvicorn: pip install fastapi uvicorn")


def main(argv):
    argv = list(argv)
    if argv and not argv[0].startswith("-") and not argv[0].endswith(".py"):  # serve.py CHECKPOINT-OR-OUT_DIR
        argv[0] = f"--init_from={argv[0]}"
    cfg, _ = parse_args(argv, [ServeConfig], "serve.py", description(__doc__))
    check_settings(cfg)
    rt = runtime.local(cfg["device"], cfg["dtype"])
    if cfg["bench"]:
        return bench(cfg, rt)
    from hf import load_for_inference
    ckpt, model, tokenizer = load_for_inference(cfg["init_from"], cfg["out_dir"], rt.device, "serve.py")
    if model.config.n_classes:
        raise UserError("this checkpoint is a classifier; serve.py serves language models (sample.py labels text)")
    if rt.dtype != "float32":
        model.to(getattr(torch, rt.dtype))
    from quantize import prepare
    note = prepare(model, cfg["quantize"])
    if note:
        print(note, flush=True)
    server = Server(cfg, ckpt, model, tokenizer)
    where = f"http://{cfg['host']}:{cfg['port']}"
    print(f"serving {server.model_name} ({'instruction template' if server.instruct else 'plain text'}) at "
          f"{where}/ (chat page) and {where}/v1 (OpenAI API){'; API key required' if server.api_key else ''}",
          flush=True)
    serve(server, cfg["host"], cfg["port"])


if __name__ == "__main__":
    sys.exit(run_cli(main))
