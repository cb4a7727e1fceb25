"""Pixtral (LLaVA with a Pixtral vision tower and a Mistral LM) and Mistral 3.1 (+ RMSNorm and a 2×2 patch
merger before the projector). Images keep their aspect ratio; each row of patches ends in [IMG_BREAK]."""

from __future__ import annotations

from functools import partial

from vlmq.demo_model.family import Family, lm_config
from vlmq.demo_model.llava import CLIP_MEAN, CLIP_STD
from vlmq.demo_model.tensors import Shapes, llama_tensors, prefixed

# The template transformers' Mistral 3.1 / Pixtral conversion writes: an image part is `[IMG]`, which the
# processor expands into rows (vlmq's containers carry that expansion in their layout).
CHAT_TEMPLATE = (
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

# Images fit a longest edge of 64 px (image_size) in 8 px patches: 8 × 8 patches at most.
VISION = {
    "model_type": "pixtral", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3,
    "num_attention_heads": 2, "num_channels": 3, "image_size": 64, "patch_size": 8,
    "hidden_act": "silu", "attention_dropout": 0.0, "rope_parameters": {"rope_theta": 10000.0, "rope_type": "axial"},
}
TEXT = {
    "model_type": "mistral", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 1024, "rms_norm_eps": 1e-6,
    "hidden_act": "silu", "sliding_window": None, "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
    "tie_word_embeddings": False,
}


def configs(ids: dict[str, int], vocab_size: int, vision: dict, text: dict, variant: str = "pixtral") -> dict[str, dict]:
    vision = VISION | vision
    vision["head_dim"] = vision["hidden_size"] // vision["num_attention_heads"]  # what transformers recomputes it to
    text = lm_config(TEXT | {"vocab_size": vocab_size, "bos_token_id": ids["<s>"], "eos_token_id": ids["</s>"],
                               "pad_token_id": ids["<pad>"]}, text)
    config = {
        "vision_config": vision, "text_config": text, "image_token_index": ids["[IMG]"], "projector_hidden_act": "gelu",
        "vision_feature_layer": -1, "tie_word_embeddings": text["tie_word_embeddings"],
    }
    if variant == "mistral3":
        merge = 2
        config |= {"architectures": ["Mistral3ForConditionalGeneration"], "model_type": "mistral3",
                   "spatial_merge_size": merge, "multimodal_projector_bias": False}
    else:
        merge = 1
        config |= {"architectures": ["LlavaForConditionalGeneration"], "model_type": "llava",
                   "vision_feature_select_strategy": "full", "multimodal_projector_bias": True}
    patch = vision["patch_size"]
    preprocessor = {
        "image_processor_type": "PixtralImageProcessor", "patch_size": {"height": patch, "width": patch},
        "size": {"longest_edge": vision["image_size"]}, "do_resize": True, "resample": 3, "do_rescale": True,
        "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": CLIP_MEAN, "image_std": CLIP_STD, "do_convert_rgb": True,
    }
    # PixtralProcessor's own fields (it resizes to multiples of patch_size × spatial_merge_size); transformers
    # cannot write them without torchvision.
    processor = {
        "processor_class": "PixtralProcessor", "patch_size": patch, "spatial_merge_size": merge,
        "image_token": "[IMG]", "image_break_token": "[IMG_BREAK]", "image_end_token": "[IMG_END]",
    }
    return {"config.json": config, "preprocessor_config.json": preprocessor, "processor_config.json": processor}


def pixtral_tower_tensors(vision: dict) -> Shapes:
    d, m, p, c = vision["hidden_size"], vision["intermediate_size"], vision["patch_size"], vision["num_channels"]
    shapes = {"patch_conv.weight": (d, c, p, p), "ln_pre.weight": (d,)}
    for i in range(vision["num_hidden_layers"]):
        layer = f"transformer.layers.{i}."
        shapes.update({f"{layer}attention.{proj}.weight": (d, d) for proj in ("q_proj", "k_proj", "v_proj", "o_proj")})
        shapes.update({
            f"{layer}attention_norm.weight": (d,), f"{layer}ffn_norm.weight": (d,),
            f"{layer}feed_forward.gate_proj.weight": (m, d), f"{layer}feed_forward.up_proj.weight": (m, d),
            f"{layer}feed_forward.down_proj.weight": (d, m),
        })
    return prefixed("vision_tower.", shapes)


def tensors(config: dict) -> Shapes:
    d, h = config["vision_config"]["hidden_size"], config["text_config"]["hidden_size"]
    if config["model_type"] == "mistral3":
        merge = config["spatial_merge_size"]
        projector = {"norm.weight": (d,), "patch_merger.merging_layer.weight": (d, d * merge * merge),
                     "linear_1.weight": (h, d), "linear_2.weight": (h, h)}
    else:
        projector = {"linear_1.weight": (h, d), "linear_1.bias": (h,), "linear_2.weight": (h, h), "linear_2.bias": (h,)}
    return (pixtral_tower_tensors(config["vision_config"]) | llama_tensors(config["text_config"], config["tie_word_embeddings"])
            | prefixed("multi_modal_projector.", projector))


def family(variant: str) -> Family:
    return Family(
        # Mistral's instruction and image specials: the image's rows, row breaks and end.
        special_tokens=("<unk>", "<s>", "</s>", "<pad>", "[INST]", "[/INST]", "[IMG]", "[IMG_BREAK]", "[IMG_END]"),
        roles={"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"},
        stop_tokens=("</s>",),
        chat_template=CHAT_TEMPLATE,
        configs=partial(configs, variant=variant),
        tensors=tensors,
    )


PIXTRAL = family("pixtral")
MISTRAL3 = family("mistral3")
