"""Weight shapes the families share, named as `transformers` saves them: a CLIP/SigLIP encoder, a Llama."""

from __future__ import annotations

Shapes = dict[str, tuple[int, ...]]


def vit_encoder_tensors(vision: dict) -> Shapes:
    """The encoder layers of a CLIP or SigLIP ViT, relative to its `vision_model.`."""
    d, m = vision["hidden_size"], vision["intermediate_size"]
    shapes = {}
    for i in range(vision["num_hidden_layers"]):
        layer = f"encoder.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            shapes[f"{layer}self_attn.{proj}.weight"] = (d, d)
            shapes[f"{layer}self_attn.{proj}.bias"] = (d,)
        for norm in ("layer_norm1", "layer_norm2"):
            shapes[f"{layer}{norm}.weight"] = (d,)
            shapes[f"{layer}{norm}.bias"] = (d,)
        shapes.update({f"{layer}mlp.fc1.weight": (m, d), f"{layer}mlp.fc1.bias": (m,), f"{layer}mlp.fc2.weight": (d, m), f"{layer}mlp.fc2.bias": (d,)})
    return shapes


def llama_tensors(text: dict, tie_word_embeddings: bool) -> Shapes:
    """A Llama-style language model under `language_model.`: embeddings, layers, final norm, head unless tied."""
    d, m, v = text["hidden_size"], text["intermediate_size"], text["vocab_size"]
    hd = text["head_dim"]
    q, kv = text["num_attention_heads"] * hd, text["num_key_value_heads"] * hd
    shapes = {"model.embed_tokens.weight": (v, d), "model.norm.weight": (d,)}
    if not tie_word_embeddings:
        shapes["lm_head.weight"] = (v, d)
    for i in range(text["num_hidden_layers"]):
        layer = f"model.layers.{i}."
        shapes.update({
            f"{layer}input_layernorm.weight": (d,), f"{layer}post_attention_layernorm.weight": (d,),
            f"{layer}self_attn.q_proj.weight": (q, d), f"{layer}self_attn.k_proj.weight": (kv, d),
            f"{layer}self_attn.v_proj.weight": (kv, d), f"{layer}self_attn.o_proj.weight": (d, q),
            f"{layer}mlp.gate_proj.weight": (m, d), f"{layer}mlp.up_proj.weight": (m, d), f"{layer}mlp.down_proj.weight": (d, m),
        })
    return prefixed("language_model.", shapes)


def prefixed(prefix: str, shapes: Shapes) -> Shapes:
    return {prefix + name: shape for name, shape in shapes.items()}
