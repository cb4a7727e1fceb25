"""The CPU decode kernels: where they run, and the switch back to the torch path.

Decoding one token reads every weight once, so on the CPU its speed is the rate at which
the matrix-vector products stream the weights, plus whatever the steps between them cost.
`torch.ops.vlmq_decode_cpu` (built from `cuda_ext/decode/csrc/` on first use, see
`cuda_ext.build`) has these ops:

- `decode_layer`: a whole decode step of a pre-norm Llama layer (Llama, Qwen2, Mistral;
  Gemma 3's with its QK-norm, output norms and GeGLU), one call instead of ~35 eager ops;
  `generator_service.models.decoder.DecoderLayer` uses it for decode forwards, and its own torch decode path
  is the reference the tests hold it to;
- `panel_linear`: x wᵀ (+ bias) (+ residual) for any number of rows of x, over a weight packed in
  panels (`PanelWeight`); the language models' prefill and mixed steps run their products on it too, and
  every step its LM head (a tied head then costs a copy of the embedding table, which lookups read row-major);
- `paged_attention`: the attention of decode rows over their cached keys, through the block tables (what
  `decode_layer` attends): a step that prefills too runs its layers on the torch path, and attends its decode
  rows with it;
- `linear`: x wᵀ for a few rows of x over a row-major weight (what `choose_prefetch` times, and
  bench/products.py's row-major contender);
- `activation_`: silu or tanh GELU over a tensor in place, times a second one if given
  (the vision towers' MLPs, `embedder_service.models.gemm`).

Why panels: a row-major weight gives each output a dot product along K, so several tokens need a
horizontal sum per output and a load of every token's x per weight load; 16 outputs interleaved by k
give one weight load per k for 16 outputs, each token's x[k] a broadcast, and one contiguous stream
per thread. `bench/products.py` times both layouts against MKL and oneDNN from 1 to 512 tokens.

Which path runs (`VLMQ_DECODE_KERNEL`, read through `Settings`, or `set_decode_kernel` before a model is prepared):

- `auto` (default): the kernels for CPU float32 models, built on first use; where they
  cannot be built (no compiler, no ninja, a CPU without AVX2) the torch path, with one
  logged warning;
- `reference`: the torch path (oneDNN-blocked weights, eager ops); the vision towers'
  activations then run as torch's.

Weights in 16 bits (`VLMQ_DECODE_WEIGHTS`): a checkpoint saved in bfloat16 or float16 is upcast to float32
on loading, and `pack_panels` keeps each weight whose values all fit back in that type; the products widen
each value to the same float32 before its FMAs (the same results, bit for bit), so a decode step, which
streams every weight once, reads half the bytes. A product over many tokens (a prompt) widens each group of
panels once into float32 scratch, where it is compute-bound. `float32` keeps every weight in float32.

Whether the products prefetch weight lines ahead of the hardware prefetcher is timed once per
process (`choose_prefetch`): it helps on some CPUs and costs on others.

A product or attention is split between torch's threads only where each thread streams at
least 128 KB, so a tiny model's steps run in the calling thread: with more busy threads than
cores (two workers of 2 threads on 2 cores) every hand-off would wait for a descheduled thread.
"""

from __future__ import annotations

import functools
import logging
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from shared.config.switch import Switch
from shared.modeling.timing import fastest

log = logging.getLogger(__name__)

# The kernels' activation (`decode_layer`'s `act`, `activation_`'s) for each `DecoderConfig.hidden_act`
# (generator_service.models.decoder.GATE_ACTIVATIONS); the values are the names the vision towers use too (gemm.ACTIVATIONS).
KERNEL_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh"}

# Outputs per panel of a packed weight (decode_kernels_api.h's kPanel).
PANEL = 16

DECODE = Switch("decode_kernel")
DECODE_WEIGHTS = Switch("decode_weights")
_warned_fallback = False


def decode_kernel() -> str:
    """The decode path in force for models prepared from now on: "auto" or "reference"."""
    return DECODE()


def set_decode_kernel(mode: str) -> str:
    """Choose the decode path for models prepared from now on (overrides VLMQ_DECODE_KERNEL); returns the previous one."""
    return DECODE.set(mode)


