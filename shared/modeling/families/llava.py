"""LLaVA-1.5 images in a prompt: the chat template writes `<image>`, which `LlavaProcessor` expands
into the image's rows alone, nothing before, after or between them."""

from __future__ import annotations

from shared.modeling.checkpoint import Checkpoint
from shared.modeling.families import Family, ImagePrompt, Vocabulary, token_texts
from shared.store.container import Layout


class LlavaImagePrompt(ImagePrompt):
    def __init__(self, checkpoint: Checkpoint):
        # The processor's image token: tokenizer_config.json spells it, or config.json gives its ID.
        image_token = checkpoint.optional_json("tokenizer_config.json").get("image_token")
        self.image_token = image_token if isinstance(image_token, str) else None
        self.image_token_id = checkpoint.config.get("image_token_index", checkpoint.config.get("image_token_id"))

    def placeholder(self, vocab: Vocabulary) -> str | None:
        return self.image_token or token_texts(vocab, [self.image_token_id])

    def layout(self, grid: tuple[int, int, int] | None) -> Layout:
        return Layout()


FAMILIES = {
    ("llava", "clip_vision_model"): Family(
        "llava",
        vision_model="embedder_service.models.llava:LlavaVisionModel",
        language_model="generator_service.models.llama:LlamaForCausalLM",
        image_prompt=LlavaImagePrompt,
    ),
}
