"""Tiny random-weight checkpoints in the Hugging Face layout, built with `transformers`.

They are the test oracle's models: the same folder is loaded by `transformers`
and by vlmq's own code, and the two must agree. Nothing is downloaded: the
tokenizer is the demo model's, trained with `tokenizers` on a few sentences.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from shared.demo_model import LLAVA_CHAT_TEMPLATE, build_tokenizer


def build_tiny_llava(
    path: str | Path,
    *,
    vision_feature_layer: int | list[int] = -2,
    vision_feature_select_strategy: str = "default",
    tie_word_embeddings: bool = False,
    image_size: int = 56,
    patch_size: int = 14,
    rope_parameters: dict | None = None,
    max_shard_size: str | None = None,
    seed: int = 0,
) -> Path:
    """Write a tiny LLaVA-1.5 checkpoint (CLIP ViT + MLP projector + Llama) with tokenizer and configs."""
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        GenerationConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        PreTrainedTokenizerFast,
    )

    path = Path(path)
    tok = build_tokenizer()
    vocab = tok.get_vocab_size()
    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        image_size=image_size, patch_size=patch_size, projection_dim=32,
    )
    text = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=256,
        bos_token_id=tok.token_to_id("<s>"), eos_token_id=tok.token_to_id("</s>"),
        pad_token_id=tok.token_to_id("<pad>"), tie_word_embeddings=tie_word_embeddings,
        **({"rope_parameters": rope_parameters} if rope_parameters else {}),
    )
    config = LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=tok.token_to_id("<image>"),
        vision_feature_layer=vision_feature_layer, vision_feature_select_strategy=vision_feature_select_strategy,
        image_seq_length=(image_size // patch_size) ** 2, tie_word_embeddings=tie_word_embeddings,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    # Random init of this size gives near-uniform logits; widen the weights so greedy
    # decoding is decisive and the comparisons are meaningful.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() >= 2:
                param.normal_(0.0, 0.2 if "embed" not in name else 1.0)
    model.save_pretrained(path, **({"max_shard_size": max_shard_size} if max_shard_size else {}))

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"},
    )
    fast.chat_template = LLAVA_CHAT_TEMPLATE
    fast.save_pretrained(path)
    CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
        do_center_crop=True, do_resize=True, do_normalize=True, do_convert_rgb=True,
    ).save_pretrained(path)
    GenerationConfig(bos_token_id=text.bos_token_id, eos_token_id=text.eos_token_id, pad_token_id=text.pad_token_id).save_pretrained(path)
    return path


def load_reference(path: str | Path):
    """The `transformers` model for a tiny checkpoint, float32, eval mode."""
    from transformers import LlavaForConditionalGeneration

    return LlavaForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()


if __name__ == "__main__":
    import sys

    out = build_tiny_llava(sys.argv[1])
    print(json.dumps(sorted(p.name for p in out.iterdir())))