def cpu_decode_ops(device: torch.device | str, dtype: torch.dtype) -> Any | None:
    """`torch.ops.vlmq_decode_cpu` for tensors on `device` in `dtype` when the mode and the machine allow, else None."""
    if DECODE() == "reference" or torch.device(device).type != "cpu" or dtype != torch.float32:
        return None
    # Imported here, not with this module, so that `python -m cuda_ext.build` runs a module not yet imported.
    from cuda_ext import build

    try:
        ops = build.decode_cpu_ops()
    except build.ExtensionUnavailable as error:
        _warn_fallback(str(error))
        return None
    if ops.isa() == "none":
        _warn_fallback("this CPU has neither AVX2 + FMA nor AVX-512")
        return None
    choose_prefetch(ops)
    return ops


class PanelWeight(NamedTuple):
    """A weight [M, K] packed for `panel_linear`: data [ceil(M / 16), K, 16], w[m, k] at data[m // 16, k, m % 16],
    zero past M; float32, or bfloat16 / float16 where those hold every value exactly (`pack_panels`).
    `shared.modeling.layers.linear` calls `linear` on it like on a prepared tensor."""

    data: Tensor
    rows: int  # M

    def linear(self, x: Tensor, bias: Tensor | None = None, residual: Tensor | None = None) -> Tensor:
        """x: [N, K] → x wᵀ (+ bias) (+ residual): [N, M]."""
        return torch.ops.vlmq_decode_cpu.panel_linear(x, self.data, self.rows, bias, residual)


def pack_panels(weight: Tensor) -> PanelWeight:
    """weight: [M, K] float32 → the same weight in panels of 16 outputs (see `PanelWeight`): in bfloat16 or float16
    where every value is exactly one (a checkpoint saved in that type, upcast on loading) and VLMQ_DECODE_WEIGHTS is
    auto. The kernels widen each value back to the same float32, so the products are the same; a decode step reads
    half the bytes."""
    m, k = weight.shape
    panels = -(-m // PANEL)
    data = F.pad(weight.detach(), (0, 0, 0, panels * PANEL - m)).view(panels, PANEL, k).transpose(1, 2).contiguous()
    return PanelWeight(narrowest_exact(data) if DECODE_WEIGHTS() == "auto" else data, m)


def narrowest_exact(data: Tensor) -> Tensor:
    """data (float32) in the first of bfloat16, float16 that holds every value exactly, else data itself."""
    first = data.view(-1)[:4096]
    for half in (torch.bfloat16, torch.float16):
        if torch.equal(first.to(half).float(), first):  # a float32 weight fails here, before all of it is converted
            narrow = data.to(half)
            if torch.equal(narrow.float(), data):
                return narrow
    return data


@functools.cache
def choose_prefetch(ops: Any, rounds: int = 5) -> bool:
    """Whether the products prefetch weight lines ahead (`use_prefetch`), whichever streamed faster here, timed once.

    On the Intel Xeon measured the prefetches took the products closer to memory bandwidth; on the AMD
    EPYC measured they cost 7–15% of it. Timed on a 128 MB weight (more than most L3 caches), one row,
    the best of `rounds` alternated calls of each, with torch's threads as they are now.
    """
    weight, x = torch.full((32768, 1024), 0.5), torch.full((1, 1024), 0.5)

    def product(prefetch: bool) -> None:
        ops.use_prefetch(prefetch)
        ops.linear(x, weight)

    chosen, best = fastest({prefetch: functools.partial(product, prefetch) for prefetch in (True, False)}, rounds)
    log.info("CPU decode: products %s prefetching (%.2f ms with, %.2f ms without, 128 MB)",
             "with" if chosen else "without", 1e3 * best[True], 1e3 * best[False])
    return ops.use_prefetch(chosen)


def _warn_fallback(reason: str) -> None:
    global _warned_fallback
    if not _warned_fallback:
        _warned_fallback = True
        log.warning("CPU decode: using the torch path, the decode kernels are unavailable: %s", reason)
