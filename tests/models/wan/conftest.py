"""Wan tests: the tiny folders come from tests/conftest.py (`wan_folders`, `wan_pipelines`); `generators`
loads each once for the package."""

import pytest


@pytest.fixture(autouse=True)
def _digest_cache(tmp_path, monkeypatch):
    """Each test's weight-digest cache in its own folder, not the user's ~/.cache."""
    from models.wan import digest

    monkeypatch.setattr(digest, "CACHE_FILE", tmp_path / "cache" / "file-sha256.json")


@pytest.fixture(scope="session")
def generators(wan_folders):
    """{variant: load_generator(folder, device="cpu")}: reelforge's generator of each tiny folder."""
    from models.interface import load_generator

    return {v: load_generator(folder, device="cpu") for v, folder in wan_folders.items()}
