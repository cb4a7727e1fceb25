"""CLIP ViT vision tower (the one LLaVA-1.5 uses), in plain torch.

Parameter names are those under `vision_tower.vision_model.` in a Hugging Face
checkpoint, so `Checkpoint.load_into` fills the modules strictly. The tower is
built only as deep as the deepest hidden state the caller needs: LLaVA-1.5
reads layer −2, so the last encoder layer (and `post_layernorm`) is never
built, loaded or run.

After loading, `fuse_()` rewrites the weights for speed (same function):
q/k/v become one [3D, D] GEMM, and quick_gelu's 1.702 is folded into fc1/fc2
so the activation is one `silu` kernel instead of three element-wise passes.
On the CPU the linears run on MKL-packed weights or through oneDNN, with the
activation or the residual add applied in place (see `linear`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary

from cuda_ext.decode import KERNEL_ACTIVATIONS, cpu_decode_ops
from embedder_service.models import mkl_packed
from shared.config.errors import CheckpointError, InvalidInput
from shared.modeling.layers import prepare_weight

QUICK_GELU_SCALE = 1.702  # quick_gelu(x) = x * sigmoid(1.702 x)

# Config activation names → the function each computes (several configs name the same one).
ACTIVATIONS = {
    "gelu": "gelu",
    "quick_gelu": "quick_gelu",
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "silu": "silu",
    "swish": "silu",
    "relu": "relu",
}


def activation(name: str) -> str:
    """The canonical name of a config's activation; CheckpointError for one we do not implement."""
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise CheckpointError(f"unsupported activation {name!r}; supported: {', '.join(ACTIVATIONS)}") from None


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


# --- linear layers: MKL-packed weights or oneDNN on the CPU, torch ops elsewhere (the reference) --------
#
# On the CPU, float32 GEMMs of enough rows run on weights MKL packed where that is the faster GEMM
# (`mkl_packed`: Intel CPUs), then the activation (the CPU kernels' for silu and tanh GELU) or the
# residual, in place. The others go through oneDNN, on weights it has reordered into its blocked layout
# once (`onednn_weight`), which fuses the activation or the residual add into the GEMM's epilogue; on AMD
# EPYC, MKL (and so aten's sgemm) runs an AVX2 code path where oneDNN's JIT uses AVX-512, ~2× faster on
# the same shapes. Both are ops inductor emits for frozen CPU linears; numerics are ordinary float32
# (tests compare the paths).

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

_ONEDNN_ACTS = {"silu": ("swish", ""), "gelu": ("gelu", "none"), "gelu_tanh": ("gelu", "tanh"), "relu": ("relu", "")}


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


CPU_FAST_PATHS = True  # MKL / oneDNN GEMMs and the activation kernels; tests switch it off to compare with torch ops


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
            if act in _ONEDNN_ACTS:
                attr, algorithm = _ONEDNN_ACTS[act]
                return torch.ops.mkldnn._linear_pointwise(x, weight, bias, attr, [], algorithm)
            out = torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    if out is None:
        out = F.linear(x, weight, bias)
    # `out` is this call's own tensor: the rest may overwrite it.
    if residual is not None:
        return out.add_(residual)
    return apply_activation(out, act, inplace=True) if act is not None else out


@dataclass(frozen=True)
class ClipVisionConfig:
    """`vision_config` of a checkpoint; missing keys take `CLIPVisionConfig`'s defaults, as transformers does."""

    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 32
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5

    @classmethod
    def from_dict(cls, config: dict) -> ClipVisionConfig:
        out = cls(**{f.name: config[f.name] for f in fields(cls) if config.get(f.name) is not None})
        if out.hidden_size % out.num_attention_heads:
            raise CheckpointError(f"hidden_size {out.hidden_size} is not divisible by num_attention_heads {out.num_attention_heads}")
        activation(out.hidden_act)  # fail at load, not at the first image
        return out

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid**2

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


def patch_embed(pixel_values: torch.Tensor, conv: nn.Conv2d, config: ClipVisionConfig) -> torch.Tensor:
    """The stride-P, P×P patch convolution of a config-sized image as one GEMM: [B, C, H, W] → [B, N, D].

    The non-overlapping patches, each flattened in the weight's (C, P, P) order, go through the
    same linear kernel as the rest of the tower (on par with oneDNN's conv when measured here,
    and no layout conversion of the pixels).
    """
    B, C, H, W = pixel_values.shape
    P, g, D = config.patch_size, config.grid, config.hidden_size
    if (C, H, W) != (config.num_channels, config.image_size, config.image_size):
        raise InvalidInput(f"pixel_values must be [B, {config.num_channels}, {config.image_size}, {config.image_size}], got {list(pixel_values.shape)}")
    weight = conv.weight  # [D, C, P, P]
    patches = pixel_values.to(weight.dtype).view(B, C, g, P, g, P).permute(0, 2, 4, 1, 3, 5).reshape(B, g * g, C * P * P)
    return linear(patches, weight.view(D, C * P * P), conv.bias)  # [B, N, D]


class ClipEmbeddings(nn.Module):
    def __init__(self, config: ClipVisionConfig):
        super().__init__()
        self.config = config
        D, C, P = config.hidden_size, config.num_channels, config.patch_size
        self.class_embedding = nn.Parameter(torch.empty(D))
        self.patch_embedding = nn.Conv2d(C, D, kernel_size=P, stride=P, bias=False)
        self.position_embedding = nn.Embedding(config.num_patches + 1, D)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        # pixel_values: [B, C, H, W] → [B, 1 + N, D]
        B, D = pixel_values.shape[0], self.config.hidden_size
        x = patch_embed(pixel_values, self.patch_embedding, self.config)  # [B, N, D]
        cls = self.class_embedding.view(1, 1, D).expand(B, 1, D)
        return torch.cat([cls, x], dim=1) + self.position_embedding.weight  # [B, 1 + N, D]


