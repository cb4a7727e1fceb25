"""Qwen2-VL and Qwen2.5-VL: a ViT over 14 px patches with 2×2 patch merging into a Qwen2 LM with M-RoPE."""

from __future__ import annotations

from functools import partial

from vlmq.demo_model.family import Family
from vlmq.demo_model.llava import CLIP_MEAN, CLIP_STD
from vlmq.demo_model.tensors import Shapes, llama_tensors

# Qwen2-VL-Instruct's template: an image part is <|vision_start|><|image_pad|><|vision_end|>, which the
# processor expands into <|vision_start|> + one <|image_pad|> per merged patch + <|vision_end|>.
CHAT_TEMPLATE = (
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

COMMON_VISION = {"in_channels": 3, "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2,
                 "rope_parameters": {"rope_type": "axial", "rope_theta": 10000.0}}
VISION = {
    "qwen2_vl": {"model_type": "qwen2_vl_vision", "depth": 2, "embed_dim": 32, "num_heads": 4, "mlp_ratio": 2,
                 "hidden_act": "quick_gelu", **COMMON_VISION},
    # 2×2-cell attention windows (56 px) and one full-attention block.
    "qwen2_5_vl": {"model_type": "qwen2_5_vl_vision", "depth": 2, "hidden_size": 32, "intermediate_size": 48, "num_heads": 4,
                   "hidden_act": "silu", "window_size": 56, "fullatt_block_indexes": [1], "tokens_per_second": 2, **COMMON_VISION},
}
TEXT = {
    "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
    "num_key_value_heads": 2, "max_position_embeddings": 1024, "rms_norm_eps": 1e-5, "hidden_act": "silu",
    "use_sliding_window": False,
}


def configs(ids: dict[str, int], vocab_size: int, vision: dict, text: dict, variant: str = "qwen2_vl",
            min_pixels: int = 28 * 28 * 4, max_pixels: int = 28 * 28 * 16) -> dict[str, dict]:
    """Images become 4 to 16 merged patches by default (`min_pixels`, `max_pixels`); the merger's output
    width follows the text model's hidden size."""
    text = TEXT | {"model_type": f"{variant}_text", "vocab_size": vocab_size, "bos_token_id": ids["<|endoftext|>"],
                   "eos_token_id": ids["<|im_end|>"], "pad_token_id": ids["<|endoftext|>"]} | text
    half = text["hidden_size"] // text["num_attention_heads"] // 2
    # M-RoPE splits each head's rotary frequencies between time, height and width as Qwen2-VL does: ¼, ⅜, ⅜.
    text.setdefault("rope_parameters", {"rope_type": "default", "rope_theta": 1000000.0,
                                        "mrope_section": [half // 4, half * 3 // 8, half * 3 // 8]})
    tie = bool(text.pop("tie_word_embeddings", False))  # top level, where Qwen2VLConfig keeps it
    out = {"hidden_size": text["hidden_size"]} if variant == "qwen2_vl" else {"out_hidden_size": text["hidden_size"]}
    vision = VISION[variant] | vision | out
    config = {
        "architectures": ["Qwen2VLForConditionalGeneration" if variant == "qwen2_vl" else "Qwen2_5_VLForConditionalGeneration"],
        "model_type": variant, "text_config": text, "vision_config": vision, "tie_word_embeddings": tie,
        "image_token_id": ids["<|image_pad|>"], "video_token_id": ids["<|video_pad|>"],
        "vision_start_token_id": ids["<|vision_start|>"], "vision_end_token_id": ids["<|vision_end|>"],
    }
    preprocessor = {
        "image_processor_type": "Qwen2VLImageProcessor", "do_resize": True, "resample": 3,
        "min_pixels": min_pixels, "max_pixels": max_pixels, "size": {"shortest_edge": min_pixels, "longest_edge": max_pixels},
        "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": CLIP_MEAN, "image_std": CLIP_STD,
        "do_convert_rgb": True, "patch_size": vision["patch_size"], "temporal_patch_size": vision["temporal_patch_size"],
        "merge_size": vision["spatial_merge_size"],
    }
    return {"config.json": config, "preprocessor_config.json": preprocessor}


def tensors(config: dict) -> Shapes:
    """`visual.…`, then the language model as `model.…` and `lm_head.weight`."""
    vision, text = config["vision_config"], config["text_config"]
    qwen2 = config["model_type"] == "qwen2_vl"
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
    lm = llama_tensors({**text, "head_dim": hd}, config["tie_word_embeddings"])
    for i in range(text["num_hidden_layers"]):
        attn = f"language_model.model.layers.{i}.self_attn."
        lm.update({f"{attn}q_proj.bias": (text["num_attention_heads"] * hd,), f"{attn}k_proj.bias": (text["num_key_value_heads"] * hd,),
                   f"{attn}v_proj.bias": (text["num_key_value_heads"] * hd,)})
    return shapes | {name.removeprefix("language_model."): shape for name, shape in lm.items()}


def family(variant: str) -> Family:
    return Family(
        # Chat turns and the image markers: a subset of the real vocabulary's specials; no BOS.
        special_tokens=("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
                        "<|video_pad|>"),
        roles={"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "image_token": "<|image_pad|>"},
        stop_tokens=("<|im_end|>", "<|endoftext|>"),
        chat_template=CHAT_TEMPLATE,
        configs=partial(configs, variant=variant),
        tensors=tensors,
    )


QWEN2_VL = family("qwen2_vl")
QWEN2_5_VL = family("qwen2_5_vl")
