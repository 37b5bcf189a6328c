"""
A decoder-only transformer (GPT) in one file, for the GPT-2 and the LLaMA-3 families.

Design choices, each a switch in GPTConfig:
- positions: "learned" absolute embeddings added to the token embeddings (GPT-2), "rope":
  rotary embeddings applied to q and k in every layer (LLaMA), with the optional "llama3"
  frequency scaling of Llama 3.1/3.2 (RoPE pairs dimension i with i + head_dim/2, "rotate half"),
  or "alibi": no position vectors at all, each head adds m_h (j - i) to the score of query i on key
  j, so attention fades with distance at a per-head rate (Press et al. 2021; Baichuan 2's 13B).
- attention masks: causal, or a sliding window (attn_window: each query sees its last W keys) on the
  layers attn_window_pattern marks "S" ("SSSL": three windowed layers, then one full). ALiBi and
  windows become one additive mask built once per forward (attention_bias), which both paths take.
  causal=False makes the model an encoder (BERT): every position sees the whole row, padding aside;
  ALiBi's penalty and the window then count distance both ways, |j - i|. It is trained by masked
  language modelling (train.py objective=mlm), has no KV cache and cannot generate.
- norm: "layernorm" (GPT-2) or "rmsnorm" (LLaMA), always before each sublayer (pre-norm), plus a
  final norm before the unembedding.
- mlp: "gelu" (4x wide), "gelu_tanh" (GPT-2's tanh approximation of gelu), "swiglu" (LLaMA; hidden size 2/3 of 4x rounded up to a multiple),
  or "relu2" (squared ReLU).
- attention: n_kv_head < n_head is grouped-query attention (1 is multi-query); optional QK-norm.
  Two paths with the same result: "fused" calls F.scaled_dot_product_attention (Flash kernels on
  GPUs that have them), "explicit" spells out softmax(Q K^T / sqrt(d) + causal mask) V.
- the lm_head may share its weight with the token embedding (tied, GPT-2) or not (LLaMA-3 8B).
  norm_head (Baichuan 2's NormHead) divides each output row by its norm, logit_v = h . w_v / |w_v|:
  a rare token's row gets few, small gradients and its norm would drift apart from the frequent
  ones', so only directions are compared (Baichuan 2 found it steadies training). With tied
  embeddings the input still reads the raw rows; only the head sees them normalised.
  logit_softcap c squashes logits into (-c, c) with c tanh(logits / c) (Gemma 2, modded-nanogpt).
- init: N(0, 0.02) everywhere, residual output projections scaled by 1/sqrt(2 n_layer) (GPT-2), or
  zero (zero_init_proj, as recent speedrun recipes do: every block starts as the identity).

Fine-tuning: GPT.add_classifier / classify put a linear head on the last real token's hidden state
(GPT-1), or on an encoder, on the mean of the real tokens' hidden states; GPT.add_lora wraps the
block's linear layers in LoRALinear adapters, merge_lora folds them in.

Decoding lives in decoding.py. The model only takes an optional `cache` argument (an object with
positions(T), attn_mask(T), layer(i), length and advance(T), which decoding.KVCache is) so that a
new token costs one position's work. GPT.generate is the plain reference decoder that re-runs the
whole context at every step, as nanoGPT's does; the fast path is tested against it.
"""
import contextlib
import math
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
from torch.nn import functional as F


