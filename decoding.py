"""
Decoding: turning a model's next-token logits into text, fast. Every generation in the repository
goes through here (sample.py, the instruction helpers of tasks.py, train.py's --bench); the one
exception is GPT.generate in model.py, the plain reference that re-runs the whole context and
against which this file is tested.

Design choices:
- Token ids only: no tokenizer is imported. Where a tokenizer matters, the caller says so in ids
  (stop_tokens) or in a callback that sees each new token (on_token: streaming, stop strings).
- KVCache keeps each layer's keys and values, so a new token costs one position's work instead of
  a forward over the whole context. Grouped-query models store only their kv heads; a sliding-window
  layer keeps only its last W - 1 keys, so its memory stays bounded however long the text.
- Rows of a batch may be left-padded to a common length: each row's positions count from its first
  real token and padding is masked out as keys, so a row decodes the same in a batch as alone.
- Decoder owns the cache and the window: past block_size a row slides to its last `keep` tokens and
  the cache is refilled (what learned position tables need; one prefill per block_size - keep tokens).
- Sampling strategies are small functions on logits (B, V): temperature, top-k, top-p, CTRL's
  repetition penalty, greedy at temperature 0. Beam search ranks by length-normalised log-probability.
"""
import torch
import torch.nn.functional as F


# ----------------------------------------------------------------------------------------------
# KV cache: keys and values of the tokens already seen

def layer_windows(config):
    """Each layer's attention window (0: it sees every key), what a KVCache for the model keeps."""
    return [config.attn_window if config.windowed(i) else 0 for i in range(config.n_layer)]


