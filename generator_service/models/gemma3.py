"""The language model of Gemma 3 (`Gemma3ForConditionalGeneration`), on the shared decoder.

Gemma 3 text is the Llama decoder with these `DecoderConfig` fields set (see `shared.modeling.layers`):

- text embeddings times √hidden, rounded to the model dtype; container rows are not scaled
  (the reference scatters the projected image features in after scaling);
- Gemma's RMSNorm, (1 + weight) in float32, in four norms per layer: before and after
  attention, before and after the MLP; QK-norm on each head of Q and K before RoPE;
- the softmax scale is query_pre_attn_scalar^-½, not head_dim^-½; GeGLU (tanh GELU) MLP;
- `layer_types` of sliding-window and global layers, each kind with its own RoPE
  (`rope_parameters["sliding_attention"]` / `["full_attention"]`, or the older
  `rope_local_base_freq` + `rope_theta` / `rope_scaling`);
- during prefill the tokens of one image attend to each other both ways (transformers'
  `token_type_ids` block mask), causal elsewhere, and the window still bounds the sliding layers.

`final_logit_softcapping` and `attn_logit_softcapping` are read as the reference reads them:
`Gemma3ForConditionalGeneration` never caps its logits and Gemma 3's attention never caps its
scores, whatever the config says (published Gemma 3 configs leave both null).

The head is tied to the embedding table unless the config says otherwise (Gemma3Config's default).
"""

from __future__ import annotations

from generator_service.models.decoder import DecoderConfig
from generator_service.models.llama import LlamaForCausalLM
from shared.config.errors import CheckpointError
from shared.modeling.layers import RopeConfig

# transformers' Gemma3TextConfig defaults (gemma-3-4b-it leaves several of them out of config.json).
_GEMMA3_TEXT_DEFAULTS = {
    "vocab_size": 262208,
    "hidden_size": 2304,
    "intermediate_size": 9216,
    "num_hidden_layers": 26,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "head_dim": 256,
    "hidden_activation": "gelu_pytorch_tanh",
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-6,
    "query_pre_attn_scalar": 256,
    "sliding_window": 4096,
    "attention_bias": False,
}
_GLOBAL_THETA, _LOCAL_THETA = 1_000_000.0, 10_000.0
_DEFAULT_SLIDING_PATTERN = 6  # every 6th layer global, as Gemma3TextConfig builds layer_types when a config has none


def _ropes(text: dict) -> tuple[RopeConfig, RopeConfig]:
    """(global, sliding) RoPE: from per-layer-type `rope_parameters` (transformers ≥ 5), or from `rope_theta`,
    `rope_scaling` (global layers only) and `rope_local_base_freq` (older configs)."""
    params = text.get("rope_parameters") or {}
    if "full_attention" in params or "sliding_attention" in params:
        full = RopeConfig.from_config({"rope_parameters": params.get("full_attention") or {}}, default_theta=_GLOBAL_THETA)
        local = RopeConfig.from_config({"rope_parameters": params.get("sliding_attention") or {}}, default_theta=_LOCAL_THETA)
        return full, local
    full = RopeConfig.from_config({"rope_scaling": text.get("rope_scaling"), "rope_theta": text.get("rope_theta", _GLOBAL_THETA)})
    return full, RopeConfig(theta=float(text.get("rope_local_base_freq", _LOCAL_THETA)))


def gemma3_config(config: dict) -> DecoderConfig:
    """A `DecoderConfig` from a Gemma 3 config.json (its `text_config`); CheckpointError for what we do not implement."""
    text = {**_GEMMA3_TEXT_DEFAULTS, **{k: v for k, v in config.get("text_config", config).items() if v is not None}}
    if text.get("use_bidirectional_attention"):
        raise CheckpointError("Gemma 3 with use_bidirectional_attention (bidirectional text attention) is not supported")
    if text["attention_bias"]:
        raise CheckpointError("Gemma 3 with attention_bias is not supported")
    layers = text["num_hidden_layers"]
    layer_types = text.get("layer_types")
    if layer_types is None:
        pattern = int(text.get("sliding_window_pattern") or text.get("_sliding_window_pattern") or _DEFAULT_SLIDING_PATTERN)
        layer_types = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(layers)]
    # Tied unless said otherwise: the outer config decides in transformers 5, as for every multimodal model.
    tie = config.get("tie_word_embeddings", text.get("tie_word_embeddings", True))
    try:
        rope, rope_local = _ropes(text)
        return DecoderConfig(
            vocab_size=text["vocab_size"],
            hidden_size=text["hidden_size"],
            intermediate_size=text["intermediate_size"],
            num_layers=layers,
            num_heads=text["num_attention_heads"],
            num_kv_heads=text["num_key_value_heads"],
            head_dim=text["head_dim"],
            max_position_embeddings=text["max_position_embeddings"],
            rms_norm_eps=text["rms_norm_eps"],
            rope=rope,
            tie_word_embeddings=bool(tie),
            hidden_act=text["hidden_activation"],
            sliding_window=text["sliding_window"],
            layer_types=tuple(layer_types),
            rope_local=rope_local,
            norm_offset=1.0,
            post_norms=True,
            qk_norm=True,
            query_scale=float(text["query_pre_attn_scalar"]) ** -0.5,
            embed_scale=float(text["hidden_size"]) ** 0.5,
            bidirectional_images=True,
        )
    except ValueError as exc:  # unsupported RoPE type or activation, bad layer_types, heads not a multiple of KV heads
        raise CheckpointError(f"unsupported Gemma 3 config: {exc}") from None


class Gemma3ForCausalLM(LlamaForCausalLM):
    """Gemma 3's language model: the shared decoder with Gemma 3's config (`gemma3_config`)."""

    read_config = staticmethod(gemma3_config)
