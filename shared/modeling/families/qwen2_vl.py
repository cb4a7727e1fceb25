"""Qwen2-VL and Qwen2.5-VL images in a prompt: the chat template writes
`<|vision_start|><|image_pad|><|vision_end|>`, and the processor repeats the pad once per merged
patch. All three are the placeholder, which a container replaces whole: its layout puts the start
and end back around the image's rows."""

from __future__ import annotations

from shared.modeling.checkpoint import Checkpoint
from shared.modeling.families import Family, ImagePrompt, Vocabulary, token_texts
from shared.store.container import Layout


class Qwen2VLImagePrompt(ImagePrompt):
    def __init__(self, checkpoint: Checkpoint):
        config = checkpoint.config  # missing IDs take Qwen2VLConfig's defaults
        self.start_id = int(config.get("vision_start_token_id", 151652))
        self.image_id = int(config.get("image_token_id", 151655))
        self.end_id = int(config.get("vision_end_token_id", 151653))

    def placeholder(self, vocab: Vocabulary) -> str | None:
        return token_texts(vocab, [self.start_id, self.image_id, self.end_id])

    def layout(self, grid: tuple[int, int, int] | None) -> Layout:
        return Layout(before=(self.start_id,), after=(self.end_id,))


def _family(name: str) -> Family:
    # Qwen2-VL and Qwen2.5-VL: one implementation each side, the variant read from config.json.
    return Family(
        name,
        vision_model="embedder_service.models.qwen2_vl:Qwen2VLVisionModel",
        language_model="generator_service.models.qwen2:Qwen2VLForCausalLM",
        image_prompt=Qwen2VLImagePrompt,
    )


# A vision type of None: the family's own tower, whatever vision_config says its type is (published configs name none).
FAMILIES = {
    ("qwen2_vl", None): _family("qwen2_vl"),
    ("qwen2_5_vl", None): _family("qwen2_5_vl"),
}
