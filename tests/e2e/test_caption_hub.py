"""`--model org/name[@revision]`: a checkpoint by Hugging Face Hub name, resolved by `huggingface_hub` to its cache.

`huggingface_hub` downloads from a Hub on loopback (tests/support/fake_hub.py) and lays out the cache itself;
then, with `HF_HUB_OFFLINE=1` and the Hub gone, the CLI runs a private stack on the cached snapshot.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.captioning import read_lines, write_images
from tests.support.fake_hub import COMMIT, fake_hub, repo_files
from tests.support.services import REPO

REPO_ID = "vlmq-tests/tiny-llava"
EXTRAS = {"pytorch_model.bin": b"pickled weights vlmq never reads", "README.md": b"# tiny",
          "original/consolidated.safetensors": b"another layout"}


def hub_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VLMQ_", "HF_"))}
    env.update(HF_HOME=str(tmp_path / "hf"), PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", HF_HUB_DISABLE_TELEMETRY="1", **extra)
    return env


def resolve(name: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    """shared.modeling.hub.resolve_checkpoint in a fresh process (huggingface_hub reads HF_* when imported)."""
    code = "import sys; from shared.modeling.hub import resolve_checkpoint; print(resolve_checkpoint(sys.argv[1]))"
    return subprocess.run([sys.executable, "-c", code, name], env=env, cwd=REPO, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def checkpoint_files(demo_model) -> dict[str, bytes]:
    return repo_files(demo_model) | EXTRAS


def test_a_hub_name_is_fetched_once_then_used_offline_by_the_whole_stack(checkpoint_files, demo_model, tmp_path):
    with fake_hub(REPO_ID, checkpoint_files, revisions=("main", "v1")) as hub:
        online = resolve(f"{REPO_ID}@v1", hub_env(tmp_path, HF_ENDPOINT=hub.url, HF_TOKEN="hf_secret"))
        assert online.returncode == 0, online.stderr
        snapshot = Path(online.stdout.strip())
        # The cache as huggingface_hub lays it out: models--org--name/snapshots/<commit>, refs/<revision>.
        cache = tmp_path / "hf" / "hub" / f"models--{REPO_ID.replace('/', '--')}"
        assert snapshot == cache / "snapshots" / COMMIT
        assert (cache / "refs" / "v1").read_text() == COMMIT
        # Only what vlmq reads, every file of it, and the token sent.
        assert sorted(hub.fetched) == sorted(repo_files(demo_model))
        assert repo_files(snapshot) == repo_files(demo_model)
        assert hub.authorizations == {"Bearer hf_secret"}

    offline = hub_env(tmp_path, HF_HUB_OFFLINE="1")
    assert resolve(f"{REPO_ID}@v1", offline).stdout.strip() == str(snapshot)
    missing = resolve(f"{REPO_ID}@v2", offline)
    assert missing.returncode == 1 and "not in the Hugging Face cache and the Hub cannot be reached" in missing.stderr

    write_images(tmp_path / "images", range(2))
    out = tmp_path / "out.jsonl"
    result = subprocess.run([sys.executable, "-m", "vlmq", "caption", str(tmp_path / "images"), "--model", f"{REPO_ID}@v1",
                             "--prompt", "Describe.", "--out", str(out), "--max-tokens", "3", "--no-progress"],
                            env=offline, cwd=REPO, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr
    assert len(read_lines(out)) == 2 and all("caption" in line for line in read_lines(out))


def test_an_unknown_name_offline_is_one_clear_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "vlmq", "worker", "embed", "--model", "nobody/nothing@main"],
                            env=hub_env(tmp_path, HF_HUB_OFFLINE="1"), cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "argument --model: nobody/nothing@main: not in the Hugging Face cache" in result.stderr
    assert "Traceback" not in result.stderr
