"""
Continuous batching: many requests decoded as one batch on the KV cache, each joining at the step
after it arrives and leaving when it ends. Token ids only; serve.py holds the tokenizer.

Design choices:
- One thread owns the model and the cache (Engine.run); requests reach it through a queue and their
  tokens leave through each request's callbacks, so no two requests ever race on the model.
- New requests are prefilled together (left-padded), then their cache joins the running one
  (KVCache.join: both right-aligned to the longer, the padding masked), so rows of any length share
  each step's forward.
- Each row samples with its own settings and its own random generator (its seed) from its own
  row of logits: a request decodes the same alone or in a batch (tests/test_engine.py).
- A row ends at a stop token, at max_new_tokens, when its callback says so (a stop string), when
  it is cancelled (its client went away), or when it fills the model's context (block_size).
- The queue is bounded: submit() refuses a request once max_batch are decoding and max_queue wait.
- With utf8 (a decoding.Utf8Mask, for byte-level tokenizers) each row keeps its UTF-8 state and never
  samples a token that would break it.
"""
import queue
import threading
import traceback
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from decoding import KVCache, check_sampling, choose_next, layer_windows, left_pad


@dataclass(eq=False)  # compared and hashed by identity: the engine keeps a set of them
class Request:
    """One sequence to decode. on_token(token, logprob, top) sees each new token (top: the
    top_logprobs most likely [(id, logprob)]) and returns True to end the row there; on_end(reason)
    is called exactly once, reason "stop", "length", "cancelled" or "error". Set cancelled from any
    thread."""
    prompt: list
    max_new_tokens: int
    temperature: float = 1.0
    top_k: Optional[int] = None
    top_p: Optional[float] = None
    seed: Optional[int] = None
    stop_tokens: tuple = ()
    top_logprobs: int = 0
    on_token: Callable = lambda token, logprob, top: False
    on_end: Callable = lambda reason: None
    cancelled: bool = False
    generated: int = field(default=0, init=False)
    ended: bool = field(default=False, init=False)


