"""The machine a run computes on: device choice, the process group, torch's CPU threads, precision, peak FLOP/s.

    pick_device("auto" | "cpu" | "cuda", local_rank) -> torch.device   (CUDA: sets the current device, TF32 matmuls)
    distributed(device) -> (rank, world size)                          (joins the process group under torchrun)
    with cpu_threads(n): ...                                           (torch's intra-op threads, restored after)
    compute_dtype("auto" | "bf16" | "fp32", device) -> torch.dtype    (bf16 only where it is the faster)
    peak_flops(device, dtype) -> FLOP/s                               (measured once per process; MFU's denominator)
    sync(device)                                                        (wait for queued CUDA work before timing)

Used by the trainer (tasks/train/trainer.py) and the benchmarks; it knows nothing about models or data.
"""

from __future__ import annotations

import contextlib
import os
import time
from typing import Callable, Iterator

import torch
import torch.distributed as dist

from models import rng

_PEAK_FLOPS: dict[tuple[str, torch.dtype, int], float] = {}


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA kernels run asynchronously); nothing to wait for on CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def pick_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    """"auto": CUDA when visible, else CPU. CUDA: device `local_rank` (torchrun's LOCAL_RANK) becomes the current one,
    and fp32 matrix products outside autocast may use TF32."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("TrainConfig.device='cuda' but no CUDA device is visible; use device='auto' or 'cpu'")
        torch.cuda.set_device(local_rank)
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 parts of the model (not under autocast)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def distributed(device: torch.device) -> tuple[int, int]:
    """(rank, world size); joins the process group under torchrun (NCCL for CUDA devices, gloo for CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), world


@contextlib.contextmanager
def cpu_threads(n: int) -> Iterator[None]:
    """torch's intra-op thread count for the duration of a block (0: leave it), restored afterwards.

    Measured on the project's shared two-core machines (2026-11-29), a default-size ViT step (batch 64): one thread
    470 ms, two threads 2200 ms (every OpenMP barrier waits for a thread another process has descheduled; 700 ms
    with OMP_WAIT_POLICY=PASSIVE). On a machine of its own, cpu_threads=0 uses every core.
    """
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def peak_flops(device: torch.device, dtype: torch.dtype) -> float:
    """Best measured matrix-product FLOP/s of this device and dtype, measured once per process (and thread count).

    Square products of growing size (256 .. 4096), each timed over enough repeats to last ~0.05 s; sizes stop
    growing before one product would take over 0.25 s (a CPU without bf16 instructions emulates bf16 at ~1 GFLOP/s,
    where a 4096^3 product takes minutes). Inputs are constants, not random: measuring must not move the RNG
    streams a resumed run reproduces. On a CPU shared with other processes the figure, and so MFU, is approximate.
    """
    key = (str(device), dtype, torch.get_num_threads())
    if key not in _PEAK_FLOPS:
        best = 0.0
        for n in (256, 512, 1024, 2048, 4096):
            a = torch.full((n, n), 0.5, device=device, dtype=dtype)
            b = torch.full((n, n), 0.25, device=device, dtype=dtype)
            t0 = time.perf_counter()
            a @ b  # warm-up, and a first estimate of the time per product
            sync(device)
            one = time.perf_counter() - t0
            reps = max(1, min(50, int(0.05 / max(one, 1e-6))))
            t0 = time.perf_counter()
            for _ in range(reps):
                a @ b
            sync(device)
            best = max(best, 2 * n**3 * reps / (time.perf_counter() - t0))
            if one * 8 > 0.25:  # the next size does 8x the work
                break
        _PEAK_FLOPS[key] = best
    return _PEAK_FLOPS[key]


def compute_dtype(precision: str, device: torch.device) -> torch.dtype:
    """The autocast dtype: bf16 or fp32 as asked; "auto" takes bf16 where the device computes it faster.

    CUDA: bf16 when the GPU supports it. CPU: bf16 only if its measured matmul peak beats fp32's by 1.5x: CPUs with
    AVX512-BF16/AMX run bf16 ~4x faster than fp32, but an AVX2-only CPU emulates it ~50x slower.
    """
    if precision != "auto":
        return torch.bfloat16 if precision == "bf16" else torch.float32
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    fast = peak_flops(device, torch.bfloat16) > 1.5 * peak_flops(device, torch.float32)
    return torch.bfloat16 if fast else torch.float32


# bf16 is taken only where its step is at least this much faster than fp32's. The timing is noisy (two lanes share
# two cores): the AST's step read bf16 151 / fp32 173 ms in one run and 152 / 140 ms in the next, same command (AMD
# EPYC, 2026-12-04; 1.02x-1.23x for bf16 in five of ten runs), so the choice flipped between runs and with it the
# result (an unseen nicolas 0.698 / 0.532). Under the margin fp32 it is: the same command repeats its figures.
BF16_MARGIN = 1.3


def faster_dtype(step: Callable[[], None], device: torch.device, repeats: int = 3,
                 dtypes: tuple[torch.dtype, ...] = (torch.bfloat16, torch.float32)) -> tuple[torch.dtype, dict]:
    """(the faster for `step` of `dtypes`, bf16 autocast and fp32, bf16 only by BF16_MARGIN; {dtype: seconds a
    call}): the best of `repeats` timed calls after one warm-up, drawing from generators of its own and from torch's
    global one seeded, held and put back (models/rng.py): a training's draws are as they were. A device's matmul peak
    (compute_dtype) does not decide it for a small model: on a CPU with AMX, bf16's products are ~4x faster, yet the
    casts around them can cost more."""
    seconds = {}
    with rng.own_draws(0), rng.seeded(0):
        for dtype in dtypes:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
                step()
                times = []
                for _ in range(repeats):
                    sync(device)
                    t0 = time.perf_counter()
                    step()
                    sync(device)
                    times.append(time.perf_counter() - t0)
            seconds[dtype] = min(times)
    return kept_dtype(seconds), seconds


def kept_dtype(seconds: dict[torch.dtype, float]) -> torch.dtype:
    """Of {dtype: seconds a step}, the one precision "auto" keeps: the faster, bf16 only by BF16_MARGIN over fp32."""
    handicap = {torch.bfloat16: BF16_MARGIN} if torch.float32 in seconds else {}
    return min(seconds, key=lambda d: seconds[d] * handicap.get(d, 1.0))
