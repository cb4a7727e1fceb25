"""The families' modules, on each demo checkpoint: the placeholder is what the chat template writes for an image
part, the layout is what the processor writes around an image's rows, and a chat's images give the IDs that the
same containers give as aliases in the same text."""

from __future__ import annotations

import json

import pytest
import torch

from generator_service.tokenizer import Tokenizer
from shared.modeling.checkpoint import Checkpoint
from shared.modeling.families.llava import LlavaImagePrompt
from shared.modeling.registry import family_for
from shared.store.container import EmbeddingContainer, Layout
from shared.store.token_ids import EMBEDDING_INDEX_BASE as BASE
from vlmq.demo_model import write_demo_model

PLACEHOLDERS = {
    "llava": "<image>",
    "qwen2_vl": "<|vision_start|><|image_pad|><|vision_end|>",
    "pixtral": "[IMG]",
    "gemma3": "<start_of_image>",
}
GRID = (1, 2, 3)  # merged (t, rows, cols)


def expected_layout(family: str, tok: Tokenizer) -> Layout:
    ids = tok.token_to_id
    if family == "qwen2_vl":
        return Layout(before=(ids("<|vision_start|>"),), after=(ids("<|vision_end|>"),))
    if family == "pixtral":
        return Layout(after=(ids("[IMG_END]"),), row_length=GRID[2], row_break_id=ids("[IMG_BREAK]"))
    if family == "gemma3":
        return Layout(before=(ids("<start_of_image>"),), after=(ids("<end_of_image>"),), text_before="\n\n", text_after="\n\n")
    return Layout()


@pytest.fixture(scope="module", params=list(PLACEHOLDERS))
def demo(request, tmp_path_factory):
    path = write_demo_model(tmp_path_factory.mktemp(request.param) / request.param, request.param)
    checkpoint = Checkpoint(path)
    return request.param, checkpoint, Tokenizer.from_checkpoint(path), family_for(checkpoint.config).image_prompt(checkpoint)


def chat(images: int, text: str = "What is in the picture?") -> list[dict]:
    return [{"role": "user", "content": [*({"type": "image"} for _ in range(images)), {"type": "text", "text": text}]}]


def container(cid: str, first: int, layout: Layout) -> EmbeddingContainer:
    rows = GRID[0] * GRID[1] * GRID[2]
    return EmbeddingContainer(id=cid, model="m", tenant="t", first_token_id=first, num_tokens=rows,
                              embeddings=torch.zeros(rows, 4), layout=layout)


def test_the_placeholder_is_what_the_chat_template_writes_for_an_image_part(demo):
    family, _, tok, prompt = demo
    placeholder = prompt.placeholder(tok)
    assert placeholder == PLACEHOLDERS[family]
    assert tok.apply_chat_template(chat(2), add_generation_prompt=True).count(placeholder) == 2
    assert tok.apply_chat_template(chat(0), add_generation_prompt=True).count(placeholder) == 0


def test_the_layout_is_the_processors(demo):
    family, _, tok, prompt = demo
    assert prompt.layout(GRID) == expected_layout(family, tok)


def test_chat_images_give_the_ids_of_aliases_in_the_same_text(demo):
    """The chat path (no alias text) and the alias path agree, the layout's own text included (Gemma 3's newlines)."""
    _, _, tok, prompt = demo
    placeholder = prompt.placeholder(tok)
    images = [container("aa11", BASE, prompt.layout(GRID)), container("bb22", BASE + 100, prompt.layout(GRID))]
    pieces = tok.render_chat(chat(2, "Compare\n\nthese."), placeholder)
    by_chat = tok.encode_with_images(pieces, images, add_special_tokens=False)
    text = tok.apply_chat_template(chat(2, "Compare\n\nthese."), add_generation_prompt=True)
    aliased = text.replace(placeholder, images[0].alias, 1).replace(placeholder, images[1].alias, 1)
    by_alias = tok.encode_prompt(aliased, {c.alias: c for c in images}, add_special_tokens=False)
    assert by_chat == by_alias
    assert by_chat.containers == images and by_chat.image_tokens == 2 * images[0].num_tokens
    for image in images:
        assert _contains(by_chat.ids, image.token_ids())


def _contains(ids: list[int], run: list[int]) -> bool:
    return any(ids[i : i + len(run)] == run for i in range(len(ids) - len(run) + 1))


def test_a_llava_that_names_no_image_token_has_no_placeholder(tmp_path):
    """Neither tokenizer_config.json's `image_token` nor config.json's image token ID: no placeholder (chats with images are refused)."""
    folder = write_demo_model(tmp_path / "llava", "llava")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k not in ("image_token_index", "image_token_id")}))
    tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({k: v for k, v in tokenizer_config.items() if k != "image_token"}))
    assert LlavaImagePrompt(Checkpoint(folder)).placeholder(Tokenizer.from_checkpoint(folder)) is None
