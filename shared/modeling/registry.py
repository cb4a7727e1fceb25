"""Which of our implementations serves a checkpoint, from its `config.json`.

Lazy (`"module:Class"` strings) so the embedder never imports the language
model code and the generator never imports the vision code.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from shared.config.errors import CheckpointError


@dataclass(frozen=True)
class Family:
    name: str
    vision_model: str  # "module:Class" with .from_checkpoint(checkpoint, device, dtype)
    language_model: str  # "module:Class" with .from_checkpoint(checkpoint, device, dtype)
    # config.json keys of the token IDs whose texts, joined, are what the chat template writes for an
    # image part, when that is not the image token alone: Qwen2-VL writes <|vision_start|><|image_pad|><|vision_end|>
    # and its containers' layout puts the start and end back around the image rows; Gemma 3 writes
    # <start_of_image>, which its containers' layout expands.
    image_placeholder: tuple[str, ...] = ()

    def load_vision_class(self) -> type:
        return _import(self.vision_model)

    def load_language_class(self) -> type:
        return _import(self.language_model)


def _import(target: str) -> type:
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


def _qwen2_vl(name: str) -> Family:
    """Qwen2-VL and Qwen2.5-VL: one implementation each side, the variant read from config.json."""
    return Family(
        name,
        vision_model="embedder_service.models.qwen2_vl:Qwen2VLVisionModel",
        language_model="generator_service.models.qwen2:Qwen2VLForCausalLM",
        image_placeholder=("vision_start_token_id", "image_token_id", "vision_end_token_id"),
    )


# (config model_type, vision_config model_type) → family. A vision type of None: the family's own
# tower, whatever vision_config says its type is (published Qwen2-VL configs name none).
FAMILIES: dict[tuple[str, str | None], Family] = {
    ("llava", "clip_vision_model"): Family(
        "llava",
        vision_model="embedder_service.models.llava:LlavaVisionModel",
        language_model="generator_service.models.llama:LlamaForCausalLM",
    ),
    # Pixtral is a LLaVA with a Pixtral tower; Mistral 3.1 adds a patch merger. One implementation each side.
    ("llava", "pixtral"): Family(
        "pixtral",
        vision_model="embedder_service.models.pixtral:PixtralVisionModel",
        language_model="generator_service.models.llama:LlamaForCausalLM",
    ),
    ("mistral3", "pixtral"): Family(
        "mistral3",
        vision_model="embedder_service.models.pixtral:PixtralVisionModel",
        language_model="generator_service.models.llama:LlamaForCausalLM",
    ),
    # Gemma 3: the chat template writes <start_of_image> for an image part, which Gemma3Processor expands.
    ("gemma3", "siglip_vision_model"): Family(
        "gemma3",
        vision_model="embedder_service.models.gemma3:Gemma3VisionModel",
        language_model="generator_service.models.gemma3:Gemma3ForCausalLM",
        image_placeholder=("boi_token_index",),
    ),
    ("qwen2_vl", None): _qwen2_vl("qwen2_vl"),
    ("qwen2_5_vl", None): _qwen2_vl("qwen2_5_vl"),
}


def family_for(config: dict) -> Family:
    key = (config.get("model_type", ""), config.get("vision_config", {}).get("model_type", ""))
    family = FAMILIES.get(key) or FAMILIES.get((key[0], None))
    if family is None:
        supported = ", ".join(f"{m} + {v or 'its own vision tower'}" for m, v in FAMILIES)
        raise CheckpointError(f"unsupported model: model_type {key[0]!r} with vision {key[1]!r}; supported: {supported}")
    return family
