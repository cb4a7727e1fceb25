"""The vision towers' GEMMs and activations: `linear` on the CPU's fast paths, torch ops elsewhere (the reference).

On the CPU, float32 GEMMs of enough rows run on weights MKL packed where that is the faster GEMM
(`mkl_packed`: Intel CPUs), then the activation (the CPU kernels' for silu and tanh GELU) or the
residual, in place. The others go through oneDNN, on weights it has reordered into its blocked layout
once (`onednn_weight`), which fuses the activation or the residual add into the GEMM's epilogue; on AMD
EPYC, MKL (and so aten's sgemm) runs an AVX2 code path where oneDNN's JIT uses AVX-512, ~2× faster on
the same shapes. Both are ops inductor emits for frozen CPU linears; numerics are ordinary float32
(tests compare the paths, switching `CPU_FAST_PATHS` off).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch.utils.weak import WeakIdKeyDictionary

from cuda_ext.decode.ops import KERNEL_ACTIVATIONS, cpu_decode_ops
from embedder_service.models import mkl_packed
from shared.config.errors import CheckpointError
from shared.modeling.layers import prepare_weight

CPU_FAST_PATHS = True  # MKL / oneDNN GEMMs and the activation kernels; tests switch it off to compare with torch ops

QUICK_GELU_SCALE = 1.702  # quick_gelu(x) = x * sigmoid(1.702 x)


class Activation(NamedTuple):
    config_names: tuple[str, ...]  # what configs call it (several name the same function)
    onednn: tuple[str, str] | None  # oneDNN's GEMM epilogue for it, (attr, algorithm); None: applied after the GEMM


# Every activation the towers compute, by the name the code uses (the CPU kernels' names for theirs).
ACTIVATIONS = {
    "gelu": Activation(("gelu",), ("gelu", "none")),
    "gelu_tanh": Activation(("gelu_new", "gelu_pytorch_tanh", "gelu_fast"), ("gelu", "tanh")),
    "quick_gelu": Activation(("quick_gelu",), None),
    "silu": Activation(("silu", "swish"), ("swish", "")),
    "relu": Activation(("relu",), ("relu", "")),
}


def activation(config_name: str) -> str:
    """The name the code uses for a config's activation; CheckpointError for one we do not implement."""
    for name, act in ACTIVATIONS.items():
        if config_name in act.config_names:
            return name
    supported = ", ".join(n for act in ACTIVATIONS.values() for n in act.config_names)
    raise CheckpointError(f"unsupported activation {config_name!r}; supported: {supported}")


def apply_activation(x: torch.Tensor, act: str, inplace: bool = False) -> torch.Tensor:
    """act(x); `inplace` overwrites x where a kernel does it in place (the CPU kernels' silu and tanh GELU, torch's relu)."""
    if inplace and act in KERNEL_ACTIVATIONS.values() and (kernels := _cpu_kernels(x)) is not None:
        return kernels.activation_(x, None, act)
    if act == "gelu":
        return F.gelu(x)
    if act == "gelu_tanh":
        return F.gelu(x, approximate="tanh")
    if act == "quick_gelu":
        return x * torch.sigmoid(QUICK_GELU_SCALE * x)
    if act == "silu":
        return F.silu(x, inplace=inplace)
    if act == "relu":
        return F.relu(x, inplace=inplace)
    raise ValueError(f"unknown activation {act!r}")


def gated_activation_(gate: torch.Tensor, up: torch.Tensor, act: str) -> torch.Tensor:
    """act(gate) · up, written over gate (a gated MLP's hidden state): one pass with the CPU kernels."""
    if act in KERNEL_ACTIVATIONS.values() and up.is_contiguous() and (kernels := _cpu_kernels(gate)) is not None:
        return kernels.activation_(gate, up, act)
    return apply_activation(gate, act, inplace=True).mul_(up)


def _cpu_kernels(x: torch.Tensor):
    """The CPU kernels' ops for a contiguous float32 CPU tensor, where they run (see cuda_ext.decode), else None."""
    if not (CPU_FAST_PATHS and x.is_contiguous()):
        return None
    return cpu_decode_ops(x.device, x.dtype)


_onednn_weights: WeakIdKeyDictionary = WeakIdKeyDictionary()  # weight → (its _version, the reordered copy)


def onednn_weight(weight: torch.Tensor) -> torch.Tensor:
    """`weight` [M, K] as oneDNN's linear reads it fastest, reordered once per weight (again if modified in place).

    oneDNN otherwise reorders a plain weight on every call: 5–15% of a ViT-B GEMM's time on 197 or 1576
    rows here. The copy is kept while the weight lives (keyed weakly by it). A view, made per call,
    would be reordered per call, so it is passed as it is; so is a weight `prepare_weight` leaves as it is.
    """
    if weight._base is not None or not weight.is_contiguous():
        return weight
    cached = _onednn_weights.get(weight)
    if cached is None or cached[0] != weight._version:
        cached = _onednn_weights[weight] = (weight._version, prepare_weight(weight))
    return cached[1]


@functools.cache
def onednn_linear_available(dtype: torch.dtype = torch.float32) -> bool:
    """Whether this torch build and CPU run oneDNN's fused linear in `dtype` and it computes what F.linear does."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        # Fixed values, not torch.randn: probing must not move the global RNG.
        x = torch.linspace(-1, 1, 24).view(3, 8).to(dtype)
        w = torch.linspace(-0.5, 0.5, 40).view(5, 8).to(dtype)
        b = torch.linspace(0, 1, 5).to(dtype)
        out = torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")
        return bool(torch.allclose(out.float(), F.linear(x, w, b).float(), atol=1e-2))
    except (AttributeError, RuntimeError, NotImplementedError):  # op missing, or no kernel for this CPU/dtype
        return False


def linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, *, act: str | None = None, residual: torch.Tensor | None = None
) -> torch.Tensor:
    """x @ weight.T + bias, then `act` or `+ residual` (one of them). x: [..., K], weight: [M, K] → [..., M]."""
    out = None
    if CPU_FAST_PATHS and x.device.type == "cpu":
        out = mkl_packed.linear(x, weight, bias)
        if out is None and x.dtype in (torch.float32, torch.bfloat16) and onednn_linear_available(x.dtype):
            weight = onednn_weight(weight)
            if residual is not None:
                return torch.ops.mkldnn._linear_pointwise.binary(x, residual, weight, bias, "add")
            if act is not None and (epilogue := ACTIVATIONS[act].onednn) is not None:
                return torch.ops.mkldnn._linear_pointwise(x, weight, bias, epilogue[0], [], epilogue[1])
            out = torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    if out is None:
        out = F.linear(x, weight, bias)
    # `out` is this call's own tensor: the rest may overwrite it.
    if residual is not None:
        return out.add_(residual)
    return apply_activation(out, act, inplace=True) if act is not None else out
