"""
A decoder-only transformer (GPT) in one file, for the GPT-2 and the LLaMA-3 families.

Design choices, each a switch in GPTConfig:
- positions: "learned" absolute embeddings added to the token embeddings (GPT-2), or "rope":
  rotary embeddings applied to q and k in every layer (LLaMA), with the optional "llama3"
  frequency scaling of Llama 3.1/3.2. RoPE pairs dimension i with i + head_dim/2 ("rotate half").
- norm: "layernorm" (GPT-2) or "rmsnorm" (LLaMA), always before each sublayer (pre-norm), plus a
  final norm before the unembedding.
- mlp: "gelu" (4x wide), "gelu_tanh" (GPT-2's tanh approximation of gelu), "swiglu" (LLaMA; hidden size 2/3 of 4x rounded up to a multiple),
  or "relu2" (squared ReLU).
- attention: n_kv_head < n_head is grouped-query attention (1 is multi-query); optional QK-norm.
  Two paths with the same result: "fused" calls F.scaled_dot_product_attention (Flash kernels on
  GPUs that have them), "explicit" spells out softmax(Q K^T / sqrt(d) + causal mask) V.
- the lm_head may share its weight with the token embedding (tied, GPT-2) or not (LLaMA-3 8B).
- init: N(0, 0.02) everywhere, residual output projections scaled by 1/sqrt(2 n_layer) (GPT-2), or
  zero (zero_init_proj, as recent speedrun recipes do: every block starts as the identity).

Fine-tuning: GPT.add_classifier / classify put a linear head on the last real token's hidden state
(GPT-1); GPT.add_lora wraps the block's linear layers in LoRALinear adapters, merge_lora folds them in.

Decoding (the sections at the end): KVCache keeps each layer's keys and values so a new token
costs one position's work; Decoder feeds a batch (left-padded prompts, positions per row) and
slides the window past block_size; decode_steps / generate_batch / GPT.generate sample with
temperature, top-k, top-p and a repetition penalty, or greedily; beam_search ranks beams by
length-normalized log-probability.
"""
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
    positions: str = "learned"    # learned | rope
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
    tie_embeddings: bool = True   # lm_head shares the token embedding matrix
    attn_impl: str = "fused"      # fused | explicit (same numbers; explicit is for reading and tests)
    zero_init_proj: bool = False  # start the residual output projections (c_proj) at zero: blocks begin as identity
    n_classes: int = 0            # classification head on the last real token; 0: language model only
    lora_rank: int = 0            # rank of LoRA adapters on the target linear layers; 0: no adapters
    lora_alpha: float = 16.0      # LoRA scale: the adapter's output is multiplied by alpha / rank
    lora_dropout: float = 0.0     # dropout on the adapters' input
    lora_targets: str = "attn.c_attn,attn.c_proj,mlp.c_fc,mlp.c_proj"  # comma-separated linear layers given adapters

    def __post_init__(self):
        choices = {"norm": ("layernorm", "rmsnorm"), "positions": ("learned", "rope"),
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
        if self.mlp_hidden == 0:
            if self.mlp == "swiglu":  # LLaMA: 2/3 of 4x keeps the parameter count of a 4x MLP
                hidden, m = int(2 * 4 * self.n_embd / 3), self.mlp_multiple_of
                self.mlp_hidden = m * ((hidden + m - 1) // m)
            else:
                self.mlp_hidden = 4 * self.n_embd

    @classmethod
    def keys(cls):
        return [f.name for f in fields(cls)]


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


def explicit_attention(q, k, v, dropout, mask=None):
    """softmax(Q K^T / sqrt(d) + M) V with M = -inf above the diagonal: the textbook formula.
    mask (B, 1, T, S), True where a query may look, replaces the causal mask when given."""
    T, S = q.size(-2), k.size(-2)
    att = (q @ k.transpose(-2, -1)) / math.sqrt(q.size(-1))  # (B, H, T, S)
    # query t sits at absolute position S - T + t and may look at keys up to that position
    causal = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(diagonal=S - T) if mask is None else mask
    att = att.masked_fill(~causal, float("-inf"))
    att = F.softmax(att, dim=-1)
    att = dropout(att)
    return att @ v  # (B, H, T, d)


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
        # q, k and v for all heads in one matrix: n_head query heads, n_kv_head key and value heads
        qkv_dim = (config.n_head + 2 * config.n_kv_head) * config.head_dim
        self.c_attn = nn.Linear(config.n_embd, qkv_dim, bias=config.bias)
        self.c_proj = nn.Linear(config.n_head * config.head_dim, config.n_embd, bias=config.bias)
        # QK-norm: RMSNorm over each head's q and k keeps attention logits bounded
        self.q_norm = Norm(config.head_dim, "rmsnorm", config.norm_eps, False) if config.qk_norm else None
        self.k_norm = Norm(config.head_dim, "rmsnorm", config.norm_eps, False) if config.qk_norm else None
        self.attn_dropout = nn.Dropout(config.dropout)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, cos=None, sin=None, kv=None, mask=None):
        """kv: this layer's view of a KVCache (k and v are appended to it, attention covers all
        cached positions); mask (B, 1, T, S): where each query may look, None for plain causal."""
        B, T, C = x.size()
        H, Hkv, d = self.n_head, self.n_kv_head, self.head_dim
        q, k, v = self.c_attn(x).split([H * d, Hkv * d, Hkv * d], dim=2)
        q = q.view(B, T, H, d).transpose(1, 2)    # (B, H, T, d)
        k = k.view(B, T, Hkv, d).transpose(1, 2)  # (B, Hkv, T, d)
        v = v.view(B, T, Hkv, d).transpose(1, 2)  # (B, Hkv, T, d)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.rope:
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if kv is not None:
            k, v = kv.update(k, v)  # (B, Hkv, S, d): the cached positions, then these T
        if self.impl == "fused":
            # is_causal aligns the diagonal top-left, right only when T == S; a single query sees all
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                               dropout_p=self.dropout if self.training else 0.0,
                                               is_causal=mask is None and T > 1, enable_gqa=Hkv != H)
        else:
            # each group of H/Hkv consecutive query heads shares one key/value head
            k, v = k.repeat_interleave(H // Hkv, dim=1), v.repeat_interleave(H // Hkv, dim=1)
            y = explicit_attention(q, k, v, self.attn_dropout, mask)
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

    def forward(self, x, cos=None, sin=None, kv=None, mask=None):
        x = x + self.attn(self.ln_1(x), cos, sin, kv, mask)
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

    def forward(self, x):  # x (..., in) -> (..., out)
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
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.transformer.wte.weight = self.lm_head.weight
        if config.positions == "rope":  # computed once; not saved in checkpoints
            cos, sin = rope_cos_sin(config, config.block_size)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
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
            part = ("embeddings" if name.startswith(("transformer.wte", "transformer.wpe")) else
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

    def hidden_states(self, idx, cache=None):
        """idx (B, T) token ids -> the final-norm hidden states (B, T, C), the input of the heads.
        With a KVCache, idx continues the cached tokens: positions start after them and the
        cache grows by T."""
        B, T = idx.size()
        if T > self.config.block_size:
            raise ValueError(f"sequence of length {T} is longer than block_size {self.config.block_size}")
        if cache is not None and cache.length + T > self.config.block_size:
            raise ValueError(f"{cache.length} cached + {T} new tokens is longer than block_size "
                             f"{self.config.block_size}; start a new cache")
        x = self.transformer.wte(idx)  # (B, T, C)
        cos = sin = None
        if self.config.positions == "learned":
            if cache is None:
                pos = torch.arange(T, dtype=torch.long, device=idx.device)
            else:
                pos = cache.positions(T)  # (B, T): each row counts from its first real token
            x = x + self.transformer.wpe(pos)  # (T, C) broadcast over the batch, or (B, T, C)
        elif cache is None:
            cos, sin = self.rope_cos[:T], self.rope_sin[:T]  # (T, d/2)
        else:
            pos = cache.positions(T)  # (B, T)
            cos, sin = self.rope_cos[pos].unsqueeze(1), self.rope_sin[pos].unsqueeze(1)  # (B, 1, T, d/2)
        x = self.transformer.drop(x)
        mask = None if cache is None else cache.attn_mask(T)  # (B, 1, T, S) or None
        for i, block in enumerate(self.transformer.h):
            x = block(x, cos, sin, None if cache is None else cache.layer(i), mask)
        if cache is not None:
            cache.advance(T)
        return self.transformer.ln_f(x)

    def forward(self, idx, targets=None, label_smoothing=0.0, cache=None):
        """idx (B, T) token ids -> logits (B, T, vocab); with targets (B, T), also the mean
        cross-entropy over the positions whose target is not -1 (see hidden_states for cache)."""
        logits = self.lm_head(self.hidden_states(idx, cache))  # (B, T, vocab)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.reshape(-1),
                                   ignore_index=-1, label_smoothing=label_smoothing)
        return logits, loss

    def crop_block_size(self, block_size):
        """Shrink the context window, e.g. to fine-tune GPT-2 (1024) at a smaller block_size."""
        assert block_size <= self.config.block_size
        self.config.block_size = block_size
        if "wpe" in self.transformer:
            self.transformer.wpe.weight = nn.Parameter(self.transformer.wpe.weight[:block_size])
        else:
            self.rope_cos, self.rope_sin = self.rope_cos[:block_size], self.rope_sin[:block_size]

    # Fine-tuning: a classification head (GPT-1, the spam classifier) and LoRA adapters.
    # The head reads the hidden state of the last real token: with causal attention it has seen the
    # whole text and nothing after it, so right-padding never changes what the head reads.

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
        h = self.hidden_states(idx)  # (B, T, C)
        rows = torch.arange(idx.size(0), device=idx.device)
        logits = self.cls_head(h[rows, lengths - 1])  # (B, n_classes)
        if labels is None:
            return logits, None
        loss = F.cross_entropy(logits.float(), labels, weight=class_weight, label_smoothing=label_smoothing)
        if lm_weight > 0:
            targets = idx[:, 1:].masked_fill(  # a target is real if its position is < length
                torch.arange(1, idx.size(1), device=idx.device)[None, :] >= lengths[:, None], -1)  # (B, T-1)
            lm_logits = self.lm_head(h[:, :-1])  # (B, T-1, vocab)
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
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, repetition_penalty=1.0,
                 eot_token=None, generator=None, use_cache=True):
        """Append up to max_new_tokens tokens to idx (B, T). temperature 0 takes the most likely
        token; top_k keeps only the k most likely, top_p the smallest set holding probability p;
        repetition_penalty > 1 makes tokens already in the row less likely. A row that emits
        eot_token is filled with it afterwards, and generation stops once every row has.
        generator (a seeded torch.Generator) makes sampling reproducible. Past block_size the
        context window slides (see Decoder). Prompts of different lengths: generate_batch."""
        check_sampling(temperature, top_k, top_p, repetition_penalty)
        out = [idx]
        done = torch.zeros(idx.size(0), dtype=torch.bool, device=idx.device)
        steps = decode_steps(self, idx, max_new_tokens, temperature, top_k, top_p, repetition_penalty,
                             generator=generator, use_cache=use_cache)
        for tokens, _ in steps:
            if eot_token is not None:
                tokens = tokens.masked_fill(done, eot_token)
                done = done | (tokens == eot_token)
            out.append(tokens[:, None])
            if bool(done.all()):
                break
        return torch.cat(out, dim=1)


