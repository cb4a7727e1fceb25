"""WebDataset sidecar shards: one output shard per input shard, named after it.

Each sample gets `KEY.txt` (`KEY.NAME.txt` per prompt when there are several)
and `KEY.json`, the record, written last: a sample whose `.json` is in the shard
is whole. The shard is written to `.NAME.partial` and renamed when its input
shard is finished; a rerun skips finished shards and carries a partial one's
whole samples over (a killed run may have torn the last).
"""

from __future__ import annotations

import io
import json
import os
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from vlmq.caption.inputs import Item
from vlmq.caption.outputs import Output, OutputError


class WebDatasetOutput(Output):
    def __init__(self, folder: str | Path, prompt_names: list[str]):
        self.folder = Path(folder)
        self.prompt_names = list(prompt_names)
        self._open: dict[str, tarfile.TarFile] = {}  # input shard → its partial output shard
        self._done: dict[str, set[str]] = {}  # input shard → keys already in its partial output
        self._shard_of_name: dict[str, str] = {}  # output name → the input shard it belongs to

    def output_shard(self, shard: str) -> Path:
        name = Path(shard).name
        other = self._shard_of_name.setdefault(name, shard)
        if other != shard:
            raise OutputError(f"two input shards share the name {name} ({other} and {shard}); "
                              "their output shards would collide")
        return self.folder / name

    def _partial(self, shard: str) -> Path:
        final = self.output_shard(shard)
        return final.with_name(f".{final.name}.partial")

    def unit_done(self, unit: str) -> bool:
        return self.output_shard(unit).exists()

    def is_done(self, item: Item) -> bool:
        shard = self._shard(item)
        if shard not in self._done:
            self._done[shard] = {record["key"] for record in self._partial_records(shard)}
        return item.fields["key"] in self._done[shard]

    def write(self, item: Item, record: dict[str, Any]) -> None:
        tar = self._tar(self._shard(item))
        key = item.fields["key"]
        names = self.prompt_names
        for name in names:
            if name in record:
                _add(tar, f"{key}.txt" if len(names) == 1 else f"{key}.{name}.txt", record[name].encode("utf-8"))
        # The record last: a sample whose .json is in the partial shard is whole.
        _add(tar, f"{key}.json", json.dumps(record, ensure_ascii=False).encode("utf-8"))
        tar.fileobj.flush()

    def end_unit(self, unit: str) -> None:
        """The input shard is finished: its output shard takes its final name (with no samples, if all were skipped)."""
        tar = self._tar(unit)
        tar.close()
        del self._open[unit]
        os.replace(self._partial(unit), self.output_shard(unit))

    def close(self) -> None:
        for tar in self._open.values():
            tar.close()  # stays partial: a rerun carries its samples over
        self._open.clear()

    def _shard(self, item: Item) -> str:
        if "shard" not in item.fields:
            raise OutputError(f"--out-format webdataset writes one output shard per input shard, and {item.unit} is "
                              "not a tar shard (use jsonl, parquet or txt)")
        return item.fields["shard"]

    def _tar(self, shard: str) -> tarfile.TarFile:
        """The shard's partial output, open for appending: a partial left by an earlier run is rewritten
        with its whole samples first (a killed run may have torn the last one)."""
        if shard in self._open:
            return self._open[shard]
        partial = self._partial(shard)
        carried = list(self._partial_records(shard))
        self.folder.mkdir(parents=True, exist_ok=True)
        tar = tarfile.open(partial, "w", format=tarfile.USTAR_FORMAT)
        self._open[shard] = tar
        for record in carried:
            self.write(_carried_item(shard, record["key"]), record)
        return tar

    def _partial_records(self, shard: str) -> Iterator[dict[str, Any]]:
        partial = self._partial(shard)
        if not partial.exists() or shard in self._open:
            return
        try:
            with tarfile.open(partial, "r:") as tar:
                for member in tar:
                    if member.name.endswith(".json"):
                        yield json.loads(tar.extractfile(member).read())
        except (tarfile.TarError, ValueError, OSError):
            return  # the torn end of a killed run: what came before is kept


def _carried_item(shard: str, key: str) -> Item:
    return Item(shard, {"shard": shard, "key": key}, lambda: b"")


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), int(time.time()), 0o644
    tar.addfile(info, io.BytesIO(data))