class KVCache:
    """Per-layer key/value buffers (B, n_kv_head, max_len, head_dim), filled left to right; a layer
    with a window W > 0 holds only the last W - 1 slots (B, n_kv_head, <= W - 1, head_dim), all a
    query's window needs besides itself. Row b's first pad[b] slots are padding: masked out as keys,
    and its positions count from its first real token, so a padded row computes what it would
    alone. The model reads positions(T), attn_mask(T), layer(i) and length, and calls advance(T)
    after a forward; a windowed layer's keys are the last ones of the S slots attn_mask covers."""

    def __init__(self, n_layer, max_len, pad, windows=None):
        self.max_len = max_len
        self.windows = list(windows) if windows else [0] * n_layer
        self.length = 0  # slots filled, the same in every row
        self.pad = pad  # (B,) long: leading padding slots of each row
        self.padded = bool(pad.any())  # checked once, not at every step (a device sync on GPUs)
        self.k = [None] * n_layer  # allocated on first use, in the dtype the model computes in
        self.v = [None] * n_layer

    @classmethod
    def for_model(cls, model, batch_size=1, pad=None):
        device = next(model.parameters()).device
        if pad is None:
            pad = torch.zeros(batch_size, dtype=torch.long, device=device)
        return cls(model.config.n_layer, model.config.block_size, pad, layer_windows(model.config))

    def reserve(self, T, block_size):
        """ValueError unless T more tokens fit in block_size."""
        if self.length + T > block_size:
            raise ValueError(f"{self.length} cached + {T} new tokens is longer than block_size "
                             f"{block_size}; start a new cache")

    def positions(self, T):
        """Positions of the next T tokens, (B, T); padding slots get position 0."""
        slots = torch.arange(self.length, self.length + T, device=self.pad.device)  # (T,)
        return (slots[None, :] - self.pad[:, None]).clamp(min=0)

    def attn_mask(self, T):
        """(B, 1, T, S) bool, True where the next T queries may look; None where causal is enough."""
        if not self.padded and (T == 1 or self.length == 0):
            return None
        S = self.length + T
        q_slot = torch.arange(self.length, S, device=self.pad.device)[:, None]  # (T, 1)
        k_slot = torch.arange(S, device=self.pad.device)[None, :]  # (1, S)
        real = k_slot >= self.pad[:, None, None]  # (B, 1, S)
        # a padding query looks at itself only, so its softmax has a term and stays finite
        return ((k_slot <= q_slot) & real | (k_slot == q_slot))[:, None]  # (B, 1, T, S)

    def layer(self, i):
        return _LayerCache(self, i)

    def update(self, i, k, v):
        """Write layer i's k, v (B, Hkv, T, d) after the filled slots; all of them, (B, Hkv, S, d)."""
        end = self.length + k.size(2)
        if end > self.max_len:
            raise ValueError(f"KV cache overflow: {end} tokens > max_len {self.max_len}")
        if self.windows[i]:  # the held slots, then these T; keep the last W - 1 of them
            if self.k[i] is not None:
                k, v = torch.cat((self.k[i], k), dim=2), torch.cat((self.v[i], v), dim=2)
            first = max(0, k.size(2) - (self.windows[i] - 1))
            self.k[i], self.v[i] = k[:, :, first:], v[:, :, first:]
            return k, v
        if self.k[i] is None:
            shape = (k.size(0), k.size(1), self.max_len, k.size(3))
            self.k[i] = torch.empty(shape, dtype=k.dtype, device=k.device)
            self.v[i] = torch.empty(shape, dtype=v.dtype, device=v.device)
        self.k[i][:, :, self.length:end] = k
        self.v[i][:, :, self.length:end] = v
        return self.k[i][:, :, :end], self.v[i][:, :, :end]

    def advance(self, T):
        self.length += T

    def truncate(self, length):
        """Forget every slot from length on (speculative decoding's rejected guesses). A windowed layer
        has dropped slots it would need again, so such a cache cannot go back."""
        if any(self.windows):
            raise ValueError("a sliding-window layer's cache keeps only its last slots and cannot take tokens back")
        self.length = min(self.length, length)

    def reorder(self, index):
        """Keep rows index (N,) in that order, e.g. the parents of the surviving beams."""
        self.pad = self.pad.index_select(0, index)
        self.k = [None if k is None else k.index_select(0, index) for k in self.k]
        self.v = [None if v is None else v.index_select(0, index) for v in self.v]

    def join(self, other):
        """Add the rows of other (a cache of the same model, filled) below these, both right-aligned to
        the longer: the new padding is masked like any other, so every row computes what it did
        (continuous batching: requests prefilled together join the running batch)."""
        n = max(self.length, other.length)
        if n > self.max_len:
            raise ValueError(f"KV cache overflow: {n} tokens > max_len {self.max_len}")
        for kv, theirs in ((self.k, other.k), (self.v, other.v)):
            for i, (a, b) in enumerate(zip(kv, theirs)):
                if self.windows[i]:  # the last held slots of each, right-aligned; the rest is padding
                    width = min(n, self.windows[i] - 1)
                    joined = a.new_zeros((a.size(0) + b.size(0), a.size(1), width, a.size(3)))
                    joined[:a.size(0), :, width - a.size(2):] = a
                    joined[a.size(0):, :, width - b.size(2):] = b
                else:
                    joined = a.new_zeros((a.size(0) + b.size(0), a.size(1), self.max_len, a.size(3)))
                    joined[:a.size(0), :, n - self.length:n] = a[:, :, :self.length]
                    joined[a.size(0):, :, n - other.length:n] = b[:, :, :other.length]
                kv[i] = joined
        self.pad = torch.cat((self.pad + n - self.length, other.pad + n - other.length))
        self.length, self.padded = n, bool(self.pad.any())

    def compact(self):
        """Drop the leading slots that are padding in every row (room for more steps)."""
        drop = int(self.pad.min())
        if drop:
            for kv in (self.k, self.v):
                for i, t in enumerate(kv):
                    if self.windows[i]:  # holds the last slots already; only ones now before slot 0 go
                        kv[i] = t[:, :, max(0, t.size(2) - (self.length - drop)):]
                    else:
                        t[:, :, :self.length - drop] = t[:, :, drop:self.length].clone()
            self.pad, self.length = self.pad - drop, self.length - drop
            self.padded = bool(self.pad.any())


