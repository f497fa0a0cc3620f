"""Wan tests: the tiny folders come from tests/conftest.py (`wan_folders`, `wan_pipelines`)."""

import pytest


@pytest.fixture(autouse=True)
def _digest_cache(tmp_path, monkeypatch):
    """Each test's weight-digest cache in its own folder, not the user's ~/.cache."""
    from models.wan import digest

    monkeypatch.setattr(digest, "CACHE_FILE", tmp_path / "cache" / "file-sha256.json")
