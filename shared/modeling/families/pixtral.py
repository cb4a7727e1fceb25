"""Pixtral and Mistral 3.1 images in a prompt: the chat template writes `[IMG]`, which `PixtralProcessor`
expands into rows × cols tokens — `[IMG]`×cols `[IMG_BREAK]` per row, the last break replaced by
`[IMG_END]`. Only the `[IMG]` positions are the container's rows; the break and end tokens are text."""

from __future__ import annotations

from shared.config.errors import CheckpointError
from shared.modeling.checkpoint import Checkpoint
from shared.modeling.families import Family
from shared.modeling.families.llava import LlavaImagePrompt
from shared.store.container import Layout


class PixtralImagePrompt(LlavaImagePrompt):
    """A LLaVA's image token, expanded into rows."""

    def __init__(self, checkpoint: Checkpoint):
        super().__init__(checkpoint)
        self.break_id, self.end_id = _row_token_ids(checkpoint)

    def layout(self, grid: tuple[int, int, int] | None) -> Layout:
        _, _, cols = grid  # (1, rows, cols) after merging
        return Layout(after=(self.end_id,), row_length=cols, row_break_id=self.break_id)


def _row_token_ids(checkpoint: Checkpoint) -> tuple[int, int]:
    """IDs of the processor's `[IMG_BREAK]` and `[IMG_END]` (token texts from processor_config.json, IDs from tokenizer.json)."""
    # Imported here: the registry imports every family, and only Pixtral's layouts read a tokenizer.
    from tokenizers import Tokenizer

    processor = checkpoint.optional_json("processor_config.json")
    names = (processor.get("image_break_token") or "[IMG_BREAK]", processor.get("image_end_token") or "[IMG_END]")
    file = checkpoint.path / "tokenizer.json"
    if not file.is_file():
        raise CheckpointError(f"{checkpoint.path}: tokenizer.json is missing (the ids of {names[0]} and {names[1]} come from it)")
    tokenizer = Tokenizer.from_file(str(file))
    ids = [tokenizer.token_to_id(name) for name in names]
    missing = [name for name, i in zip(names, ids) if i is None]
    if missing:
        raise CheckpointError(f"{checkpoint.path}: tokenizer.json has no {' or '.join(missing)} token")
    return ids[0], ids[1]


def _family(name: str) -> Family:
    # Pixtral is a LLaVA with a Pixtral tower; Mistral 3.1 adds a patch merger. One implementation each side.
    return Family(
        name,
        vision_model="embedder_service.models.pixtral:PixtralVisionModel",
        language_model="generator_service.models.llama:LlamaForCausalLM",
        image_prompt=PixtralImagePrompt,
    )


FAMILIES = {
    ("llava", "pixtral"): _family("pixtral"),
    ("mistral3", "pixtral"): _family("mistral3"),
}