class StaticKVCache:
    """A KV cache of fixed shapes that torch.compile can capture: every layer's buffers are
    (B, n_kv_head, max_len, head_dim) from the start, the filled length is a tensor (pos, 0-dim) that
    advances in place, and attention covers all max_len slots under a mask of the filled ones. A step
    therefore has the same shapes and the same Python state whatever its position: one graph for every
    decoding step, no recompilation (and on CUDA, one CUDA graph). The caller counts the slots it has
    filled (a Python count would be a guard of the graph): StaticDecoder refills before max_len.
    Sliding windows and ALiBi need distances that this mask does not carry: check_static refuses them."""

    def __init__(self, n_layer, max_len, pad):
        self.max_len = max_len
        self.pad = _static(pad.clone())  # (B,) long, changed in place by reset
        self.pos = _static(torch.zeros((), dtype=torch.long, device=pad.device))  # slots filled, the same in every row
        self.slots = _static(torch.arange(max_len, device=pad.device))  # (S,)
        self.k = [None] * n_layer  # allocated by the first (eager) prefill, in the model's dtype
        self.v = [None] * n_layer

    @classmethod
    def for_model(cls, model, pad):
        check_static(model.config)
        return cls(model.config.n_layer, model.config.block_size, pad)

    def reset(self, pad):
        """Empty again, rows left-padded by pad (B,): the buffers stay (their addresses too)."""
        self.pad.copy_(pad)
        self.pos.zero_()

    def reserve(self, T, block_size):
        pass  # no Python count to check inside a graph: StaticDecoder keeps it outside

    def positions(self, T):
        """(B, T): padding slots get position 0, as in KVCache."""
        slots = self.pos + torch.arange(T, device=self.pad.device)  # (T,)
        return (slots[None, :] - self.pad[:, None]).clamp(min=0)

    def attn_mask(self, T):
        """(B, 1, T, max_len) bool: filled real slots up to each query, and the query itself."""
        q_slot = (self.pos + torch.arange(T, device=self.pad.device))[:, None]  # (T, 1)
        k_slot = self.slots[None, :]  # (1, S)
        real = k_slot >= self.pad[:, None, None]  # (B, 1, S)
        return ((k_slot <= q_slot) & real | (k_slot == q_slot))[:, None]  # (B, 1, T, S)

    def layer(self, i):
        return _LayerCache(self, i)

    def update(self, i, k, v):
        """Write layer i's k, v (B, Hkv, T, d) at slots pos..pos+T; all max_len slots, (B, Hkv, S, d)."""
        if self.k[i] is None:
            shape = (k.size(0), k.size(1), self.max_len, k.size(3))
            self.k[i] = _static(torch.zeros(shape, dtype=k.dtype, device=k.device))
            self.v[i] = _static(torch.zeros(shape, dtype=v.dtype, device=v.device))
        slots = self.pos + torch.arange(k.size(2), device=k.device)  # (T,)
        self.k[i].index_copy_(2, slots, k)
        self.v[i].index_copy_(2, slots, v)
        return self.k[i], self.v[i]

    def advance(self, T):
        self.pos.add_(T)


def _static(t):
    """t, its address marked as fixed for torch.compile: a CUDA graph reads and writes it in place
    instead of copying it in at every replay (the cache's tensors are inputs, not module buffers).
    guard=False: a new cache (another call) is no reason to compile again."""
    torch._dynamo.mark_static_address(t, guard=False)
    return t


def check_static(config):
    """ValueError naming what the static cache cannot run."""
    if not config.causal:
        raise ValueError("an encoder (causal=False) has no KV cache")
    if config.positions == "alibi":
        raise ValueError("the static KV cache does not run ALiBi (its biases count distances from the last "
                         "slot); decode with compile=False")
    if config.attn_window:
        raise ValueError("the static KV cache does not run sliding-window layers; decode with compile=False")


class _LayerCache:
    """One layer's view of a KVCache: what CausalSelfAttention needs."""

    def __init__(self, cache, i):
        self.cache, self.i = cache, i

    def update(self, k, v):
        return self.cache.update(self.i, k, v)


def weight_bytes_per_token(model):
    """Bytes of weights one decoding step of one sequence reads: every matrix, norm and bias once, and
    of a table looked up by token or position (an embedding not tied to the head, the rotary tables)
    the one row it reads. Times tokens/s over the memory's bandwidth: decoding's model-bandwidth
    utilisation (MBU)."""
    def own(m):
        return list(m.parameters(recurse=False)) + list(m.buffers(recurse=False))

    def is_table(m):
        return m is model or isinstance(m, torch.nn.Embedding) or type(m).__name__ == "Int8Embedding"

    whole = {t.data_ptr(): t.numel() * t.element_size() for m in model.modules() if not is_table(m) for t in own(m)}
    rows = {t.data_ptr(): t[0].numel() * t.element_size() for m in model.modules() if is_table(m)
            for t in own(m) if t.dim() >= 1}
    return sum(whole.values()) + sum(b for ptr, b in rows.items() if ptr not in whole)


# ----------------------------------------------------------------------------------------------
# Strategies: small functions on logits (B, V)

def check_sampling(temperature=1.0, top_k=None, top_p=None, repetition_penalty=1.0):
    """ValueError for settings that select no token or are meaningless."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 is greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1 (None keeps all tokens), got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1] (None or 1 keeps all tokens), got {top_p}")
    if repetition_penalty <= 0:
        raise ValueError(f"repetition_penalty must be > 0 (1 is off), got {repetition_penalty}")


def penalize_repeats(logits, seen, penalty):
    """CTRL's repetition penalty: logits (B, V) of tokens seen (B, V bool) are divided by penalty
    when positive and multiplied when negative, so penalty > 1 always lowers them."""
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalized, logits)


def top_k_filter(logits, k):
    """-inf for all but the k largest logits of each row (ties at the k-th are kept)."""
    if k >= logits.size(-1):
        return logits
    kth = torch.topk(logits, k, dim=-1).values[:, -1:]  # (B, 1)
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits, p):
    """-inf outside the nucleus: the most likely tokens, in order, until their probability
    reaches p. The most likely token always stays, so p -> 0 is greedy."""
    if p >= 1:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)  # (B, V)
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # probability of the tokens ranked above
    drop = (mass_before >= p).scatter(-1, order, mass_before >= p)  # back to vocabulary order
    return logits.masked_fill(drop, float("-inf"))


def choose_next(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """The next token of each row, (B,), from logits (B, V): argmax at temperature 0, else a
    sample from the tempered distribution restricted by top_k and top_p."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = sampling_probs(logits, temperature, top_k, top_p)
    return torch.multinomial(probs, num_samples=1, generator=generator)[:, 0]