# ----------------------------------------------------------------------------------------------
# KV cache: keys and values of the tokens already seen, so that each new token costs one
# position's work instead of a forward pass over the whole context.

class KVCache:
    """Per-layer key/value buffers (B, n_kv_head, max_len, head_dim), filled left to right.
    Grouped-query models store only their n_kv_head heads. Rows may be left-padded: row b's
    first pad[b] slots are padding, masked out as keys, and its positions count from its first
    real token, so a padded row computes what it would alone."""

    def __init__(self, n_layer, max_len, pad):
        self.max_len = max_len
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
        return cls(model.config.n_layer, model.config.block_size, pad)

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
        if self.k[i] is None:
            shape = (k.size(0), k.size(1), self.max_len, k.size(3))
            self.k[i] = torch.empty(shape, dtype=k.dtype, device=k.device)
            self.v[i] = torch.empty(shape, dtype=v.dtype, device=v.device)
        self.k[i][:, :, self.length:end] = k
        self.v[i][:, :, self.length:end] = v
        return self.k[i][:, :, :end], self.v[i][:, :, :end]

    def advance(self, T):
        self.length += T

    def reorder(self, index):
        """Keep rows index (N,) in that order, e.g. the parents of the surviving beams."""
        self.pad = self.pad.index_select(0, index)
        self.k = [None if k is None else k.index_select(0, index) for k in self.k]
        self.v = [None if v is None else v.index_select(0, index) for v in self.v]


