"""Cheap checks before costly work: image counts and the images' prompt length are known before
a prompt is cut at its aliases or any token list is built."""

from __future__ import annotations

import pytest
import torch

from generator_service.tokenizer import Tokenizer, count_images
from shared.config.errors import InvalidInput
from shared.store.container import EmbeddingContainer, Layout
from shared.store.token_ids import EMBEDDING_INDEX_BASE as BASE
from vlmq.demo_model import write_demo_model

LAYOUTS = [Layout(), Layout(before=(1, 2), after=(3,)), Layout(row_length=4, row_break_id=9, after=(10,)),
           Layout(row_length=3, row_break_id=9)]


@pytest.mark.parametrize(("layout", "rows"), [(layout, rows) for layout in LAYOUTS for rows in (0, 1, 4, 12)
                                              if not layout.row_length or rows % layout.row_length == 0])
def test_a_layouts_length_is_the_length_of_its_expansion(layout, rows):
    assert layout.length(rows) == len(layout.expand(BASE, rows))


def test_counting_aliases_stops_at_the_limit():
    assert count_images("<image:a> x <image:b> y", [], 10) == 2
    assert count_images("e" * 2_000_000, ["e"], 65) == 65
    assert count_images("cat dog cat", ["cat", "dog"], 10) == 3
    assert count_images("no images here", ["img"], 10) == 0


class ExplodingContainer(EmbeddingContainer):
    """A container whose token IDs must not be built: the refusal has to come from arithmetic."""

    def token_ids(self) -> list[int]:
        raise AssertionError("the token list was built before the length check")


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Tokenizer:
    return Tokenizer.from_checkpoint(write_demo_model(tmp_path_factory.mktemp("demo") / "llava"))


def big_image(rows: int) -> EmbeddingContainer:
    return ExplodingContainer(id="big", model="m", tenant="t", first_token_id=BASE, num_tokens=rows,
                              embeddings=torch.zeros(rows, 2))


def test_images_longer_than_the_context_are_refused_before_any_list_is_built(tokenizer):
    image = big_image(1000)
    with pytest.raises(InvalidInput, match="images alone take 3000 tokens, over the context of 2048"):
        tokenizer.encode_prompt("a <i> b <i> c <i>", {"<i>": image}, max_length=2048)


def test_more_aliases_than_allowed_are_refused_before_the_prompt_is_cut(tokenizer):
    with pytest.raises(InvalidInput, match="more than 64 images"):
        tokenizer.encode_prompt("e" * 2_000_000, {"e": big_image(16)}, max_length=2048, max_images=64)
