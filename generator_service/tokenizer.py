"""Text ↔ token IDs for the generator, on `tokenizers` alone (no `transformers`).

Reads a checkpoint's `tokenizer.json`, `tokenizer_config.json` (special tokens,
`add_bos_token`/`add_eos_token`, the chat template — or `chat_template.jinja`)
and `generation_config.json` (EOS IDs), and encodes as `transformers`'
`AutoTokenizer` does.

Images enter prompts as embedding containers, which `encode_with_images` puts
between pieces of text: the text is encoded once with a private special token in
each image's place, so the text around an image splits as it does around the
model's own image token, and the token is then replaced by the container's IDs
(per its layout). A layout's own text (Gemma 3's "\n\n" either side of the image)
goes into that text around the private token, so it merges with the prompt's
neighbouring text as in the model's processor.

The pieces come from one of two places: a prompt cut at its aliases
(`encode_prompt`; `<image:{id}>` or the caller's own), or a chat template's text
cut where it writes each image part (`render_chat`).
"""

from __future__ import annotations

import bisect
import itertools
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from tokenizers import AddedToken, processors
from tokenizers import Tokenizer as HFTokenizer

from generator_service.chat_template import ChatTemplate, image_parts
from shared.config.errors import CheckpointError, InvalidInput
from shared.modeling.checkpoint import Checkpoint
from shared.store.token_ids import EMBEDDING_INDEX_BASE

# A container's default alias, `<image:{id}>`.
_ALIAS_ID = r"[^<>\s]+"
DEFAULT_ALIAS = re.compile(f"<image:({_ALIAS_ID})>")

# Stands for one image while the text around it is encoded; never accepted in a prompt.
_IMAGE_SLOT = "<|vlmq:alias|>"

# transformers' named special tokens: the variables a chat template sees.
_NAMED_SPECIALS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def _token_text(value: Any) -> str | None:
    """A special token as tokenizer_config.json spells it: "<s>" or {"content": "<s>", ...}."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _optional_json(file: Path) -> dict:
    if not file.is_file():
        return {}
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{file} is not valid JSON: {exc}") from None


def default_alias_ids(prompt: str) -> list[str]:
    """Container IDs named by default aliases (`<image:{id}>`) in `prompt`, first occurrence order, unique."""
    return list(dict.fromkeys(m.group(1) for m in DEFAULT_ALIAS.finditer(prompt)))


def _alias_pattern(aliases: Iterable[str]) -> re.Pattern:
    """The aliases, longest first (one that contains another wins), then any default alias `<image:{id}>`."""
    literals = [re.escape(a) for a in sorted(set(aliases), key=len, reverse=True)]
    return re.compile("|".join([*literals, f"<image:{_ALIAS_ID}>"]))  # no group: split() and findall() give whole aliases


def count_images(prompt: str, aliases: Iterable[str], limit: int) -> int:
    """How many image aliases (`aliases` or default ones) `prompt` holds, counting no further than `limit`."""
    return sum(1 for _ in itertools.islice(_alias_pattern(aliases).finditer(prompt), limit))


def check_token_ids(ids: Sequence[int], containers: Iterable[Any], vocab_size: int | None = None) -> None:
    """Refuse a prompt given as IDs that holds a forged or unbound container ID, or a text ID out of the vocabulary.

    Every ID ≥ EMBEDDING_INDEX_BASE must fall in the range of one of `containers`
    (first_token_id, num_tokens); the error names the first ID that does not.
    """
    ranges = sorted((c.first_token_id, c.first_token_id + c.num_tokens) for c in containers)
    firsts = [r[0] for r in ranges]
    for token in ids:
        if not isinstance(token, int) or isinstance(token, bool) or token < 0:
            raise InvalidInput(f"token id {token!r} is not a non-negative integer")
        if token >= EMBEDDING_INDEX_BASE:
            i = bisect.bisect_right(firsts, token) - 1
            if i < 0 or token >= ranges[i][1]:
                raise InvalidInput(f"token id {token} belongs to no bound embedding container")
        elif vocab_size is not None and token >= vocab_size:
            raise InvalidInput(f"token id {token} is outside the vocabulary of {vocab_size} tokens")


def _image_text(container: Any) -> str:
    """What stands for an image in the text that is tokenized: the private token inside its layout's text."""
    layout = getattr(container, "layout", None)
    return getattr(layout, "text_before", "") + _IMAGE_SLOT + getattr(layout, "text_after", "")


@dataclass(frozen=True)
class EncodedPrompt:
    ids: list[int]
    containers: list[Any]  # the containers used, in order of first appearance, each once
    image_tokens: int  # IDs ≥ EMBEDDING_INDEX_BASE


