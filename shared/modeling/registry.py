"""Which family serves a checkpoint, from its `config.json`: the families' modules, listed.

Each module in `shared.modeling.families` holds its own entries; a new family is one more line here.
"""

from __future__ import annotations

from shared.config.errors import CheckpointError
from shared.modeling.families import Family, gemma3, llava, pixtral, qwen2_vl

# (config model_type, vision_config model_type) → family. A vision type of None: the family's own
# tower, whatever vision_config says its type is.
FAMILIES: dict[tuple[str, str | None], Family] = {
    **llava.FAMILIES,
    **pixtral.FAMILIES,
    **gemma3.FAMILIES,
    **qwen2_vl.FAMILIES,
}


def family_for(config: dict) -> Family:
    key = (config.get("model_type", ""), config.get("vision_config", {}).get("model_type", ""))
    family = FAMILIES.get(key) or FAMILIES.get((key[0], None))
    if family is None:
        supported = ", ".join(f"{m} + {v or 'its own vision tower'}" for m, v in FAMILIES)
        raise CheckpointError(f"unsupported model: model_type {key[0]!r} with vision {key[1]!r}; supported: {supported}")
    return family
