"""Datasets as the ecosystem writes them, for the captioning tests: WebDataset shards (tarfile, as
webdataset's TarWriter lays them out), Parquet files (pyarrow), JSONL manifests."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq


def write_shard(path: Path, samples: dict[str, dict[str, bytes]]) -> Path:
    """A tar shard: for each key, one member per extension (`KEY.png`, `KEY.json`, …), a sample's members together."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for key, members in samples.items():
            for extension, data in members.items():
                info = tarfile.TarInfo(f"{key}.{extension}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def read_shard(path: Path) -> dict[str, bytes]:
    """Member name → bytes."""
    with tarfile.open(path) as tar:
        return {member.name: tar.extractfile(member).read() for member in tar if member.isfile()}


def write_parquet(path: Path, columns: dict[str, list], row_group_size: int | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), path, row_group_size=row_group_size)
    return path


def write_manifest(path: Path, entries: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(entry) + "\n" for entry in entries))
    return path