@dataclass
class GPTConfig:
    block_size: int = 1024        # longest context the model sees
    vocab_size: int = 50304       # set from the dataset's meta.json by train.py
    n_layer: int = 12             # transformer blocks
    n_head: int = 12              # query heads per attention layer
    n_kv_head: int = 0            # key/value heads; 0 means n_head (plain multi-head attention)
    n_embd: int = 768             # width of the residual stream
    head_dim: int = 0             # per-head width; 0 means n_embd // n_head
    dropout: float = 0.0          # on attention weights, sublayer outputs and embeddings
    bias: bool = True             # biases in Linear layers and LayerNorms
    norm: str = "layernorm"       # layernorm | rmsnorm
    norm_eps: float = 1e-5        # epsilon inside the norms
    positions: str = "learned"    # learned | rope | alibi (no position vectors; a distance penalty per head)
    rope_theta: float = 10000.0   # RoPE base period
    rope_scaling: str = ""        # "" | llama3 (frequency scaling of Llama 3.1 / 3.2)
    rope_factor: float = 8.0      # llama3 scaling: how much longer than the original context
    rope_low_freq_factor: float = 1.0   # llama3 scaling: wavelengths above orig/low are divided by factor
    rope_high_freq_factor: float = 4.0  # llama3 scaling: wavelengths below orig/high are kept
    rope_original_context: int = 8192   # llama3 scaling: context length before scaling
    mlp: str = "gelu"             # gelu | gelu_tanh (OpenAI GPT-2's approximation) | swiglu | relu2
    mlp_hidden: int = 0           # MLP hidden width; 0: 4*n_embd (gelu*, relu2) or LLaMA's rule (swiglu)
    mlp_multiple_of: int = 256    # swiglu: round the default hidden width up to a multiple of this
    qk_norm: bool = False         # RMS-normalise q and k per head before attention
    attn_window: int = 0          # sliding-window attention: a query sees its last W keys (itself included); 0: all
    attn_window_pattern: str = "S"  # tiled over the layers: S windowed, L full ("SSSL"); read when attn_window > 0
    causal: bool = True           # False: an encoder (BERT), each position sees the whole sequence
    value_embeds: bool = False    # each layer adds an embedding of the token to its values (modded-nanogpt)
    tie_embeddings: bool = True   # lm_head shares the token embedding matrix
    norm_head: bool = False       # Baichuan 2's NormHead: each lm_head row divided by its L2 norm
    logit_softcap: float = 0.0    # logits -> c tanh(logits / c), bounded by c; 0: off
    attn_impl: str = "fused"      # fused | explicit (same numbers; explicit is for reading and tests)
    zero_init_proj: bool = False  # start the residual output projections (c_proj) at zero: blocks begin as identity
    n_classes: int = 0            # classification head on the last real token; 0: language model only
    lora_rank: int = 0            # rank of LoRA adapters on the target linear layers; 0: no adapters
    lora_alpha: float = 16.0      # LoRA scale: the adapter's output is multiplied by alpha / rank
    lora_dropout: float = 0.0     # dropout on the adapters' input
    lora_targets: str = "attn.c_attn,attn.c_proj,mlp.c_fc,mlp.c_proj"  # comma-separated linear layers given adapters

    def __post_init__(self):
        choices = {"norm": ("layernorm", "rmsnorm"), "positions": ("learned", "rope", "alibi"),
                   "mlp": ("gelu", "gelu_tanh", "swiglu", "relu2"), "rope_scaling": ("", "llama3"),
                   "attn_impl": ("fused", "explicit")}
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise ValueError(f"{key}={getattr(self, key)!r} is not one of {', '.join(map(repr, allowed))}")
        if self.n_kv_head == 0:
            self.n_kv_head = self.n_head
        if self.head_dim == 0:
            if self.n_embd % self.n_head:
                raise ValueError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
            self.head_dim = self.n_embd // self.n_head
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_head={self.n_head} is not divisible by n_kv_head={self.n_kv_head}")
        if self.positions == "rope" and self.head_dim % 2:
            raise ValueError(f"rope needs an even head_dim, got {self.head_dim}")
        if self.attn_window < 0:
            raise ValueError(f"attn_window must be >= 0 (0: full attention), got {self.attn_window}")
        if not self.attn_window_pattern or set(self.attn_window_pattern) - set("SL"):
            raise ValueError(f"attn_window_pattern={self.attn_window_pattern!r} is not a string of S (windowed) "
                             f"and L (full), e.g. SSSL")
        if self.logit_softcap < 0:
            raise ValueError(f"logit_softcap must be >= 0 (0: off), got {self.logit_softcap}")
        if self.mlp_hidden == 0:
            if self.mlp == "swiglu":  # LLaMA: 2/3 of 4x keeps the parameter count of a 4x MLP
                hidden, m = int(2 * 4 * self.n_embd / 3), self.mlp_multiple_of
                self.mlp_hidden = m * ((hidden + m - 1) // m)
            else:
                self.mlp_hidden = 4 * self.n_embd

    def windowed(self, layer):
        """Whether this layer attends through the sliding window."""
        pattern = self.attn_window_pattern
        return self.attn_window > 0 and pattern[layer % len(pattern)] == "S"

    @classmethod
    def keys(cls):
        return [f.name for f in fields(cls)]

    @classmethod
    def from_dict(cls, d):
        """A config from a dict such as a checkpoint's model_config: keys this version does not
        know are left out, and keys an older checkpoint lacks take their defaults."""
        known = set(cls.keys())
        return cls(**{k: v for k, v in d.items() if k in known})


# Published shapes. gpt2*: OpenAI's GPT-2 checkpoints. llama3.2-*: Meta's Llama 3.2 base models
# (for reference and parameter counts). llama3-tiny: a LLaMA-style model that trains on a CPU.
PRESETS = {
    "gpt2":        dict(n_layer=12, n_head=12, n_embd=768, vocab_size=50257, block_size=1024),
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024, vocab_size=50257, block_size=1024),
    "gpt2-large":  dict(n_layer=36, n_head=20, n_embd=1280, vocab_size=50257, block_size=1024),
    "gpt2-xl":     dict(n_layer=48, n_head=25, n_embd=1600, vocab_size=50257, block_size=1024),
}
_LLAMA = dict(norm="rmsnorm", positions="rope", mlp="swiglu", bias=False, rope_theta=500000.0)
_LLAMA32 = dict(_LLAMA, rope_scaling="llama3", rope_factor=32.0, rope_original_context=8192,
                vocab_size=128256, block_size=131072, tie_embeddings=True)
