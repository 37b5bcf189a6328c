"""
Weight-only int8 quantization: smaller checkpoints and faster batch-1 decoding.

  python quantize.py --out_dir=out-shakespeare-char --out=out-shakespeare-char-int8   # saves ckpt.pt there
  python quantize.py --out_dir=out --out=out-int8 --quantize=int8_all                 # embedding and head too
  python sample.py --out_dir=out-shakespeare-char --quantize=int8                      # or quantize on load
  python sample.py --out_dir=out-shakespeare-char-int8                                 # a saved int8 checkpoint

Decoding one sequence reads every weight once per token and does little arithmetic with each, so its
speed is the memory's: int8 weights are a quarter of float32's bytes (sample.py --bench shows the
bandwidth used, MBU).

Design choices:
- Per output channel, symmetric: row o of W becomes q_o * s_o with s_o = max|W_o| / 127 and q_o int8, so
  each output keeps its own scale (one outlier row costs only its own precision) and zero stays zero.
- Activations stay in the model's dtype; only the matrix product sees int8 weights. The product's
  kernel is chosen at run time by timing the candidates on this machine (choose_kernel): torch's
  int8 weight-only kernel with bfloat16 or with the model's own activations, or dequantizing the
  rows first (works everywhere). Kernels differ by CPU and GPU, and the choice is printed. The same
  kernel runs under torch.compile (the static cache): a broadcast-and-sum product that inductor fuses
  into one loop over the int8 weights was measured too, and ran at less than half its tokens/s (AVX-512
  without bf16).
- Two modes: "int8" quantizes the transformer blocks' matrices (attention and MLP, 95%+ of a small
  model's weight bytes once the vocabulary is small); "int8_all" also the token embedding and the
  output head (one shared table when they are tied), the largest matrix of a GPT-2-vocabulary model.
- A quantized checkpoint records quantization=MODE and holds the int8 tensors and scales; loading it
  (checkpoint.model_from_checkpoint) rebuilds the same modules. LoRA adapters are merged first
  (merge_lora.py); a classifier's small head stays in float.
"""
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

MODES = ("int8", "int8_all")
BLOCK_LINEARS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


def quantize_rows(w):
    """w (out, in) float -> q (out, in) int8 and scales (out,) float32 with w ~ q * scales[:, None]."""
    scales = w.detach().float().abs().amax(dim=1).clamp(min=1e-12) / 127  # an all-zero row keeps scale > 0
    q = torch.round(w.detach().float() / scales[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scales


def dequantize_rows(q, scales, dtype=torch.float32):
    return (q.to(dtype) * scales[:, None].to(dtype))


# ----------------------------------------------------------------------------------------------
# The product x @ (q * s)^T: candidates, and the choice made by timing them here

def _int8pack(x, q, scales):
    """torch's weight-only int8 kernel in the activations' own dtype."""
    shape = x.shape
    if scales.dtype != x.dtype:
        scales = scales.to(x.dtype)
    out = torch._weight_int8pack_mm(x.reshape(-1, shape[-1]).contiguous(), q, scales)
    return out.reshape(*shape[:-1], q.size(0))


def _int8pack_bf16(x, q, scales):
    """torch's weight-only int8 kernel with bfloat16 activations, the result back in x's dtype."""
    return _int8pack(x.to(torch.bfloat16), q, scales).to(x.dtype)


def _dequant(x, q, scales):
    """The rows dequantized to x's dtype, then an ordinary product: correct on every device."""
    return F.linear(x, dequantize_rows(q, scales, x.dtype))


KERNELS = {"int8pack_bf16": _int8pack_bf16, "int8pack": _int8pack, "dequant": _dequant}
_chosen = {}  # (device type, dtype) -> kernel name


def _time(fn, device, repeat=30):
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeat):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / repeat


@torch.no_grad()
def choose_kernel(device, dtype, n_embd):
    """The fastest kernel for one-token products on device (an MLP-sized matrix, batch 1), among
    those that run and agree with a float product; measured once per (device, dtype) and reused."""
    device = torch.device(device)
    key = (device.type, dtype)
    if key not in _chosen:
        gen = torch.Generator().manual_seed(0)
        w = (torch.randn(4 * n_embd, n_embd, generator=gen) * 0.02).to(device)
        x = torch.randn(1, n_embd, generator=gen).to(device, dtype)
        q, s = quantize_rows(w)
        want = F.linear(x.float(), dequantize_rows(q, s))
        times = {}
        for name, kernel in KERNELS.items():
            try:
                got = kernel(x, q, s).float()
            except (RuntimeError, NotImplementedError):  # not built for this device or dtype
                continue
            if torch.allclose(got, want, rtol=2e-2, atol=2e-2 * want.abs().max().item()):
                times[name] = _time(lambda: kernel(x, q, s), device)
        _chosen[key] = min(times, key=times.get)
    return _chosen[key]


class Int8Linear(nn.Module):
    """A Linear layer whose weight is held as int8 rows and float32 scales: y = x (q s)^T + b."""

    def __init__(self, in_features, out_features, bias):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scales", torch.ones(out_features))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        self.kernel = "dequant"  # set by use_kernel once the model is on its device
        self.register_buffer("kernel_scales", None, persistent=False)  # scales in the kernel's dtype

    def use_kernel(self, name):
        self.kernel = name
        dtype = torch.bfloat16 if name == "int8pack_bf16" else self.scales.dtype
        self.kernel_scales = self.scales.to(dtype)

    @classmethod
    def from_linear(cls, linear):
        m = cls(linear.in_features, linear.out_features, linear.bias is not None)
        m.qweight, m.scales = quantize_rows(linear.weight)
        if linear.bias is not None:
            m.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        return m

    def forward(self, x):  # x (..., in) -> (..., out)
        y = KERNELS[self.kernel](x, self.qweight, self.scales if self.kernel_scales is None else self.kernel_scales)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self):
        return f"in={self.in_features}, out={self.out_features}, bias={self.bias is not None}, kernel={self.kernel}"


