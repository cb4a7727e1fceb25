"""Settings come from VLMQ_ environment variables, and the README documents every one."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from shared.config.settings import Settings

README = Path(__file__).resolve().parents[2] / "README.md"


def test_environment_overrides_and_lists(monkeypatch):
    monkeypatch.setenv("VLMQ_BROKER_URL", "redis://:secret@broker:6380/2")
    monkeypatch.setenv("VLMQ_API_KEYS", "alpha, beta")
    monkeypatch.setenv("VLMQ_ALLOWED_PATH_ROOTS", '["/data/a", "/data/b"]')
    monkeypatch.setenv("VLMQ_MAX_UPLOAD_BYTES", "1234")
    settings = Settings()
    assert settings.effective_store_url == "redis://:secret@broker:6380/2"  # the store defaults to the broker
    assert settings.api_keys == ["alpha", "beta"]
    assert settings.allowed_path_roots == [Path("/data/a"), Path("/data/b")]
    assert settings.max_upload_bytes == 1234
    monkeypatch.setenv("VLMQ_STORE_URL", "rediss://store:6379/0")
    assert Settings().effective_store_url == "rediss://store:6379/0"


def test_limits_must_be_positive(monkeypatch):
    monkeypatch.setenv("VLMQ_MAX_IMAGE_PIXELS", "0")
    with pytest.raises(ValidationError, match="max_image_pixels"):
        Settings()


def test_readme_documents_every_setting():
    text = README.read_text()
    missing = [name for name in Settings.model_fields if f"`VLMQ_{name.upper()}`" not in text]
    assert not missing, f"README's configuration table lacks {missing}"