def sampling_probs(logits, temperature=1.0, top_k=None, top_p=None):
    """(B, V) probabilities that choose_next samples from (for temperature > 0)."""
    logits = logits.float() / temperature
    if top_k is not None:
        logits = top_k_filter(logits, top_k)
    if top_p is not None:
        logits = top_p_filter(logits, top_p)
    return F.softmax(logits, dim=-1)


class Utf8Mask:
    """Keeps a byte-level model's output valid UTF-8: tables from the tokenizer (tokenizer.utf8_tables:
    for each of a handful of decoder states, which tokens may come next and the state after them)
    and each row's state; one masked fill per step."""

    def __init__(self, tables, device=None):
        self.tables = tables  # as lists, for stepping through prompts without a device sync per token
        allowed, after = tables
        self.allowed = torch.tensor(allowed, dtype=torch.bool, device=device)  # (S, V)
        self.after = torch.tensor(after, dtype=torch.long, device=device)  # (S, V)

    def states_after(self, prompts):
        """(B,) the state at the end of each prompt (token ids); bytes that break UTF-8 reset it to 0."""
        allowed, after = self.tables
        states = []
        for ids in prompts:
            s = 0
            for t in ids:
                s = after[s][t] if t < len(allowed[s]) and allowed[s][t] else 0
            states.append(s)
        return torch.tensor(states, dtype=torch.long, device=self.allowed.device)

    def apply(self, logits, states):
        """logits (B, V) with -inf where a token cannot follow its row's state."""
        return logits.masked_fill(~self.allowed[states, :logits.size(-1)], float("-inf"))

    def advance(self, states, tokens):
        return self.after[states, tokens]

    def next_state(self, state, token):
        """One row's state (an int) after token, from the tables' lists: no device sync."""
        return self.tables[1][state][token]


# ----------------------------------------------------------------------------------------------
# Feeding a model token by token