class ClipAttention(nn.Module):
    def __init__(self, config: ClipVisionConfig):
        super().__init__()
        D = config.hidden_size
        self.num_heads, self.head_dim = config.num_attention_heads, config.head_dim
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(D, D), nn.Linear(D, D), nn.Linear(D, D)
        self.out_proj = nn.Linear(D, D)
        self.qkv: nn.Linear | None = None  # set by fuse_()

    @torch.no_grad()
    def fuse_(self) -> None:
        """One [3D, D] projection instead of three: one GEMM reads the activations once."""
        if self.qkv is not None:
            return
        weight = torch.cat([self.q_proj.weight, self.k_proj.weight, self.v_proj.weight])  # [3D, D]
        bias = torch.cat([self.q_proj.bias, self.k_proj.bias, self.v_proj.bias])  # [3D]
        self.qkv = nn.Linear(weight.shape[1], weight.shape[0], device="meta")  # parameters assigned below
        self.qkv.weight = nn.Parameter(weight, requires_grad=False)
        self.qkv.bias = nn.Parameter(bias, requires_grad=False)
        del self.q_proj, self.k_proj, self.v_proj

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        # x: [B, N, D] (normed), residual: [B, N, D] → residual + attention(x)
        B, N, D = x.shape
        H, hd = self.num_heads, self.head_dim
        if self.qkv is not None:
            qkv = linear(x, self.qkv.weight, self.qkv.bias)  # [B, N, 3D]
            q, k, v = qkv.view(B, N, 3, H, hd).permute(2, 0, 3, 1, 4)  # 3 × [B, H, N, hd]
        else:
            q, k, v = (linear(x, p.weight, p.bias).view(B, N, H, hd).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        out = F.scaled_dot_product_attention(q, k, v)  # [B, H, N, hd], scale 1/sqrt(hd) as CLIP's
        out = out.transpose(1, 2).reshape(B, N, D)  # [B, N, D]
        return linear(out, self.out_proj.weight, self.out_proj.bias, residual=residual)


class ClipMLP(nn.Module):
    def __init__(self, config: ClipVisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)
        self.act = activation(config.hidden_act)

    @torch.no_grad()
    def fuse_(self) -> None:
        """quick_gelu(h) = silu(1.702 h) / 1.702: scale fc1 by 1.702 and fc2 by 1/1.702, and the
        activation becomes silu, one in-place pass (the CPU kernels') instead of three.

        float32 only: in bfloat16/float16 rescaling the weights would round them a second time.
        """
        if self.act == "quick_gelu" and self.fc1.weight.dtype == torch.float32:
            self.fc1.weight.mul_(QUICK_GELU_SCALE)
            self.fc1.bias.mul_(QUICK_GELU_SCALE)
            self.fc2.weight.div_(QUICK_GELU_SCALE)
            self.act = "silu"

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        # x: [B, N, D] (normed) → [B, N, I] → residual + [B, N, D]
        h = linear(x, self.fc1.weight, self.fc1.bias, act=self.act)
        return linear(h, self.fc2.weight, self.fc2.bias, residual=residual)


class ClipEncoderLayer(nn.Module):
    def __init__(self, config: ClipVisionConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = ClipAttention(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = ClipMLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [B, N, D], pre-norm residual blocks; the residual adds are out_proj's and fc2's (`linear`)
        x = self.self_attn(self.layer_norm1(x), residual=x)
        return self.mlp(self.layer_norm2(x), residual=x)


class ClipEncoder(nn.Module):
    def __init__(self, config: ClipVisionConfig, num_layers: int):
        super().__init__()
        self.layers = nn.ModuleList(ClipEncoderLayer(config) for _ in range(num_layers))


class ClipVisionTower(nn.Module):
    """CLIP ViT truncated to its first `num_layers` encoder layers; no post_layernorm (LLaVA never reads it)."""

    def __init__(self, config: ClipVisionConfig, num_layers: int):
        super().__init__()
        if not 0 <= num_layers <= config.num_hidden_layers:
            raise CheckpointError(f"cannot build {num_layers} of the {config.num_hidden_layers} CLIP layers")
        self.config = config
        self.embeddings = ClipEmbeddings(config)
        self.pre_layrnorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)  # sic: the checkpoint's name
        self.encoder = ClipEncoder(config, num_layers)

    def fuse_(self) -> None:
        for layer in self.encoder.layers:
            layer.self_attn.fuse_()
            layer.mlp.fuse_()

    def forward(self, pixel_values: torch.Tensor, keep: tuple[int, ...]) -> dict[int, torch.Tensor]:
        """Hidden states after k layers for each k in `keep` (0 = embeddings after pre_layrnorm), each [B, 1 + N, D].

        The indices are those of transformers' `hidden_states` tuple with negative ones resolved.
        """
        x = self.pre_layrnorm(self.embeddings(pixel_values))  # [B, 1 + N, D]
        states = {0: x} if 0 in keep else {}
        for k, layer in enumerate(self.encoder.layers, start=1):
            x = layer(x)
            if k in keep:
                states[k] = x
        return states

    @staticmethod
    def checkpoint_names(config: ClipVisionConfig) -> set[str]:
        """Every tensor name a full CLIPVisionModel may hold under `vision_model.` (for the unexpected-name check)."""
        with torch.device("meta"):
            full = ClipVisionTower(config, config.num_hidden_layers)
        names = set(full.state_dict())
        names |= {"post_layernorm.weight", "post_layernorm.bias", "embeddings.position_ids"}  # position_ids: older saves
        return names
