"""Parquet inputs: one image per row, as bytes or as a path, read in small batches with pyarrow.

The image column (``--image-column``; else the first of `IMAGE_COLUMNS` present)
holds the encoded bytes (binary), a path (string, relative to the Parquet file's
folder), or a Hugging Face datasets image (a struct with `bytes` and `path`).
``--id-column`` is carried into each record as `id`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from vlmq.caption.inputs import InputError, InputOptions, Item, read_file

IMAGE_COLUMNS = ("image", "jpg", "png", "webp", "img", "bytes", "path", "image_path")
BATCH_ROWS = 64  # rows held at a time: a batch of images, not the file


def parquet_items(path: str, options: InputOptions, *, images: bool = True) -> Iterator[Item]:
    """Each row's image; with ``images=False`` the same items without reading a bytes column (for counting)."""
    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise InputError(f"{path}: not a readable Parquet file ({exc})") from None
    schema = parquet.schema_arrow
    column = _image_column(path, schema, options.image_column)
    kind = _column_kind(path, schema.field(column))
    if options.id_column is not None and options.id_column not in schema.names:
        raise InputError(f"{path}: no id column {options.id_column!r}; its columns: {', '.join(schema.names)}")
    # Paths are part of a record's identity: read them even when counting; bytes only when captioning.
    wanted = [name for name in (column if images or kind != "bytes" else None, options.id_column) if name is not None]
    base = os.path.dirname(path)
    row = 0
    batches = parquet.iter_batches(batch_size=BATCH_ROWS, columns=wanted) if wanted else _empty_batches(parquet)
    for batch in batches:
        values = batch.column(column).to_pylist() if column in wanted else [None] * batch.num_rows
        ids = batch.column(options.id_column).to_pylist() if options.id_column else [None] * batch.num_rows
        for value, id_value in zip(values, ids):
            yield _item(path, base, row, kind, value, id_value)
            row += 1


def _empty_batches(parquet: pq.ParquetFile) -> Iterator[pa.RecordBatch]:
    """Row counts only, from the footer (no column is read)."""
    for group in range(parquet.num_row_groups):
        yield pa.RecordBatch.from_pydict({"_": [None] * parquet.metadata.row_group(group).num_rows})


def _image_column(path: str, schema: pa.Schema, chosen: str | None) -> str:
    if chosen is not None:
        if chosen not in schema.names:
            raise InputError(f"{path}: no image column {chosen!r}; its columns: {', '.join(schema.names)}")
        return chosen
    found = next((name for name in IMAGE_COLUMNS if name in schema.names), None)
    if found is None:
        raise InputError(f"{path}: no image column found (looked for {', '.join(IMAGE_COLUMNS)}); "
                         f"name it with --image-column, one of: {', '.join(schema.names)}")
    return found


def _column_kind(path: str, column: pa.Field) -> str:
    kind = column.type
    if pa.types.is_binary(kind) or pa.types.is_large_binary(kind):
        return "bytes"
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        return "path"
    if pa.types.is_struct(kind) and kind.get_field_index("bytes") >= 0:
        return "struct"
    raise InputError(f"{path}: column {column.name!r} is {kind}; an image column holds bytes (binary), a path "
                     "(string) or a datasets image (struct with bytes)")


def _item(source: str, base: str, row: int, kind: str, value: Any, id_value: Any) -> Item:
    fields: dict[str, Any] = {"source": source, "row": row}
    if id_value is not None:
        fields["id"] = id_value if isinstance(id_value, (str, int)) else str(id_value)
    if kind == "struct" and value is not None:  # a datasets image: the bytes if it has them, else its path
        kind, value = ("bytes", value["bytes"]) if value.get("bytes") is not None else ("path", value.get("path"))
    if kind == "path" and value is not None:
        image_path = os.path.join(base, value)
        return Item(source, fields | {"path": image_path}, read_file(image_path), image_path)
    return Item(source, fields, lambda: _bytes_or_fail(source, row, value))


def _bytes_or_fail(source: str, row: int, value: bytes | None) -> bytes:
    if value is None:
        raise InputError(f"{source}, row {row}: the image is null")
    return value