PRESETS.update({
    "llama3-tiny":  dict(_LLAMA, n_layer=4, n_head=4, n_kv_head=2, n_embd=128, mlp_hidden=384,
                         tie_embeddings=False, block_size=256, rope_theta=10000.0),
    "llama3.2-1b":  dict(_LLAMA32, n_layer=16, n_head=32, n_kv_head=8, n_embd=2048, mlp_hidden=8192),
    "llama3.2-3b":  dict(_LLAMA32, n_layer=28, n_head=24, n_kv_head=8, n_embd=3072, mlp_hidden=8192),
})


def preset_config(name, **overrides):
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return GPTConfig(**{**PRESETS[name], **overrides})


# ----------------------------------------------------------------------------------------------
# Small pure functions the modules compose

def norm(x, weight, bias, kind, eps):
    """LayerNorm (subtract the mean, divide by the std) or RMSNorm (divide by the root mean square)."""
    if weight.dtype != x.dtype:  # under autocast q and k arrive in bfloat16: one dtype takes the fused kernel
        weight, bias = weight.to(x.dtype), None if bias is None else bias.to(x.dtype)
    if kind == "layernorm":
        return F.layer_norm(x, (x.size(-1),), weight, bias, eps)
    return F.rms_norm(x, (x.size(-1),), weight, eps)


def rope_inv_freq(config):
    """Rotation speed of each dimension pair: theta^(-2i/d), optionally scaled as in Llama 3.1."""
    d = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))  # (d/2,)
    if config.rope_scaling == "llama3":
        factor, orig = config.rope_factor, config.rope_original_context
        low_wavelen = orig / config.rope_low_freq_factor    # longer wavelengths: slowed by factor
        high_wavelen = orig / config.rope_high_freq_factor  # shorter wavelengths: unchanged
        wavelen = 2 * math.pi / inv_freq
        smooth = (orig / wavelen - config.rope_low_freq_factor) / (
            config.rope_high_freq_factor - config.rope_low_freq_factor)
        blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
        inv_freq = torch.where(wavelen > low_wavelen, inv_freq / factor,
                               torch.where(wavelen < high_wavelen, inv_freq, blended))
    return inv_freq


def rope_cos_sin(config, seq_len):
    """cos and sin of the rotation angle of every position and dimension pair, (T, d/2) each."""
    t = torch.arange(seq_len, dtype=torch.float64)
    angles = torch.outer(t, rope_inv_freq(config))  # (T, d/2)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x, cos, sin):
    """Rotate each pair (x_i, x_{i+d/2}) of x (B, H, T, d) by its position's angle."""
    x1, x2 = x.chunk(2, dim=-1)  # (B, H, T, d/2) each
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def alibi_slopes(n_head):
    """ALiBi's per-head slopes m_h: for H a power of two the geometric sequence 2^(-8h/H), h = 1..H;
    otherwise the paper's rule: the slopes of the power of two below H, then every other slope of
    the power of two above it until there are H."""
    def geometric(n):
        return [2 ** (-8 * h / n) for h in range(1, n + 1)]
    if n_head & (n_head - 1) == 0:
        return torch.tensor(geometric(n_head))
    below = 2 ** int(math.log2(n_head))
    return torch.tensor(geometric(below) + geometric(2 * below)[0::2][:n_head - below])


def attention_bias(allowed, slopes=None, window=0):
    """The attention mask of one kind of layer. allowed (B | 1, 1, T, S) bool, True where a query may
    look (causal, padding); the T queries are the last T of the S slots. window > 0 also hides keys
    window or more slots away; slopes (H,) add -m_h |j - i|, so the mask becomes float (B | 1, H, T, S)
    with -inf where hidden. Slot differences equal position differences within a row, padding or not.
    Where causal, j <= i and -|j - i| is ALiBi's j - i; an encoder's queries also look forward."""
    T, S = allowed.shape[-2:]
    dist = -(torch.arange(S, device=allowed.device)[None, :] -
             torch.arange(S - T, S, device=allowed.device)[:, None]).abs()  # (T, S): -|j - i|
    if window:
        allowed = allowed & (dist > -window)
    if slopes is None:
        return allowed
    bias = slopes.to(allowed.device)[:, None, None] * dist  # (H, T, S)
    return bias.masked_fill(~allowed, float("-inf"))


def causal_mask(T, S, device):
    """(1, 1, T, S) bool: query t, at slot S - T + t, may look at keys up to its own slot."""
    return torch.ones(T, S, dtype=torch.bool, device=device).tril(diagonal=S - T)[None, None]


