"""Multimodal embedding gather: the compiled kernel vs the torch reference and vs a plain copy.

The gather (`cuda_ext.gather.ops.multimodal_embedding`) writes one [D] row per token from the text
table or a container: it moves T×D elements, reading as many, so its ceiling is the
device's copy bandwidth. Measured in one run on the same inputs:

  kernel_vs_reference_<case>   tokens/s through the dispatcher, kernel path vs reference path
                               (both with their checks and error synchronisation)
  copy_fraction_<case>         the raw kernel's bytes/s ÷ a same-size device copy's      target ≥ 0.8 on a GPU (bulk)

Times are best-of-R wall time (bench/common.py), each round of back-to-back calls ending in
a synchronisation on CUDA. On CUDA (`--device cuda`, or auto when a GPU is visible): the CUDA
kernel, bfloat16. On the CPU: the CPU extension (the kernel's per-token code compiled for the
host, `VLMQ_EMBED_GATHER=kernel`), float32, one thread; the GPU target does not apply there
(no `met`), and `kernel_vs_reference` informs the CPU default.

Cases: `prompt` — bench-small (vocab 49152, hidden 576) with one 196-row image in 25
text tokens; `multi` — four 576-row images in 256 text tokens; on CUDA also `bulk` — a
7B-shaped table (vocab 32000, hidden 4096) and 64 images, 41k tokens, the bandwidth test.

    python bench/inject.py [--device auto|cpu|cuda] [--repeats 5] [--threads 1] [--quick]
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from common import best_of, compare, emit, parse_args

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cuda_ext import build  # noqa: E402
from cuda_ext.gather.ops import multimodal_embedding_kernel  # noqa: E402
from cuda_ext.gather.reference import multimodal_embedding_reference  # noqa: E402
from shared.store.token_ids import EMBEDDING_INDEX_BASE  # noqa: E402

BENCH = "inject"
COPY_TARGET = 0.8


@dataclass
class Case:
    name: str
    vocab: int
    hidden: int
    images: int  # containers
    rows_per_image: int
    text_tokens: int
    bandwidth_bound: bool = False  # large enough for the copy target: far beyond L2, launch cost negligible


CPU_CASES = [Case("prompt", 49152, 576, 1, 196, 25), Case("multi", 49152, 576, 4, 576, 256)]
CUDA_CASES = [*CPU_CASES, Case("bulk", 32000, 4096, 64, 576, 4096, bandwidth_bound=True)]


def make_inputs(case: Case, dtype: torch.dtype, device: str, g: torch.Generator):
    """ids: Long[T] (text tokens spread between the images, every image whole), table, ranges, rows."""
    table = torch.randn(case.vocab, case.hidden, generator=g).to(device, dtype)
    rows = torch.randn(case.images * case.rows_per_image, case.hidden, generator=g).to(device, dtype)
    firsts = [EMBEDDING_INDEX_BASE + i * (case.rows_per_image + 7) for i in range(case.images)]  # gaps between ranges
    ranges = torch.tensor([[f, case.rows_per_image] for f in firsts], dtype=torch.long)
    text = torch.randint(0, case.vocab, (case.text_tokens,), generator=g).tolist()
    per_gap = case.text_tokens // (case.images + 1)
    ids = text[:per_gap]
    for i, first in enumerate(firsts):
        ids += list(range(first, first + case.rows_per_image)) + text[(i + 1) * per_gap:(i + 2) * per_gap]
    ids += text[(case.images + 1) * per_gap:]
    return torch.tensor(ids, device=device), table, ranges.to(device), rows


def per_call_seconds(fns: dict, device: str, repeats: int, min_seconds: float = 0.05) -> dict[str, float]:
    """Seconds per call of each function: `common.best_of` over rounds of as many back-to-back calls as
    fill `min_seconds` (one timed call sets the count), so that microsecond kernels time well. On CUDA
    each round ends in a synchronisation (a call that syncs inside, like the dispatcher, is timed with it)."""
    sync = torch.cuda.synchronize if device == "cuda" else None
    calls = {name: max(1, int(min_seconds / max(seconds, 1e-7))) for name, seconds in best_of(fns, 1, sync).items()}
    rounds = {name: (lambda fn=fn, n=calls[name]: [fn() for _ in range(n)]) for name, fn in fns.items()}
    return {name: seconds / calls[name] for name, seconds in best_of(rounds, repeats, sync).items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--repeats", type=int, default=5)
    # One thread: the CPU extension runs on one, so the ratio compares code rather than thread
    # counts, and a 2-thread op on this shared 2-core machine stalls whenever the other core is busy.
    parser.add_argument("--threads", type=int, default=1)
    args = parse_args(parser, quick={"repeats": 1})
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    torch.set_num_threads(args.threads)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    bench = f"{BENCH}/{device}"

    start = time.perf_counter()
    gather = build.cuda_gather() if device == "cuda" else build.cpu_gather()
    impl = "CUDA kernel" if device == "cuda" else "CPU extension (the kernel's per-token code)"
    emit(bench, "extension_load_s", time.perf_counter() - start, "s", note="build on a cold cache, import on a warm one", impl=impl,
         device=torch.cuda.get_device_name() if device == "cuda" else "cpu", dtype=str(dtype).removeprefix("torch."))

    g = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for case in CUDA_CASES if device == "cuda" else CPU_CASES:
            measure_case(bench, case, gather, device, dtype, g, args.repeats)


def measure_case(bench: str, case: Case, gather, device: str, dtype: torch.dtype, g: torch.Generator, repeats: int) -> None:
    ids, table, ranges, rows = make_inputs(case, dtype, device, g)
    tokens, row_bytes = ids.shape[0], case.hidden * table.element_size()
    kernel_out = multimodal_embedding_kernel(gather, ids, table, ranges, rows)
    match = torch.equal(kernel_out, multimodal_embedding_reference(ids, table, ranges, rows))

    t = per_call_seconds({
        "kernel": lambda: multimodal_embedding_kernel(gather, ids, table, ranges, rows),
        "reference": lambda: multimodal_embedding_reference(ids, table, ranges, rows),
    }, device, repeats)
    compare(bench, f"kernel_vs_reference_{case.name}", tokens / t["kernel"], tokens / t["reference"], "tokens/s",
            note="no target: context for the gather's share of a prefill, and copy_fraction",
            tokens=tokens, hidden=case.hidden, images=case.images, outputs_match=match,
            kernel_us=t["kernel"] * 1e6, reference_us=t["reference"] * 1e6)

    # The raw op, without the dispatcher's checks and sync, against a copy of the same bytes.
    src, dst = torch.empty_like(kernel_out), torch.empty_like(kernel_out)
    t = per_call_seconds({
        "raw": lambda: gather(ids, table, ranges, rows, EMBEDDING_INDEX_BASE),
        "copy": lambda: dst.copy_(src),
    }, device, repeats)
    moved = 2 * tokens * row_bytes  # read + write
    if device == "cuda" and case.bandwidth_bound:
        target, note = f">= {COPY_TARGET}", "the raw kernel against a copy of as many bytes"
    else:
        target = None
        note = (f"the target (>= {COPY_TARGET}) is on a GPU; not applicable on the CPU" if device != "cuda"
                else "no target: launch-bound and cache-resident at this size (the target is on bulk)")
    compare(bench, f"copy_fraction_{case.name}", moved / t["raw"] / 1e9, moved / t["copy"] / 1e9, "GB/s", target, note=note,
            bytes_moved=moved, kernel_us=t["raw"] * 1e6, copy_us=t["copy"] * 1e6)


if __name__ == "__main__":
    main()
