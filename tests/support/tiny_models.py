"""Tiny random-weight checkpoints in the Hugging Face layout, built with `transformers`.

They are the test oracle's models: the same folder is loaded by `transformers`
and by vlmq's own code, and the two must agree. Nothing is downloaded: the
tokenizer is the demo model's, trained with `tokenizers` on a few sentences.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from PIL import Image

from vlmq.demo_model import (
    GEMMA3_CHAT_TEMPLATE,
    GEMMA_CORPUS,
    GEMMA_SPECIAL_TOKENS,
    LLAVA_CHAT_TEMPLATE,
    MISTRAL_CHAT_TEMPLATE,
    PIXTRAL_SPECIAL_TOKENS,
    QWEN2_VL_CHAT_TEMPLATE,
    QWEN_SPECIAL_TOKENS,
    build_tokenizer,
)


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
    randomize_(model)
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


def build_tiny_pixtral(
    path: str | Path,
    *,
    family: str = "pixtral",
    patch_size: int = 8,
    longest_edge: int = 64,
    sliding_window: int | None = None,
    tie_word_embeddings: bool = False,
    seed: int = 0,
) -> Path:
    """Write a tiny Pixtral (LLaVA + Pixtral vision + Mistral) or Mistral 3.1 (`family="mistral3"`: + RMSNorm and
    2×2 patch merger) checkpoint with tokenizer, chat template, image processor and processor config."""
    from transformers import (
        GenerationConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        Mistral3Config,
        Mistral3ForConditionalGeneration,
        MistralConfig,
        PixtralImageProcessorPil,
        PixtralVisionConfig,
        PreTrainedTokenizerFast,
    )

    path = Path(path)
    tok = build_tokenizer(special_tokens=PIXTRAL_SPECIAL_TOKENS)
    vision = PixtralVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2, patch_size=patch_size,
        image_size=longest_edge, hidden_act="silu",
    )
    text = MistralConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=tok.get_vocab_size(), max_position_embeddings=512, sliding_window=sliding_window,
        bos_token_id=tok.token_to_id("<s>"), eos_token_id=tok.token_to_id("</s>"), pad_token_id=tok.token_to_id("<pad>"),
        tie_word_embeddings=tie_word_embeddings,
    )
    common = dict(vision_config=vision, text_config=text, image_token_index=tok.token_to_id("[IMG]"), vision_feature_layer=-1,
                  tie_word_embeddings=tie_word_embeddings)
    if family == "pixtral":
        config, model_class, merge = LlavaConfig(**common, vision_feature_select_strategy="full"), LlavaForConditionalGeneration, 1
    elif family == "mistral3":
        config, model_class, merge = Mistral3Config(**common, spatial_merge_size=2), Mistral3ForConditionalGeneration, 2
    else:
        raise ValueError(f"unknown family {family!r}")
    torch.manual_seed(seed)
    model = model_class(config).eval()
    randomize_(model)
    model.save_pretrained(path)

    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>")
    fast.chat_template = MISTRAL_CHAT_TEMPLATE
    fast.save_pretrained(path)
    PixtralImageProcessorPil(patch_size={"height": patch_size, "width": patch_size}, size={"longest_edge": longest_edge}).save_pretrained(path)
    # What PixtralProcessor.save_pretrained writes (it cannot be built here: it requires torchvision).
    (path / "processor_config.json").write_text(json.dumps({
        "processor_class": "PixtralProcessor", "patch_size": patch_size, "spatial_merge_size": merge,
        "image_token": "[IMG]", "image_break_token": "[IMG_BREAK]", "image_end_token": "[IMG_END]",
    }, indent=2))
    GenerationConfig(bos_token_id=text.bos_token_id, eos_token_id=text.eos_token_id, pad_token_id=text.pad_token_id).save_pretrained(path)
    return path


def load_pixtral_reference(path: str | Path):
    """The `transformers` model of a tiny Pixtral or Mistral 3.1 checkpoint, float32, eval mode."""
    from transformers import (
        LlavaForConditionalGeneration,
        Mistral3ForConditionalGeneration,
    )

    model_type = json.loads((Path(path) / "config.json").read_text())["model_type"]
    model_class = Mistral3ForConditionalGeneration if model_type == "mistral3" else LlavaForConditionalGeneration
    return model_class.from_pretrained(path, dtype=torch.float32).eval()


def build_tiny_qwen2_vl(
    path: str | Path,
    *,
    variant: str = "qwen2_vl",
    tie_word_embeddings: bool = False,
    min_pixels: int = 28 * 28 * 4,
    max_pixels: int = 28 * 28 * 16,
    seed: int = 0,
) -> Path:
    """Write a tiny Qwen2-VL (`variant="qwen2_5_vl"`: Qwen2.5-VL, with 2×2-cell attention windows and one
    full-attention block) checkpoint with tokenizer, chat template, image processor and generation config."""
    from transformers import (
        GenerationConfig,
        PreTrainedTokenizerFast,
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLImageProcessorPil,
    )

    path = Path(path)
    tok = build_tokenizer(special_tokens=QWEN_SPECIAL_TOKENS)
    ids = {name: tok.token_to_id(name) for name in QWEN_SPECIAL_TOKENS}
    text = dict(
        vocab_size=tok.get_vocab_size(), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"], rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [2, 3, 3]},
    )
    tokens = dict(image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                  vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    if variant == "qwen2_vl":
        vision = dict(depth=2, embed_dim=32, hidden_size=64, num_heads=4, mlp_ratio=2, patch_size=14, spatial_merge_size=2, temporal_patch_size=2)
        model_class, config = Qwen2VLForConditionalGeneration, Qwen2VLConfig(
            vision_config=vision, text_config=text, tie_word_embeddings=tie_word_embeddings, **tokens)
    else:
        vision = dict(depth=2, hidden_size=32, intermediate_size=48, out_hidden_size=64, num_heads=4, patch_size=14,
                      spatial_merge_size=2, temporal_patch_size=2, window_size=56, fullatt_block_indexes=[1])
        model_class, config = Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLConfig(
            vision_config=vision, text_config=text, tie_word_embeddings=tie_word_embeddings, **tokens)
    torch.manual_seed(seed)
    model = model_class(config).eval()
    randomize_(model)
    model.save_pretrained(path)

    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   extra_special_tokens={"image_token": "<|image_pad|>"})
    fast.chat_template = QWEN2_VL_CHAT_TEMPLATE
    fast.save_pretrained(path)
    Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels).save_pretrained(path)
    GenerationConfig(bos_token_id=ids["<|endoftext|>"], eos_token_id=[ids["<|im_end|>"], ids["<|endoftext|>"]],
                     pad_token_id=ids["<|endoftext|>"]).save_pretrained(path)
    return path


def load_qwen2_vl_reference(path: str | Path):
    """The `transformers` model of a tiny Qwen2-VL or Qwen2.5-VL checkpoint, float32, eval mode."""
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()


def build_tiny_gemma3(
    path: str | Path,
    *,
    image_size: int = 32,
    patch_size: int = 4,
    tokens_per_image: int = 16,
    sliding_window: int = 8,
    softcapping: float | None = None,
    seed: int = 0,
) -> Path:
    """Write a tiny Gemma 3 (SigLIP + pooled projector + Gemma 3 text) checkpoint with tokenizer, chat template,
    image processor and generation config.

    Sliding layers 0, 1 and 3 have a window of 8 (shorter than an image's 16 tokens), layer 2 is global;
    the two kinds have different RoPE (the global one linearly scaled), and query_pre_attn_scalar is not
    head_dim, so each of those must be right for the logits to match. Every weight is random, norms and
    biases included (a wrong norm offset or a misplaced per-head norm weight shows).
    """
    from transformers import (
        Gemma3Config,
        Gemma3ForConditionalGeneration,
        Gemma3ImageProcessorPil,
        Gemma3TextConfig,
        GenerationConfig,
        SiglipVisionConfig,
    )

    path = Path(path)
    fast = gemma3_tokenizer()
    tok = fast.backend_tokenizer
    ids = {name: tok.token_to_id(name) for name in GEMMA_SPECIAL_TOKENS}
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                image_size=image_size, patch_size=patch_size, vision_use_head=False)
    text = Gemma3TextConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        vocab_size=tok.get_vocab_size(), max_position_embeddings=512, sliding_window=sliding_window, query_pre_attn_scalar=24,
        layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"],
        rope_parameters={"full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1000000.0},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}},
        final_logit_softcapping=softcapping, attn_logit_softcapping=softcapping,
        bos_token_id=ids["<bos>"], eos_token_id=ids["<eos>"], pad_token_id=ids["<pad>"],
    )
    config = Gemma3Config(vision_config=vision, text_config=text, mm_tokens_per_image=tokens_per_image,
                          boi_token_index=ids["<start_of_image>"], eoi_token_index=ids["<end_of_image>"],
                          image_token_index=ids["<image_soft_token>"])
    torch.manual_seed(seed)
    model = Gemma3ForConditionalGeneration(config).eval()
    randomize_(model)
    model.save_pretrained(path)
    fast.save_pretrained(path)
    Gemma3ImageProcessorPil(size={"height": image_size, "width": image_size}).save_pretrained(path)
    GenerationConfig(bos_token_id=ids["<bos>"], eos_token_id=[ids["<eos>"], ids["<end_of_turn>"]],
                     pad_token_id=ids["<pad>"]).save_pretrained(path)
    return path


def gemma3_tokenizer():
    """The demo Gemma 3 tokenizer (newline-run merges, Gemma's specials) as transformers' tokenizer, chat template set."""
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(
        tokenizer_object=build_tokenizer(special_tokens=GEMMA_SPECIAL_TOKENS, corpus=GEMMA_CORPUS, bos_token="<bos>"),
        bos_token="<bos>", eos_token="<eos>", unk_token="<unk>", pad_token="<pad>",
        extra_special_tokens={"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"},
    )
    fast.chat_template = GEMMA3_CHAT_TEMPLATE
    return fast


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


if __name__ == "__main__":
    import sys

    out = build_tiny_llava(sys.argv[1])
    print(json.dumps(sorted(p.name for p in out.iterdir())))


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
