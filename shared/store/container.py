"""The embedding container: projected image embeddings, their token-ID range, and metadata.

Wire format (docs/DESIGN.md §5) — one msgpack map::

    {"v": 1,
     "meta": {id, model, tenant, first_token_id, num_tokens, alias,
              layout: {before, after, row_length, row_break_id, text_before, text_after},
              grid: [t, h, w] | None, image: {...}, created_at, expires_at},
     "dtype": "float32" | "bfloat16" | "float16" | "int8",
     "shape": [num_tokens, hidden],
     "data": bin,          # the raw tensor bytes, row-major, little-endian
     "scales": bin}        # int8 only: one float32 per row, row = data row × its scale

An ``int8`` container is quantized per row, symmetric on the row's largest magnitude
(`quantize_rows`): about half the bytes of float16; the generator dequantizes it into
its own dtype when it fetches it (`EmbeddingContainer.dequantized`).

No pickle: every field is a plain msgpack type. ``decode_container`` accepts any
key order and validates everything, raising ``ContainerFormatError`` — and only
that — for any malformed blob. ``encode_container`` writes ``data`` first at a
16-byte offset, so decoding wraps the tensor around the blob's own bytes.
"""

from __future__ import annotations

import math
import reprlib
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import msgpack
import torch

from shared.config.errors import ContainerFormatError
from shared.store.token_ids import EMBEDDING_INDEX_BASE

__all__ = [
    "EMBEDDING_INDEX_BASE",
    "FORMAT_VERSION",
    "EmbeddingContainer",
    "Layout",
    "decode_container",
    "encode_container",
    "encode_container_buffers",
    "quantize_rows",
    "stored_as",
]

FORMAT_VERSION = 1

# The wire dtypes. numpy has no bfloat16, so tensors travel as raw bytes, never as numpy arrays.
_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "int8": torch.int8,
}
_DTYPE_NAMES = {dtype: name for name, dtype in _DTYPES.items()}

# Far above any real hidden size or token count; keeps torch's int64 sizes safe from forged shapes.
_MAX_DIM = 2**31 - 1
# Token IDs feed int64 tensors; leave headroom so first + count never overflows.
_MAX_TOKEN_ID = 2**62
# A layout's text is a processor's few separator characters, not a prompt.
_MAX_LAYOUT_TEXT = 64


def _is_int(value: object) -> bool:
    # Exactly int: msgpack booleans are Python bools, which are ints too, and a flag is not an ID.
    return type(value) is int


def _is_text_token_id(value: object) -> bool:
    return _is_int(value) and 0 <= value < EMBEDDING_INDEX_BASE


