"""Checkpoints by Hugging Face Hub name: `org/name` or `org/name@revision` → a snapshot folder in the local cache.

`huggingface_hub` does the work, as for `transformers` and vLLM: the cache is its
own (`HF_HOME`, `HF_HUB_CACHE`), `HF_TOKEN` authenticates, `HF_HUB_OFFLINE=1` uses
the cache alone. Only the files vlmq reads are fetched (`CHECKPOINT_FILES`):
never `.bin` weights, `original/` folders or anything else a repository holds.
"""

from __future__ import annotations

import re
from pathlib import Path

from shared.config.errors import CheckpointError

# org/name, then an optional @revision (a branch, tag or commit).
HUB_NAME = re.compile(r"(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<revision>[\w./-]+))?")
# What shared/modeling/checkpoint.py, the tokenizer and the preprocessors read of a folder, at its top level.
CHECKPOINT_FILES = [
    "config.json", "model.safetensors", "model-*.safetensors", "model.safetensors.index.json",
    "tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json",
    "preprocessor_config.json", "processor_config.json",
]


def is_hub_name(text: str) -> bool:
    """A Hub name rather than a folder: it matches `org/name[@revision]` and no such path exists here."""
    return HUB_NAME.fullmatch(text) is not None and not Path(text).exists()


def resolve_checkpoint(text: str) -> str:
    """``text`` itself if it is not a Hub name; else the folder of its snapshot, fetched into the cache if missing."""
    match = HUB_NAME.fullmatch(text)
    if match is None or Path(text).exists():
        return text
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        folder = snapshot_download(match["repo"], revision=match["revision"], allow_patterns=CHECKPOINT_FILES)
    except LocalEntryNotFoundError as exc:
        raise CheckpointError(f"{text}: not in the Hugging Face cache and the Hub cannot be reached "
                              f"({_first_line(exc)})") from None
    except HfHubHTTPError as exc:  # unknown repository or revision, gated, no or a bad token
        raise CheckpointError(f"{text}: the Hugging Face Hub refused it ({_first_line(exc)})") from None
    if not (Path(folder) / "config.json").is_file():
        raise CheckpointError(f"{text}: the repository has no config.json; it is not a checkpoint vlmq can read")
    return folder


def _first_line(exc: Exception) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