class Int8Embedding(nn.Module):
    """An embedding table held as int8 rows and scales; a lookup dequantizes only the rows it reads.
    Tied to an Int8Linear head, it holds no tensors of its own and reads the head's: a model moved or
    cast (Module._apply replaces each module's buffers on its own) still has one table."""

    def __init__(self, num_embeddings, embedding_dim, head=None):
        super().__init__()
        self._head = [head]  # in a list, so that the head is not a second submodule (nor a second state dict entry)
        if head is None:
            self.register_buffer("qweight", torch.zeros(num_embeddings, embedding_dim, dtype=torch.int8))
            self.register_buffer("scales", torch.ones(num_embeddings))

    def __getattr__(self, name):
        head = self.__dict__.get("_head", [None])[0]
        if head is not None and name in ("qweight", "scales"):
            return getattr(head, name)
        return super().__getattr__(name)

    def forward(self, idx):  # (B, T) -> (B, T, C)
        return self.qweight[idx].to(self.scales.dtype) * self.scales[idx][..., None]


# ----------------------------------------------------------------------------------------------
# A model in place

def check_quantizable(model, mode):
    """ValueError for a mode or a model this file cannot quantize."""
    if mode not in MODES:
        raise ValueError(f"quantize={mode!r}: choose {' or '.join(MODES)} (or leave it empty for none)")
    c = model.config
    if c.lora_rank or any(hasattr(m, "lora_A") for m in model.modules()):
        raise ValueError("the model has LoRA adapters: merge them into its weights first (python merge_lora.py)")
    if mode == "int8_all" and c.norm_head:
        raise ValueError("int8_all quantizes the output head, which norm_head normalises at every step; "
                         "use quantize=int8 (the blocks only)")
    if mode == "int8_all" and c.value_embeds:
        raise ValueError("int8_all does not quantize value embeddings; use quantize=int8 (the blocks only)")


def quantize_model(model, mode, weights=True):
    """Replace model's linear layers (and with int8_all its embedding and head) by int8 ones, in place;
    returns the model. weights=False builds the modules only, for a quantized state dict to fill."""
    check_quantizable(model, mode)
    dtype = model.transformer.wte.weight.dtype  # a model cast to bfloat16 keeps computing in it
    convert = Int8Linear.from_linear if weights else (
        lambda lin: Int8Linear(lin.in_features, lin.out_features, lin.bias is not None))
    for block in model.transformer.h:
        for path in BLOCK_LINEARS:
            parent, name = path.split(".")
            owner = getattr(block, parent)
            setattr(owner, name, convert(getattr(owner, name)))
    if mode == "int8_all":
        wte, tied = model.transformer.wte, model.config.tie_embeddings
        model.lm_head = convert(model.lm_head)
        emb = Int8Embedding(wte.num_embeddings, wte.embedding_dim, model.lm_head if tied else None)  # tied: one table
        if weights and not tied:
            emb.qweight, emb.scales = quantize_rows(wte.weight)
        model.transformer.wte = emb
    if weights and dtype != torch.float32:  # the scales as a quantized checkpoint's are after the same cast
        for m in model.modules():
            if isinstance(m, (Int8Linear, Int8Embedding)) and "scales" in m._buffers:
                m.scales = m.scales.to(dtype)
    model.quantization = mode
    return model


