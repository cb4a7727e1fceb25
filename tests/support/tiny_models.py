"""Tiny random-weight checkpoints in the Hugging Face layout, with weights made by `transformers`.

They are the test oracle's models: the same folder is loaded by `transformers` and by vlmq's own code, and
the two must agree. Each is its family's spec in `vlmq.demo_model` (the demo model's tokenizer, chat template,
processor files and config.json), with transformers' model of that config making the weights and writing
config.json as it does. Nothing is downloaded.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch
from PIL import Image

from vlmq.demo_model import tiny_checkpoint
from vlmq.demo_model.gemma3 import CHAT_TEMPLATE as GEMMA3_CHAT_TEMPLATE


@torch.no_grad()
def randomize_(model: torch.nn.Module) -> None:
    """Random init of this size gives near-uniform logits: widen the weights so greedy decoding is
    decisive and the comparisons are meaningful, and move every 1-D parameter (biases, norm weights)
    off its init of zeros or ones, so that one read wrongly or left out shows in the outputs."""
    for name, param in model.named_parameters():
        if param.dim() >= 2:
            param.normal_(0.0, 0.2 if "embed" not in name else 1.0)
        else:
            param.add_(torch.randn_like(param) * 0.2)


def build_tiny(path: str | Path, family: str, *, seed: int = 0, max_shard_size: str | None = None, text: dict | None = None,
               dtype: torch.dtype = torch.float32, **options) -> Path:
    """Write `family`'s tiny checkpoint with weights from transformers' model of its config.json, randomised
    by `randomize_`, saved in `dtype`. `text` and `options` as in `vlmq.demo_model.tiny_checkpoint`."""
    import transformers

    spec = tiny_checkpoint(family, text=text, **options)
    config = transformers.AutoConfig.for_model(**spec.config)
    torch.manual_seed(seed)
    model = getattr(transformers, config.architectures[0])(config).eval()
    randomize_(model)
    model.to(dtype).save_pretrained(path, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    return spec.write_files(path, skip=("config.json",))  # config.json as transformers wrote it


def build_tiny_llava(path: str | Path, *, vision_feature_layer: int | list[int] = -2, vision_feature_select_strategy: str = "default",
                     tie_word_embeddings: bool = False, rope_parameters: dict | None = None, max_shard_size: str | None = None,
                     seed: int = 0, dtype: torch.dtype = torch.float32) -> Path:
    """LLaVA-1.5: CLIP ViT (56 px, 16 image tokens) + MLP projector + Llama."""
    text = {"tie_word_embeddings": tie_word_embeddings} | ({"rope_parameters": rope_parameters} if rope_parameters else {})
    return build_tiny(path, "llava", seed=seed, max_shard_size=max_shard_size, text=text, vision_feature_layer=vision_feature_layer,
                      vision_feature_select_strategy=vision_feature_select_strategy, dtype=dtype)


def build_tiny_pixtral(path: str | Path, *, family: str = "pixtral", sliding_window: int | None = None,
                       tie_word_embeddings: bool = False, seed: int = 0) -> Path:
    """Pixtral (LLaVA + Pixtral vision + Mistral) or Mistral 3.1 (`family="mistral3"`: + RMSNorm and 2×2 patch merger)."""
    return build_tiny(path, family, seed=seed, text={"sliding_window": sliding_window, "tie_word_embeddings": tie_word_embeddings})


def load_pixtral_reference(path: str | Path):
    """The `transformers` model of a tiny Pixtral or Mistral 3.1 checkpoint, float32, eval mode."""
    from transformers import (
        LlavaForConditionalGeneration,
        Mistral3ForConditionalGeneration,
    )

    model_type = json.loads((Path(path) / "config.json").read_text())["model_type"]
    model_class = Mistral3ForConditionalGeneration if model_type == "mistral3" else LlavaForConditionalGeneration
    return model_class.from_pretrained(path, dtype=torch.float32).eval()


def build_tiny_qwen2_vl(path: str | Path, *, variant: str = "qwen2_vl", tie_word_embeddings: bool = False, seed: int = 0) -> Path:
    """Qwen2-VL, or Qwen2.5-VL (`variant="qwen2_5_vl"`: 2×2-cell attention windows and one full-attention block)."""
    return build_tiny(path, variant, seed=seed, text={"tie_word_embeddings": tie_word_embeddings})


def load_qwen2_vl_reference(path: str | Path):
    """The `transformers` model of a tiny Qwen2-VL or Qwen2.5-VL checkpoint, float32, eval mode."""
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()


def build_tiny_gemma3(path: str | Path, *, softcapping: float | None = None, seed: int = 0) -> Path:
    """Gemma 3: SigLIP (32 px, 16 tokens) + pooled projector + Gemma 3 text with every quirk in play (see
    vlmq.demo_model.gemma3), `softcapping` on attention scores and final logits. Every weight is random,
    norms and biases included (a wrong norm offset or a misplaced per-head norm weight shows)."""
    return build_tiny(path, "gemma3", seed=seed, text={"final_logit_softcapping": softcapping, "attn_logit_softcapping": softcapping})


def gemma3_tokenizer():
    """The demo Gemma 3 tokenizer (newline-run merges, Gemma's specials), chat template set, as transformers loads it."""
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as folder:
        return AutoTokenizer.from_pretrained(tiny_checkpoint("gemma3").write_files(folder))


def load_gemma3_reference(path: str | Path):
    """The `transformers` model of a tiny Gemma 3 checkpoint, float32, eval mode."""
    from transformers import Gemma3ForConditionalGeneration

    return Gemma3ForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()


def gemma3_processor(path: str | Path):
    """transformers' Gemma3Processor of a tiny Gemma 3 checkpoint, with the PIL image processor."""
    from transformers import AutoTokenizer, Gemma3ImageProcessorPil, Gemma3Processor

    tokens = json.loads((Path(path) / "config.json").read_text())["mm_tokens_per_image"]
    return Gemma3Processor(image_processor=Gemma3ImageProcessorPil.from_pretrained(path), tokenizer=AutoTokenizer.from_pretrained(path),
                           chat_template=GEMMA3_CHAT_TEMPLATE, image_seq_length=tokens)


def load_reference(path: str | Path):
    """The `transformers` model for a tiny checkpoint, float32, eval mode."""
    from transformers import LlavaForConditionalGeneration

    return LlavaForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()


def reference_inputs(path, text: str, ims: list[Image.Image]) -> dict:
    """What Qwen2VLProcessor gives for `text` and `ims` (it cannot be built here: its video processor needs
    torchvision): each <|image_pad|> repeated once per merged patch of its image, then tokenized."""
    from transformers import AutoTokenizer, Qwen2VLImageProcessorPil

    image_processor = Qwen2VLImageProcessorPil.from_pretrained(path)
    pixels = image_processor(ims, return_tensors="pt")
    for grid in pixels["image_grid_thw"]:
        text = text.replace("<|image_pad|>", "<|placeholder|>" * (int(grid.prod()) // image_processor.merge_size**2), 1)
    tokenizer = AutoTokenizer.from_pretrained(path)
    ids = tokenizer(text.replace("<|placeholder|>", "<|image_pad|>"), return_tensors="pt")["input_ids"]
    mm_token_type_ids = (ids == tokenizer.convert_tokens_to_ids("<|image_pad|>")).int()
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "mm_token_type_ids": mm_token_type_ids, **pixels}
