"""What `vlmq caption` writes, each output resumable: a rerun asks it which images are done and skips them.

A record is one image's outcome: the fields that identify it (inputs.py), its
`sha256`, `container_id`, one field per prompt name with that caption, the
token counts summed over its prompts, `seconds`, and `error` if it failed.

- ``jsonl``: one record per line, flushed as written; a torn last line is cut off on reopening.
- ``txt``: `image.txt` beside each image file (`image.NAME.txt` per prompt when there
  are several); a failed image gets none and is retried by a rerun.
- ``parquet`` (parquet_output.py) and ``webdataset`` (webdataset_output.py).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from vlmq.caption.inputs import Item, uid

FORMATS = ("jsonl", "parquet", "txt", "webdataset")


class OutputError(ValueError):
    """An output that cannot be written as asked; the message says why."""


def caption_files(image_path: str, prompt_names: list[str]) -> dict[str, Path]:
    """prompt name → the .txt beside the image: `a/b.png` → `a/b.txt`, or `a/b.NAME.txt` per prompt when several."""
    path = Path(image_path)
    stem = path.parent / path.name.rsplit(".", 1)[0]
    if len(prompt_names) == 1:
        return {prompt_names[0]: Path(f"{stem}.txt")}
    return {name: Path(f"{stem}.{name}.txt") for name in prompt_names}


def write_atomically(path: Path, data: bytes) -> None:
    """Write beside, then rename: a reader (or a rerun) sees the whole file or none."""
    staging = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    staging.write_bytes(data)
    os.replace(staging, path)


class Output:
    """What every output answers. The defaults suit an output written image by image that keeps
    ``done``, the uids of the images it holds."""

    done: set[str] = frozenset()

    def is_done(self, item: Item) -> bool:
        return item.uid in self.done

    def unit_done(self, unit: str) -> bool:
        """The whole unit is written: its images need not even be listed."""
        return False

    def write(self, item: Item, record: dict[str, Any]) -> None:
        raise NotImplementedError

    def end_unit(self, unit: str) -> None:
        """Every image of the unit is written."""

    def close(self) -> None:
        """The run is over (finished or not)."""


# -- JSONL ------------------------------------------------------------------------------------------


def cut_torn_tail(path: Path) -> None:
    """Cut a last line without its newline (the previous run was killed mid-write), so the next starts clean."""
    with open(path, "rb+") as out:
        out.seek(0, os.SEEK_END)
        size = out.tell()
        if size == 0:
            return
        out.seek(size - 1)
        if out.read(1) == b"\n":
            return
        position = size  # walk back to the last newline (the torn line is short: one record)
        while position > 0:
            step = min(4096, position)
            position -= step
            out.seek(position)
            cut = out.read(step).rfind(b"\n")
            if cut >= 0:
                out.truncate(position + cut + 1)
                return
        out.truncate(0)


def read_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    """The records of a JSONL output; lines that are not ours (or torn) are passed over."""
    if not path.exists():
        return
    with open(path, encoding="utf-8") as lines:
        for line in lines:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict):
                yield record


class JsonlOutput(Output):
    def __init__(self, path: str | Path):
        self.path = Path(path)
        if self.path.exists():
            cut_torn_tail(self.path)
        self.done = {uid(record) for record in read_jsonl(self.path)}
        self._file = None  # opened on the first write: a run with nothing to do leaves no file

    def write(self, item: Item, record: dict[str, Any]) -> None:
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "a", encoding="utf-8")
        self._file.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


# -- .txt beside each image -------------------------------------------------------------------------


class TxtOutput(Output):
    def __init__(self, prompt_names: list[str]):
        self.prompt_names = list(prompt_names)

    def is_done(self, item: Item) -> bool:
        return all(path.exists() for path in caption_files(self._image_path(item), self.prompt_names).values())

    def write(self, item: Item, record: dict[str, Any]) -> None:
        for name, path in caption_files(self._image_path(item), self.prompt_names).items():
            if name in record:
                write_atomically(path, record[name].encode("utf-8"))

    @staticmethod
    def _image_path(item: Item) -> str:
        if item.path is None:
            raise OutputError(f"--out-format txt writes beside image files, and {item.unit} holds its images inside "
                              "(use jsonl, parquet or webdataset)")
        return item.path


def open_output(out_format: str, out: str | None, prompt_names: list[str]):
    """The output for ``--out-format`` (or the extension of ``--out``)."""
    if out_format == "txt":
        return TxtOutput(prompt_names)
    if out is None:
        raise OutputError(f"--out is required for --out-format {out_format}")
    if out_format == "parquet":
        from vlmq.caption.parquet_output import ParquetOutput

        return ParquetOutput(out, prompt_names)
    if out_format == "webdataset":
        from vlmq.caption.webdataset_output import WebDatasetOutput

        if Path(out).exists() and not Path(out).is_dir():
            raise OutputError(f"--out {out}: webdataset output is a folder of shards, and this is a file")
        return WebDatasetOutput(out, prompt_names)
    return JsonlOutput(out)


def guess_format(out: str | None) -> str:
    """`--out-format` left out: parquet for a `.parquet` file, else jsonl."""
    if out is None:
        raise OutputError("give --out (a .jsonl or .parquet file, or a folder with --out-format webdataset) or --out-format txt")
    return "parquet" if out.endswith(".parquet") else "jsonl"
