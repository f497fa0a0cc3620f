import hashlib
import json

import pytest
import torch

from models.config import load_config
from models.weights import (
    WeightsError,
    init_modules,
    load_modules,
    load_weights,
    save_weights,
    state_dict_sha256,
    weights_sha256,
)


@pytest.mark.parametrize("scheme", ["path", "file", "memory"])
def test_save_load_round_trip_with_sha256(tmp_path, scheme):
    sd = {"a.weight": torch.randn(3, 4), "b.bias": torch.arange(5, dtype=torch.float32)}
    uri = {"path": str(tmp_path / "w" / "m.safetensors"), "file": f"file://{tmp_path}/m.safetensors",
           "memory": "memory://reelforge-weights-test/m.safetensors"}[scheme]
    sha = save_weights(sd, uri)
    assert sha == state_dict_sha256(sd)
    if scheme == "path":
        assert sha == hashlib.sha256((tmp_path / "w" / "m.safetensors").read_bytes()).hexdigest()
    loaded, sha2 = load_weights(uri, expected_sha256=sha)
    assert sha2 == sha and loaded.keys() == sd.keys() and all(torch.equal(loaded[k], sd[k]) for k in sd)
    with pytest.raises(WeightsError, match=f"have sha256 {sha}, expected 0000"):
        load_weights(uri, expected_sha256="0" * 64)


def test_missing_weights_are_a_clear_error(tmp_path):
    with pytest.raises(WeightsError, match="weights not found"):
        load_weights(str(tmp_path / "nope.safetensors"))


def test_random_init_is_deterministic_and_leaves_the_global_rng_alone(tiny_config):
    state = torch.random.get_rng_state()
    a, sha = load_modules(tiny_config)
    assert torch.equal(state, torch.random.get_rng_state())
    assert sha == state_dict_sha256(init_modules(tiny_config).state_dict()) == weights_sha256(tiny_config)
    other = load_config("tiny", overrides={"init_seed": 1})
    assert weights_sha256(other) != sha
    assert {k.split(".")[0] for k in a.state_dict()} == {"vae", "dit"}


def test_config_folder_with_weights_file(tmp_path, tiny_config):
    modules = init_modules(load_config("tiny", overrides={"init_seed": 5}))
    sha = save_weights(modules, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({"base": "tiny", "weights": "model.safetensors",
                                                      "weights_sha256": sha}))
    cfg = load_config(str(tmp_path))
    loaded, got = load_modules(cfg)
    assert got == sha == weights_sha256(cfg)
    assert all(torch.equal(v, modules.state_dict()[k]) for k, v in loaded.state_dict().items())

    (tmp_path / "config.json").write_text(json.dumps({"base": "tiny", "weights": "model.safetensors",
                                                      "weights_sha256": "f" * 64}))
    with pytest.raises(WeightsError, match="expected ffff"):
        load_modules(load_config(str(tmp_path)))
    wrong = load_config(str(tmp_path), overrides={"weights_sha256": None, "dit": {"hidden_size": 32}})
    with pytest.raises(WeightsError, match="do not fit"):
        load_modules(wrong)
