"""Shared fixtures for the models tests: small configs, one text encoder, one tiny generator.

Everything runs offline on the CPU; the tiny config keeps each render well under a second.
"""

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from models.config import load_config  # noqa: E402


@pytest.fixture(autouse=True)
def _two_threads():
    torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def tiny_config():
    return load_config("tiny")


@pytest.fixture(scope="session")
def text_encoder(tiny_config):
    from models.text import TextEncoder

    return TextEncoder(tiny_config.text)


@pytest.fixture(scope="session")
def tiny_generator():
    from models.interface import load_generator

    return load_generator("tiny", device="cpu")