class Tokenizer:
    def __init__(
        self,
        tokenizer: HFTokenizer,
        config: Mapping[str, Any] | None = None,
        generation_config: Mapping[str, Any] | None = None,
        chat_template: str | None = None,
    ):
        config = dict(config or {})
        self._tok = tokenizer
        self.special_tokens: dict[str, str] = {}
        for name in _NAMED_SPECIALS:
            text = _token_text(config.get(name))
            if text is not None:
                self.special_tokens[name] = text
        extra = config.get("extra_special_tokens") or config.get("additional_special_tokens") or []
        extra = list(extra.values()) if isinstance(extra, dict) else list(extra)
        # As transformers does: special tokens named in the config but missing from tokenizer.json are added.
        missing = [t for t in [*self.special_tokens.values(), *map(_token_text, extra)] if t and tokenizer.token_to_id(t) is None]
        if missing:
            tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in missing])
        if tokenizer.post_processor is None:
            # tokenizer.json's post-processor decides BOS/EOS when it has one (as in transformers 5,
            # which ignores add_bos_token then); without one, the config's flags do.
            self._set_post_processor(bool(config.get("add_bos_token")), bool(config.get("add_eos_token")))

        self.bos_token_id = self.token_to_id(self.special_tokens.get("bos_token"))
        self.pad_token_id = self.token_to_id(self.special_tokens.get("pad_token"))
        eos = (generation_config or {}).get("eos_token_id")
        if eos is None:
            eos = self.token_to_id(self.special_tokens.get("eos_token"))
        self.eos_token_ids: tuple[int, ...] = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        self.chat_template = ChatTemplate(chat_template, self.special_tokens) if chat_template else None

        # The copy that encodes text around images: the image slot is one more special token.
        self._image_tok = HFTokenizer.from_str(tokenizer.to_str())
        self._image_tok.add_special_tokens([AddedToken(_IMAGE_SLOT, special=True, normalized=False)])
        self._image_slot_id = self._image_tok.token_to_id(_IMAGE_SLOT)

    @classmethod
    def from_checkpoint(cls, checkpoint: Checkpoint | str | Path) -> Tokenizer:
        """From a checkpoint folder: tokenizer.json, tokenizer_config.json, generation_config.json, chat template."""
        path = checkpoint.path if isinstance(checkpoint, Checkpoint) else Path(checkpoint)
        if not (path / "tokenizer.json").is_file():
            raise CheckpointError(f"{path}: tokenizer.json is missing")
        config = _optional_json(path / "tokenizer_config.json")
        template = config.get("chat_template")
        if (path / "chat_template.jinja").is_file():  # where newer transformers save it
            template = (path / "chat_template.jinja").read_text()
        elif isinstance(template, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
            template = {t.get("name"): t.get("template") for t in template}.get("default")
        return cls(
            HFTokenizer.from_file(str(path / "tokenizer.json")),
            config,
            _optional_json(path / "generation_config.json"),
            template if isinstance(template, str) else None,
        )

    def _set_post_processor(self, add_bos: bool, add_eos: bool) -> None:
        """BOS/EOS around every text per add_bos_token/add_eos_token (transformers ≤ 4's rule)."""
        bos, eos = self.special_tokens.get("bos_token"), self.special_tokens.get("eos_token")
        add_bos, add_eos = add_bos and bos is not None, add_eos and eos is not None
        single = f"{(bos + ':0 ') if add_bos else ''}$A:0{(' ' + eos + ':0') if add_eos else ''}"
        pair = f"{single}{(' ' + bos + ':1') if add_bos else ''} $B:1{(' ' + eos + ':1') if add_eos else ''}"
        specials = [(t, self._tok.token_to_id(t)) for t, on in ((bos, add_bos), (eos, add_eos)) if on]
        self._tok.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=specials)

    # -- basics ---------------------------------------------------------------------

    def token_to_id(self, token: str | None) -> int | None:
        return None if token is None else self._tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(token_id)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids`; IDs ≥ EMBEDDING_INDEX_BASE (image rows) are skipped."""
        text_ids = [i for i in ids if i < EMBEDDING_INDEX_BASE]
        return self._tok.decode(text_ids, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = False, **kwargs: Any) -> str:
        if self.chat_template is None:
            raise InvalidInput("this model has no chat template")
        return self.chat_template.render(messages, add_generation_prompt=add_generation_prompt, **kwargs)

    def stream_decoder(self, skip_special_tokens: bool = True) -> StreamDecoder:
        return StreamDecoder(self, skip_special_tokens)

    # -- prompts with images -------------------------------------------------------------

    def encode_prompt(
        self,
        prompt: str,
        bindings: Mapping[str, Any] | None = None,
        *,
        add_special_tokens: bool = True,
        max_length: int | None = None,
        max_images: int | None = None,
    ) -> EncodedPrompt:
        """Token IDs of `prompt` with each bound alias replaced by its container's IDs.

        `max_images` caps the aliases in the prompt; it is checked before the prompt is cut at them.

        bindings: alias → EmbeddingContainer (anything with `token_ids()`). A default
        alias `<image:{id}>` left in the text unbound is an error naming it (the worker
        binds the containers `default_alias_ids` names under their default aliases).
        """
        bindings = dict(bindings or {})
        for alias, container in bindings.items():
            if not isinstance(alias, str) or not alias:
                raise InvalidInput(f"alias {alias!r} must be a non-empty string")
            match = DEFAULT_ALIAS.fullmatch(alias)
            if match and getattr(container, "id", match.group(1)) != match.group(1):
                raise InvalidInput(f"alias {alias} is bound to another container ({container.id})")
        pattern = _alias_pattern(bindings)
        if max_images is not None and count_images(prompt, bindings, max_images + 1) > max_images:
            raise InvalidInput(f"the prompt holds more than {max_images} images (VLMQ_MAX_IMAGES_PER_REQUEST)")
        pieces, aliases = pattern.split(prompt), pattern.findall(prompt)
        unbound = next((alias for alias in aliases if alias not in bindings), None)
        if unbound is not None:
            match = DEFAULT_ALIAS.fullmatch(unbound)
            raise InvalidInput(f"unknown image alias {unbound}: no container {match.group(1)} is bound")
        images = [bindings[alias] for alias in aliases]
        return self.encode_with_images(pieces, images, add_special_tokens=add_special_tokens, max_length=max_length)

    def render_chat(self, messages: list[dict], image_placeholder: str | None) -> list[str]:
        """The chat template's prompt for `messages`, cut where it writes each image part: the text before, between
        and after the images, one piece more than there are image parts.

        image_placeholder: what the template writes for an image part (the family's, `shared.modeling.families`).
        Every occurrence is cut, so message text must not contain it: a count that differs from the image parts
        is an error naming both.
        """
        text = self.apply_chat_template(messages, add_generation_prompt=True)
        count = len(image_parts(messages))
        if not count:
            return [text]
        if not image_placeholder:
            raise InvalidInput(f"the chat has {count} images, but this model's checkpoint names no image placeholder for its chat template")
        found = text.count(image_placeholder)
        if found != count:
            raise InvalidInput(
                f"the chat has {count} images but its rendered prompt has {found} image placeholders {image_placeholder!r} "
                "(message text must not contain the placeholder)"
            )
        return text.split(image_placeholder)

    def encode_with_images(
        self,
        pieces: Sequence[str],
        images: Sequence[Any],
        *,
        add_special_tokens: bool = True,
        max_length: int | None = None,
    ) -> EncodedPrompt:
        """Token IDs of pieces[0], images[0], pieces[1], …, images[-1], pieces[-1]: each image the IDs of its
        container (anything with `token_ids()` and a `layout`), the text encoded as around the model's image token."""
        if len(pieces) != len(images) + 1:
            raise ValueError(f"{len(images)} images go between {len(images) + 1} pieces of text, not {len(pieces)}")
        if any(_IMAGE_SLOT in piece for piece in pieces):
            raise InvalidInput(f"the prompt contains the reserved text {_IMAGE_SLOT}")
        image_length = sum(image.prompt_length for image in images)
        if max_length is not None and image_length > max_length:  # before any text is encoded or list built
            raise InvalidInput(f"the prompt's images alone take {image_length} tokens, over the context of {max_length} tokens")
        text = pieces[0] + "".join(_image_text(image) + piece for image, piece in zip(images, pieces[1:]))
        encoded = self._image_tok.encode(text, add_special_tokens=add_special_tokens).ids
        ids: list[int] = []
        slots = iter(images)
        used: dict[int, Any] = {}
        for token in encoded:
            if token != self._image_slot_id:
                ids.append(token)
                continue
            container = next(slots)
            used.setdefault(id(container), container)
            ids.extend(container.token_ids())
        if next(slots, None) is not None:  # a normalizer ate an image slot: refuse rather than misplace images
            raise InvalidInput("the prompt's images could not be placed in its tokens")
        if max_length is not None and len(ids) > max_length:
            raise InvalidInput(f"prompt of {len(ids)} tokens exceeds the context of {max_length} tokens")
        image_tokens = sum(1 for i in ids if i >= EMBEDDING_INDEX_BASE)
        return EncodedPrompt(ids, list(used.values()), image_tokens)


class StreamDecoder:
    """Incremental detokenization that never emits broken characters.

    `push(token_id)` returns the text the token completes (possibly ""), holding back
    bytes of an unfinished UTF-8 character (a trailing U+FFFD) until later tokens
    complete it; `flush()` returns whatever is left at the end. The pieces join to
    `decode(all ids)`. Each step decodes only a short window of recent tokens, so the
    cost does not grow with the output.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = []
        self._prefix = 0  # window start: context so that decoders that strip a leading space see it
        self._read = 0  # tokens before this are emitted

    def _text(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip)

    def push(self, token_id: int) -> str:
        if token_id >= EMBEDDING_INDEX_BASE:
            return ""
        self._ids.append(token_id)
        emitted = self._text(self._ids[self._prefix : self._read])
        text = self._text(self._ids[self._prefix :])
        if len(text) > len(emitted) and not text.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self._ids)
            return text[len(emitted) :]
        return ""

    def flush(self) -> str:
        emitted = self._text(self._ids[self._prefix : self._read])
        text = self._text(self._ids[self._prefix :])
        self._prefix = self._read = len(self._ids)
        return text[len(emitted) :]