def attention_weights(q, k, mask=None, causal=True):
    """softmax(Q K^T / sqrt(d) + M) (B, H, T, S), each row summing to 1, with M = -inf above the
    diagonal: the textbook formula. mask (B | 1, 1 | H, T, S) replaces the causal mask when given:
    bool, True where a query may look, or float, added to the scores (ALiBi's distances, -inf where
    hidden). causal=False and no mask: every query sees every key (an encoder)."""
    T, S = q.size(-2), k.size(-2)
    att = (q @ k.transpose(-2, -1)) / math.sqrt(q.size(-1))  # (B, H, T, S)
    if mask is None and causal:
        mask = causal_mask(T, S, q.device)
    if mask is not None and mask.dtype == torch.bool:  # None here: an encoder without padding sees everything
        att = att.masked_fill(~mask, float("-inf"))
    elif mask is not None:
        att = att + mask.to(att.dtype)
    return F.softmax(att, dim=-1)


def z_losses(logits, targets):
    """Two penalties on logits (B, T, V) that keep them from drifting large, averaged over the
    positions whose target is not -1: PaLM's z-loss, the mean of log^2 Z with Z the softmax's
    normaliser, and Baichuan 2's max-z loss, the mean of the squared largest logit."""
    logits, keep = logits.float(), targets != -1  # (B, T, V), (B, T)
    n = keep.sum().clamp(min=1)
    log_z = torch.logsumexp(logits, dim=-1)  # (B, T)
    max_z = logits.max(dim=-1).values  # (B, T)
    return (log_z.square() * keep).sum() / n, (max_z.square() * keep).sum() / n


# ----------------------------------------------------------------------------------------------
# Modules

class Norm(nn.Module):
    def __init__(self, dim, kind, eps, bias):
        super().__init__()
        self.kind, self.eps = kind, eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if bias and kind == "layernorm" else None

    def forward(self, x):
        return norm(x, self.weight, self.bias, self.kind, self.eps)


