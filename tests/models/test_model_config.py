import json

import pytest

from models.config import ConfigError, load_config, shipped_configs


def test_shipped_configs_load_and_tiny_layers_on_default():
    assert {"default", "tiny"} <= set(shipped_configs())
    default, tiny = load_config("default"), load_config("tiny")
    assert default.name != tiny.name and tiny.weights is None  # tiny never inherits default's weights
    assert tiny.dit.hidden_size < default.dit.hidden_size
    assert tiny.text == default.text  # inherited untouched
    assert tiny.grid.max_frames == default.grid.max_frames and tiny.grid.max_steps != default.grid.max_steps
    # a dict merges key by key: tiny changes the VAE's width but keeps its compression
    assert tiny.vae.spatial_compression == default.vae.spatial_compression
    assert tiny.dit.latent_channels == tiny.vae.latent_channels and tiny.dit.text_dim == tiny.text.dim


def test_layered_user_config_in_a_folder_and_by_uri(tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    (base / "b.json").write_text(json.dumps({"base": "tiny", "name": "b", "weights": "w/b.safetensors",
                                             "dit": {"num_layers": 3}}))
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"base": "../base/b.json", "version": "7",
                                                   "dit": {"num_heads": 4}}))
    for spec in (str(model), f"file://{model}", str(model / "config.json")):
        cfg = load_config(spec)
        assert (cfg.name, cfg.version, cfg.dit.num_layers, cfg.dit.num_heads) == ("b", "7", 3, 4)
        assert cfg.dit.hidden_size == load_config("tiny").dit.hidden_size
        # weights resolve against the file that names them, not the one that layers on it
        assert cfg.weights.endswith("base/w/b.safetensors")
    assert load_config(str(model), overrides={"dit": {"num_layers": 1}}).dit.num_layers == 1


def test_config_errors_are_clear(tmp_path):
    with pytest.raises(ConfigError, match="shipped configs: .*default"):
        load_config("no-such-model")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"base": "tiny", "dit": {"hiden_size": 3}}))
    with pytest.raises(ConfigError, match=r"unknown config key\(s\) dit.hiden_size"):
        load_config(str(bad))
    loop = tmp_path / "loop.json"
    loop.write_text(json.dumps({"base": "loop.json"}))
    with pytest.raises(ConfigError, match="loops"):
        load_config(str(loop))
    with pytest.raises(ConfigError, match="power of two"):
        load_config("tiny", overrides={"vae": {"spatial_compression": 3}})
    with pytest.raises(ConfigError, match="divisible"):
        load_config("tiny", overrides={"dit": {"num_heads": 3}})
