"""Tiny random-weight checkpoints in the Hugging Face layout, written without `transformers`.

`vlmq demo-model PATH --family llava` uses this so a fresh machine can run the
whole stack with no download. The folder has what a published checkpoint has:
`config.json`, `model.safetensors`, `tokenizer.json`, `tokenizer_config.json`,
`chat_template.jinja`, `preprocessor_config.json`, `generation_config.json`.
The weights are random, so captions are gibberish — but every code path runs.
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import torch
from safetensors.torch import save_file

CORPUS = [
    "A photo of a cat sitting on a red sofa next to a window.",
    "Describe this image in one sentence. What do you see?",
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "USER: ASSISTANT: a dog, a bird, a car, a tree, a house, the sky is blue.",
    "Émile a vu un château près de la forêt — très beau! 猫と犬 😀",
    "Numbers 0 1 2 3 4 5 6 7 8 9 and punctuation: , . ; : ! ? ( ) [ ] { }",
]

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]

# LLaVA-1.5's template (llava-hf), without transformers' private {% generation %} tag.
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}{% endif %}"
    "{% if message['content'] is string %}{{ message['content'] + ' ' }}{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' ' }}{% endfor %}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

# Pixtral / Mistral 3.1: Mistral's instruction and image specials (the image's rows, row breaks and end).
PIXTRAL_SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "[INST]", "[/INST]", "[IMG]", "[IMG_BREAK]", "[IMG_END]"]

# The template transformers' Mistral 3.1 / Pixtral conversion writes: an image part is `[IMG]`, which the
# processor expands into rows (vlmq's containers carry that expansion in their layout).
MISTRAL_CHAT_TEMPLATE = (
    '{%- if messages[0]["role"] == "system" %}{%- set system_message = messages[0]["content"] %}'
    '{%- set loop_messages = messages[1:] %}\n{%- else %}{%- set loop_messages = messages %}{%- endif %}'
    "{{- bos_token }}{%- for message in loop_messages %}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{- raise_exception('After the optional system message, conversation roles must alternate user/assistant/user/assistant/...') }}"
    '{%- endif %}{%- if message["role"] == "user" %}{%- if loop.last and system_message is defined %}'
    '{{- "[INST]" + system_message + "\n\n" }}{%- else %}{{ "[INST]" }}{%- endif %}{%- endif %}'
    '{%- if message["content"] is not string %}{%- for chunk in message["content"] %}'
    '{%- if chunk["type"] == "text" %}{%- if "content" in chunk %}{{- chunk["content"] }}'
    '{%- elif "text" in chunk %}{{- chunk["text"] }}{%- endif %}'
    '{%- elif chunk["type"] == "image" %}{{- "[IMG]" }}'
    '{%- else %}{{- raise_exception("Unrecognized content type!") }}{%- endif %}{%- endfor %}'
    '{%- else %}{{- message["content"] }}{%- endif %}'
    '{%- if message["role"] == "user" %}{{- "[/INST]" }}{%- elif message["role"] == "assistant" %}{{- eos_token}}'
    '{%- else %}{{- raise_exception("Only user and assistant roles are supported, with the exception of an initial optional system message!") }}'
    "{%- endif %}{%- endfor %}"
)

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def build_tokenizer(vocab_size: int = 400, special_tokens: list[str] = SPECIAL_TOKENS, corpus: list[str] = CORPUS, bos_token: str = "<s>"):
    """A byte-level BPE tokenizer with Llama's specials (or `special_tokens`), trained on `corpus`; BOS added by its
    post-processor when `bos_token` is one of the specials (Qwen's have none)."""
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
        trainers,
    )

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus * 4, trainer)
    if bos_token in special_tokens:
        bos = tok.token_to_id(bos_token)
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos_token} $A", pair=f"{bos_token} $A {bos_token} $B", special_tokens=[(bos_token, bos)]
        )
    return tok


