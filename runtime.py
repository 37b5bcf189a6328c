"""
Where and how a script runs: the device, the number type, the process group, and the helpers that
keep several processes in step. train.py and sample.py ask for a Runtime once and pass it around.

Design choices:
- device=auto takes CUDA, then Apple's MPS, then the CPU.
- dtype=auto: bfloat16 autocast on CUDA GPUs that have it (float16 with a grad scaler on older
  ones); on CPUs with native bfloat16 (AVX512-BF16 or AMX) also bfloat16, where a 6x384 training
  step ran 1.85x faster than float32 and the loss curve held; float32 on every other CPU, where
  bfloat16 is emulated and slower. Weights stay float32 under autocast.
- Under torchrun the process group is joined once (NCCL on GPUs, gloo on CPUs). parallel=fsdp
  without torchrun makes a group of one process, so its sharded checkpoints resume alone too.
- On a CPU, glibc returns every large freed tensor to the OS and faults its pages back in at the next
  step (over a thousand page faults a step for a small model): keep_freed_memory keeps them.
- A CPU already loaded by other processes is named at start (busy_cpu_note): a slow run then has
  an explanation, not a mystery. (common.yield_idle_cores keeps the slowdown to the run's share.)
- Collective decisions (stop, save, skip a step) are taken by all processes together (any).
"""
import ctypes
import gc
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torch.distributed as dist

from common import UserError, cpu_cores

# Dense bf16 tensor-core peaks (FLOP/s) of common training GPUs, for MFU
GPU_PEAK_FLOPS = {"A100": 312e12, "H100": 989e12, "H200": 989e12, "A10G": 125e12, "L4": 121e12,
                  "RTX 4090": 165e12, "RTX 3090": 71e12}
DTYPES = ("float32", "bfloat16", "float16")


def pick_device(name):
    if name != "auto":
        if name.startswith("cuda") and not torch.cuda.is_available():
            raise UserError(f"device={name} but CUDA is not available; use --device=cpu")
        return name
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def cpu_has_native_bf16():
    """Whether this CPU multiplies bfloat16 in hardware (AVX512-BF16 or AMX), not by emulation."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def pick_dtype(name, device_type):
    if name == "auto":
        if device_type == "cuda":
            return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
        if device_type == "cpu" and cpu_has_native_bf16():
            return "bfloat16"
        return "float32"
    if name not in DTYPES:
        raise UserError(f"dtype={name!r} is not one of auto, {', '.join(DTYPES)}")
    return name


def keep_freed_memory():
    """Keep freed memory in the process (glibc): blocks under 1 GiB come from the heap, and up to
    1 GiB of freed heap stays for the next step instead of being returned and faulted back in.
    Returns whether the setting was applied (not on other systems or C libraries)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (musl, say): its allocator is left as it is
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    return bool(libc.mallopt(M_MMAP_THRESHOLD, 1 << 30)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 1 << 30))


def minor_page_faults():
    """This process's minor page faults so far (0 where the system does not count them)."""
    try:
        import resource
    except ImportError:
        return 0
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def busy_cpu_note(device):
    """A line saying the CPU is already busy (the 1-minute load average is at least its core count), or
    "" when it is not, the device is not the CPU, or the system keeps no load average."""
    if device != "cpu" or not hasattr(os, "getloadavg"):
        return ""
    load, cores = os.getloadavg()[0], cpu_cores()
    if load < cores:
        return ""
    return (f"note: the load average is {load:.1f} on {cores} cores: other processes are using the CPU, so this "
            f"runs at its share of it (README, \"A busy CPU\")")


def peak_flops_of(device):
    if not device.startswith("cuda"):
        return 0.0
    name = torch.cuda.get_device_name()
    return next((v for k, v in GPU_PEAK_FLOPS.items() if k in name), 0.0)


