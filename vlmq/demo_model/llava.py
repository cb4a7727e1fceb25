"""LLaVA-1.5 (llava-hf): a CLIP ViT, a two-layer MLP projector and a Llama."""

from __future__ import annotations

from vlmq.demo_model.family import Family, lm_config
from vlmq.demo_model.tensors import Shapes, llama_tensors, prefixed, vit_encoder_tensors

# OpenAI CLIP's normalisation, which Qwen2-VL and Pixtral use too.
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

# LLaVA-1.5's template (llava-hf), without transformers' private {% generation %} tag.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}{% endif %}"
    "{% if message['content'] is string %}{{ message['content'] + ' ' }}{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' ' }}{% endfor %}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

# 56 px images in 14 px patches: 16 image tokens.
VISION = {
    "model_type": "clip_vision_model", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3,
    "num_attention_heads": 4, "num_channels": 3, "image_size": 56, "patch_size": 14,
    "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5, "projection_dim": 32,
}
TEXT = {
    "model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 1024, "rms_norm_eps": 1e-6,
    "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
    "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}, "tie_word_embeddings": False,
}


def configs(ids: dict[str, int], vocab_size: int, vision: dict, text: dict,
            vision_feature_layer: int | list[int] = -2, vision_feature_select_strategy: str = "default") -> dict[str, dict]:
    vision = VISION | vision
    text = lm_config(TEXT | {"vocab_size": vocab_size, "bos_token_id": ids["<s>"], "eos_token_id": ids["</s>"],
                               "pad_token_id": ids["<pad>"]}, text)
    size = vision["image_size"]
    config = {
        "architectures": ["LlavaForConditionalGeneration"], "model_type": "llava",
        "vision_config": vision, "text_config": text, "image_token_index": ids["<image>"],
        "image_seq_length": (size // vision["patch_size"]) ** 2, "projector_hidden_act": "gelu",
        "multimodal_projector_bias": True, "vision_feature_layer": vision_feature_layer,
        "vision_feature_select_strategy": vision_feature_select_strategy, "tie_word_embeddings": text["tie_word_embeddings"],
    }
    preprocessor = {
        "image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": {"shortest_edge": size},
        "resample": 3, "do_center_crop": True, "crop_size": {"height": size, "width": size},
        "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": CLIP_MEAN,
        "image_std": CLIP_STD, "do_convert_rgb": True,
    }
    return {"config.json": config, "preprocessor_config.json": preprocessor}


def clip_tensors(vision: dict) -> Shapes:
    d, p, c = vision["hidden_size"], vision["patch_size"], vision["num_channels"]
    shapes = {
        "embeddings.class_embedding": (d,),
        "embeddings.patch_embedding.weight": (d, c, p, p),
        "embeddings.position_embedding.weight": ((vision["image_size"] // p) ** 2 + 1, d),
        "pre_layrnorm.weight": (d,), "pre_layrnorm.bias": (d,),
        "post_layernorm.weight": (d,), "post_layernorm.bias": (d,),
    } | vit_encoder_tensors(vision)
    return prefixed("vision_tower.vision_model.", shapes)


def tensors(config: dict) -> Shapes:
    vision, text = config["vision_config"], config["text_config"]
    layers = config["vision_feature_layer"]
    features = vision["hidden_size"] * (len(layers) if isinstance(layers, list) else 1)  # the chosen layers, concatenated
    h = text["hidden_size"]
    projector = {"linear_1.weight": (h, features), "linear_1.bias": (h,), "linear_2.weight": (h, h), "linear_2.bias": (h,)}
    return clip_tensors(vision) | llama_tensors(text, config["tie_word_embeddings"]) | prefixed("multi_modal_projector.", projector)


LLAVA = Family(
    special_tokens=("<unk>", "<s>", "</s>", "<pad>", "<image>"),
    roles={"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>", "image_token": "<image>"},
    stop_tokens=("</s>",),
    chat_template=CHAT_TEMPLATE,
    configs=configs,
    tensors=tensors,
)