def left_pad(prompts, device=None):
    """Prompts of different lengths as one batch: idx (B, N) right-aligned, with pad (B,) the
    number of leading filler slots of each row (filled with token 0, never attended to)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    n = max(len(p) for p in prompts)
    idx = torch.tensor([[0] * (n - len(p)) + list(p) for p in prompts], dtype=torch.long, device=device)
    pad = torch.tensor([n - len(p) for p in prompts], dtype=torch.long, device=device)
    return idx, pad


class Decoder:
    """Next-token logits of a growing batch of sequences: push(tokens) appends one token per
    row, .logits (B, V) are the predictions after the last one.

    With the cache, the prompt is prefilled once and each push runs the model on one token.
    Without it (use_cache=False) each push re-runs the whole window: slower, same numbers.
    The window: each row sees at most block_size of its tokens. When a push would take a row
    past that, its window slides to its last `keep` tokens (block_size // 2 by default) and the
    cache is refilled, positions counted from 0 again: re-encoding is what learned position
    tables need (absolute positions shift), and it costs one prefill per block_size - keep
    tokens. Rows slide on their own schedule (each is left-padded to the longest window at a
    refill), so a row decodes the same in a batch as alone. keep = block_size - 1 reproduces
    a window cropped at every step, as nanoGPT's generate does."""

    def __init__(self, model, idx, pad=None, use_cache=True, keep=None):
        self.model, self.use_cache = model, use_cache
        self.block_size = model.config.block_size
        self.keep = keep or self.block_size // 2
        if not 0 < self.keep < self.block_size:
            raise ValueError(f"keep must be in [1, block_size), got {self.keep}")
        self.seq = idx  # (B, N): every token so far, left-padded
        pads = [0] * idx.size(0) if pad is None else pad.tolist()
        # first slot of seq in each row's window; a Python list, so checks need no device sync
        self.start = [max(p, idx.size(1) - self.block_size) for p in pads]
        self.logits = self._refill()

    def _refill(self):
        """A fresh cache over the windows, left-padded to the longest; the logits after them."""
        first = min(self.start)
        window_pad = torch.tensor([s - first for s in self.start], dtype=torch.long, device=self.seq.device)
        self.cache = self._empty_cache(window_pad)
        logits, _ = self.model(self.seq[:, first:], cache=self.cache)
        return logits[:, -1, :]  # (B, V)

    def _empty_cache(self, pad):
        return KVCache.for_model(self.model, pad=pad)

    def _next_logits(self, tokens):
        """The logits after tokens (B,), one more position on the cache."""
        logits, _ = self.model(tokens[:, None], cache=self.cache)
        return logits[:, -1, :]

    def push(self, tokens):
        """Append tokens (B,) and compute the logits that follow them."""
        self.seq = torch.cat((self.seq, tokens[:, None]), dim=1)
        n = self.seq.size(1)
        full = [row for row, s in enumerate(self.start) if n - s > self.block_size]
        for row in full:
            self.start[row] = n - self.keep
        if full or not self.use_cache:
            self.logits = self._refill()
        else:
            self.logits = self._next_logits(tokens)

    def reorder(self, index):
        """Keep rows index (N,) in that order (beam search)."""
        self.seq = self.seq.index_select(0, index)
        self.start = [self.start[i] for i in index.tolist()]
        self.logits = self.logits.index_select(0, index)
        self.cache.reorder(index)


def _step(model, idx, cache):
    """One decoding step on a static cache: idx (B, 1) -> the next logits (B, V)."""
    logits, _ = model(idx, cache=cache)
    return logits[:, -1, :]


class CompiledStep:
    """_step under torch.compile: on CUDA with mode reduce-overhead (CUDA graphs replay the whole
    step, no kernel launches from Python), elsewhere the default mode (fused kernels, less Python).
    It keeps one StaticKVCache per model and batch size and hands it out again (reset), so that later
    calls run on the same buffers: a CUDA graph recorded once stays valid."""

    def __init__(self, device_type, backend="inductor"):
        mode = "reduce-overhead" if device_type == "cuda" and backend == "inductor" else None
        self.fn = torch.compile(_step, backend=backend, mode=mode, fullgraph=True)
        self.caches = {}  # (id(model), batch size) -> (model, StaticKVCache)

    def __call__(self, model, idx, cache):
        return self.fn(model, idx, cache)

    def cache_for(self, model, pad):
        key = (id(model), pad.numel())
        if key not in self.caches or self.caches[key][0] is not model:
            self.caches[key] = (model, StaticKVCache.for_model(model, pad))
        return self.caches[key][1]


def compiled_step(device_type, backend="inductor"):
    return CompiledStep(device_type, backend)


class StaticDecoder(Decoder):
    """Decoder on a StaticKVCache, each push one call of step (compiled_step: the same graph at every
    position). Prefills (the prompt, a slide of the window) run eagerly, their lengths being whatever
    they are; the window slides as Decoder's does, so the tokens are Decoder's."""

    def __init__(self, model, idx, pad=None, keep=None, step=None):
        self.step = step or _step
        self.static = None
        super().__init__(model, idx, pad, True, keep)

    def _empty_cache(self, pad):
        """The one static cache of this decoder (or of its step, which keeps one per model and batch
        size), emptied: a refill reuses its buffers."""
        if self.static is None:
            make = getattr(self.step, "cache_for", None)
            self.static = make(self.model, pad) if make else StaticKVCache.for_model(self.model, pad)
        self.static.reset(pad)
        return self.static

    def _next_logits(self, tokens):
        return self.step(self.model, tokens[:, None], self.cache)

    def reorder(self, index):
        raise ValueError("the static cache decodes a fixed batch; beam search runs on KVCache (compile=False)")


# ----------------------------------------------------------------------------------------------
# The loops: sampling steps, batches of prompts with stop tokens, beam search

@torch.no_grad()
def decode_steps(model, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, repetition_penalty=1.0,
                 pad=None, generator=None, use_cache=True, utf8=None, states=None, static=None):
    """Yields (tokens (B,), logits (B, V)) for each of max_new_tokens steps: the chosen tokens
    and the model's raw logits they were chosen from. idx (B, N) is left-padded by pad (B,).
    static: decode on a StaticKVCache, each step a call of this function (compiled_step, or _step).
    With utf8 (a Utf8Mask) and states (B,), tokens that would break UTF-8 are never chosen; the
    states advance in place. The model runs only when the next step is asked for, so a caller that
    stops early costs nothing more."""
    check_sampling(temperature, top_k, top_p, repetition_penalty)
    if max_new_tokens < 1:
        return
    decoder = Decoder(model, idx, pad, use_cache) if static is None else StaticDecoder(model, idx, pad, step=static)
    seen = None
    if repetition_penalty != 1.0:  # which tokens each row holds, padding excluded: (B, V)
        seen = torch.zeros(idx.size(0), model.config.vocab_size, dtype=torch.bool, device=idx.device)
        pad = torch.zeros(idx.size(0), dtype=torch.long, device=idx.device) if pad is None else pad
        real = torch.arange(idx.size(1), device=idx.device)[None, :] >= pad[:, None]  # (B, N)
        seen.scatter_(1, idx, real)
    for step in range(max_new_tokens):
        logits = decoder.logits.float()
        scored = logits if seen is None else penalize_repeats(logits, seen, repetition_penalty)
        if utf8 is not None:
            scored = utf8.apply(scored, states)
        tokens = choose_next(scored, temperature, top_k, top_p, generator)  # (B,)
        if utf8 is not None:
            states.copy_(utf8.advance(states, tokens))
        yield tokens, logits
        if seen is not None:
            seen[torch.arange(tokens.size(0), device=tokens.device), tokens] = True
        if step + 1 < max_new_tokens:
            decoder.push(tokens)


@torch.no_grad()
def generate_batch(model, prompts, max_new_tokens, temperature=1.0, top_k=None, top_p=None,
                   repetition_penalty=1.0, stop_tokens=(), on_token=None, generator=None, use_cache=True,
                   utf8=None, static=None):
    """Several prompts (lists of token ids, any lengths) decoded together in one left-padded
    batch. Returns the new tokens of each prompt, a list of lists. A row ends before any of
    stop_tokens (not included), or after a token for which on_token(row, token) returns True:
    that callback sees every new token of every unfinished row in order, the hook for
    streaming output and stop strings. For num_samples samples of a prompt, repeat it.
    With utf8 (a Utf8Mask) every row's bytes stay valid UTF-8, and a row cut inside a character
    (by max_new_tokens) loses that character's first bytes. static: see decode_steps."""
    device = next(model.parameters()).device
    stop = set(stop_tokens)
    idx, pad = left_pad(prompts, device)
    out = [[] for _ in prompts]
    whole = [0] * len(prompts)  # tokens of each row that end between characters
    states = None if utf8 is None else utf8.states_after(prompts)
    live = set(range(len(prompts)))
    steps = decode_steps(model, idx, max_new_tokens, temperature, top_k, top_p, repetition_penalty,
                         pad=pad, generator=generator, use_cache=use_cache, utf8=utf8, states=states,
                         static=static)
    for tokens, _ in steps:
        between = None if states is None else (states == 0).tolist()
        for row, token in enumerate(tokens.tolist()):
            if row not in live:
                continue
            if token in stop:
                live.discard(row)
                continue
            out[row].append(token)
            if between is None or between[row]:
                whole[row] = len(out[row])
            if on_token is not None and on_token(row, token):
                live.discard(row)
        if not live:
            break
    return out if utf8 is None else [tokens[:n] for tokens, n in zip(out, whole)]


def normalized_score(logprob, length, length_penalty):
    """Beam ranking: total log-probability over length ** length_penalty (0: the plain total;
    1: the mean per token, so longer hypotheses are not penalised just for being longer)."""
    return logprob / max(length, 1) ** length_penalty


@torch.no_grad()
def beam_search(model, prompt, max_new_tokens, beam_width, length_penalty=1.0, stop_tokens=(), use_cache=True):
    """Keeps the beam_width best partial continuations of prompt (a list of ids) by total
    log-probability, extending each by every token at every step. A candidate ending in one of
    stop_tokens is finished (the stop token counts in its length but is not returned); search ends
    once beam_width hypotheses are finished, or after max_new_tokens, when the live beams compete
    too. Returns [(tokens, total log-probability)], best first by normalized_score."""
    if beam_width < 1:
        raise ValueError(f"beam_width must be >= 1, got {beam_width}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    stop = set(stop_tokens)
    device = next(model.parameters()).device
    decoder = Decoder(model, torch.tensor([list(prompt)], dtype=torch.long, device=device), use_cache=use_cache)
    beams, scores = [[]], torch.zeros(1, device=device)  # live beams' new tokens and log-probs (K,)
    finished = []  # (tokens, total log-prob)
    for step in range(max_new_tokens):
        logprobs = F.log_softmax(decoder.logits.float(), dim=-1)  # (K, V)
        vocab = logprobs.size(-1)
        totals = (scores[:, None] + logprobs).view(-1)  # (K * V,)
        # 2K candidates leave K live ones even if K of them end in a stop token
        top = torch.topk(totals, min(2 * beam_width, totals.numel()))
        parents, tokens, new_beams, new_scores = [], [], [], []
        for total, flat in zip(top.values.tolist(), top.indices.tolist()):
            parent, token = divmod(flat, vocab)
            if token in stop:
                finished.append((beams[parent], total))
                continue
            parents.append(parent)
            tokens.append(token)
            new_beams.append(beams[parent] + [token])
            new_scores.append(total)
            if len(new_beams) == beam_width:
                break
        beams = new_beams
        if len(finished) >= beam_width or step + 1 == max_new_tokens or not beams:
            break
        decoder.reorder(torch.tensor(parents, dtype=torch.long, device=device))
        decoder.push(torch.tensor(tokens, dtype=torch.long, device=device))
        scores = torch.tensor(new_scores, device=device)
    candidates = [(t, s, len(t) + 1) for t, s in finished]  # (tokens, log-prob, length)
    if len(finished) < beam_width:  # the length limit ended the search: live beams count too
        candidates += [(t, s, len(t)) for t, s in zip(beams, new_scores)]
    ranked = sorted(candidates, key=lambda c: normalized_score(c[1], c[2], length_penalty), reverse=True)
    return [(tokens, total) for tokens, total, _ in ranked]


# ----------------------------------------------------------------------------------------------
# Speculative decoding (Leviathan et al. 2023; Chen et al. 2023): a small draft model guesses k
# tokens one by one, the target scores all k in one forward, and a guess is kept with probability
# min(1, p/q); at the first refusal a token is drawn from the leftover max(0, p - q), renormalised.
# The kept tokens are distributed exactly as the target's own samples; greedy keeps a guess when it
# is the target's argmax, so the text is the target's greedy text. Each round costs k draft steps and
# one target forward of k + 1 tokens, and yields between 1 and k + 1 tokens.

def accept_or_resample(p, q, guess, generator=None):
    """One verification step: guess (an int) was drawn from q (V,); returns (kept, token) with the
    token distributed as p (V,) over the draws of guess and of this step's randomness."""
    u = torch.rand((), device=p.device, generator=generator)
    if u * q[guess] <= p[guess]:  # probability min(1, p/q), with no division by a zero q
        return True, guess
    leftover = (p - q).clamp(min=0)
    if leftover.sum() <= 0:  # p == q up to rounding: any refusal was rounding; p itself is the answer
        leftover = p
    token = int(torch.multinomial(leftover / leftover.sum(), 1, generator=generator))
    return token == guess, token  # p's fallback may draw the guess again: then it was kept after all


class _Speculator:
    """One model's side of speculative decoding, batch 1, over its window of the text, seq[start:]
    (Decoder's: at most block_size tokens, sliding to the last `keep` when full): `fed`, the window's
    tokens its cache holds, and `pending`, the committed tokens its next forward feeds first."""

    def __init__(self, model, prompt):
        self.model, self.device = model, next(model.parameters()).device
        self.block_size, self.keep = model.config.block_size, model.config.block_size // 2
        self.start = max(0, len(prompt) - self.block_size)
        self.restart(prompt)

    def restart(self, seq):
        self.cache = KVCache.for_model(self.model)
        self.fed, self.pending = [], list(seq[self.start:])

    def room(self, n):
        """Tokens that may follow a text of n tokens before this window is full."""
        return self.block_size - (n - self.start)

    def forward(self, guesses=()):
        """Logits (T, V) after each of pending + guesses; they all join the cache."""
        tokens = self.pending + list(guesses)
        logits, _ = self.model(torch.tensor([tokens], device=self.device), cache=self.cache)
        self.fed, self.pending = self.fed + tokens, []
        return logits[0].float()

    def grew(self, n):
        """The text is n tokens long now: past a full window, slide as Decoder.push does."""
        if n - self.start > self.block_size:
            self.start = n - self.keep
            self.fed = None  # the cache holds another window: refill

    def rewind(self, seq):
        """Keep the cached tokens that agree with the window of seq, the committed text; the rest of the
        window is pending."""
        if self.fed is None:
            return self.restart(seq)
        window, n = seq[self.start:], 0
        for a, b in zip(self.fed, window):
            if a != b:
                break
            n += 1
        n = min(n, len(window) - 1)  # the next forward feeds at least the last token: its logits come next
        self.cache.truncate(n)
        self.fed, self.pending = self.fed[:n], list(window[n:])


class _Rule:
    """What choose_next does to one row's logits (temperature, top_k, top_p, the UTF-8 mask), for
    speculative decoding, which needs the distribution itself and not only a draw from it."""

    def __init__(self, temperature, top_k, top_p, generator, utf8):
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p
        self.generator, self.utf8 = generator, utf8

    def step(self, s, token):
        """The UTF-8 state after token."""
        return 0 if self.utf8 is None else self.utf8.next_state(s, token)

    def dist(self, logits, s):
        """(V,) logits -> what choose_next draws from: probabilities, or the logits when greedy."""
        if self.utf8 is not None:
            logits = self.utf8.apply(logits[None], torch.tensor([s], device=logits.device))[0]
        if self.temperature == 0:
            return logits
        return sampling_probs(logits[None], self.temperature, self.top_k, self.top_p)[0]

    def draw(self, probs):
        if self.temperature == 0:
            return int(probs.argmax())
        return int(torch.multinomial(probs, 1, generator=self.generator))

    def verify(self, logits, guesses, qs, s):
        """The target's logits (n + 1, V) before each of n guesses (drawn from qs) and after them all:
        (the round's tokens, how many guesses were kept)."""
        new = []
        for i, guess in enumerate(guesses):
            p = self.dist(logits[i], s)
            if self.temperature == 0:
                kept, token = guess == int(p.argmax()), int(p.argmax())
            else:
                kept, token = accept_or_resample(p, qs[i], guess, self.generator)
            new.append(token)
            s = self.step(s, token)
            if not kept:
                return new, i
        # every guess kept: the target's next token comes free with the same forward
        return new + [self.draw(self.dist(logits[len(guesses)], s))], len(guesses)


def check_speculative(target, draft):
    """ValueError for a pair of models that cannot decode together."""
    for name, m in (("target", target), ("draft", draft)):
        if not m.config.causal:
            raise ValueError(f"the {name} is an encoder (causal=False): it cannot generate")
        if any(layer_windows(m.config)):
            raise ValueError(f"the {name} has sliding-window layers, whose cache cannot take rejected guesses back; "
                             f"decode without a draft")
    if draft.config.vocab_size != target.config.vocab_size:
        raise ValueError(f"the draft's vocabulary ({draft.config.vocab_size}) is not the target's "
                         f"({target.config.vocab_size}): a draft must share the target's tokenizer")


@torch.no_grad()
def speculative_generate(target, draft, prompt, max_new_tokens, k=4, temperature=1.0, top_k=None, top_p=None,
                         stop_tokens=(), generator=None, utf8=None, on_token=None):
    """The new tokens of prompt (a list of ids), sampled from target with draft's guesses, k per round,
    and stats {rounds, proposed, accepted}. Output as generate_batch's for one prompt: the same text at
    temperature 0, the same distribution otherwise; it ends before a stop token or after max_new_tokens,
    each model's window sliding as Decoder's does, or after a token for which on_token(token) returns
    True (stop strings). With utf8 (a Utf8Mask) both models' choices keep UTF-8 valid, and a tail cut
    inside a character is dropped."""
    check_speculative(target, draft)
    check_sampling(temperature, top_k, top_p)
    if k < 1:
        raise ValueError(f"k (draft tokens per round) must be >= 1, got {k}")
    if not prompt:
        raise ValueError("the prompt needs at least one token")
    t, d = _Speculator(target, prompt), _Speculator(draft, prompt)
    seq, n_prompt, stop = list(prompt), len(prompt), set(stop_tokens)
    state = 0 if utf8 is None else utf8.states_after([prompt])[0].item()
    whole = 0  # new tokens that end between characters
    stats = dict(rounds=0, proposed=0, accepted=0)

    rule = _Rule(temperature, top_k, top_p, generator, utf8)
    while True:
        room = max_new_tokens - (len(seq) - n_prompt)
        if room <= 0:
            break
        # the round's last token always comes from the target, and every logit the target gives in this
        # round is from one window (so, as Decoder's, the target's text); the draft's window must fit too
        n_guess = min(k, room - 1, t.room(len(seq)), d.room(len(seq)) + 1)
        guesses, qs, s = [], [], state
        for _ in range(n_guess):  # the draft guesses one token at a time
            qs.append(rule.dist(d.forward(guesses[-1:])[-1], s))
            guesses.append(rule.draw(qs[-1]))
            s = rule.step(s, guesses[-1])
        logits = t.forward(guesses)[-(n_guess + 1):]  # (n_guess + 1, V): before each guess, then after all
        new, accepted = rule.verify(logits, guesses, qs, state)
        stats["accepted"] += accepted
        stats["rounds"] += 1
        stats["proposed"] += n_guess
        ended = False
        for token in new:
            if token in stop:
                ended = True
                break
            seq.append(token)
            t.grew(len(seq))
            d.grew(len(seq))
            state = rule.step(state, token)
            whole = len(seq) - n_prompt if state == 0 else whole
            if on_token is not None and on_token(token):
                ended = True
                break
        if ended:
            break
        t.rewind(seq)
        d.rewind(seq)
    out = seq[n_prompt:]
    return (out if utf8 is None else out[:whole]), stats