class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        self.impl, self.rope, self.dropout = config.attn_impl, config.positions == "rope", config.dropout
        self.causal = config.causal
        self.keep_weights, self.weights = False, None  # the explicit path's last weights, for pictures
        self.sdpa_dtype = None  # the fused path computes in this dtype when set (train.py: what a CPU runs faster)
        # q, k and v for all heads in one matrix: n_head query heads, n_kv_head key and value heads
        qkv_dim = (config.n_head + 2 * config.n_kv_head) * config.head_dim
        self.c_attn = nn.Linear(config.n_embd, qkv_dim, bias=config.bias)
        self.c_proj = nn.Linear(config.n_head * config.head_dim, config.n_embd, bias=config.bias)
        # QK-norm: RMSNorm over each head's q and k keeps attention logits bounded
        self.q_norm = Norm(config.head_dim, "rmsnorm", config.norm_eps, False) if config.qk_norm else None
        self.k_norm = Norm(config.head_dim, "rmsnorm", config.norm_eps, False) if config.qk_norm else None
        self.attn_dropout = nn.Dropout(config.dropout)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, cos=None, sin=None, kv=None, mask=None, ve=None):
        """kv: this layer's view of a KVCache (k and v are appended to it, attention covers all
        cached positions); mask (B, 1, T, S): where each query may look, None for plain causal (an
        encoder's None: everything); ve (B, T, Hkv * d): the tokens' value embeddings, added to v."""
        B, T, C = x.size()
        H, Hkv, d = self.n_head, self.n_kv_head, self.head_dim
        q, k, v = self.c_attn(x).split([H * d, Hkv * d, Hkv * d], dim=2)
        q = q.view(B, T, H, d).transpose(1, 2)    # (B, H, T, d)
        k = k.view(B, T, Hkv, d).transpose(1, 2)  # (B, Hkv, T, d)
        if ve is not None:
            v = v + ve
        v = v.view(B, T, Hkv, d).transpose(1, 2)  # (B, Hkv, T, d)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.rope:
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if kv is not None:
            k, v = kv.update(k, v)  # (B, Hkv, S, d): the cached positions, then these T
            if mask is not None and mask.size(-1) > k.size(2):  # a windowed layer's cache holds the last slots
                mask = mask[..., -k.size(2):]
        if self.impl == "fused":
            # is_causal aligns the diagonal top-left, right only when T == S; a single query sees all.
            # An if, not a bool expression: under torch.compile with dynamic shapes T > 1 is symbolic,
            # and SDPA takes a Python bool
            causal = False
            if mask is None and T > 1 and self.causal:
                causal = True
            dtype = q.dtype
            if self.sdpa_dtype is not None and self.sdpa_dtype != dtype:
                q, k, v = q.to(self.sdpa_dtype), k.to(self.sdpa_dtype), v.to(self.sdpa_dtype)
            if mask is not None and mask.dtype != torch.bool:
                mask = mask.to(q.dtype)
            # in another dtype than autocast's, out of autocast, which would cast q, k and v back
            ctx = torch.autocast(q.device.type, enabled=False) if q.dtype != dtype else contextlib.nullcontext()
            with ctx:
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                                   dropout_p=self.dropout if self.training else 0.0,
                                                   is_causal=causal, enable_gqa=Hkv != H)
            y = y.to(dtype)
        else:
            # each group of H/Hkv consecutive query heads shares one key/value head
            k, v = k.repeat_interleave(H // Hkv, dim=1), v.repeat_interleave(H // Hkv, dim=1)
            att = attention_weights(q, k, mask, self.causal)  # (B, H, T, S)
            if self.keep_weights:  # GPT.attention_maps reads them
                self.weights = att.detach()
            y = self.attn_dropout(att) @ v
        y = y.transpose(1, 2).contiguous().view(B, T, H * d)  # re-assemble heads side by side
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.kind = config.mlp
        # swiglu needs two input projections (gate and up); they share one matrix
        fc_out = 2 * config.mlp_hidden if self.kind == "swiglu" else config.mlp_hidden
        self.c_fc = nn.Linear(config.n_embd, fc_out, bias=config.bias)
        self.c_proj = nn.Linear(config.mlp_hidden, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        h = self.c_fc(x)  # (B, T, hidden) or (B, T, 2*hidden)
        if self.kind == "gelu":
            h = F.gelu(h)
        elif self.kind == "gelu_tanh":  # what OpenAI's GPT-2 weights were trained with
            h = F.gelu(h, approximate="tanh")
        elif self.kind == "relu2":
            h = F.relu(h).square()
        else:
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        return self.dropout(self.c_proj(h))


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.ln_1 = Norm(config.n_embd, config.norm, config.norm_eps, config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = Norm(config.n_embd, config.norm, config.norm_eps, config.bias)
        self.mlp = MLP(config)

    def forward(self, x, cos=None, sin=None, kv=None, mask=None, ve=None):
        x = x + self.attn(self.ln_1(x), cos, sin, kv, mask, ve)
        x = x + self.mlp(self.ln_2(x))
        return x


# ----------------------------------------------------------------------------------------------
# LoRA (Hu et al. 2021): W x + (alpha / r) B A x with A (r, in), B (out, r); B starts at zero so
# the adapted model starts equal to the base one. The adapter lives beside the base weight in the
# same module, so a base checkpoint's keys (….weight, ….bias) load unchanged.

class LoRALinear(nn.Linear):
    def __init__(self, base, rank, alpha, dropout):
        nn.Module.__init__(self)  # reuse the base module's tensors, allocate nothing new for them
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=base.weight.device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=base.weight.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear initialises its weight
        self.scale = alpha / rank
        self.lora_dropout = nn.Dropout(dropout)
        self.enabled = True  # False: the base layer alone (GPT.adapters_disabled)

    def forward(self, x):  # x (..., in) -> (..., out)
        if not self.enabled:
            return F.linear(x, self.weight, self.bias)
        delta = F.linear(F.linear(self.lora_dropout(x), self.lora_A), self.lora_B)  # (..., r) -> (..., out)
        return F.linear(x, self.weight, self.bias) + self.scale * delta

    def merged(self):
        """A plain nn.Linear whose weight is W + scale * B A."""
        out = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            out.weight.copy_(self.weight + self.scale * (self.lora_B @ self.lora_A))
            if self.bias is not None:
                out.bias.copy_(self.bias)
        return out


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=Norm(config.n_embd, config.norm, config.norm_eps, config.bias),
        ))
        if config.positions == "learned":
            self.transformer.wpe = nn.Embedding(config.block_size, config.n_embd)
        if config.value_embeds:  # one table per layer, as wide as its keys and values
            self.transformer.ve = nn.ModuleList([nn.Embedding(config.vocab_size, config.n_kv_head * config.head_dim)
                                                 for _ in range(config.n_layer)])
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.transformer.wte.weight = self.lm_head.weight
        if config.positions == "rope":  # computed once; not saved in checkpoints
            cos, sin = rope_cos_sin(config, config.block_size)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        if config.positions == "alibi":
            self.register_buffer("alibi_slopes", alibi_slopes(config.n_head), persistent=False)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):  # residual branches add up over 2 n_layer sublayers
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))
                if config.zero_init_proj:
                    nn.init.zeros_(p)
        if config.n_classes:
            self.add_classifier(config.n_classes)
        if config.lora_rank:
            self.add_lora(config.lora_rank, config.lora_alpha, config.lora_dropout, config.lora_targets)

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def get_num_params(self, non_embedding=True):
        """Parameters, counted once when tied; non_embedding drops the position table (as GPT-2 counts)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding and "wpe" in self.transformer:
            n -= self.transformer.wpe.weight.numel()
        return n

    def param_counts(self):
        """Parameters by part: embeddings, attention, mlp (LoRA adapters included), norms, heads (the
        untied lm_head, a classification head)."""
        parts = {"embeddings": 0, "attention": 0, "mlp": 0, "norms": 0, "head": 0}
        seen = set()
        for name, p in self.named_parameters():
            if id(p) in seen:
                continue
            seen.add(id(p))
            part = ("embeddings" if name.startswith(("transformer.wte", "transformer.wpe", "transformer.ve")) else
                    "attention" if ".attn." in name and "_norm" not in name else
                    "mlp" if ".mlp." in name else
                    "head" if name.startswith(("lm_head", "cls_head")) else "norms")
            parts[part] += p.numel()
        return parts

    def describe(self):
        """A few lines: parameters by part and training FLOPs per token."""
        counts = self.param_counts()
        total = sum(counts.values())
        lines = [f"parameters: {total:,} ({total / 1e6:.2f}M)"]
        lines += [f"  {part:<11}{n:>14,}  {100 * n / total:5.1f}%" for part, n in counts.items() if n]
        lines.append(f"training FLOPs per token: {self.flops_per_token() / 1e6:,.2f}M "
                     f"(6 x {self.get_num_params():,} non-position parameters + attention over "
                     f"{self.config.block_size} positions)")
        return "\n".join(lines)

    def hidden_states(self, idx, cache=None, lengths=None):
        """idx (B, T) token ids -> the final-norm hidden states (B, T, C), the input of the heads.
        With a KVCache, idx continues the cached tokens: positions start after them and the
        cache grows by T. lengths (B,): an encoder's rows are right-padded after this many tokens,
        which no position may attend to (a decoder's real tokens never see the padding after them)."""
        B, T = idx.size()
        if T > self.config.block_size:
            raise ValueError(f"sequence of length {T} is longer than block_size {self.config.block_size}")
        if cache is not None and not self.config.causal:
            raise ValueError("an encoder (causal=False) has no KV cache: every position sees the ones after it")
        if cache is not None:
            cache.reserve(T, self.config.block_size)
        x = self.transformer.wte(idx)  # (B, T, C)
        cos = sin = None
        if self.config.positions == "learned":
            if cache is None:
                pos = torch.arange(T, dtype=torch.long, device=idx.device)
            else:
                pos = cache.positions(T)  # (B, T): each row counts from its first real token
            x = x + self.transformer.wpe(pos)  # (T, C) broadcast over the batch, or (B, T, C)
        elif self.config.positions == "rope" and cache is None:
            cos, sin = self.rope_cos[:T], self.rope_sin[:T]  # (T, d/2)
        elif self.config.positions == "rope":
            pos = cache.positions(T)  # (B, T)
            cos, sin = self.rope_cos[pos].unsqueeze(1), self.rope_sin[pos].unsqueeze(1)  # (B, 1, T, d/2)
        x = self.transformer.drop(x)
        full, windowed = self.attention_masks(T, cache, lengths, idx.device)
        for i, block in enumerate(self.transformer.h):
            mask = windowed if self.config.windowed(i) else full
            ve = self.transformer.ve[i](idx) if self.config.value_embeds else None  # (B, T, Hkv * d)
            x = block(x, cos, sin, None if cache is None else cache.layer(i), mask, ve)
        if cache is not None:
            cache.advance(T)
        return self.transformer.ln_f(x)

    def set_sdpa_dtype(self, dtype):
        """Have every layer's fused attention compute in dtype (None: in its inputs' dtype, the default)."""
        for block in self.transformer.h:
            block.attn.sdpa_dtype = dtype

    @torch.no_grad()
    def attention_maps(self, idx):
        """idx (B, T) -> one (B, H, T, T) tensor per layer: the attention weights that the explicit path
        computes (the fused path's numbers, which it does not expose), for pictures (visualize.py)."""
        layers = [block.attn for block in self.transformer.h]
        impls = [a.impl for a in layers]
        for a in layers:
            a.impl, a.keep_weights = "explicit", True
        try:
            self.hidden_states(idx)
            return [a.weights for a in layers]
        finally:
            for a, impl in zip(layers, impls):
                a.impl, a.keep_weights, a.weights = impl, False, None

    def attention_masks(self, T, cache=None, lengths=None, device=None):
        """The masks of the full and of the windowed layers for the next T tokens: None (plain causal,
        the fused path's fastest case; an encoder's: all), bool (B | 1, 1, T, S), or float
        (B | 1, H, T, S) with ALiBi."""
        cfg, device = self.config, device or self.transformer.ln_f.weight.device
        padded = None if cache is None else cache.attn_mask(T)  # (B, 1, T, S) or None
        if not cfg.causal and lengths is not None:  # keys past a row's length are padding
            padded = (torch.arange(T, device=device)[None, :] < lengths[:, None])[:, None, None, :]  # (B, 1, 1, T)
            padded = padded.expand(-1, 1, T, T)
        if cfg.positions != "alibi" and not cfg.attn_window:
            return padded, padded
        S = T if cache is None else cache.length + T
        if padded is not None:
            allowed = padded
        elif cfg.causal:
            allowed = causal_mask(T, S, device)
        else:
            allowed = torch.ones(1, 1, T, S, dtype=torch.bool, device=device)
        slopes = self.alibi_slopes if cfg.positions == "alibi" else None
        full = attention_bias(allowed, slopes) if slopes is not None else padded
        windowed = attention_bias(allowed, slopes, cfg.attn_window) if cfg.attn_window else full
        return full, windowed

    def logits(self, h):
        """Hidden states (..., C) -> logits (..., vocab): the lm_head, its rows normalised with
        norm_head, soft-capped with logit_softcap."""
        if self.config.norm_head:
            logits = F.linear(h, F.normalize(self.lm_head.weight, dim=-1))
        else:
            logits = self.lm_head(h)  # the module, so that an int8 head (quantize.py) takes its place
        c = self.config.logit_softcap
        return c * torch.tanh(logits / c) if c else logits

    def forward(self, idx, targets=None, label_smoothing=0.0, cache=None, z_loss=0.0, max_z_loss=0.0):
        """idx (B, T) token ids -> logits (B, T, vocab); with targets (B, T), also the mean
        cross-entropy over the positions whose target is not -1, plus z_loss * PaLM's log^2 Z and
        max_z_loss * Baichuan 2's squared largest logit on the same positions (see z_losses; for
        cache, hidden_states)."""
        logits = self.logits(self.hidden_states(idx, cache))  # (B, T, vocab)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.reshape(-1),
                                   ignore_index=-1, label_smoothing=label_smoothing)
            if z_loss or max_z_loss:
                z, max_z = z_losses(logits, targets)
                loss = loss + z_loss * z + max_z_loss * max_z
        return logits, loss

    def crop_block_size(self, block_size):
        """Shrink the context window, e.g. to fine-tune GPT-2 (1024) at a smaller block_size."""
        assert block_size <= self.config.block_size
        self.config.block_size = block_size
        if "wpe" in self.transformer:
            self.transformer.wpe.weight = nn.Parameter(self.transformer.wpe.weight[:block_size])
        elif self.config.positions == "rope":
            self.rope_cos, self.rope_sin = self.rope_cos[:block_size], self.rope_sin[:block_size]

    def set_block_size(self, block_size):
        """Read contexts of block_size tokens: a crop, or, for rope and alibi (no position table), a
        longer context than trained on: the extrapolation that ALiBi's paper measures."""
        if block_size <= self.config.block_size:
            return self.crop_block_size(block_size)
        if self.config.positions == "learned":
            raise ValueError(f"learned positions stop at block_size {self.config.block_size}: the table has no "
                             f"row for position {block_size - 1}")
        self.config.block_size = block_size
        if self.config.positions == "rope":
            cos, sin = rope_cos_sin(self.config, block_size)
            self.rope_cos, self.rope_sin = cos.to(self.rope_cos.device), sin.to(self.rope_sin.device)

    # Fine-tuning: a classification head (GPT-1, the spam classifier) and LoRA adapters.
    # The head reads the hidden state of the last real token: with causal attention it has seen the
    # whole text and nothing after it, so right-padding never changes what the head reads. An
    # encoder's last token is no better placed than any other, and it has no [CLS] token trained
    # by next-sentence prediction, so the head reads the mean over the real tokens (as Sentence-BERT
    # found best), with the padding masked out of attention.

    def add_classifier(self, n_classes):
        """Give the model a fresh head of n_classes outputs (N(0, 0.02) weights, zero bias)."""
        self.cls_head = nn.Linear(self.config.n_embd, n_classes, bias=True)
        self.cls_head.to(self.lm_head.weight.device)
        nn.init.normal_(self.cls_head.weight, mean=0.0, std=0.02)
        nn.init.zeros_(self.cls_head.bias)
        self.config.n_classes = n_classes

    def classify(self, idx, lengths, labels=None, lm_weight=0.0, label_smoothing=0.0, class_weight=None):
        """idx (B, T) right-padded token ids, lengths (B,) real tokens per row (>= 1) -> class logits
        (B, n_classes); with labels (B,), also L = L_cls + lm_weight * L_lm, where L_lm is next-token
        cross-entropy over the real tokens only (GPT-1's auxiliary objective)."""
        if self.config.causal:
            h = self.hidden_states(idx)  # (B, T, C)
            rows = torch.arange(idx.size(0), device=idx.device)
            pooled = h[rows, lengths - 1]  # (B, C)
        else:
            h = self.hidden_states(idx, lengths=lengths)  # (B, T, C)
            real = (torch.arange(idx.size(1), device=idx.device)[None, :] < lengths[:, None]).to(h.dtype)  # (B, T)
            pooled = (h * real[..., None]).sum(1) / lengths[:, None].to(h.dtype)  # (B, C)
        logits = self.cls_head(pooled)  # (B, n_classes)
        if labels is None:
            return logits, None
        loss = F.cross_entropy(logits.float(), labels, weight=class_weight, label_smoothing=label_smoothing)
        if lm_weight > 0 and not self.config.causal:
            raise ValueError("lm_weight: an encoder sees each next token, so it has no next-token loss")
        if lm_weight > 0:
            targets = idx[:, 1:].masked_fill(  # a target is real if its position is < length
                torch.arange(1, idx.size(1), device=idx.device)[None, :] >= lengths[:, None], -1)  # (B, T-1)
            lm_logits = self.logits(h[:, :-1])  # (B, T-1, vocab)
            lm_loss = F.cross_entropy(lm_logits.reshape(-1, lm_logits.size(-1)).float(), targets.reshape(-1),
                                      ignore_index=-1, label_smoothing=label_smoothing)
            loss = loss + lm_weight * lm_loss
        return logits, loss

    def _lora_modules(self, targets):
        """(parent, attribute name) of every linear layer named by targets, e.g. "attn.c_attn"."""
        wanted = [t.strip() for t in targets.split(",") if t.strip()]
        known = {"attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"}
        unknown = [t for t in wanted if t not in known]
        if unknown or not wanted:
            raise ValueError(f"lora_targets {targets!r}: choose from {', '.join(sorted(known))}")
        for block in self.transformer.h:
            for t in wanted:
                sub, name = t.split(".")
                yield getattr(block, sub), name

    def add_lora(self, rank, alpha=16.0, dropout=0.0, targets="attn.c_attn,attn.c_proj,mlp.c_fc,mlp.c_proj"):
        """Wrap the target linear layers of every block in LoRA adapters (B = 0: outputs unchanged)."""
        if rank < 1:
            raise ValueError(f"lora_rank must be >= 1, got {rank}")
        for parent, name in list(self._lora_modules(targets)):
            base = getattr(parent, name)
            if isinstance(base, LoRALinear):
                raise ValueError("the model already has LoRA adapters")
            setattr(parent, name, LoRALinear(base, rank, alpha, dropout))
        self.config.lora_rank, self.config.lora_alpha = rank, alpha
        self.config.lora_dropout, self.config.lora_targets = dropout, targets

    @contextlib.contextmanager
    def adapters_disabled(self):
        """Within the block, the base model: every LoRA adapter skipped (a reference policy for DPO or
        GRPO's KL without a second copy of the weights)."""
        layers = [m for m in self.modules() if isinstance(m, LoRALinear)]
        for m in layers:
            m.enabled = False
        try:
            yield self
        finally:
            for m in layers:
                m.enabled = True

    def merge_lora(self):
        """Fold every adapter into its base weight (W += scale B A) and drop it: a plain model again."""
        for module in list(self.modules()):
            for name, child in list(module.named_children()):
                if isinstance(child, LoRALinear):
                    setattr(module, name, child.merged())
        self.config.lora_rank = 0
        return self

    def flops_per_token(self):
        """Training FLOPs per token: 6 per parameter (forward + backward) plus attention scores
        and weighted sums, 6 * 2 * n_layer * n_head * head_dim * T (PaLM paper, appendix B)."""
        cfg = self.config
        n = self.get_num_params()
        return 6 * n + 12 * cfg.n_layer * cfg.n_head * cfg.head_dim * cfg.block_size

    def estimate_mfu(self, tokens_per_iter, dt, peak_flops):
        """Model FLOPs utilisation: achieved training FLOP/s over the device's peak."""
        return self.flops_per_token() * tokens_per_iter / dt / peak_flops

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, generator=None):
        """The plain reference decoder, as nanoGPT's: append max_new_tokens tokens to idx (B, T),
        each step re-running the whole context (cropped to block_size) for the last position's
        logits. Temperature 0 is greedy; top_k keeps the k most likely tokens. decoding.py does the
        same with a KV cache and more strategies, and is tested against this."""
        if not self.config.causal:
            raise ValueError("an encoder (causal=False) does not generate; it fills masked tokens (sample.py)")
        for _ in range(max_new_tokens):
            logits, _ = self(idx[:, -self.config.block_size:])
            logits = logits[:, -1, :].float()  # (B, vocab)
            if temperature == 0:
                next_id = logits.argmax(dim=-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k is not None:
                    kth = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1).values[:, -1:]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                next_id = torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator)  # (B, 1)
            idx = torch.cat((idx, next_id), dim=1)
        return idx
