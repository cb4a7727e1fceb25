"""Every bench, one after another, into one markdown report: `python bench/run_all.py > bench/RESULTS.md`.

The report is stamped with the date, the CPU (model, logical CPUs, SIMD flags), torch, the commit and
each command run; then the table of comparisons (bench/table.py) and every JSON line. The benches'
own progress and errors go to stderr. A bench that fails is named in the report and the exit status
is 1; the others still run. `--quick` passes --quick to each (fewer rounds: a check that they run,
not a measurement). A full run takes the better part of an hour on 2 cores.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from datetime import datetime, timezone

import torch
from common import BENCH_SMALL, REPO, cpu_description
from table import json_lines, table

RUNS = [
    *(["embed.py", "--family", family] for family in BENCH_SMALL),
    *(["generate.py", "--family", family] for family in BENCH_SMALL),
    ["products.py"],
    ["caption.py"],
    ["store.py"],
    ["inject.py"],
    *(["serve.py", "--family", family] for family in ("llava", "pixtral")),
    ["serving.py"],
    ["int8_containers.py"],
]


def commit() -> str:
    """The checked-out commit, marked when the tree has changes."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True).stdout.strip()

    return (git("rev-parse", "--short", "HEAD") or "unknown") + (" with uncommitted changes" if git("status", "--porcelain") else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="pass --quick to every bench")
    args = parser.parse_args()
    started = datetime.now(timezone.utc)
    runs = [[f"bench/{run[0]}", *run[1:], *(["--quick"] if args.quick else [])] for run in RUNS]
    lines, failed = [], []
    for run in runs:
        shown = "python " + " ".join(run)
        print(f"running {shown}", file=sys.stderr, flush=True)
        result = subprocess.run([sys.executable, *run], cwd=REPO, stdout=subprocess.PIPE, text=True)
        lines += [line for line in result.stdout.splitlines() if line.startswith("{")]
        if result.returncode != 0:
            failed.append(f"`{shown}` exited with {result.returncode}")

    print("# Benchmark results\n")
    print(f"Made by `python bench/run_all.py{' --quick' if args.quick else ''} > bench/RESULTS.md`, "
          f"{started:%Y-%m-%d %H:%M} to {datetime.now(timezone.utc):%H:%M} UTC"
          f"{' (fewer rounds: a check that every bench runs, not a measurement)' if args.quick else ''}.\n")
    print(f"- CPU: {cpu_description()}")
    print(f"- torch {torch.__version__}; commit {commit()}")
    print("- runs: " + ", ".join(f"`python {' '.join(run)}`" for run in runs))
    for failure in failed:
        print(f"- **failed**: {failure}")
    print()
    for line in table(json_lines(lines)):
        print(line)
    print("\nEvery line the benches printed, context included:\n\n```json")
    print("\n".join(lines))
    print("```")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
