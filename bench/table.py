"""Markdown table of bench JSON lines: `python bench/store.py | python bench/table.py`.

The README's benchmark table is this script's output over every bench script's lines.
"""

from __future__ import annotations

import json
import sys


def main() -> None:
    print("| bench | metric | value | baseline | ratio | target | met |")
    print("|---|---|---|---|---|---|---|")
    for line in sys.stdin:
        line = line.strip()
        if not line.startswith("{"):
            continue
        row = json.loads(line)
        if "ratio" not in row:
            continue  # context lines (bandwidths, FLOPs) stay in the raw output
        met = {True: "yes", False: "**no**"}.get(row.get("met"), "")
        print(f"| {row['bench']} | {row['metric']} | {row['value']} {row['unit']} | {row.get('baseline', '')} | "
              f"{row['ratio']} | {row.get('target', '')} | {met} |")


if __name__ == "__main__":
    main()
