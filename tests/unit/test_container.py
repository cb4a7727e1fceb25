"""The embedding container: round trips, alias expansion, and a decoder that fails only one way."""

from __future__ import annotations

import warnings

import msgpack
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shared.config.errors import ContainerFormatError
from shared.store.container import (
    EMBEDDING_INDEX_BASE,
    EmbeddingContainer,
    Layout,
    decode_container,
    encode_container,
    stored_as,
)

FIRST = EMBEDDING_INDEX_BASE + 100


def make_container(shape=(4, 8), dtype=torch.float32, layout=Layout(), **overrides) -> EmbeddingContainer:
    fields = dict(
        id="c0ffee",
        model="model-fp",
        tenant="acme",
        first_token_id=FIRST,
        num_tokens=shape[0],
        embeddings=torch.randn(shape).to(dtype),
        layout=layout,
        grid=(1, 2, 2),
        image={"original_size": [640, 480], "processed_size": [336, 336], "sha256": "ab" * 32},
        created_at=1_700_000_000.5,
        expires_at=1_700_600_000.25,
    )
    fields.update(overrides)
    return EmbeddingContainer(**fields)


def assert_same(a: EmbeddingContainer, b: EmbeddingContainer) -> None:
    assert a.metadata() == b.metadata()
    assert a.embeddings.dtype == b.embeddings.dtype
    assert torch.equal(a.embeddings, b.embeddings)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_round_trip_keeps_every_dtype_bit_exact(dtype):
    original = make_container(dtype=dtype)
    decoded = decode_container(encode_container(original))
    assert_same(original, decoded)
    assert decoded.dtype == str(dtype).removeprefix("torch.")


@pytest.mark.parametrize("shape", [(0, 16), (1, 1), (3, 7), (5, 0), (0, 0), (577, 33)])
def test_round_trip_of_empty_and_odd_shapes(shape):
    original = make_container(shape=shape, dtype=torch.bfloat16)
    decoded = decode_container(encode_container(original))
    assert_same(original, decoded)
    assert tuple(decoded.embeddings.shape) == shape


def test_blob_is_the_documented_msgpack_map_of_little_endian_bytes():
    original = make_container(shape=(2, 3), dtype=torch.float16)
    top = msgpack.unpackb(encode_container(original))
    assert set(top) == {"v", "meta", "dtype", "shape", "data"}
    assert (top["v"], top["dtype"], top["shape"]) == (1, "float16", [2, 3])
    expected = b"".join(int(x).to_bytes(2, "little", signed=True) for x in original.embeddings.view(torch.int16).flatten())
    assert top["data"] == expected


def test_encode_refuses_dtypes_outside_the_allow_list():
    with pytest.raises(ValueError, match="float64"):
        encode_container(make_container(dtype=torch.float64))


def _address(buffer) -> int:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # frombuffer on bytes: not writable, and we only read the address
        return torch.frombuffer(buffer, dtype=torch.uint8).data_ptr()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_is_zero_copy_the_tensor_lies_inside_the_blob(dtype):
    original = make_container(shape=(576, 1024), dtype=dtype)
    blob = encode_container(original)
    decoded = decode_container(blob)
    start = _address(blob)
    offset = decoded.embeddings.data_ptr() - start
    assert 0 <= offset and offset + decoded.embeddings.numel() * decoded.embeddings.element_size() <= len(blob)
    assert offset % 16 == 0  # aligned for every dtype
    assert torch.equal(decoded.embeddings, original.embeddings)


def test_decode_copies_only_when_the_data_is_misaligned():
    original = make_container(dtype=torch.float32)
    shifted = memoryview(b"x" + encode_container(original))[1:]  # data at an odd address
    decoded = decode_container(shifted)
    assert decoded.embeddings.data_ptr() % 4 == 0
    assert torch.equal(decoded.embeddings, original.embeddings)


