"""`reel serve` under load (bench/serve_soak.py, briefly): 6 clients creating and polling the tiny model's
videos into the loopback S3 (through tests/flaky_store.py with no faults drawn, so every PUT is counted),
429 + Retry-After when the 4-job queue is full.

* killed with SIGKILL (the whole process group, its Ray included) mid-render and started again on the
  same job store: every accepted job completes, each clip's metadata is PUT exactly once, no client sees
  a 5xx (connection errors while it is down are expected), the job store holds exactly the accepted jobs;
* a steady soak: the resident memory of each process level is sampled and its slope after warm-up
  reported, all jobs complete, and a 50 MB chunked upload is refused while it streams (413 before its
  end, the ingress's and the Serve proxy's memory not grown by it).
"""

from __future__ import annotations

import json

import pytest

from bench.serve_soak import soak
from pipeline import storage
from tests.flaky_store import FlakyStore

pytestmark = [pytest.mark.faults, pytest.mark.timeout(600)]


@pytest.fixture
def counted_store(s3_server):
    store = FlakyStore(s3_server, rate=0.0).start()
    try:
        yield store
    finally:
        store.stop()


def check_every_job_once(figures: dict, store: FlakyStore, out_prefix: str) -> None:
    accepted = figures["accepted_ids"]
    assert accepted and figures["unfinished"] == 0 and figures["failed"] == 0, figures
    assert figures["completed"] == len(accepted)
    assert figures["server_errors_5xx"] == 0 and figures["429_without_retry_after"] == 0, figures["answers"]
    assert figures["store"] == {"statuses": {"completed": len(accepted)}, "extra_jobs": 0, "duplicate_accepts": 0}
    puts = {k.rsplit("/", 1)[-1].removesuffix(".parquet"): n for k, n in store.puts.items()
            if f"{out_prefix}/metadata/" in k}
    assert sorted(puts) == sorted(accepted) and set(puts.values()) == {1}, puts  # each clip rendered once


def test_the_endpoint_killed_under_load_completes_every_accepted_job_once(counted_store, bucket, tmp_path):
    figures = soak(seconds=45, clients=6, kill_at=15, out=f"s3://{bucket}/online", store=str(tmp_path / "jobs.sqlite"),
                   sample_every=5, env={"AWS_ENDPOINT_URL": counted_store.url})
    print("\nkilled under load:", json.dumps({k: v for k, v in figures.items() if k != "accepted_ids"}))
    assert figures["killed_and_restarted"]
    check_every_job_once(figures, counted_store, f"{bucket}/online")
    assert figures["answers"].get("429", 0) >= 1  # the queue was full at times, and said when to come back
    assert storage.list_names(f"s3://{bucket}/online/metadata") == sorted(f"{i}.parquet"
                                                                          for i in figures["accepted_ids"])


def test_a_bounded_soak_keeps_memory_flat_and_refuses_a_50_mb_upload_while_it_streams(counted_store, bucket,
                                                                                      tmp_path):
    figures = soak(seconds=50, clients=4, out=f"s3://{bucket}/soak", store=str(tmp_path / "jobs.sqlite"),
                   sample_every=2, upload_at=8, env={"AWS_ENDPOINT_URL": counted_store.url})
    print("\nsoak:", json.dumps({k: v for k, v in figures.items() if k != "accepted_ids"}))
    check_every_job_once(figures, counted_store, f"{bucket}/soak")
    upload = figures["upload"]
    # --max-upload-mb 1: refused long before the end (what was sent by then sat in socket buffers)
    assert upload["status"] == 413 and upload["sent_mb"] < 40, upload
    # Ray Serve's HTTP proxy, and the request queue in front of our ingress, take in what the client sent
    # before the 413 came back, ahead of the ingress's reading (docs/RELIABILITY.md): the memory of each is
    # bounded by what was sent (a copy on each side of the hand-off), not by the size of the upload
    for level in ("api_ingress", "serve_proxy"):
        assert upload[f"{level}_rss_mb_after"] - upload[f"{level}_rss_mb_before"] < 2 * upload["sent_mb"] + 32, upload
    levels = figures["rss_mb"]
    assert {"reel serve driver", "api ingress", "render replica", "serve proxy", "serve controller",
            "ray daemons"} <= set(levels), levels
    for level, rss in levels.items():  # bounded: no level grows by more than 30 MB a minute
        assert rss["slope_mb_per_min"] < 30, (level, rss)