class Engine:
    """The decoding loop of a server: submit() from any thread, run() on one thread of its own."""

    def __init__(self, model, max_batch=8, max_queue=64, utf8=None):
        self.model, self.utf8 = model.eval(), utf8
        self.block_size = model.config.block_size
        self.device = next(model.parameters()).device
        self.max_batch, self.max_queue = max_batch, max_queue
        self.incoming = queue.Queue()
        self.lock = threading.Lock()
        self.pending = set()  # submitted and not yet ended
        self.rows, self.cache, self.logits = [], None, None  # the running batch
        self.stopping = threading.Event()

    # -- any thread ----------------------------------------------------------------------------

    def submit(self, request):
        """Queue a request; False (and nothing queued) when the engine is full."""
        check_sampling(request.temperature, request.top_k, request.top_p)
        if not 0 < len(request.prompt) <= self.block_size:
            raise ValueError(f"a prompt needs 1 to {self.block_size} tokens, got {len(request.prompt)}")
        with self.lock:  # a cancelled request ends at the next step: it holds no place
            if sum(not r.cancelled for r in self.pending) >= self.max_batch + self.max_queue:
                return False
            self.pending.add(request)
        self.incoming.put(request)
        return True

    @property
    def outstanding(self):
        """Requests submitted and not yet ended."""
        return len(self.pending)

    def stop(self):
        self.stopping.set()

    # -- the engine's own thread ---------------------------------------------------------------

    def run(self):
        """Decode until stop(): admit waiting requests, step the batch; then cancel what is left."""
        while not self.stopping.is_set():
            self.admit(wait=not self.rows)
            if self.rows:
                try:
                    self.step()
                except Exception:  # a failed forward ends its rows, never the server
                    traceback.print_exc()
                    for r in self.rows:
                        self.end(r, "error")
                    self.rows, self.cache, self.logits = [], None, None
        for r in self.rows:
            self.end(r, "cancelled")
        while not self.incoming.empty():
            self.end(self.incoming.get_nowait(), "cancelled")

    def admit(self, wait):
        """Take the waiting requests (up to max_batch rows in all), prefill them together, join them to the batch."""
        new = []
        while len(self.rows) + len(new) < self.max_batch:
            try:
                r = self.incoming.get(timeout=0.05) if wait and not new else self.incoming.get_nowait()
            except queue.Empty:
                break
            if r.cancelled:
                self.end(r, "cancelled")
                continue
            new.append(r)
        if not new:
            return
        try:
            self.join(new)
        except Exception:  # a failed prefill ends the new requests alone
            traceback.print_exc()
            for r in new:
                self.end(r, "error")

    @torch.no_grad()
    def join(self, new):
        """Prefill new requests in one left-padded batch and add their rows to the running one."""
        for r in new:
            r.generator = None if r.seed is None else torch.Generator(device=self.device).manual_seed(r.seed)
            r.utf8_state = 0 if self.utf8 is None else int(self.utf8.states_after([r.prompt])[0])
        idx, pad = left_pad([r.prompt for r in new], self.device)
        cache = KVCache(self.model.config.n_layer, self.block_size, pad, layer_windows(self.model.config))
        logits, _ = self.model(idx, cache=cache)
        logits = logits[:, -1, :].float()  # (N, V)
        if not self.rows:
            self.cache, self.logits = cache, logits
        else:
            self.cache.join(cache)
            self.logits = torch.cat((self.logits, logits))
        self.rows += new

    def choose(self):
        """Each row's next token. Rows with the same settings and no seed of their own are sampled in
        one call; a seeded row alone, from its own generator."""
        groups = {}
        for b, r in enumerate(self.rows):
            key = (r.temperature, r.top_k, r.top_p) if r.generator is None else b
            groups.setdefault(key, []).append(b)
        tokens = [0] * len(self.rows)
        allowed = self.logits
        if self.utf8 is not None:
            states = torch.tensor([r.utf8_state for r in self.rows], device=self.device)
            allowed = self.utf8.apply(self.logits, states)
        for rows in groups.values():
            r = self.rows[rows[0]]
            logits = allowed if len(rows) == len(self.rows) else allowed[rows]
            for b, token in zip(rows, choose_next(logits, r.temperature, r.top_k, r.top_p, r.generator).tolist()):
                tokens[b] = token
        if self.utf8 is not None:
            for r, token in zip(self.rows, tokens):
                r.utf8_state = self.utf8.next_state(r.utf8_state, token)
        return tokens

    @torch.no_grad()
    def step(self):
        """Choose each row's next token, hand it over, drop the rows that ended, run the rest one position."""
        logp = F.log_softmax(self.logits, dim=-1)  # (B, V)
        chosen = self.choose()
        chosen_logp = logp.gather(1, torch.tensor(chosen, device=self.device)[:, None])[:, 0].tolist()
        keep, tokens = [], []
        for b, (r, token) in enumerate(zip(self.rows, chosen)):
            if r.cancelled:
                self.end(r, "cancelled")
                continue
            if token in r.stop_tokens:
                self.end(r, "stop")
                continue
            top = []
            if r.top_logprobs:
                values, ids = logp[b].topk(r.top_logprobs)
                top = list(zip(ids.tolist(), values.tolist()))
            r.generated += 1
            try:
                said_stop = r.on_token(token, chosen_logp[b], top)
            except Exception:  # a callback's failure ends its own row
                traceback.print_exc()
                self.end(r, "error")
                continue
            if said_stop:
                self.end(r, "stop")
            elif r.generated >= r.max_new_tokens or len(r.prompt) + r.generated >= self.block_size:
                self.end(r, "length")
            else:
                keep.append(b)
                tokens.append(token)
        if not keep:
            self.rows, self.cache, self.logits = [], None, None
            return
        if len(keep) < len(self.rows):
            self.cache.reorder(torch.tensor(keep, device=self.device))
            self.rows = [self.rows[b] for b in keep]
        if self.cache.length + 1 > self.block_size:  # no row is that long (they end at block_size): drop shared padding
            self.cache.compact()
        x = torch.tensor(tokens, dtype=torch.long, device=self.device)[:, None]  # (B, 1)
        logits, _ = self.model(x, cache=self.cache)
        self.logits = logits[:, -1, :].float()

    def end(self, r, reason):
        if r.ended:
            return
        r.ended = True
        with self.lock:
            self.pending.discard(r)
        try:
            r.on_end(reason)
        except Exception:  # a callback's failure is its request's, not the engine's
            pass