def test_alias_defaults_to_the_id_and_metadata_is_json_ready():
    container = make_container()
    assert container.alias == "<image:c0ffee>"
    meta = container.metadata()
    assert "embeddings" not in meta
    assert (meta["hidden_size"], meta["dtype"], meta["shape"]) == (8, "float32", [4, 8])
    assert container.last_token_id == FIRST + 3


def test_plain_layout_expands_to_the_image_ids_only():
    assert make_container().token_ids() == [FIRST, FIRST + 1, FIRST + 2, FIRST + 3]


def test_layout_wraps_image_ids_in_literal_tokens():
    container = make_container(layout=Layout(before=(151652,), after=(151653,)))
    assert container.token_ids() == [151652, FIRST, FIRST + 1, FIRST + 2, FIRST + 3, 151653]


def test_row_layout_breaks_after_every_row_but_the_last():
    # Pixtral: 2 rows of 3, [IMG_BREAK]=12 between rows, [IMG_END]=13 last.
    container = make_container(shape=(6, 8), layout=Layout(after=(13,), row_length=3, row_break_id=12))
    f = FIRST
    assert container.token_ids() == [f, f + 1, f + 2, 12, f + 3, f + 4, f + 5, 13]
    assert decode_container(encode_container(container)).token_ids() == container.token_ids()


def test_row_layout_needs_whole_rows():
    with pytest.raises(ValueError, match="whole number of rows"):
        make_container(shape=(5, 8), layout=Layout(row_length=3, row_break_id=12))


def test_layout_refuses_embedding_ids_as_literal_tokens():
    with pytest.raises(ValueError, match="text-token IDs"):
        Layout(before=(EMBEDDING_INDEX_BASE,))


def _top(container: EmbeddingContainer) -> dict:
    return msgpack.unpackb(encode_container(container))


def _decode_map(top: dict) -> EmbeddingContainer:
    return decode_container(msgpack.packb(top))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda t: t.update(v=2), "unsupported container version 2"),
        (lambda t: t.update(dtype="float64"), "dtype 'float64'"),
        (lambda t: t.update(shape=[4]), "field 'shape'"),
        (lambda t: t.update(shape=[4, -8]), "field 'shape'"),
        (lambda t: t.update(shape=[8, 4, 1]), "field 'shape'"),
        (lambda t: t.update(data=t["data"][:-1]), "needs 128"),
        (lambda t: t.update(data="text"), "field 'data' must be bin"),
        (lambda t: t.pop("meta"), "field 'meta' is missing"),
        (lambda t: t["meta"].pop("tenant"), "field 'tenant' is missing"),
        (lambda t: t["meta"].update(num_tokens=5), "num_tokens=5"),
        (lambda t: t["meta"].update(first_token_id=7), "first_token_id must be in"),
        (lambda t: t["meta"].update(first_token_id=True), "field 'first_token_id' must be an integer"),
        (lambda t: t["meta"].update(grid=[1, 2]), "field 'grid'"),
        (lambda t: t["meta"].update(image={"x": b"bytes"}), "field 'image'"),
        (lambda t: t["meta"]["layout"].update(row_length=3), "given together"),
        (lambda t: t["meta"]["layout"].update(after=[EMBEDDING_INDEX_BASE + 1]), "text-token IDs"),
    ],
)
def test_decode_names_what_is_wrong(change, message):
    top = _top(make_container())
    change(top)
    with pytest.raises(ContainerFormatError, match=message.replace("(", r"\(")):
        _decode_map(top)


def test_decode_enforces_the_size_limit():
    blob = encode_container(make_container())
    assert decode_container(blob, max_bytes=len(blob)).num_tokens == 4
    with pytest.raises(ContainerFormatError, match="over the limit"):
        decode_container(blob, max_bytes=len(blob) - 1)


# -- fuzzing: whatever the bytes, decode returns a container or raises ContainerFormatError ------------

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
_FUZZED = make_container(shape=(2, 3), layout=Layout(before=(1,), row_length=1, row_break_id=2))
VALID_BLOBS = [encode_container(_FUZZED), encode_container(stored_as(_FUZZED, "int8"))]  # float32 and int8 with scales

msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=8)
    | st.binary(max_size=16)
    | st.sampled_from(["float32", "bfloat16", "float16", "int8", 1, [2, 3], [0, 0]]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)


def decodes_or_fails_cleanly(blob: bytes) -> None:
    try:
        decoded = decode_container(blob)
    except ContainerFormatError:
        return
    assert isinstance(decoded, EmbeddingContainer)


@FUZZ
@given(st.binary(max_size=256))
def test_fuzz_random_bytes(blob):
    decodes_or_fails_cleanly(blob)


@FUZZ
@given(
    st.dictionaries(
        st.sampled_from(["v", "meta", "dtype", "shape", "data", "scales", "extra"]) | st.text(max_size=4), msgpack_values
    )
)
def test_fuzz_random_msgpack_maps(top):
    decodes_or_fails_cleanly(msgpack.packb(top))


@FUZZ
@given(st.data())
def test_fuzz_valid_blob_with_one_field_replaced(data):
    top = msgpack.unpackb(data.draw(st.sampled_from(VALID_BLOBS)))
    section = data.draw(st.sampled_from([top, top["meta"], top["meta"]["layout"]]))
    section[data.draw(st.sampled_from(sorted(section)))] = data.draw(msgpack_values)
    decodes_or_fails_cleanly(msgpack.packb(top))


@FUZZ
@given(st.data())
def test_fuzz_mutated_valid_blob(data):
    blob = bytearray(data.draw(st.sampled_from(VALID_BLOBS)))
    positions = st.integers(0, len(blob) - 1)
    for position, value in data.draw(st.lists(st.tuples(positions, st.integers(0, 255)), min_size=1, max_size=8)):
        blob[position] = value
    decodes_or_fails_cleanly(bytes(blob))


@FUZZ
@given(st.data())
def test_fuzz_truncated_blob_always_fails(data):
    blob = data.draw(st.sampled_from(VALID_BLOBS))
    with pytest.raises(ContainerFormatError):
        decode_container(blob[: data.draw(st.integers(0, len(blob) - 1))])


# -- int8 containers ---------------------------------------------------------------------------------


def test_int8_round_trips_bit_exact_and_dequantizes_within_half_a_step():
    original = make_container(shape=(64, 256))
    stored = stored_as(original, "int8")
    decoded = decode_container(encode_container(stored))
    assert decoded.dtype == "int8" and torch.equal(decoded.embeddings, stored.embeddings) and torch.equal(decoded.scales, stored.scales)
    step = original.embeddings.abs().amax(dim=1, keepdim=True) / 127  # [N, 1]: one quantization step per row
    rows = decoded.dequantized(torch.float32).embeddings
    assert ((rows - original.embeddings).abs() <= step / 2 + 1e-6).all()
    assert torch.nn.functional.cosine_similarity(rows, original.embeddings, dim=1).min() > 0.999


def test_int8_takes_about_half_the_bytes_of_float16():
    half = make_container(shape=(576, 4096), dtype=torch.float16)  # a LLaVA-1.5-7B image
    assert len(encode_container(stored_as(half, "int8"))) <= 0.51 * len(encode_container(half))


def test_an_all_zero_row_stays_zero():
    rows = stored_as(make_container(embeddings=torch.zeros(4, 8)), "int8").dequantized(torch.float32).embeddings
    assert torch.equal(rows, torch.zeros(4, 8))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda t: t.pop("scales"), "field 'scales' is missing"),
        (lambda t: t.update(scales=t["scales"][:-4]), "scales are 12 bytes but 4 rows need 16"),
        (lambda t: t.update(scales=b"\x00\x00\xc0\x7f" * 4), "non-finite"),
        (lambda t: t.update(dtype="float16", data=t["data"] * 2), "a float16 container has no scales"),
    ],
)
def test_decode_names_what_is_wrong_with_an_int8_container(change, message):
    top = _top(stored_as(make_container(), "int8"))
    change(top)
    with pytest.raises(ContainerFormatError, match=message):
        _decode_map(top)
