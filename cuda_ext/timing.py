"""CUDA timing and the GPU's peaks, measured in the run, for the benches' GPU mode (`bench/*.py --device cuda`).

Peaks are the best of a few tries: other work only ever slows a try down, so the fastest
is the closest to what the GPU does alone, and a fraction of it cannot be inflated.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def cuda_seconds(fn: Callable[[], object]) -> float:
    """Seconds of GPU time for everything `fn` queues, by CUDA events around it on the current stream."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3


def matmul_tflops(size: int = 8192, dtype: torch.dtype = torch.bfloat16, tries: int = 5) -> float:
    """TFLOP/s of a size³ matmul in `dtype` on the current GPU (cuBLAS), best of `tries` after a warm-up."""
    a = torch.randn(size, size, device="cuda", dtype=dtype)
    b = torch.randn(size, size, device="cuda", dtype=dtype)
    torch.mm(a, b)
    return 2 * size**3 / min(cuda_seconds(lambda: torch.mm(a, b)) for _ in range(tries)) / 1e12


def copy_gb_per_s(nbytes: int = 1 << 30, tries: int = 5) -> float:
    """Device-to-device copy bandwidth in GB/s, counting bytes read plus bytes written, best of `tries`."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda").random_()  # random: no compressible pages
    dst = torch.empty_like(src)
    dst.copy_(src)
    return 2 * nbytes / min(cuda_seconds(lambda: dst.copy_(src)) for _ in range(tries)) / 1e9