@dataclass(frozen=True)
class Layout:
    """How a container's image expands into token IDs, as the model's own processor expands it.

    Data only: which layout a family's images get is decided in its module in ``shared.modeling.families``.

    ``before``/``after`` are literal text-token IDs around the image IDs (e.g.
    Qwen2-VL's ``<|vision_start|>``/``<|vision_end|>``). For Pixtral-style row
    layouts, ``row_break_id`` follows every ``row_length`` image IDs except the last
    row (the end token goes in ``after``). ``Layout()`` is image IDs only (LLaVA).

    ``text_before``/``text_after`` are text the processor writes around those IDs before it
    tokenizes (Gemma 3's ``"\n\n"`` on either side): not IDs, because the tokenizer merges
    them with the prompt's neighbouring text, so the generator tokenizes them in place.
    """

    before: tuple[int, ...] = ()
    after: tuple[int, ...] = ()
    row_length: int | None = None
    row_break_id: int | None = None
    text_before: str = ""
    text_after: str = ""

    def __post_init__(self) -> None:
        for name in ("before", "after"):
            ids = getattr(self, name)
            if not all(_is_text_token_id(i) for i in ids):
                raise ValueError(f"layout.{name} must hold text-token IDs in [0, {EMBEDDING_INDEX_BASE}), got {ids!r}")
        if (self.row_length is None) != (self.row_break_id is None):
            raise ValueError("layout.row_length and layout.row_break_id must be given together")
        if self.row_length is not None and not (_is_int(self.row_length) and self.row_length >= 1):
            raise ValueError(f"layout.row_length must be a positive integer, got {self.row_length!r}")
        if self.row_break_id is not None and not _is_text_token_id(self.row_break_id):
            raise ValueError(f"layout.row_break_id must be a text-token ID, got {self.row_break_id!r}")
        for name in ("text_before", "text_after"):
            text = getattr(self, name)
            if not isinstance(text, str) or len(text) > _MAX_LAYOUT_TEXT:
                raise ValueError(f"layout.{name} must be a string of at most {_MAX_LAYOUT_TEXT} characters, got {reprlib.repr(text)}")

    def expand(self, first_token_id: int, num_tokens: int) -> list[int]:
        """The token IDs of an image whose rows are IDs ``[first_token_id, first_token_id + num_tokens)``."""
        image_ids = range(first_token_id, first_token_id + num_tokens)
        if self.row_length is None:
            body = list(image_ids)
        else:
            body = []
            for start in range(0, num_tokens, self.row_length):
                if start:
                    body.append(self.row_break_id)
                body.extend(image_ids[start : start + self.row_length])
        return [*self.before, *body, *self.after]

    def length(self, num_tokens: int) -> int:
        """``len(expand(first, num_tokens))``, without building the list."""
        row_breaks = max(0, -(-num_tokens // self.row_length) - 1) if self.row_length is not None else 0
        return len(self.before) + num_tokens + row_breaks + len(self.after)

    def to_dict(self) -> dict[str, Any]:
        return {
            "before": list(self.before),
            "after": list(self.after),
            "row_length": self.row_length,
            "row_break_id": self.row_break_id,
            "text_before": self.text_before,
            "text_after": self.text_after,
        }


@dataclass(eq=False)
class EmbeddingContainer:
    """One image's projected embeddings and the token IDs that stand for them.

    ``embeddings`` is ``(num_tokens, hidden)``; row ``i`` is the embedding of token
    ID ``first_token_id + i``. A decoded container's tensor shares memory with the
    received bytes: treat it as read-only. ``expires_at`` is None for a container
    that never expires (pinned) or has not been stored yet.
    """

    id: str
    model: str
    tenant: str
    first_token_id: int
    num_tokens: int
    embeddings: torch.Tensor  # [num_tokens, hidden]
    layout: Layout = field(default_factory=Layout)
    grid: tuple[int, int, int] | None = None
    image: dict[str, Any] = field(default_factory=dict)
    alias: str = ""
    created_at: float = field(default_factory=time.time)
    expires_at: float | None = None
    scales: torch.Tensor | None = None  # Float32[num_tokens], for int8 embeddings only

    def __post_init__(self) -> None:
        if not self.alias:
            self.alias = f"<image:{self.id}>"
        if not EMBEDDING_INDEX_BASE <= self.first_token_id <= _MAX_TOKEN_ID:
            raise ValueError(
                f"first_token_id must be in [{EMBEDDING_INDEX_BASE}, {_MAX_TOKEN_ID}], got {self.first_token_id}"
            )
        if self.embeddings.dim() != 2 or self.embeddings.shape[0] != self.num_tokens:
            raise ValueError(
                f"embeddings must be (num_tokens={self.num_tokens}, hidden), got {tuple(self.embeddings.shape)}"
            )
        if (self.embeddings.dtype == torch.int8) != (self.scales is not None):
            raise ValueError("int8 embeddings need their per-row scales, and only they have scales")
        if self.scales is not None and (self.scales.dtype != torch.float32 or tuple(self.scales.shape) != (self.num_tokens,)):
            raise ValueError(f"scales must be float32 of shape ({self.num_tokens},), got {self.scales.dtype} {tuple(self.scales.shape)}")
        if self.layout.row_length is not None and self.num_tokens % self.layout.row_length:
            raise ValueError(
                f"num_tokens={self.num_tokens} is not a whole number of rows of {self.layout.row_length}"
            )

    @property
    def hidden_size(self) -> int:
        return self.embeddings.shape[1]

    @property
    def dtype(self) -> str:
        """The tensor's dtype name: ``float32``, ``bfloat16``, ``float16`` or ``int8``."""
        return str(self.embeddings.dtype).removeprefix("torch.")

    @property
    def last_token_id(self) -> int:
        """The last ID of the range (``first_token_id - 1`` for an empty container)."""
        return self.first_token_id + self.num_tokens - 1

    def token_ids(self) -> list[int]:
        """The token IDs that stand for the image in a prompt (for its alias or its chat image part), per the layout."""
        return self.layout.expand(self.first_token_id, self.num_tokens)

    @property
    def prompt_length(self) -> int:
        """How many token IDs the image takes in a prompt: ``len(token_ids())``, computed."""
        return self.layout.length(self.num_tokens)

    def dequantized(self, dtype: torch.dtype) -> EmbeddingContainer:
        """This container with its rows in `dtype`: int8 rows times their scales; others cast (itself if already so)."""
        if self.scales is not None:
            rows = (self.embeddings.to(torch.float32) * self.scales[:, None]).to(dtype)  # [N, D]
        elif self.embeddings.dtype != dtype:
            rows = self.embeddings.to(dtype)
        else:
            return self
        return replace(self, embeddings=rows, scales=None)

    def metadata(self) -> dict[str, Any]:
        """Everything but the tensor, as a JSON-able dict (what the APIs return)."""
        return {
            **_meta(self),
            "hidden_size": self.hidden_size,
            "dtype": self.dtype,
            "shape": list(self.embeddings.shape),
        }


def quantize_rows(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, D] float rows → (Int8[N, D], Float32[N] scales), each row symmetric on its largest magnitude."""
    rows = rows.to(torch.float32)
    scales = rows.abs().amax(dim=1) / 127  # [N]
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))  # an all-zero row stays zeros
    quantized = torch.round(rows / safe[:, None]).clamp_(-127, 127).to(torch.int8)
    return quantized, scales


def stored_as(container: EmbeddingContainer, dtype_name: str) -> EmbeddingContainer:
    """The container as `VLMQ_CONTAINER_DTYPE` stores it: "model" as it is, a float dtype cast, "int8" quantized."""
    if dtype_name == "model" or dtype_name == container.dtype:
        return container
    if dtype_name == "int8":
        quantized, scales = quantize_rows(container.embeddings)
        return replace(container, embeddings=quantized, scales=scales)
    return container.dequantized(_DTYPES[dtype_name])


def _meta(container: EmbeddingContainer) -> dict[str, Any]:
    return {
        "id": container.id,
        "model": container.model,
        "tenant": container.tenant,
        "first_token_id": container.first_token_id,
        "num_tokens": container.num_tokens,
        "alias": container.alias,
        "layout": container.layout.to_dict(),
        "grid": list(container.grid) if container.grid is not None else None,
        "image": container.image,
        "created_at": container.created_at,
        "expires_at": container.expires_at,
    }


# Blobs written here put "data" first, behind a 16-byte header — map32 of its 5 (int8: 6)
# entries, the key "data" as str8, a bin32 length — so the tensor bytes start 16 bytes into
# the blob and stay aligned wherever the blob's buffer is (CPython's bytes are
# 16-aligned). Non-minimal encodings are still plain msgpack.
_MAP32 = b"\xdf"
_DATA_KEY_BIN32 = b"\xd9\x04data" + b"\xc6"
_HEADER_BEFORE_DATA_LENGTH_SIZE = len(_MAP32) + 4 + len(_DATA_KEY_BIN32)


def encode_container(container: EmbeddingContainer) -> bytes:
    """The container as one msgpack blob (see the module docstring)."""
    return b"".join(encode_container_buffers(container))


def encode_container_buffers(container: EmbeddingContainer) -> list[bytes | memoryview]:
    """The blob of `encode_container` as the buffers it is made of, the tensor's bytes uncopied among them.

    The store sends them to Redis as they are: joining them would copy the whole tensor once more.
    """
    tensor = container.embeddings.detach()
    if tensor.dtype not in _DTYPE_NAMES:
        raise ValueError(f"cannot encode dtype {tensor.dtype}; allowed: {', '.join(_DTYPES)}")
    # A uint8 view gives numpy a type it knows (numpy has no bf16): the raw bytes, uncopied.
    data = memoryview(tensor.cpu().contiguous().view(torch.uint8).numpy())
    if data.nbytes >= 2**32:
        raise ValueError(f"embeddings of {data.nbytes} bytes do not fit a msgpack bin32")
    rest = {
        "v": FORMAT_VERSION,
        "meta": _meta(container),
        "dtype": _DTYPE_NAMES[tensor.dtype],
        "shape": list(tensor.shape),
    }
    if container.scales is not None:
        rest["scales"] = container.scales.detach().cpu().contiguous().numpy().astype("<f4").tobytes()
    # The map's other entries follow the data: msgpack keys and values, back to back — a
    # packed map without its one-byte fixmap marker.
    entries = msgpack.packb(rest)[1:]
    header = _MAP32 + (len(rest) + 1).to_bytes(4, "big") + _DATA_KEY_BIN32
    return [header + data.nbytes.to_bytes(4, "big"), data, entries]


def decode_container(blob: bytes | bytearray | memoryview, *, max_bytes: int | None = None) -> EmbeddingContainer:
    """Decode and validate a container blob.

    Checks the version, the dtype against the allow-list, the shape (two
    non-negative ints), ``prod(shape) * itemsize == len(data)``, ``num_tokens ==
    shape[0]``, every meta field's presence and type, and the blob size against
    ``max_bytes``. Any failure raises ``ContainerFormatError`` naming the problem;
    no other exception escapes for malformed input.

    Zero-copy: the embeddings are ``torch.frombuffer`` on the data's place inside
    ``blob`` (copied only when that place is misaligned for the dtype, which never
    happens for blobs written by ``encode_container`` into a ``bytes``). The tensor
    aliases the blob and keeps it alive; treat it as read-only.
    """
    try:
        view = memoryview(blob).cast("B")
    except TypeError as exc:
        raise ContainerFormatError(f"container blob must be contiguous bytes, got {type(blob).__name__}") from exc
    if max_bytes is not None and len(view) > max_bytes:
        raise ContainerFormatError(f"container blob is {len(view)} bytes, over the limit of {max_bytes}")
    top = _read_top_level_map(view)

    version = _require(top, "v", _is_int, "an integer", "container")
    if version != FORMAT_VERSION:
        raise ContainerFormatError(f"unsupported container version {version} (this vlmq reads {FORMAT_VERSION})")
    dtype_name = _require(top, "dtype", _is_str, "a string", "container")
    if dtype_name not in _DTYPES:
        raise ContainerFormatError(f"container dtype {dtype_name!r} is not one of {', '.join(_DTYPES)}")
    dtype = _DTYPES[dtype_name]
    shape = _require(
        top,
        "shape",
        lambda v: isinstance(v, list) and len(v) == 2 and all(_is_int(d) and 0 <= d <= _MAX_DIM for d in v),
        f"a list of 2 integers in [0, {_MAX_DIM}]",
        "container",
    )
    data = _require(top, "data", lambda v: isinstance(v, memoryview), "bin", "container")
    expected = shape[0] * shape[1] * dtype.itemsize
    if len(data) != expected:
        raise ContainerFormatError(
            f"container data is {len(data)} bytes but shape {shape} of {dtype_name} needs {expected}"
        )
    scales = None
    if dtype == torch.int8:
        raw_scales = _require(top, "scales", lambda v: isinstance(v, (bytes, memoryview)), "bin", "container")
        if len(raw_scales) != shape[0] * 4:
            raise ContainerFormatError(f"container scales are {len(raw_scales)} bytes but {shape[0]} rows need {shape[0] * 4}")
        scales = _tensor_from_buffer(memoryview(raw_scales), torch.float32, [shape[0]])
        if not bool(torch.isfinite(scales).all()):
            raise ContainerFormatError("container scales hold non-finite values")
    elif "scales" in top:
        raise ContainerFormatError(f"a {dtype_name} container has no scales")
    meta = _require(top, "meta", lambda v: isinstance(v, dict), "a map", "container")
    return _container_from_meta(meta, _tensor_from_buffer(data, dtype, shape), scales)


def _tensor_from_buffer(data: memoryview, dtype: torch.dtype, shape: list[int]) -> torch.Tensor:
    if not len(data):  # frombuffer refuses empty buffers
        return torch.empty(shape, dtype=dtype)
    if data.readonly:
        with warnings.catch_warnings():
            # frombuffer warns that bytes are not writable; the tensor is used read-only.
            warnings.filterwarnings("ignore", message="The given buffer is not writable")
            flat = torch.frombuffer(data, dtype=dtype)
    else:  # the store's blobs arrive in a bytearray: nothing to warn about, and the warnings machinery is not free
        flat = torch.frombuffer(data, dtype=dtype)
    if flat.data_ptr() % dtype.itemsize:
        # Misaligned elements would break vectorized kernels: one aligned copy.
        flat = flat.clone()
    return flat.view(shape)


# -- the top-level map, read so that "data" stays a view into the blob -------------------------------
# msgpack.unpackb would copy the bin into a new bytes object. Here msgpack parses
# the keys and the small values; only the map header and the data's bin header
# are read by hand, and the data itself is skipped over, never copied.

_BIN_MARKERS = {0xC4: 1, 0xC5: 2, 0xC6: 4}  # bin8/16/32 → size of the big-endian length field
_MAP_MARKERS = {0xDE: 2, 0xDF: 4}  # map16/32


def _read_top_level_map(view: memoryview) -> dict[str, Any]:
    """The blob's map with ``data`` as a memoryview slice of ``view``; every key must be a string."""
    if view[:1] == _MAP32 and view[5:_HEADER_BEFORE_DATA_LENGTH_SIZE] == _DATA_KEY_BIN32 and 2 <= int.from_bytes(view[1:5], "big") <= 8:
        return _read_encoded_map(view, int.from_bytes(view[1:5], "big"))
    count, pos = _read_length(view, 0, _MAP_MARKERS, 0x80, 0x0F, "a msgpack map")
    top: dict[str, Any] = {}
    cursor = _Cursor(view, pos)
    for _ in range(count):
        key = _checked_key(cursor.unpack(), top)
        if key == "data" and cursor.position < len(view) and view[cursor.position] in _BIN_MARKERS:
            length, start = _read_length(view, cursor.position, _BIN_MARKERS, None, 0, "bin")
            if start + length > len(view):
                raise ContainerFormatError("container blob is truncated")
            top[key] = view[start : start + length]
            cursor = _Cursor(view, start + length)  # msgpack resumes after the data
        else:
            top[key] = cursor.unpack()
    if cursor.position != len(view):
        raise ContainerFormatError(f"container blob has {len(view) - cursor.position} bytes after its map")
    return top


def _read_encoded_map(view: memoryview, entries: int) -> dict[str, Any]:
    """The map of a blob laid out as `encode_container` writes it, read in two steps instead of entry by entry.

    The header gives the entries, the data first; the others are parsed by one msgpack
    call, as the keys and values of a fixarray (the store's hot path).
    """
    length, start = _read_length(view, _HEADER_BEFORE_DATA_LENGTH_SIZE - 1, _BIN_MARKERS, None, 0, "bin")
    if start + length > len(view):
        raise ContainerFormatError("container blob is truncated")
    top: dict[str, Any] = {"data": view[start : start + length]}
    try:
        items = msgpack.unpackb(bytes([0x90 | 2 * (entries - 1)]) + bytes(view[start + length :]), raw=False)
    except msgpack.ExtraData as exc:
        raise ContainerFormatError(f"container blob has {len(exc.extra)} bytes after its map") from exc
    except Exception as exc:  # msgpack raises many types (ValueError, FormatError, StackError, ...)
        raise ContainerFormatError(f"container blob is not valid msgpack: {str(exc) or type(exc).__name__}") from exc
    for key, value in zip(items[::2], items[1::2]):
        top[_checked_key(key, top)] = value
    return top


def _checked_key(key: object, top: dict[str, Any]) -> str:
    if not isinstance(key, str):
        raise ContainerFormatError(f"container keys must be strings, got {_describe(key)}")
    if key in top:
        raise ContainerFormatError(f"container key {key!r} appears twice")
    return key


def _read_length(
    view: memoryview, pos: int, markers: dict[int, int], fix_base: int | None, fix_mask: int, what: str
) -> tuple[int, int]:
    """A msgpack length — in a fix-type marker's low bits or a big-endian field after the marker — and where it ends."""
    if pos >= len(view):
        raise ContainerFormatError("container blob is truncated")
    marker = view[pos]
    if fix_base is not None and fix_base <= marker <= fix_base + fix_mask:
        return marker & fix_mask, pos + 1
    if marker not in markers:
        raise ContainerFormatError(f"container blob has 0x{marker:02x} at byte {pos} where it needs {what}")
    size = markers[marker]
    if pos + 1 + size > len(view):
        raise ContainerFormatError("container blob is truncated")
    return int.from_bytes(view[pos + 1 : pos + 1 + size], "big"), pos + 1 + size


class _ViewReader:
    """File-like reads from ``view`` at ``pos``."""

    def __init__(self, view: memoryview, pos: int):
        self._view, self._pos = view, pos

    def read(self, size: int) -> bytes:
        chunk = bytes(self._view[self._pos : self._pos + size])
        self._pos += len(chunk)
        return chunk


class _Cursor:
    """msgpack values read one after another from ``view`` starting at ``pos``.

    msgpack pulls 4 KiB at a time through the reader, so only the values it
    parses (and at most one read-ahead chunk) are ever copied out of the blob.
    """

    def __init__(self, view: memoryview, pos: int):
        self._start = pos
        self._unpacker = msgpack.Unpacker(_ViewReader(view, pos), raw=False, read_size=4096)

    @property
    def position(self) -> int:
        """Where the next value starts."""
        return self._start + self._unpacker.tell()

    def unpack(self) -> Any:
        try:
            return self._unpacker.unpack()
        except Exception as exc:  # msgpack raises many types (OutOfData, FormatError, StackError, ValueError, ...)
            message = str(exc) or type(exc).__name__
            raise ContainerFormatError(f"container blob is not valid msgpack: {message}") from exc


def _require(mapping: dict, key: str, check: Callable[[Any], bool], what: str, where: str) -> Any:
    if key not in mapping:
        raise ContainerFormatError(f"{where} field {key!r} is missing")
    value = mapping[key]
    if not check(value):
        raise ContainerFormatError(f"{where} field {key!r} must be {what}, got {_describe(value)}")
    return value


def _describe(value: object) -> str:
    return f"{type(value).__name__} {reprlib.repr(value)}"


def _is_finite_number(value: object) -> bool:
    return (type(value) is int or type(value) is float) and math.isfinite(value)


def _is_json_like(value: object, depth: int = 0) -> bool:
    # metadata() goes out as JSON: only plain JSON values, finite floats, bounded nesting. Exact
    # types, as msgpack decodes them (a bool is not an int here, and is allowed as itself).
    kind = type(value)
    if value is None or kind is str or kind is bool or kind is int:
        return True
    if kind is float:
        return math.isfinite(value)
    if depth >= 32:
        return False
    if kind is list:
        return all(_is_json_like(item, depth + 1) for item in value)
    if kind is dict:
        return all(type(k) is str and _is_json_like(v, depth + 1) for k, v in value.items())
    return False


def _is_str(value: object) -> bool:
    return isinstance(value, str)


def _is_id_list(value: object) -> bool:
    return isinstance(value, list) and all(_is_int(i) for i in value)


def _layout_from_meta(raw: dict) -> Layout:
    before = _require(raw, "before", _is_id_list, "a list of integers", "layout")
    after = _require(raw, "after", _is_id_list, "a list of integers", "layout")
    row_length = _require(raw, "row_length", lambda v: v is None or _is_int(v), "an integer or null", "layout")
    row_break_id = _require(raw, "row_break_id", lambda v: v is None or _is_int(v), "an integer or null", "layout")
    # Optional: blobs written before layouts had text hold none.
    text_before = _require(raw, "text_before", _is_str, "a string", "layout") if "text_before" in raw else ""
    text_after = _require(raw, "text_after", _is_str, "a string", "layout") if "text_after" in raw else ""
    try:
        return Layout(tuple(before), tuple(after), row_length, row_break_id, text_before, text_after)
    except ValueError as exc:
        raise ContainerFormatError(str(exc)) from exc


def _container_from_meta(meta: dict, embeddings: torch.Tensor, scales: torch.Tensor | None) -> EmbeddingContainer:
    container_id = _require(meta, "id", lambda v: _is_str(v) and v != "", "a non-empty string", "meta")
    model = _require(meta, "model", _is_str, "a string", "meta")
    tenant = _require(meta, "tenant", _is_str, "a string", "meta")
    first = _require(meta, "first_token_id", _is_int, "an integer", "meta")
    num_tokens = _require(meta, "num_tokens", _is_int, "an integer", "meta")
    if num_tokens != embeddings.shape[0]:
        raise ContainerFormatError(f"meta num_tokens={num_tokens} but the tensor has {embeddings.shape[0]} rows")
    alias = _require(meta, "alias", _is_str, "a string", "meta")
    layout = _layout_from_meta(_require(meta, "layout", lambda v: isinstance(v, dict), "a map", "meta"))
    grid = _require(
        meta,
        "grid",
        lambda v: v is None or (isinstance(v, list) and len(v) == 3 and all(_is_int(d) and d >= 0 for d in v)),
        "null or a list of 3 non-negative integers",
        "meta",
    )
    image = _require(meta, "image", lambda v: isinstance(v, dict) and _is_json_like(v), "a JSON-like map", "meta")
    created_at = _require(meta, "created_at", _is_finite_number, "a number", "meta")
    expires_at = _require(meta, "expires_at", lambda v: v is None or _is_finite_number(v), "a number or null", "meta")
    try:
        return EmbeddingContainer(
            id=container_id,
            model=model,
            tenant=tenant,
            first_token_id=first,
            num_tokens=num_tokens,
            embeddings=embeddings,
            layout=layout,
            grid=tuple(grid) if grid is not None else None,
            image=image,
            alias=alias,
            created_at=float(created_at),
            expires_at=float(expires_at) if expires_at is not None else None,
            scales=scales,
        )
    except ValueError as exc:  # the container's own invariants: ID range, whole rows of a row layout
        raise ContainerFormatError(str(exc)) from exc
