"""Gemma 3 images in a prompt: the chat template writes `<start_of_image>`, which `Gemma3Processor`
replaces by text: "\\n\\n<start_of_image>" + the image tokens + "<end_of_image>\\n\\n". The start
and end are special tokens (the layout's `before`/`after` IDs); the newlines are text the generator
tokenizes together with the prompt's neighbouring text (`text_before`/`text_after`), because in the
reference they merge with the newlines around the image."""

from __future__ import annotations

from shared.modeling.checkpoint import Checkpoint
from shared.modeling.families import Family, ImagePrompt, Vocabulary, token_texts
from shared.store.container import Layout

# The text Gemma3Processor writes on either side of an image's <start_of_image> … <end_of_image>.
IMAGE_TEXT_AROUND = "\n\n"


class Gemma3ImagePrompt(ImagePrompt):
    def __init__(self, checkpoint: Checkpoint):
        config = checkpoint.config  # missing IDs take Gemma3Config's defaults
        self.start_id = int(config.get("boi_token_index", 255_999))
        self.end_id = int(config.get("eoi_token_index", 256_000))

    def placeholder(self, vocab: Vocabulary) -> str | None:
        return token_texts(vocab, [self.start_id])

    def layout(self, grid: tuple[int, int, int] | None) -> Layout:
        return Layout(before=(self.start_id,), after=(self.end_id,), text_before=IMAGE_TEXT_AROUND, text_after=IMAGE_TEXT_AROUND)


FAMILIES = {
    ("gemma3", "siglip_vision_model"): Family(
        "gemma3",
        vision_model="embedder_service.models.gemma3:Gemma3VisionModel",
        language_model="generator_service.models.gemma3:Gemma3ForCausalLM",
        image_prompt=Gemma3ImagePrompt,
    ),
}
