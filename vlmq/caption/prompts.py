"""The prompts of a run: `--prompt [name=]text` (repeatable) and `--prompts prompts.yaml`, by name.

Each name becomes a field (JSONL), a column (Parquet), a file suffix (txt) in the
output, so a name must be a plain identifier that no record field already uses.
"""

from __future__ import annotations

import re
from pathlib import Path

import yaml

DEFAULT_NAME = "caption"
NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_-]{0,63}")
# Fields every record may carry (see outputs.py); a prompt of that name would overwrite one.
RESERVED = frozenset({"path", "shard", "key", "source", "row", "id", "meta", "sha256", "container_id", "prompt_tokens",
                      "completion_tokens", "seconds", "error"})


class PromptError(ValueError):
    """Prompts that cannot be used as given; the message says why."""


def parse_prompts(flags: list[str], yaml_file: str | None = None) -> dict[str, str]:
    """name → text, in the order given. One `--prompt` without a name is called `caption`; several must be
    named (`short=Describe it briefly.`), as must every entry of the YAML mapping."""
    prompts: dict[str, str] = {}
    if yaml_file is not None:
        prompts.update(_read_yaml(yaml_file))
    for flag in flags:
        name, text = _split(flag, unnamed_ok=len(flags) == 1 and yaml_file is None)
        if name in prompts:
            raise PromptError(f"prompt {name!r} is given twice")
        prompts[name] = text
    if not prompts:
        raise PromptError("give a prompt: --prompt TEXT, --prompt name=TEXT (repeatable) or --prompts FILE.yaml")
    for name in prompts:
        _check_name(name)
    return prompts


def _split(flag: str, *, unnamed_ok: bool) -> tuple[str, str]:
    match = re.match(rf"({NAME.pattern})=(.*)\Z", flag, re.S)
    if match and match.group(2).strip():
        return match.group(1), match.group(2)
    if not unnamed_ok:
        raise PromptError(f"name each prompt when there are several: --prompt name=TEXT (got {flag!r})")
    if not flag.strip():
        raise PromptError("the prompt is empty")
    return DEFAULT_NAME, flag


def _read_yaml(path: str) -> dict[str, str]:
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise PromptError(f"cannot read {path}: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise PromptError(f"{path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict) or not data:
        raise PromptError(f"{path} must be a mapping of prompt names to prompt texts, e.g. `short: Describe it briefly.`")
    for name, text in data.items():
        if not isinstance(name, str) or not isinstance(text, str) or not text.strip():
            raise PromptError(f"{path}: entry {name!r} must map a name to a non-empty prompt text")
    return dict(data)


def _check_name(name: str) -> None:
    if not NAME.fullmatch(name):
        raise PromptError(f"prompt name {name!r}: use letters, digits, _ and - (starting with a letter or _)")
    if name in RESERVED:
        raise PromptError(f"prompt name {name!r} is a field every record has; choose another")
