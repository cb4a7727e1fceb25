"""Reading Hugging Face checkpoint folders without `transformers`.

A folder holds `config.json`, weights in `model.safetensors` (or shards listed
in `model.safetensors.index.json`), and the tokenizer/preprocessor files. A
service loads only the tensors it needs, chosen by name prefix, straight from
safetensors (never `torch.load`), in the dtype it asks for.

Tensor names are canonicalised to the published layout (`vision_tower.vision_model.…`,
`multi_modal_projector.…`, `language_model.model.…`, `language_model.lm_head.…`)
so checkpoints saved by `transformers` ≥ 5's new module layout
(`model.vision_tower.…`, `model.language_model.…`, `lm_head.…`, a CLIP tower
without `vision_model.`) load the same. Qwen2-VL's tower stays `visual.…`
(`model.visual.…` too), and its language model, published as `model.…`, joins
every other family's under `language_model.model.…`.
"""

from __future__ import annotations

import hashlib
import json
from functools import cached_property
from pathlib import Path

import torch
from safetensors import safe_open

from shared.config.errors import CheckpointError

# (new layout prefix, published prefix), first match wins.
_CANONICAL_PREFIXES = (
    ("model.vision_tower.", "vision_tower."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
    ("model.language_model.", "language_model.model."),
    ("model.visual.", "visual."),
    ("model.", "language_model.model."),  # a bare `model.` left by the rules above: Qwen2-VL's language model
    ("lm_head.", "language_model.lm_head."),
)

# Tensors that, with config.json, identify the model a container was made by: the image side's last
# layers, whose output is what a container holds (LLaVA's projector, Qwen2-VL's PatchMerger).
_FINGERPRINT_PREFIXES = ("multi_modal_projector.", "visual.merger.")

# The top-level modules of a CLIP/SigLIP `vision_model`, as they appear when transformers 5 drops that level.
_VISION_MODEL_CHILDREN = tuple(
    f"vision_tower.{child}." for child in ("embeddings", "pre_layrnorm", "encoder", "post_layernorm", "head")
)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def canonical_name(name: str) -> str:
    for new, published in _CANONICAL_PREFIXES:
        if name.startswith(new):
            name = published + name[len(new) :]
            break
    # transformers 5 saves a CLIP/SigLIP tower without its inner `vision_model.` level. Only their
    # modules get it back: other towers (Pixtral's `patch_conv.`, `transformer.` …) never had one.
    if name.startswith(_VISION_MODEL_CHILDREN):
        name = "vision_tower.vision_model." + name[len("vision_tower.") :]
    return name


def check_device(device: str) -> None:
    """ValueError saying in one line why a worker cannot run on `device` here (cpu, cuda or cuda:N that exists)."""
    try:
        parsed = torch.device(device)
    except RuntimeError:
        raise ValueError(f"{device!r} is no device; use cpu, cuda or cuda:N") from None
    if parsed.type == "cpu":
        return
    if parsed.type != "cuda":
        raise ValueError(f"device {device}: workers run on cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        why = "this torch build has no CUDA" if torch.version.cuda is None else "the driver reports none"
        raise ValueError(f"device {device}: no CUDA device is available ({why})")
    count = torch.cuda.device_count()
    if parsed.index is not None and parsed.index >= count:
        raise ValueError(f"device {device}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}")


def resolve_dtype(name: str, device: str | torch.device) -> torch.dtype:
    """`auto` is float32 on the CPU and bfloat16 on CUDA."""
    if name == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if name not in DTYPES:
        raise CheckpointError(f"unsupported dtype {name!r}; choose auto, {', '.join(DTYPES)}")
    return DTYPES[name]


class Checkpoint:
    """A Hugging Face checkpoint folder: its configs and a name → file index of its tensors."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not (self.path / "config.json").is_file():
            raise CheckpointError(f"{self.path} is not a checkpoint folder: config.json is missing")
        self.config: dict = self._read_json("config.json")
        self._files = self._index_tensors()

    def _read_json(self, name: str) -> dict:
        try:
            return json.loads((self.path / name).read_text())
        except FileNotFoundError:
            raise CheckpointError(f"{self.path}: {name} is missing") from None
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"{self.path}: {name} is not valid JSON: {exc}") from None

    def optional_json(self, name: str) -> dict:
        return self._read_json(name) if (self.path / name).is_file() else {}

    def _index_tensors(self) -> dict[str, tuple[Path, str]]:
        """canonical name → (file, stored name)."""
        index_file = self.path / "model.safetensors.index.json"
        if index_file.is_file():
            weight_map = self._read_json(index_file.name)["weight_map"]
            pairs = [(name, self.path / file) for name, file in weight_map.items()]
        elif (self.path / "model.safetensors").is_file():
            with safe_open(self.path / "model.safetensors", "pt") as f:
                pairs = [(name, self.path / "model.safetensors") for name in f.keys()]
        else:
            raise CheckpointError(f"{self.path}: no model.safetensors or model.safetensors.index.json (only safetensors weights are read)")
        return {canonical_name(name): (file, name) for name, file in pairs}

    def tensor_names(self, prefix: str = "") -> list[str]:
        return sorted(name for name in self._files if name.startswith(prefix))

    def load_tensors(self, prefix: str, dtype: torch.dtype | None = None, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
        """Every tensor whose canonical name starts with `prefix`, keyed by the rest of its name."""
        by_file: dict[Path, list[tuple[str, str]]] = {}
        for name in self.tensor_names(prefix):
            file, stored = self._files[name]
            by_file.setdefault(file, []).append((name, stored))
        tensors: dict[str, torch.Tensor] = {}
        for file, names in by_file.items():
            with safe_open(file, "pt", device=str(device)) as f:
                for name, stored in names:
                    tensor = f.get_tensor(stored)
                    tensors[name[len(prefix) :]] = tensor.to(dtype) if dtype is not None else tensor
        return tensors

    def load_into(self, module: torch.nn.Module, prefix: str, dtype: torch.dtype, device: str | torch.device = "cpu") -> torch.nn.Module:
        """Fill `module` (possibly built on the meta device) from the tensors under `prefix`.

        Raises CheckpointError listing missing and unexpected tensors, so a
        checkpoint of the wrong shape never loads half-way. Non-persistent buffers
        (rotary tables and the like) are left to the module to compute.
        """
        self.check_names(module, prefix)
        try:
            module.load_state_dict(self.load_tensors(prefix, dtype, device), strict=True, assign=True)
        except RuntimeError as exc:  # shapes that disagree with config.json
            raise CheckpointError(f"{self.path}: tensors under {prefix!r} do not fit config.json: {exc}") from None
        return module

    def check_names(self, module: torch.nn.Module, prefix: str) -> None:
        """Raise CheckpointError unless the tensors under `prefix` are exactly `module`'s, listing the missing and
        unexpected ones (nothing is read but the names)."""
        expected = set(module.state_dict().keys())
        stored = {name[len(prefix) :] for name in self.tensor_names(prefix)}
        missing, unexpected = sorted(expected - stored), sorted(stored - expected)
        if missing or unexpected:
            raise CheckpointError(
                f"{self.path}: tensors under {prefix!r} do not match {type(module).__name__}: "
                f"missing {[prefix + n for n in missing]}, unexpected {[prefix + n for n in unexpected]}"
            )

    @cached_property
    def fingerprint(self) -> str:
        """Identifies the model a container was made by: config.json plus the projector's (or merger's) weights.

        The embedder and the generator compute it from the same folder, so a
        generator refuses containers of any other model.
        """
        digest = hashlib.sha256()
        digest.update(json.dumps(self.config, sort_keys=True).encode())
        for prefix in _FINGERPRINT_PREFIXES:
            for name, tensor in sorted(self.load_tensors(prefix).items()):
                digest.update(name.encode())
                digest.update(tensor.contiguous().view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()[:32]