class _LayerCache:
    """One layer's view of a KVCache: what CausalSelfAttention needs."""

    def __init__(self, cache, i):
        self.cache, self.i = cache, i

    def update(self, k, v):
        return self.cache.update(self.i, k, v)


# ----------------------------------------------------------------------------------------------
# Decoding: strategies as small functions on logits (B, vocab), a Decoder that feeds a model
# token by token, and the loops built on them (sampling, batches of prompts, beam search).

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
    logits = logits.float() / temperature
    if top_k is not None:
        logits = top_k_filter(logits, top_k)
    if top_p is not None:
        logits = top_p_filter(logits, top_p)
    probs = F.softmax(logits, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator)[:, 0]


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
        self.cache = KVCache.for_model(self.model, pad=window_pad)
        logits, _ = self.model(self.seq[:, first:], cache=self.cache)
        return logits[:, -1, :]  # (B, V)

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
            logits, _ = self.model(tokens[:, None], cache=self.cache)
            self.logits = logits[:, -1, :]

    def reorder(self, index):
        """Keep rows index (N,) in that order (beam search)."""
        self.seq = self.seq.index_select(0, index)
        self.start = [self.start[i] for i in index.tolist()]
        self.logits = self.logits.index_select(0, index)
        self.cache.reorder(index)


