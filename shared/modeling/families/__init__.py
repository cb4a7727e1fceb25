"""Model families: one module each, holding what both services must agree on about a family.

A family's module names the implementations that serve it (`FAMILIES`, its entries in
`shared.modeling.registry`) and says how its images appear in a prompt (its `ImagePrompt`):
the text its chat template writes for an image part, which the generator cuts out and fills
with a container's IDs, and the layout of those IDs, which the embedder records in every
container. Both come from the same checkpoint files, so the two services cannot disagree.

Adding a family: its vision tower (`embedder_service.models`), its language model
(`generator_service.models`) if new, its module here, its line in the registry, its tests.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Protocol

from shared.modeling.checkpoint import Checkpoint
from shared.store.container import Layout


class Vocabulary(Protocol):
    """A tokenizer's ID → token text (the generator's `Tokenizer`, or `tokenizers.Tokenizer`)."""

    def id_to_token(self, token_id: int) -> str | None: ...


class ImagePrompt(ABC):
    """How a checkpoint's images appear in its prompts; each family's module defines one, built from the checkpoint."""

    @abstractmethod
    def __init__(self, checkpoint: Checkpoint):
        """Read what the family needs from the checkpoint's files, once: both services build one at load."""

    @abstractmethod
    def placeholder(self, vocab: Vocabulary) -> str | None:
        """The text the chat template writes for one image part (`<image>` for LLaVA), all of which a container's
        IDs replace; None where the checkpoint names no such text."""

    @abstractmethod
    def layout(self, grid: tuple[int, int, int] | None) -> Layout:
        """The layout of the IDs of an image whose merged grid is `grid` (the tower's `grid_for`, None where it has none)."""


@dataclass(frozen=True)
class Family:
    """A registry entry. The implementations are "module:Class" strings imported on demand, so the embedder
    never imports the language models and the generator never the vision towers."""

    name: str
    vision_model: str  # "module:Class" with .from_checkpoint(checkpoint, device, dtype)
    language_model: str  # "module:Class" with .from_checkpoint(checkpoint, device, dtype)
    image_prompt: type[ImagePrompt]  # built by both services: image_prompt(checkpoint)

    def load_vision_class(self) -> type:
        return _import(self.vision_model)

    def load_language_class(self) -> type:
        return _import(self.language_model)


def _import(target: str) -> type:
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


def token_texts(vocab: Vocabulary, token_ids: list[int | None]) -> str | None:
    """The texts of `token_ids` joined; None if any is missing or unknown to `vocab`."""
    texts = [None if i is None else vocab.id_to_token(i) for i in token_ids]
    return "".join(texts) if all(texts) else None
