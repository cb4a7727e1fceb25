"""Tiny random-weight checkpoints in the Hugging Face layout, written without `transformers`.

`vlmq demo-model PATH --family llava` uses this so a fresh machine can run the
whole stack with no download. The folder has what a published checkpoint has:
`config.json`, `model.safetensors`, `tokenizer.json`, `tokenizer_config.json`,
`chat_template.jinja`, `preprocessor_config.json`, `generation_config.json`.
The weights are random, so captions are gibberish — but every code path runs.
"""

from __future__ import annotations

import json
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

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def build_tokenizer(vocab_size: int = 400):
    """A byte-level BPE tokenizer with Llama's specials; BOS added by its post-processor."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 4, trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)])
    return tok


def _clip_tensor_shapes(vc: dict) -> dict[str, tuple[int, ...]]:
    d, m, p, c = vc["hidden_size"], vc["intermediate_size"], vc["patch_size"], vc["num_channels"]
    prefix = "vision_tower.vision_model."
    shapes = {
        "embeddings.class_embedding": (d,),
        "embeddings.patch_embedding.weight": (d, c, p, p),
        "embeddings.position_embedding.weight": ((vc["image_size"] // p) ** 2 + 1, d),
        "pre_layrnorm.weight": (d,), "pre_layrnorm.bias": (d,),
        "post_layernorm.weight": (d,), "post_layernorm.bias": (d,),
    }
    for i in range(vc["num_hidden_layers"]):
        layer = f"encoder.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            shapes[f"{layer}self_attn.{proj}.weight"] = (d, d)
            shapes[f"{layer}self_attn.{proj}.bias"] = (d,)
        for norm in ("layer_norm1", "layer_norm2"):
            shapes[f"{layer}{norm}.weight"] = (d,)
            shapes[f"{layer}{norm}.bias"] = (d,)
        shapes.update({f"{layer}mlp.fc1.weight": (m, d), f"{layer}mlp.fc1.bias": (m,), f"{layer}mlp.fc2.weight": (d, m), f"{layer}mlp.fc2.bias": (d,)})
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


def _random_weights(shapes: dict[str, tuple[int, ...]], generator: torch.Generator, std: float = 0.2) -> dict[str, torch.Tensor]:
    weights = {}
    for name, shape in shapes.items():
        if name.endswith(("norm.weight", "norm1.weight", "norm2.weight", "layrnorm.weight")):
            weights[name] = torch.ones(shape)  # norms start at identity, as trained models roughly are
        elif name.endswith(".bias"):
            weights[name] = torch.zeros(shape)
        else:
            weights[name] = torch.randn(shape, generator=generator) * (1.0 if "embed" in name else std)
    return weights


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
    save_file(_random_weights(shapes, torch.Generator().manual_seed(seed), weight_std), path / "model.safetensors", metadata={"format": "pt"})
    tok.save(str(path / "tokenizer.json"))
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
    for name, content in files.items():
        (path / name).write_text(json.dumps(content, indent=2) + "\n")
    (path / "chat_template.jinja").write_text(LLAVA_CHAT_TEMPLATE)
    return path


DEMO_FAMILIES = {"llava": write_llava_demo}


def write_demo_model(path: str | Path, family: str = "llava") -> Path:
    if family not in DEMO_FAMILIES:
        raise ValueError(f"unknown family {family!r}; choose one of {', '.join(DEMO_FAMILIES)}")
    return DEMO_FAMILIES[family](path)

