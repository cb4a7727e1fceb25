"""Which of our implementations serves a checkpoint, from its `config.json`.

Lazy (`"module:Class"` strings) so the embedder never imports the language
model code and the generator never imports the vision code.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from shared.errors import CheckpointError


@dataclass(frozen=True)
class Family:
    name: str
    vision_model: str  # "module:Class" with .from_checkpoint(checkpoint, device, dtype)
    language_model: str  # "module:Class" with .from_checkpoint(checkpoint, device, dtype)

    def load_vision_class(self) -> type:
        return _import(self.vision_model)

    def load_language_class(self) -> type:
        return _import(self.language_model)


def _import(target: str) -> type:
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


# (config model_type, vision_config model_type) → family.
FAMILIES: dict[tuple[str, str], Family] = {
    ("llava", "clip_vision_model"): Family(
        "llava",
        vision_model="embedder_service.models.llava:LlavaVisionModel",
        language_model="generator_service.models.llama:LlamaForCausalLM",
    ),
}


def family_for(config: dict) -> Family:
    key = (config.get("model_type", ""), config.get("vision_config", {}).get("model_type", ""))
    try:
        return FAMILIES[key]
    except KeyError:
        supported = ", ".join(f"{m} + {v}" for m, v in FAMILIES)
        raise CheckpointError(f"unsupported model: model_type {key[0]!r} with vision {key[1]!r}; supported: {supported}") from None
