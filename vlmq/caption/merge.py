"""`vlmq caption merge OUT`: join the parts of a shared run (`OUT.parts/*`) into OUT, each image once.

A client that died may have written images of a unit that another client then
took over and captioned again; the first record of each image is kept. The
parts of a killed client are read as they are: a torn last line is passed over,
a Parquet part's unfolded journal is read too. OUT may exist already (a merge
run again): its images count as written.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from vlmq.caption.command import parts_folder
from vlmq.caption.inputs import uid
from vlmq.caption.outputs import OutputError, open_output, read_jsonl
from vlmq.caption.parquet_output import read_parquet
from vlmq.caption.prompts import RESERVED


def merge(out: str, out_format: str) -> tuple[int, int]:
    """Write every image of the parts not yet in ``out``; returns (records written, duplicates passed over)."""
    folder = parts_folder(out)
    journal = f".{out_format}.journal.jsonl"  # a killed Parquet client's records may be only there
    names = {path.name.removesuffix(".journal.jsonl") for path in folder.iterdir()
             if path.name.endswith((f".{out_format}", journal))} if folder.is_dir() else set()
    parts = [folder / name for name in sorted(names) if not name.startswith(".")]
    if not parts:
        raise OutputError(f"no parts to merge: {folder}/ holds no *.{out_format} (written by `vlmq caption --run-id`)")
    prompt_names: dict[str, None] = {}  # in the order first seen
    for record in _records(parts, out_format):
        prompt_names.update((name, None) for name in record if name not in RESERVED)
    target = open_output(out_format, out, list(prompt_names))
    seen = set(target.done)
    written = duplicates = 0
    try:
        for record in _records(parts, out_format):
            key = uid(record)
            if key in seen:
                duplicates += 1
                continue
            seen.add(key)
            target.write(None, record)
            written += 1
    finally:
        target.close()
    return written, duplicates


def _records(parts: list[Path], out_format: str) -> Iterator[dict[str, Any]]:
    for part in parts:
        if out_format == "parquet":
            yield from read_parquet(part)
            yield from read_jsonl(part.with_name(part.name + ".journal.jsonl"))
        else:
            yield from read_jsonl(part)
