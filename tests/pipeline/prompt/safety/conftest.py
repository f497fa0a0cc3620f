"""The shipped default policy, loaded once per test module."""

import pytest

from pipeline.prompt.safety.policy import load_policy


@pytest.fixture(scope="module")
def default():
    return load_policy(None)
