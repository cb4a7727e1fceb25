"""The README's quick start runs as written: `vlmq caption` over the bundled images with the demo model."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def quickstart_caption_args() -> list[str]:
    readme = (REPO / "README.md").read_text()
    block = readme.split("## Quick start", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    command = next(line for line in block.splitlines() if "vlmq caption" in line)
    return re.findall(r'"[^"]*"|\S+', command.split("&&")[-1].strip())[1:]  # the words after `vlmq`


def test_readme_quickstart_captions_every_example_image(tmp_path):
    args = [a.strip('"') for a in quickstart_caption_args()]
    assert args[:2] == ["caption", "examples/images"] and "demo" in args
    env = {k: v for k, v in os.environ.items() if not k.startswith("VLMQ_")}  # no running stack: a private one
    env.update(XDG_CACHE_HOME=str(tmp_path / "cache"), PYTHONPATH=str(REPO))
    out = tmp_path / "captions.jsonl"
    args[args.index("--out") + 1] = str(out)
    args[1] = str(REPO / "examples" / "images")
    done = subprocess.run([sys.executable, "-m", "vlmq", *args, "--no-progress"], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    images = sorted(p.name for p in (REPO / "examples" / "images").iterdir())
    assert sorted(Path(line["path"]).name for line in lines) == images
    assert all(line["completion_tokens"] >= 1 and "error" not in line for line in lines)
    assert (tmp_path / "cache" / "vlmq" / "demo-llava" / "config.json").is_file()
