"""Markdown table of bench JSON lines: `python bench/store.py | python bench/table.py`.

The README's benchmark table is this script's output over every bench script's lines;
bench/run_all.py uses it to make bench/RESULTS.md from one run of every bench.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Iterator


def json_lines(lines: Iterable[str]) -> Iterator[dict]:
    """The JSON objects among `lines` (a bench's other output is skipped)."""
    for line in lines:
        line = line.strip()
        if line.startswith("{"):
            yield json.loads(line)


def table(rows: Iterable[dict]) -> Iterator[str]:
    """The comparisons and the results with a target among `rows` as markdown table lines; context lines
    (bandwidths, FLOPs) stay in the raw output."""
    yield "| bench | metric | value | baseline | ratio | target | met |"
    yield "|---|---|---|---|---|---|---|"
    for row in rows:
        if "ratio" not in row and "target" not in row:
            continue
        met = {True: "yes", False: "**no**"}.get(row.get("met"), "")
        yield (f"| {row['bench']} | {row['metric']} | {row['value']} {row['unit']} | {row.get('baseline', '')} | "
               f"{row.get('ratio', '')} | {row.get('target', '')} | {met} |")


def main() -> None:
    for line in table(json_lines(sys.stdin)):
        print(line)


if __name__ == "__main__":
    main()
