"""`ServeConfig` from REELFORGE_* variables and API keys; `reel serve` without a key."""

import pytest


def test_config_from_the_environment():
    from pipeline.serve.config import ServeConfig, key_hash

    cfg = ServeConfig.from_env({"REELFORGE_MAX_QUEUED": "5", "REELFORGE_ALLOW_PRIVATE_URLS": "true",
                                "REELFORGE_OUT": "s3://bucket/online", "REEL_API_KEYS": "a, b,"})
    assert (cfg.max_queued, cfg.allow_private_urls, cfg.out) == (5, True, "s3://bucket/online")
    assert cfg.api_key_sha256 == tuple(sorted(key_hash(k) for k in "ab"))
    assert ServeConfig.from_env({"REELFORGE_ALLOW_PRIVATE_URLS": "0"}).allow_private_urls is False
    assert ServeConfig.from_env({}, max_queued=9).max_queued == 9
    roots = ServeConfig.from_env({"REELFORGE_LORA_ROOTS": "s3://b/loras, /srv/loras/,"}).lora_roots
    assert roots == ("s3://b/loras/", "/srv/loras")
    assert ServeConfig.from_env({"REELFORGE_LORA_ROOTS": "s3://b/x"}, lora_roots=["/a"]).lora_roots == ("/a",)


def test_batch_settings_and_the_dispatchers_slots():
    from pipeline.serve.config import ServeConfig

    cfg = ServeConfig.from_env({"REELFORGE_MAX_BATCH_SIZE": "4", "REELFORGE_BATCH_WAIT_MS": "20",
                                "REELFORGE_REPLICAS": "3"})
    assert (cfg.max_batch_size, cfg.batch_wait_ms, cfg.render_slots) == (4, 20, 12)  # a batch's worth per replica
    assert ServeConfig().render_slots == 1 and ServeConfig(gpus_per_replica=1).render_slots == 8  # CPU: off
    with pytest.raises(ValueError, match="max_batch_size must be at least 1"):
        ServeConfig(max_batch_size=0)


def test_serve_refuses_to_start_without_api_keys(monkeypatch, capsys):
    from pipeline.cli import main

    monkeypatch.delenv("REEL_API_KEYS", raising=False)
    monkeypatch.delenv("REELFORGE_API_KEY_FILE", raising=False)
    assert main(["serve", "--model", "tiny"]) == 2
    assert "no API key" in capsys.readouterr().err


def test_serve_refuses_a_lora_root_no_prefix_can_judge(monkeypatch, capsys):
    from pipeline.cli import main

    monkeypatch.setenv("REEL_API_KEYS", "k")
    assert main(["serve", "--model", "tiny", "--lora-root", "/srv/loras", "--lora-root", "simplecache::s3://b/"]) == 2
    assert "lora root 'simplecache::s3://b/'" in capsys.readouterr().err