@torch.no_grad()
def decode_steps(model, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, repetition_penalty=1.0,
                 pad=None, generator=None, use_cache=True):
    """Yields (tokens (B,), logits (B, V)) for each of max_new_tokens steps: the chosen tokens
    and the model's raw logits they were chosen from. idx (B, N) is left-padded by pad (B,)."""
    check_sampling(temperature, top_k, top_p, repetition_penalty)
    if max_new_tokens < 1:
        return
    decoder = Decoder(model, idx, pad, use_cache)
    seen = None
    if repetition_penalty != 1.0:  # which tokens each row holds, padding excluded: (B, V)
        seen = torch.zeros(idx.size(0), model.config.vocab_size, dtype=torch.bool, device=idx.device)
        pad = torch.zeros(idx.size(0), dtype=torch.long, device=idx.device) if pad is None else pad
        real = torch.arange(idx.size(1), device=idx.device)[None, :] >= pad[:, None]  # (B, N)
        seen.scatter_(1, idx, real)
    for step in range(max_new_tokens):
        logits = decoder.logits.float()
        scored = logits if seen is None else penalize_repeats(logits, seen, repetition_penalty)
        tokens = choose_next(scored, temperature, top_k, top_p, generator)  # (B,)
        yield tokens, logits
        if seen is not None:
            seen[torch.arange(tokens.size(0), device=tokens.device), tokens] = True
        if step + 1 < max_new_tokens:
            decoder.push(tokens)


@torch.no_grad()
def generate_batch(model, prompts, max_new_tokens, temperature=1.0, top_k=None, top_p=None,
                   repetition_penalty=1.0, eot_token=None, on_token=None, generator=None, use_cache=True):
    """Several prompts (lists of token ids, any lengths) decoded together in one left-padded
    batch. Returns the new tokens of each prompt, a list of lists. A row ends before
    eot_token (not included), or after a token for which on_token(row, token) returns True:
    that callback sees every new token of every unfinished row in order, the hook for
    streaming output and stop strings. For num_samples samples of a prompt, repeat it."""
    device = next(model.parameters()).device
    idx, pad = left_pad(prompts, device)
    out = [[] for _ in prompts]
    live = set(range(len(prompts)))
    steps = decode_steps(model, idx, max_new_tokens, temperature, top_k, top_p, repetition_penalty,
                         pad=pad, generator=generator, use_cache=use_cache)
    for tokens, _ in steps:
        for row, token in enumerate(tokens.tolist()):
            if row not in live:
                continue
            if token == eot_token:
                live.discard(row)
                continue
            out[row].append(token)
            if on_token is not None and on_token(row, token):
                live.discard(row)
        if not live:
            break
    return out


def normalized_score(logprob, length, length_penalty):
    """Beam ranking: total log-probability over length ** length_penalty (0: the plain total;
    1: the mean per token, so longer hypotheses are not penalised just for being longer)."""
    return logprob / max(length, 1) ** length_penalty


@torch.no_grad()
def beam_search(model, prompt, max_new_tokens, beam_width, length_penalty=1.0, eot_token=None, use_cache=True):
    """Keeps the beam_width best partial continuations of prompt (a list of ids) by total
    log-probability, extending each by every token at every step. A candidate ending in
    eot_token is finished (eot counts in its length but is not returned); search ends once
    beam_width hypotheses are finished, or after max_new_tokens, when the live beams compete
    too. Returns [(tokens, total log-probability)], best first by normalized_score."""
    if beam_width < 1:
        raise ValueError(f"beam_width must be >= 1, got {beam_width}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    device = next(model.parameters()).device
    decoder = Decoder(model, torch.tensor([list(prompt)], dtype=torch.long, device=device), use_cache=use_cache)
    beams, scores = [[]], torch.zeros(1, device=device)  # live beams' new tokens and log-probs (K,)
    finished = []  # (tokens, total log-prob)
    for step in range(max_new_tokens):
        logprobs = F.log_softmax(decoder.logits.float(), dim=-1)  # (K, V)
        vocab = logprobs.size(-1)
        totals = (scores[:, None] + logprobs).view(-1)  # (K * V,)
        # 2K candidates leave K live ones even if K of them end in eot
        top = torch.topk(totals, min(2 * beam_width, totals.numel()))
        parents, tokens, new_beams, new_scores = [], [], [], []
        for total, flat in zip(top.values.tolist(), top.indices.tolist()):
            parent, token = divmod(flat, vocab)
            if token == eot_token:
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
# LoRA checkpoints

def lora_state_dict(model):
    """Only the adapters and the classification head: what a LoRA fine-tune adds to its base."""
    return {k: v for k, v in model.state_dict().items() if ".lora_" in k or k.startswith("cls_head.")}