def _vit_encoder_shapes(vc: dict) -> dict[str, tuple[int, ...]]:
    """The encoder layers of a CLIP or SigLIP ViT, under `vision_model.`."""
    d, m = vc["hidden_size"], vc["intermediate_size"]
    shapes = {}
    for i in range(vc["num_hidden_layers"]):
        layer = f"encoder.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            shapes[f"{layer}self_attn.{proj}.weight"] = (d, d)
            shapes[f"{layer}self_attn.{proj}.bias"] = (d,)
        for norm in ("layer_norm1", "layer_norm2"):
            shapes[f"{layer}{norm}.weight"] = (d,)
            shapes[f"{layer}{norm}.bias"] = (d,)
        shapes.update({f"{layer}mlp.fc1.weight": (m, d), f"{layer}mlp.fc1.bias": (m,), f"{layer}mlp.fc2.weight": (d, m), f"{layer}mlp.fc2.bias": (d,)})
    return shapes


def _clip_tensor_shapes(vc: dict) -> dict[str, tuple[int, ...]]:
    d, p, c = vc["hidden_size"], vc["patch_size"], vc["num_channels"]
    prefix = "vision_tower.vision_model."
    shapes = {
        "embeddings.class_embedding": (d,),
        "embeddings.patch_embedding.weight": (d, c, p, p),
        "embeddings.position_embedding.weight": ((vc["image_size"] // p) ** 2 + 1, d),
        "pre_layrnorm.weight": (d,), "pre_layrnorm.bias": (d,),
        "post_layernorm.weight": (d,), "post_layernorm.bias": (d,),
    } | _vit_encoder_shapes(vc)
    return {prefix + k: v for k, v in shapes.items()}


def _llama_tensor_shapes(tc: dict) -> dict[str, tuple[int, ...]]:
    d, m, v = tc["hidden_size"], tc["intermediate_size"], tc["vocab_size"]
    hd = tc["head_dim"]
    q, kv = tc["num_attention_heads"] * hd, tc["num_key_value_heads"] * hd
    shapes = {"model.embed_tokens.weight": (v, d), "model.norm.weight": (d,)}
    if not tc["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (v, d)
    for i in range(tc["num_hidden_layers"]):
        layer = f"model.layers.{i}."
        shapes.update({
            f"{layer}input_layernorm.weight": (d,), f"{layer}post_attention_layernorm.weight": (d,),
            f"{layer}self_attn.q_proj.weight": (q, d), f"{layer}self_attn.k_proj.weight": (kv, d),
            f"{layer}self_attn.v_proj.weight": (kv, d), f"{layer}self_attn.o_proj.weight": (d, q),
            f"{layer}mlp.gate_proj.weight": (m, d), f"{layer}mlp.up_proj.weight": (m, d), f"{layer}mlp.down_proj.weight": (d, m),
        })
    return {"language_model." + k: v for k, v in shapes.items()}


def _random_weights(shapes: dict[str, tuple[int, ...]], generator: torch.Generator, std: float = 0.2,
                    offset_norms: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """`offset_norms`: name prefixes under which norms scale by 1 + weight (Gemma's)."""
    weights = {}
    for name, shape in shapes.items():
        if name.endswith(("norm.weight", "norm1.weight", "norm2.weight", "layrnorm.weight", "ln_q.weight", "ln_pre.weight")):
            # Norms start at identity, as trained models roughly are: weight 1, or 0 for a 1 + weight norm.
            weights[name] = torch.full(shape, 0.0 if name.startswith(offset_norms) else 1.0)
        elif name.endswith(".bias"):
            weights[name] = torch.zeros(shape)
        else:
            weights[name] = torch.randn(shape, generator=generator) * (1.0 if "embed" in name else std)
    return weights


def _write_checkpoint(path: Path, shapes: dict[str, tuple[int, ...]], tok, files: dict[str, dict], chat_template: str,
                      seed: int, weight_std: float, offset_norms: tuple[str, ...] = ()) -> Path:
    """Random weights of `shapes`, the tokenizer, the JSON `files` and the chat template, into the folder `path`."""
    weights = _random_weights(shapes, torch.Generator().manual_seed(seed), weight_std, offset_norms)
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
    tok.save(str(path / "tokenizer.json"))
    for name, content in files.items():
        (path / name).write_text(json.dumps(content, indent=2) + "\n")
    (path / "chat_template.jinja").write_text(chat_template)
    return path


def write_llava_demo(
    path: str | Path,
    *,
    image_size: int = 56,
    patch_size: int = 14,
    seed: int = 0,
    vision: dict | None = None,
    text: dict | None = None,
    weight_std: float = 0.2,
) -> Path:
    """A random-weight LLaVA-1.5 (CLIP ViT + MLP projector + Llama) that `transformers` loads too.

    Tiny by default. ``vision`` and ``text`` override fields of the CLIP and Llama
    configs to write bigger ones (the benchmarks' *bench-small*). A ``vocab_size``
    above the demo tokenizer's pads the embedding table: the tokenizer never
    produces those IDs and decoding skips them, but the LM pays for a full-size
    vocabulary. ``head_dim`` follows ``hidden_size / num_attention_heads`` unless given.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer()
    ids = {name: tok.token_to_id(name) for name in SPECIAL_TOKENS}
    vision = {
        "model_type": "clip_vision_model", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 3,
        "num_attention_heads": 4, "num_channels": 3, "image_size": image_size, "patch_size": patch_size,
        "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5, "projection_dim": 64,
    } | (vision or {})
    text_overrides = text or {}
    text = {
        "model_type": "llama", "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 4,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32, "vocab_size": tok.get_vocab_size(),
        "max_position_embeddings": 1024, "rms_norm_eps": 1e-6, "hidden_act": "silu", "attention_bias": False,
        "mlp_bias": False, "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
        "tie_word_embeddings": False, "bos_token_id": ids["<s>"], "eos_token_id": ids["</s>"], "pad_token_id": ids["<pad>"],
    } | text_overrides
    if "head_dim" not in text_overrides:
        text["head_dim"] = text["hidden_size"] // text["num_attention_heads"]
    if text["vocab_size"] < tok.get_vocab_size():
        raise ValueError(f"vocab_size {text['vocab_size']} is below the demo tokenizer's {tok.get_vocab_size()}")
    image_size, patch_size = vision["image_size"], vision["patch_size"]
    config = {
        "architectures": ["LlavaForConditionalGeneration"], "model_type": "llava",
        "vision_config": vision, "text_config": text, "image_token_index": ids["<image>"],
        "image_seq_length": (image_size // patch_size) ** 2, "projector_hidden_act": "gelu",
        "multimodal_projector_bias": True, "vision_feature_layer": -2, "vision_feature_select_strategy": "default",
        "tie_word_embeddings": text["tie_word_embeddings"],
    }
    shapes = _clip_tensor_shapes(vision) | _llama_tensor_shapes(text) | {
        "multi_modal_projector.linear_1.weight": (text["hidden_size"], vision["hidden_size"]),
        "multi_modal_projector.linear_1.bias": (text["hidden_size"],),
        "multi_modal_projector.linear_2.weight": (text["hidden_size"], text["hidden_size"]),
        "multi_modal_projector.linear_2.bias": (text["hidden_size"],),
    }
    files = {
        "config.json": config,
        "tokenizer_config.json": {
            "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
            "unk_token": "<unk>", "pad_token": "<pad>", "image_token": "<image>", "model_max_length": text["max_position_embeddings"],
        },
        "preprocessor_config.json": {
            "image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": {"shortest_edge": image_size},
            "resample": 3, "do_center_crop": True, "crop_size": {"height": image_size, "width": image_size},
            "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": CLIP_MEAN,
            "image_std": CLIP_STD, "do_convert_rgb": True,
        },
        "generation_config.json": {"bos_token_id": ids["<s>"], "eos_token_id": ids["</s>"], "pad_token_id": ids["<pad>"]},
    }
    return _write_checkpoint(path, shapes, tok, files, LLAVA_CHAT_TEMPLATE, seed, weight_std)


# Qwen2-VL / Qwen2.5-VL: chat turns and the image markers (a subset of the real vocabulary's specials; no BOS).
QWEN_SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>",
]

# Qwen2-VL-Instruct's template: an image part is <|vision_start|><|image_pad|><|vision_end|>, which the
# processor expands into <|vision_start|> + one <|image_pad|> per merged patch + <|vision_end|>.
QWEN2_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _qwen2_vl_tensor_shapes(variant: str, vision: dict, text: dict) -> dict[str, tuple[int, ...]]:
    """Every tensor of a Qwen2(.5)-VL, named as transformers saves it: `visual.…`, `model.…`, `lm_head.weight`."""
    qwen2 = variant == "qwen2_vl"
    d = vision["embed_dim"] if qwen2 else vision["hidden_size"]
    m = d * vision["mlp_ratio"] if qwen2 else vision["intermediate_size"]
    c, t, p, unit = vision["in_channels"], vision["temporal_patch_size"], vision["patch_size"], vision["spatial_merge_size"] ** 2
    norm = ("weight", "bias") if qwen2 else ("weight",)  # LayerNorm or RMSNorm
    shapes = {"visual.patch_embed.proj.weight": (d, c, t, p, p)}
    for i in range(vision["depth"]):
        block = f"visual.blocks.{i}."
        shapes.update({f"{block}{n}.{s}": (d,) for n in ("norm1", "norm2") for s in norm})
        shapes.update({f"{block}attn.qkv.weight": (3 * d, d), f"{block}attn.qkv.bias": (3 * d,),
                       f"{block}attn.proj.weight": (d, d), f"{block}attn.proj.bias": (d,)})
        projections = {"fc1": (m, d), "fc2": (d, m)} if qwen2 else {"gate_proj": (m, d), "up_proj": (m, d), "down_proj": (d, m)}
        for name, shape in projections.items():
            shapes.update({f"{block}mlp.{name}.weight": shape, f"{block}mlp.{name}.bias": shape[:1]})
    shapes.update({f"visual.merger.ln_q.{s}": (d,) for s in norm})
    shapes.update({"visual.merger.mlp.0.weight": (unit * d, unit * d), "visual.merger.mlp.0.bias": (unit * d,),
                   "visual.merger.mlp.2.weight": (text["hidden_size"], unit * d), "visual.merger.mlp.2.bias": (text["hidden_size"],)})
    # The language model: Llama's tensors plus Qwen2's Q/K/V biases.
    hd = text["hidden_size"] // text["num_attention_heads"]
    lm = _llama_tensor_shapes({**text, "head_dim": hd})
    for i in range(text["num_hidden_layers"]):
        attn = f"language_model.model.layers.{i}.self_attn."
        lm.update({f"{attn}q_proj.bias": (text["num_attention_heads"] * hd,), f"{attn}k_proj.bias": (text["num_key_value_heads"] * hd,),
                   f"{attn}v_proj.bias": (text["num_key_value_heads"] * hd,)})
    return shapes | {name.removeprefix("language_model."): shape for name, shape in lm.items()}


def write_qwen2_vl_demo(
    path: str | Path,
    *,
    variant: str = "qwen2_vl",
    seed: int = 0,
    vision: dict | None = None,
    text: dict | None = None,
    min_pixels: int = 28 * 28 * 4,
    max_pixels: int = 28 * 28 * 16,
    weight_std: float = 0.2,
) -> Path:
    """A random-weight Qwen2-VL (`variant="qwen2_5_vl"`: Qwen2.5-VL) that `transformers` loads too.

    Tiny by default: images become 4 to 16 rows (`min_pixels` / `max_pixels`).
    ``vision`` and ``text`` override fields of the two configs; the merger's output
    width follows the text model's hidden size. A ``vocab_size`` above the demo
    tokenizer's pads the embedding table, as in `write_llava_demo`.
    """
    if variant not in ("qwen2_vl", "qwen2_5_vl"):
        raise ValueError(f"unknown Qwen2-VL variant {variant!r}")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(special_tokens=QWEN_SPECIAL_TOKENS)
    ids = {name: tok.token_to_id(name) for name in QWEN_SPECIAL_TOKENS}
    text = {
        "model_type": f"{variant}_text", "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 4,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": tok.get_vocab_size(),
        "max_position_embeddings": 1024, "rms_norm_eps": 1e-6, "hidden_act": "silu", "use_sliding_window": False,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [4, 6, 6]},
        "bos_token_id": ids["<|endoftext|>"], "eos_token_id": ids["<|im_end|>"], "pad_token_id": ids["<|endoftext|>"],
    } | (text or {})
    tie = bool(text.pop("tie_word_embeddings", False))  # top level, where Qwen2VLConfig keeps it
    if text["vocab_size"] < tok.get_vocab_size():
        raise ValueError(f"vocab_size {text['vocab_size']} is below the demo tokenizer's {tok.get_vocab_size()}")
    common = {"in_channels": 3, "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2,
              "rope_parameters": {"rope_type": "axial", "rope_theta": 10000.0}}
    if variant == "qwen2_vl":
        vision = {"model_type": "qwen2_vl_vision", "depth": 2, "embed_dim": 64, "num_heads": 4, "mlp_ratio": 2,
                  "hidden_act": "quick_gelu", **common} | (vision or {}) | {"hidden_size": text["hidden_size"]}
    else:
        vision = {"model_type": "qwen2_5_vl_vision", "depth": 2, "hidden_size": 64, "intermediate_size": 128, "num_heads": 4,
                  "hidden_act": "silu", "window_size": 56, "fullatt_block_indexes": [1], "tokens_per_second": 2,
                  **common} | (vision or {}) | {"out_hidden_size": text["hidden_size"]}
    config = {
        "architectures": ["Qwen2VLForConditionalGeneration" if variant == "qwen2_vl" else "Qwen2_5_VLForConditionalGeneration"],
        "model_type": variant, "text_config": text, "vision_config": vision, "tie_word_embeddings": tie,
        "image_token_id": ids["<|image_pad|>"], "video_token_id": ids["<|video_pad|>"],
        "vision_start_token_id": ids["<|vision_start|>"], "vision_end_token_id": ids["<|vision_end|>"],
    }
    shapes = _qwen2_vl_tensor_shapes(variant, vision, {**text, "tie_word_embeddings": tie})
    files = {
        "config.json": config,
        "tokenizer_config.json": {
            "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
            "image_token": "<|image_pad|>", "model_max_length": text["max_position_embeddings"],
        },
        "preprocessor_config.json": {
            "image_processor_type": "Qwen2VLImageProcessor", "do_resize": True, "resample": 3,
            "min_pixels": min_pixels, "max_pixels": max_pixels, "size": {"shortest_edge": min_pixels, "longest_edge": max_pixels},
            "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": CLIP_MEAN, "image_std": CLIP_STD,
            "do_convert_rgb": True, "patch_size": vision["patch_size"], "temporal_patch_size": vision["temporal_patch_size"],
            "merge_size": vision["spatial_merge_size"],
        },
        "generation_config.json": {"bos_token_id": ids["<|endoftext|>"], "eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]],
                                   "pad_token_id": ids["<|endoftext|>"]},
    }
    return _write_checkpoint(path, shapes, tok, files, QWEN2_VL_CHAT_TEMPLATE, seed, weight_std)


def _pixtral_tensor_shapes(vc: dict) -> dict[str, tuple[int, ...]]:
    d, m, p, c = vc["hidden_size"], vc["intermediate_size"], vc["patch_size"], vc["num_channels"]
    shapes = {"patch_conv.weight": (d, c, p, p), "ln_pre.weight": (d,)}
    for i in range(vc["num_hidden_layers"]):
        layer = f"transformer.layers.{i}."
        shapes.update({f"{layer}attention.{proj}.weight": (d, d) for proj in ("q_proj", "k_proj", "v_proj", "o_proj")})
        shapes.update({
            f"{layer}attention_norm.weight": (d,), f"{layer}ffn_norm.weight": (d,),
            f"{layer}feed_forward.gate_proj.weight": (m, d), f"{layer}feed_forward.up_proj.weight": (m, d),
            f"{layer}feed_forward.down_proj.weight": (d, m),
        })
    return {"vision_tower." + k: v for k, v in shapes.items()}


def write_pixtral_demo(
    path: str | Path,
    *,
    family: str = "pixtral",
    patch_size: int = 8,
    longest_edge: int | None = None,
    seed: int = 0,
    vision: dict | None = None,
    text: dict | None = None,
    weight_std: float = 0.2,
) -> Path:
    """A random-weight Pixtral (LLaVA + Pixtral vision + Mistral), or with `family="mistral3"` a Mistral 3.1
    (+ RMSNorm and 2×2 patch merger before the projector), in the layout `transformers` saves and loads.

    Images keep their aspect ratio and fit `longest_edge` (8 × 8 language-model tokens at most by
    default). ``vision`` and ``text`` override fields of the Pixtral vision and Mistral configs.
    """
    if family not in ("pixtral", "mistral3"):
        raise ValueError(f"unknown Pixtral family {family!r}; choose pixtral or mistral3")
    merge = 2 if family == "mistral3" else 1
    longest_edge = longest_edge or 8 * patch_size * merge
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(special_tokens=PIXTRAL_SPECIAL_TOKENS)
    ids = {name: tok.token_to_id(name) for name in PIXTRAL_SPECIAL_TOKENS}
    vision = {
        "model_type": "pixtral", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 3,
        "num_attention_heads": 4, "num_channels": 3, "image_size": longest_edge, "patch_size": patch_size,
        "hidden_act": "silu", "attention_dropout": 0.0, "rope_parameters": {"rope_theta": 10000.0, "rope_type": "axial"},
    } | (vision or {})
    vision["head_dim"] = vision["hidden_size"] // vision["num_attention_heads"]  # what transformers recomputes it to
    text_overrides = text or {}
    text = {
        "model_type": "mistral", "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 4,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": tok.get_vocab_size(),
        "max_position_embeddings": 1024, "rms_norm_eps": 1e-5, "hidden_act": "silu", "sliding_window": None,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0}, "tie_word_embeddings": False,
        "bos_token_id": ids["<s>"], "eos_token_id": ids["</s>"], "pad_token_id": ids["<pad>"],
    } | text_overrides
    text.setdefault("head_dim", text["hidden_size"] // text["num_attention_heads"])
    if text["vocab_size"] < tok.get_vocab_size():
        raise ValueError(f"vocab_size {text['vocab_size']} is below the demo tokenizer's {tok.get_vocab_size()}")
    d, h = vision["hidden_size"], text["hidden_size"]
    config = {
        "vision_config": vision, "text_config": text, "image_token_index": ids["[IMG]"], "projector_hidden_act": "gelu",
        "vision_feature_layer": -1, "tie_word_embeddings": text["tie_word_embeddings"],
    }
    if family == "mistral3":
        config |= {"architectures": ["Mistral3ForConditionalGeneration"], "model_type": "mistral3",
                   "spatial_merge_size": merge, "multimodal_projector_bias": False}
        projector = {
            "norm.weight": (d,), "patch_merger.merging_layer.weight": (d, d * merge * merge),
            "linear_1.weight": (h, d), "linear_2.weight": (h, h),
        }
    else:
        config |= {"architectures": ["LlavaForConditionalGeneration"], "model_type": "llava",
                   "vision_feature_select_strategy": "full", "multimodal_projector_bias": True}
        projector = {"linear_1.weight": (h, d), "linear_1.bias": (h,), "linear_2.weight": (h, h), "linear_2.bias": (h,)}
    shapes = _pixtral_tensor_shapes(vision) | _llama_tensor_shapes(text) | {"multi_modal_projector." + k: v for k, v in projector.items()}
    files = {
        "config.json": config,
        "tokenizer_config.json": {
            "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
            "unk_token": "<unk>", "pad_token": "<pad>", "model_max_length": text["max_position_embeddings"],
        },
        "preprocessor_config.json": {
            "image_processor_type": "PixtralImageProcessor", "patch_size": {"height": patch_size, "width": patch_size},
            "size": {"longest_edge": longest_edge}, "do_resize": True, "resample": 3, "do_rescale": True,
            "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": CLIP_MEAN, "image_std": CLIP_STD, "do_convert_rgb": True,
        },
        # PixtralProcessor's own fields: it resizes to multiples of patch_size × spatial_merge_size.
        "processor_config.json": {
            "processor_class": "PixtralProcessor", "patch_size": patch_size, "spatial_merge_size": merge,
            "image_token": "[IMG]", "image_break_token": "[IMG_BREAK]", "image_end_token": "[IMG_END]",
        },
        "generation_config.json": {"bos_token_id": ids["<s>"], "eos_token_id": ids["</s>"], "pad_token_id": ids["<pad>"]},
    }
    return _write_checkpoint(path, shapes, tok, files, MISTRAL_CHAT_TEMPLATE, seed, weight_std)


# Gemma 3: its tokenizer's first specials (same IDs as the real vocabulary: pad 0, eos 1, bos 2, unk 3), turns and images.
GEMMA_SPECIAL_TOKENS = [
    "<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>", "<start_of_image>", "<end_of_image>", "<image_soft_token>",
]
# Gemma's vocabulary has tokens for runs of newlines; Gemma3Processor's "\n\n" around an image merges with the
# newlines next to it. This corpus teaches the demo tokenizer those merges, so the difference shows.
GEMMA_CORPUS = CORPUS + [
    "Paragraph one.\n\nParagraph two.\n\n\nThree newlines.\n\n\n\nFour newlines.\nOne newline.",
    "user\n\n\nA picture.\n\n\n\nmodel\nIt shows a cat.\n\n",
] * 3

# google/gemma-3-*-it's template: a system message joins the first user turn; an image part is <start_of_image>,
# which Gemma3Processor expands (vlmq's containers carry that expansion in their layout).
GEMMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}\n"
    "{%- if messages[0]['role'] == 'system' -%}\n"
    "    {%- if messages[0]['content'] is string -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}\n"
    "    {%- else -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}\n"
    "    {%- endif -%}\n"
    "    {%- set loop_messages = messages[1:] -%}\n"
    "{%- else -%}\n"
    "    {%- set first_user_prefix = \"\" -%}\n"
    "    {%- set loop_messages = messages -%}\n"
    "{%- endif -%}\n"
    "{%- for message in loop_messages -%}\n"
    "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}\n"
    "        {{ raise_exception(\"Conversation roles must alternate user/assistant/user/assistant/...\") }}\n"
    "    {%- endif -%}\n"
    "    {%- if (message['role'] == 'assistant') -%}\n"
    "        {%- set role = \"model\" -%}\n"
    "    {%- else -%}\n"
    "        {%- set role = message['role'] -%}\n"
    "    {%- endif -%}\n"
    "    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else \"\") }}\n"
    "    {%- if message['content'] is string -%}\n"
    "        {{ message['content'] | trim }}\n"
    "    {%- elif message['content'] is iterable -%}\n"
    "        {%- for item in message['content'] -%}\n"
    "            {%- if item['type'] == 'image' -%}\n"
    "                {{ '<start_of_image>' }}\n"
    "            {%- elif item['type'] == 'text' -%}\n"
    "                {{ item['text'] | trim }}\n"
    "            {%- endif -%}\n"
    "        {%- endfor -%}\n"
    "    {%- else -%}\n"
    "        {{ raise_exception(\"Invalid content type\") }}\n"
    "    {%- endif -%}\n"
    "    {{ '<end_of_turn>\n' }}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}\n"
    "    {{'<start_of_turn>model\n'}}\n"
    "{%- endif -%}\n"
)

GEMMA_MEAN = GEMMA_STD = [0.5, 0.5, 0.5]


def _siglip_tensor_shapes(vc: dict) -> dict[str, tuple[int, ...]]:
    d, p, c = vc["hidden_size"], vc["patch_size"], vc["num_channels"]
    shapes = {
        "embeddings.patch_embedding.weight": (d, c, p, p), "embeddings.patch_embedding.bias": (d,),
        "embeddings.position_embedding.weight": ((vc["image_size"] // p) ** 2, d),
        "post_layernorm.weight": (d,), "post_layernorm.bias": (d,),
    } | _vit_encoder_shapes(vc)
    return {"vision_tower.vision_model." + k: v for k, v in shapes.items()}


def _gemma3_text_shapes(tc: dict) -> dict[str, tuple[int, ...]]:
    """Llama's tensors plus Gemma 3's norms: after attention, around the MLP, and on each head of Q and K."""
    shapes = _llama_tensor_shapes(tc)
    for i in range(tc["num_hidden_layers"]):
        layer = f"language_model.model.layers.{i}."
        shapes.update({f"{layer}{norm}.weight": (tc["hidden_size"],) for norm in ("pre_feedforward_layernorm", "post_feedforward_layernorm")})
        shapes.update({f"{layer}self_attn.{norm}.weight": (tc["head_dim"],) for norm in ("q_norm", "k_norm")})
    return shapes


def write_gemma3_demo(
    path: str | Path,
    *,
    image_size: int = 64,
    patch_size: int = 8,
    tokens_per_image: int = 16,
    seed: int = 0,
    vision: dict | None = None,
    text: dict | None = None,
    weight_std: float = 0.2,
) -> Path:
    """A random-weight Gemma 3 (SigLIP + pooled projector + Gemma 3 text) that `transformers` loads too.

    Tiny by default: 64 × 64 images, 8 × 8 patches pooled to `tokens_per_image` = 16 tokens, and a
    4-layer language model with a window of 32 on three sliding layers and one global. ``vision`` and
    ``text`` override fields of the SigLIP and Gemma 3 text configs; a ``vocab_size`` above the demo
    tokenizer's pads the table, as in `write_llava_demo`.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(special_tokens=GEMMA_SPECIAL_TOKENS, corpus=GEMMA_CORPUS, bos_token="<bos>")
    ids = {name: tok.token_to_id(name) for name in GEMMA_SPECIAL_TOKENS}
    vision = {
        "model_type": "siglip_vision_model", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_channels": 3, "image_size": image_size, "patch_size": patch_size,
        "hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-6, "vision_use_head": False,
    } | (vision or {})
    text = {
        "model_type": "gemma3_text", "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 4,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32, "vocab_size": tok.get_vocab_size(),
        "max_position_embeddings": 1024, "rms_norm_eps": 1e-6, "hidden_activation": "gelu_pytorch_tanh",
        "query_pre_attn_scalar": 32, "sliding_window": 32,
        "layer_types": ["sliding_attention", "sliding_attention", "sliding_attention", "full_attention"],
        "rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 1000000.0},
                            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}},
        "final_logit_softcapping": None, "attn_logit_softcapping": None, "attention_bias": False, "tie_word_embeddings": True,
        "bos_token_id": ids["<bos>"], "eos_token_id": ids["<eos>"], "pad_token_id": ids["<pad>"],
    } | (text or {})
    if len(text["layer_types"]) != text["num_hidden_layers"]:  # a deeper override: Gemma 3's pattern, every 6th layer global
        text["layer_types"] = ["sliding_attention" if (i + 1) % 6 else "full_attention" for i in range(text["num_hidden_layers"])]
    if text["vocab_size"] < tok.get_vocab_size():
        raise ValueError(f"vocab_size {text['vocab_size']} is below the demo tokenizer's {tok.get_vocab_size()}")
    config = {
        "architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3", "vision_config": vision, "text_config": text,
        "mm_tokens_per_image": tokens_per_image, "boi_token_index": ids["<start_of_image>"], "eoi_token_index": ids["<end_of_image>"],
        "image_token_index": ids["<image_soft_token>"], "tie_word_embeddings": text["tie_word_embeddings"],
    }
    shapes = _siglip_tensor_shapes(vision) | _gemma3_text_shapes(text) | {
        "multi_modal_projector.mm_input_projection_weight": (vision["hidden_size"], text["hidden_size"]),
        "multi_modal_projector.mm_soft_emb_norm.weight": (vision["hidden_size"],),
    }
    eos = [ids["<eos>"], ids["<end_of_turn>"]]
    files = {
        "config.json": config,
        "tokenizer_config.json": {
            "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<bos>", "eos_token": "<eos>", "unk_token": "<unk>",
            "pad_token": "<pad>", "boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>",
            "model_max_length": text["max_position_embeddings"],
        },
        "preprocessor_config.json": {
            "image_processor_type": "Gemma3ImageProcessor", "do_resize": True, "size": {"height": image_size, "width": image_size},
            "resample": 2, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": GEMMA_MEAN,
            "image_std": GEMMA_STD, "do_convert_rgb": None, "do_pan_and_scan": None, "image_seq_length": tokens_per_image,
        },
        "processor_config.json": {"processor_class": "Gemma3Processor", "image_seq_length": tokens_per_image},
        "generation_config.json": {"bos_token_id": ids["<bos>"], "eos_token_id": eos, "pad_token_id": ids["<pad>"]},
    }
    return _write_checkpoint(path, shapes, tok, files, GEMMA3_CHAT_TEMPLATE, seed, weight_std,
                             offset_norms=("language_model.", "multi_modal_projector."))


DEMO_FAMILIES = {
    "llava": write_llava_demo,
    "qwen2_vl": write_qwen2_vl_demo,
    "qwen2_5_vl": partial(write_qwen2_vl_demo, variant="qwen2_5_vl"),
    "pixtral": write_pixtral_demo,
    "mistral3": partial(write_pixtral_demo, family="mistral3"),
    "gemma3": write_gemma3_demo,
}


def write_demo_model(path: str | Path, family: str = "llava") -> Path:
    if family not in DEMO_FAMILIES:
        raise ValueError(f"unknown family {family!r}; choose one of {', '.join(DEMO_FAMILIES)}")
    return DEMO_FAMILIES[family](path)

