"""Parquet output: one row per image, a column per prompt.

Parquet cannot be appended to, so records go to a JSONL journal beside the file
(`OUT.journal.jsonl`) as they finish; closing the run rewrites the Parquet file
with them, streamed batch by batch, and drops the journal. A killed run leaves
the journal: the next run counts its records as done and folds them in.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from vlmq.caption.inputs import Item, uid
from vlmq.caption.outputs import JsonlOutput, Output, OutputError, read_jsonl


class ParquetOutput(Output):
    ROWS_PER_BATCH = 1024

    def __init__(self, path: str | Path, prompt_names: list[str]):
        self.path = Path(path)
        self.prompt_names = list(prompt_names)
        self.journal = JsonlOutput(self.path.with_name(self.path.name + ".journal.jsonl"))
        if self.path.exists():
            self._check_schema()
        self.done = {uid(record) for record in read_parquet(self.path)} | self.journal.done

    def write(self, item: Item, record: dict[str, Any]) -> None:
        self.journal.write(item, record)

    def close(self) -> None:
        """Fold the journal into the Parquet file (rewritten beside, then renamed), and drop the journal."""
        self.journal.close()
        journal = self.journal.path
        if not journal.exists():
            return
        schema = self._schema()
        staging = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        with pq.ParquetWriter(staging, schema) as writer:
            if self.path.exists():
                for batch in pq.ParquetFile(self.path).iter_batches(self.ROWS_PER_BATCH):
                    writer.write_batch(batch)
            rows = []
            for record in read_jsonl(journal):
                rows.append(self._row(record))
                if len(rows) == self.ROWS_PER_BATCH:
                    writer.write_table(pa.Table.from_pylist(rows, schema))
                    rows = []
            if rows:
                writer.write_table(pa.Table.from_pylist(rows, schema))
        os.replace(staging, self.path)
        journal.unlink()

    def _schema(self):
        text, integer = pa.string(), pa.int64()
        columns = [("path", text), ("shard", text), ("key", text), ("source", text), ("row", integer), ("id", text),
                   ("meta", text), ("sha256", text), ("container_id", text)]
        columns += [(name, text) for name in self.prompt_names]
        columns += [("prompt_tokens", integer), ("completion_tokens", integer), ("seconds", pa.float64()),
                    ("error", pa.struct([("code", text), ("message", text)]))]
        return pa.schema(columns)

    def _row(self, record: dict[str, Any]) -> dict[str, Any]:
        row = dict(record)
        if "id" in row:
            row["id"] = str(row["id"])
        if "meta" in row:
            row["meta"] = json.dumps(row["meta"], ensure_ascii=False)
        return row

    def _check_schema(self) -> None:
        schema = pq.ParquetFile(self.path).schema_arrow
        if schema != self._schema():
            raise OutputError(f"{self.path} has other columns than this run writes ({', '.join(schema.names)}): "
                              "the prompts differ; write to another file")


def read_parquet(path: Path) -> Iterator[dict[str, Any]]:
    """The rows of a Parquet output, as records (nulls dropped, `meta` parsed)."""
    if not path.exists():
        return
    for batch in pq.ParquetFile(path).iter_batches(ParquetOutput.ROWS_PER_BATCH):
        for row in batch.to_pylist():
            record = {name: value for name, value in row.items() if value is not None}
            if "meta" in record:
                record["meta"] = json.loads(record["meta"])
            yield record
