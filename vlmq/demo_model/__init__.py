"""Tiny random-weight checkpoints in the Hugging Face layout: one spec per model family.

`vlmq demo-model PATH --family F` writes one without `transformers` or a download, so a fresh machine can run
the whole stack; the folder has what a published checkpoint has (`config.json`, `model.safetensors`,
`tokenizer.json`, `tokenizer_config.json`, `chat_template.jinja`, `preprocessor_config.json`,
`generation_config.json`). The weights are random, so captions are gibberish — but every code path runs.
The tests build the same checkpoints with `transformers` making the weights (tests/support/tiny_models.py),
and the benchmarks write them at bench-small sizes (bench/common.py).

A family is one module here (its specials, chat template, tiny configs and weight shapes) and one line in
FAMILIES.
"""

from __future__ import annotations

from pathlib import Path

from vlmq.demo_model.checkpoint import TinyCheckpoint
from vlmq.demo_model.gemma3 import GEMMA3
from vlmq.demo_model.llava import LLAVA
from vlmq.demo_model.pixtral import MISTRAL3, PIXTRAL
from vlmq.demo_model.qwen2_vl import QWEN2_5_VL, QWEN2_VL

FAMILIES = {"llava": LLAVA, "qwen2_vl": QWEN2_VL, "qwen2_5_vl": QWEN2_5_VL, "pixtral": PIXTRAL, "mistral3": MISTRAL3, "gemma3": GEMMA3}


def tiny_checkpoint(family: str, vision: dict | None = None, text: dict | None = None, **options) -> TinyCheckpoint:
    """`family`'s checkpoint at tiny sizes, or bigger where `vision` and `text` override fields of its vision and
    text configs; `options` are the family's own (`vision_feature_layer`, `tokens_per_image`, …)."""
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; choose one of {', '.join(FAMILIES)}")
    return FAMILIES[family].checkpoint(vision, text, **options)


def write_demo_model(path: str | Path, family: str = "llava") -> Path:
    return tiny_checkpoint(family).write(path)