def set_kernel(model, dtype=torch.float32):
    """Every Int8Linear of model (already on its device) uses the kernel this machine runs fastest;
    returns its name."""
    layers = [m for m in model.modules() if isinstance(m, Int8Linear)]
    if not layers:
        return None
    name = choose_kernel(layers[0].qweight.device, dtype, model.config.n_embd)
    for m in layers:
        m.use_kernel(name)
    return name


def prepare(model, mode, dtype=None):
    """What sample.py, eval.py and serve.py call, the model on its device and in its dtype: quantized by
    mode ("" leaves it as it is, and so does a model loaded quantized; a model it cannot quantize is a
    UserError), with the kernel chosen for its device and for activations of dtype (default: the
    model's weights', what reaches its layers, autocast or not). Returns a line saying so, or None."""
    if mode and not getattr(model, "quantization", ""):
        from common import UserError
        try:
            quantize_model(model, mode)
        except ValueError as e:
            raise UserError(str(e)) from None
    if not getattr(model, "quantization", ""):
        return None
    if dtype is None:
        dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    return f"weights: {model.quantization} (kernel {set_kernel(model, dtype)})"


def weight_bytes(model):
    """Bytes of the model's parameters and buffers, each tensor counted once."""
    seen, n = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            n += t.numel() * t.element_size()
    return n


# ----------------------------------------------------------------------------------------------
# The command: a checkpoint in, a quantized checkpoint out

def load_model(ckpt):
    """The model of a loaded checkpoint, float or saved by this file (the int8 modules built first, then
    their tensors loaded), on the CPU."""
    from checkpoint import model_from_checkpoint
    if not ckpt.get("quantization"):
        return model_from_checkpoint(ckpt)
    from common import UserError
    from model import GPT, GPTConfig
    model = GPT(GPTConfig.from_dict(ckpt["model_config"]))
    try:
        quantize_model(model, ckpt["quantization"], weights=False)
    except ValueError as e:
        raise UserError(f"the checkpoint's quantization cannot be rebuilt ({e})") from None
    model.load_state_dict(ckpt["model"])
    return model


def main(argv):
    import os
    from checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
    from common import ArgumentParser, UserError, description, make_folder
    p = ArgumentParser(prog="quantize.py", description=description(__doc__))
    p.add_argument("--out_dir", required=True, help="folder of the float checkpoint (its ckpt.pt), or a ckpt file")
    p.add_argument("--out", required=True, help="folder to write the quantized ckpt.pt into (not the source's)")
    p.add_argument("--quantize", default="int8", help=f"{' | '.join(MODES)} (default int8: the blocks' matrices)")
    args = p.parse_args(argv)
    src = args.out_dir if args.out_dir.endswith(".pt") else os.path.join(args.out_dir, "ckpt.pt")
    if os.path.abspath(os.path.dirname(src)) == os.path.abspath(args.out):
        raise UserError(f"--out {args.out} is the source's folder; write the quantized checkpoint elsewhere "
                        f"so the float one stays")
    ckpt = load_checkpoint(src)
    if ckpt.get("quantization"):
        raise UserError(f"{src} is quantized already ({ckpt['quantization']})")
    model = model_from_checkpoint(ckpt)
    before = weight_bytes(model)
    try:
        quantize_model(model, args.quantize)
    except ValueError as e:
        raise UserError(str(e)) from None
    make_folder(args.out, "output folder")
    keep = {k: v for k, v in ckpt.items() if k not in ("optimizer", "model", "format")}
    save_checkpoint({**keep, "model": model.state_dict(), "quantization": args.quantize}, args.out)
    print(f"{args.quantize}: {before / 1e6:.1f} MB of weights -> {weight_bytes(model) / 1e6:.1f} MB, "
          f"{os.path.join(args.out, 'ckpt.pt')}")


if __name__ == "__main__":
    from common import run_cli
    sys.exit(run_cli(main))