def copy_bandwidth(device, mb=256, repeat=5):
    """The memory bandwidth (bytes/s) one tensor copy reaches on device with torch's threads as they are
    set: the best of repeat copies of an mb-MB buffer, counting its bytes read and written (STREAM's
    "copy" convention), the ceiling for a decoder that reads its weights once per token."""
    device = torch.device(device)
    src = torch.ones(mb * 2**20 // 4, device=device)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(repeat + 1):  # the first copy faults the pages in
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        dst.copy_(src)
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return 2 * src.numel() * src.element_size() / best


def attention_training_ms(shape, dtype, repeat=3):
    """The best of repeat forward-and-backward passes of causal scaled_dot_product_attention on the CPU
    at shape (B, H, T, d) in dtype, in milliseconds (random inputs from a generator of its own, so the
    run's random numbers are untouched)."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(shape, generator=g, dtype=dtype).requires_grad_() for _ in range(3))
    best = float("inf")
    for _ in range(repeat + 1):  # the first pass allocates
        t0 = time.perf_counter()
        F.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward()
        best = min(best, time.perf_counter() - t0)
    return best * 1000


def cpu_attention_dtype(shape, dtype):
    """The dtype a CPU trains attention of shape (B, H, T, d) faster in: dtype or float32, by timing both.
    torch's CPU flash-attention kernel runs its bfloat16 backward several times slower than float32's on
    small shapes (8.1 against 2.2 ms at 16 x 4 heads x 64 x 32) and faster on large ones (1024 tokens)."""
    if dtype == torch.float32:
        return dtype, {}
    times = {d: attention_training_ms(shape, d) for d in (dtype, torch.float32)}
    return min(times, key=times.get), times


@dataclass(frozen=True)
class Runtime:
    """The device, number type and place in the process group of this process."""
    device: str = "cpu"      # cpu | cuda | cuda:N | mps
    dtype: str = "float32"   # the autocast type (float32: none)
    rank: int = 0
    local_rank: int = 0
    world: int = 1

    @property
    def device_type(self):
        return "cuda" if self.device.startswith("cuda") else self.device

    @property
    def master(self):
        return self.rank == 0

    def autocast(self, enabled=True):
        """Mixed precision for a forward pass, or nothing in float32 (or when not enabled: fsdp casts
        by its own policy)."""
        if self.dtype == "float32" or not enabled:
            return nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=getattr(torch, self.dtype))

    def sync(self):
        """Wait for the device, before reading a clock."""
        if self.device_type == "cuda":
            torch.cuda.synchronize()

    def any(self, flag):
        """True on every process when flag is true on any one: keeps collective decisions in step."""
        if self.world == 1:
            return bool(flag)
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def mean(self, t):
        """The mean of a tensor over the processes (in place)."""
        if self.world > 1:
            dist.all_reduce(t, op=dist.ReduceOp.AVG)
        return t

    def total(self, t):
        """The sum of a tensor over the processes (in place)."""
        if self.world > 1:
            dist.all_reduce(t)
        return t

    def gather(self, obj):
        """Every process's obj, in rank order."""
        if self.world == 1:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out


    def peak_memory_mb(self):
        if self.device_type == "cuda":
            return torch.cuda.max_memory_allocated() / 2**20
        import resource  # CPU: the process's peak resident memory (kB on Linux)
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def local(device="auto", dtype="auto"):
    """The Runtime of a script that runs as one process (sampling, evaluation)."""
    return start(device, dtype, distributed=False)


def start(device="auto", dtype="auto", backend="auto", group=False, distributed=True):
    """The Runtime of this process. Joins the process group when launched by torchrun, or as a
    group of one when group=True (parallel=fsdp alone); distributed=False never joins one."""
    torchrun = "RANK" in os.environ and distributed
    rank = local_rank = 0
    world = 1
    if torchrun or (group and distributed):
        env = os.environ if torchrun else {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1"}
        rank, local_rank, world = int(env["RANK"]), int(env["LOCAL_RANK"]), int(env["WORLD_SIZE"])
        if backend == "auto":
            backend = "nccl" if torch.cuda.is_available() and device in ("auto", "cuda") else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
            device = f"cuda:{local_rank}"
        alone = {} if torchrun else dict(store=dist.HashStore(), rank=0, world_size=1)
        dist.init_process_group(backend=backend, **alone)
    device = pick_device(device)
    runtime = Runtime(device, pick_dtype(dtype, "cuda" if device.startswith("cuda") else device),
                      rank, local_rank, world)
    if runtime.device_type == "cpu":
        keep_freed_memory()
    if runtime.device_type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return runtime


def barrier():
    """Wait until every process of the group (if one was joined) gets here."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def stop():
    """Leave the process group, if one was joined: after every process has finished."""
    if dist.is_available() and dist.is_initialized():
        gc.collect()  # free fsdp's reference cycles now: freed in interpreter shutdown, they aborted
        dist.destroy_process_group()  # the process at exit (gloo; about 1 run in 25 before this)


def shard_model(model, runtime, compile_blocks=False):
    """parallel=fsdp: split each block's weights, then the rest, over the processes, moving them to the
    device one block at a time; each group is gathered for its forward and backward only. Computes in
    runtime.dtype, keeps float32 weights for the optimizer and reduces gradients in float32 (instead of
    autocast)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mesh = init_device_mesh(runtime.device_type, (runtime.world,))  # fsdp's default would pick CUDA for device=cpu
    policy = MixedPrecisionPolicy(param_dtype=getattr(torch, runtime.dtype), reduce_dtype=torch.float32)
    for block in model.transformer.h:
        if compile_blocks:  # in place, before sharding: fsdp's hooks stay outside compiled code, names unchanged
            block.compile()
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
