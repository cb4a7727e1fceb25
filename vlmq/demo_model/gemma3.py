"""Gemma 3: SigLIP, average-pooled into a fixed number of tokens per image, into Gemma 3 text (sliding and
global layers, each kind with its own RoPE)."""

from __future__ import annotations

from vlmq.demo_model.family import Family, lm_config
from vlmq.demo_model.tensors import Shapes, llama_tensors, prefixed, vit_encoder_tensors
from vlmq.demo_model.tokenizer import CORPUS

# Gemma's vocabulary has tokens for runs of newlines; Gemma3Processor's "\n\n" around an image merges with the
# newlines next to it. This corpus teaches the demo tokenizer those merges, so the difference shows.
GEMMA_CORPUS = CORPUS + (
    "Paragraph one.\n\nParagraph two.\n\n\nThree newlines.\n\n\n\nFour newlines.\nOne newline.",
    "user\n\n\nA picture.\n\n\n\nmodel\nIt shows a cat.\n\n",
) * 3

# google/gemma-3-*-it's template: a system message joins the first user turn; an image part is <start_of_image>,
# which Gemma3Processor expands (vlmq's containers carry that expansion in their layout).
CHAT_TEMPLATE = (
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

# 32 px images in 4 px patches: 8 × 8 patches, pooled to 16 tokens (tokens_per_image).
VISION = {
    "model_type": "siglip_vision_model", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_channels": 3, "image_size": 32, "patch_size": 4,
    "hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-6, "vision_use_head": False,
}
# Each quirk that must be read right shows in the logits: a window of 8 (shorter than one image) on layers 0, 1
# and 3, a global layer 2 with linearly scaled RoPE of its own base, and query_pre_attn_scalar ≠ head_dim.
TEXT = {
    "model_type": "gemma3_text", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4,
    "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 1024, "rms_norm_eps": 1e-6,
    "hidden_activation": "gelu_pytorch_tanh", "query_pre_attn_scalar": 24, "sliding_window": 8,
    "layer_types": ["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"],
    "rope_parameters": {"full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1000000.0},
                        "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}},
    "final_logit_softcapping": None, "attn_logit_softcapping": None, "attention_bias": False, "tie_word_embeddings": True,
}


def configs(ids: dict[str, int], vocab_size: int, vision: dict, text: dict, tokens_per_image: int = 16) -> dict[str, dict]:
    vision = VISION | vision
    text = lm_config(TEXT | {"vocab_size": vocab_size, "bos_token_id": ids["<bos>"], "eos_token_id": ids["<eos>"],
                               "pad_token_id": ids["<pad>"]}, text)
    if len(text["layer_types"]) != text["num_hidden_layers"]:  # a deeper override: Gemma 3's pattern, every 6th layer global
        text["layer_types"] = ["sliding_attention" if (i + 1) % 6 else "full_attention" for i in range(text["num_hidden_layers"])]
    config = {
        "architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3", "vision_config": vision, "text_config": text,
        "mm_tokens_per_image": tokens_per_image, "boi_token_index": ids["<start_of_image>"], "eoi_token_index": ids["<end_of_image>"],
        "image_token_index": ids["<image_soft_token>"], "tie_word_embeddings": text["tie_word_embeddings"],
    }
    size = vision["image_size"]
    preprocessor = {
        "image_processor_type": "Gemma3ImageProcessor", "do_resize": True, "size": {"height": size, "width": size},
        "resample": 2, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": GEMMA_MEAN,
        "image_std": GEMMA_STD, "do_convert_rgb": None, "do_pan_and_scan": None, "image_seq_length": tokens_per_image,
    }
    processor = {"processor_class": "Gemma3Processor", "image_seq_length": tokens_per_image}
    return {"config.json": config, "preprocessor_config.json": preprocessor, "processor_config.json": processor}


def siglip_tensors(vision: dict) -> Shapes:
    d, p, c = vision["hidden_size"], vision["patch_size"], vision["num_channels"]
    shapes = {
        "embeddings.patch_embedding.weight": (d, c, p, p), "embeddings.patch_embedding.bias": (d,),
        "embeddings.position_embedding.weight": ((vision["image_size"] // p) ** 2, d),
        "post_layernorm.weight": (d,), "post_layernorm.bias": (d,),
    } | vit_encoder_tensors(vision)
    return prefixed("vision_tower.vision_model.", shapes)


def tensors(config: dict) -> Shapes:
    """SigLIP, the pooled projector, and Llama's tensors plus Gemma 3's norms: after attention, around the MLP,
    and on each head of Q and K."""
    vision, text = config["vision_config"], config["text_config"]
    lm = llama_tensors(text, config["tie_word_embeddings"])
    for i in range(text["num_hidden_layers"]):
        layer = f"language_model.model.layers.{i}."
        lm.update({f"{layer}{norm}.weight": (text["hidden_size"],) for norm in ("pre_feedforward_layernorm", "post_feedforward_layernorm")})
        lm.update({f"{layer}self_attn.{norm}.weight": (text["head_dim"],) for norm in ("q_norm", "k_norm")})
    projector = {"mm_input_projection_weight": (vision["hidden_size"], text["hidden_size"]),
                 "mm_soft_emb_norm.weight": (vision["hidden_size"],)}
    return siglip_tensors(vision) | lm | prefixed("multi_modal_projector.", projector)


GEMMA3 = Family(
    # Its tokenizer's first specials, with the real vocabulary's IDs (pad 0, eos 1, bos 2, unk 3), turns and images.
    special_tokens=("<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>", "<start_of_image>", "<end_of_image>",
                    "<image_soft_token>"),
    roles={"bos_token": "<bos>", "eos_token": "<eos>", "unk_token": "<unk>", "pad_token": "<pad>", "boi_token": "<start_of_image>",
           "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"},
    stop_tokens=("<eos>", "<end_of_turn>"),
    chat_template=CHAT_TEMPLATE,
    configs=configs,
    tensors=tensors,
    corpus=GEMMA_CORPUS,
    offset_norms=("language_model.", "multi_modal_projector."),
)
