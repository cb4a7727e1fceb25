"""`vlmq caption` as the tests run it: the CLI in a subprocess against real Redis and real worker subprocesses."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from shared.config.settings import Settings
from tests.support.images import png_bytes
from tests.support.services import REPO, service_env, worker_processes


@contextmanager
def caption_stack(model: Path, redis_url: str, embed_workers: int = 1) -> Iterator[Settings]:
    """Embed and generate workers under a key prefix of their own; yields their settings."""
    settings = Settings(broker_url=redis_url, key_prefix=f"caption-{uuid.uuid4().hex[:8]}:")
    with worker_processes(["embed"] * embed_workers + ["generate"], model, settings):
        yield settings


def write_images(folder: Path, seeds, size=(32, 24)) -> list[Path]:
    """Distinct small PNGs, every third one in a subfolder (inputs are found recursively)."""
    paths = []
    for seed in seeds:
        path = folder / ("nested" if seed % 3 == 0 else "") / f"img{seed:03d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(png_bytes(seed, size))
        paths.append(path)
    return paths


def ctrl_c_raises() -> None:
    """Popen's preexec_fn for a child the test interrupts: SIGINT at its default, so Python installs its handler.
    A shell's background job starts with SIGINT ignored, and a child inherits that."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def caption_command(inputs, *args: str) -> list[str]:
    return [sys.executable, "-m", "vlmq", "caption", str(inputs), *args, "--no-progress"]


def run_caption(settings: Settings | None, inputs, *args: str, timeout: float = 240, **env: str) -> subprocess.CompletedProcess:
    """The command against the running stack of ``settings``."""
    return subprocess.run(caption_command(inputs, *args), env=service_env(settings, **env), cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)


def read_lines(out: Path) -> list[dict]:
    return [json.loads(line) for line in out.read_text().splitlines()]
