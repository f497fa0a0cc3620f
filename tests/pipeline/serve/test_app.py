"""The application builder cluster/rayservice.yaml imports (`pipeline.serve.app:app_from_env`):
the app built from REELFORGE_* variables and the Serve config's `args` when Serve asks for it."""

import pytest


def test_the_application_builder_reads_the_environment_and_its_args(monkeypatch, tmp_path):
    from ray.serve import Application

    from pipeline.serve.app import app_from_env

    monkeypatch.setenv("REELFORGE_MODEL", "tiny")
    monkeypatch.setenv("REELFORGE_OUT", str(tmp_path))
    monkeypatch.setenv("REELFORGE_MAX_QUEUED", "5")
    monkeypatch.setenv("REEL_API_KEYS", "k")
    app = app_from_env({"max_queued": 7, "allow_private_urls": True, "store": None,
                        "lora_roots": ["s3://bucket/loras", str(tmp_path)]})
    assert isinstance(app, Application)
    cfg = app._bound_deployment.init_args[0]  # VideoAPI.bind(cfg, renderer)
    assert (cfg.model, cfg.out, cfg.max_queued, cfg.allow_private_urls, cfg.store) == ("tiny", str(tmp_path), 7,
                                                                                        True, None)
    assert len(cfg.api_key_sha256) == 1
    assert cfg.lora_roots == ("s3://bucket/loras/", str(tmp_path))
    with pytest.raises(ValueError, match=r"unknown args \['api_key_sha256'\]"):
        app_from_env({"api_key_sha256": "x"})
