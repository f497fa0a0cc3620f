"""Batched serving: concurrent text→video requests of one shape are sampled as one batch on a render
replica, other shapes apart, and each clip is the one its request gives alone (to rounding).

A real local Ray Serve app on the tiny model, created with the real `openai` client; the batch a
clip was sampled in is read from the ingress' `reel_render_batch_size` histogram.
"""

import socket
import threading
import warnings

import httpx2 as httpx
import numpy as np
import openai
import pytest
import torch

from pipeline import storage
from pipeline.media.encode import decode_mp4, encode_mp4
from pipeline.media.watermark import embed_watermark

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the SDK marks videos.* deprecated
warnings.filterwarnings("ignore", category=DeprecationWarning)

KEY = "key-batch"


def metric(text, name):
    return float(next(line.split()[-1] for line in text.splitlines() if line.startswith(name + " ")))


@pytest.fixture(scope="module")
def batching_server(ray_session, tmp_path_factory):
    from ray import serve

    from pipeline.serve.app import APP_NAME, build_app
    from pipeline.serve.config import ServeConfig, key_hash

    root = tmp_path_factory.mktemp("serve-batching")
    # A batch of 4 goes as soon as 4 requests wait; the long wait keeps a slow machine from
    # splitting the 4 concurrent creates below into several batches.
    cfg = ServeConfig(model="tiny", out=str(root / "out"), store=str(root / "jobs.sqlite"),
                      api_key_sha256=(key_hash(KEY),), poll_after_ms=100, graceful_shutdown_s=1,
                      max_batch_size=4, batch_wait_ms=5000)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(cfg), name=APP_NAME, route_prefix="/")
    yield cfg, f"http://127.0.0.1:{port}"
    serve.shutdown()


def test_concurrent_requests_of_one_shape_share_a_batch_and_keep_their_frames(batching_server):
    from models.interface import RenderRequest, load_generator

    cfg, base = batching_server
    client = openai.OpenAI(base_url=f"{base}/v1", api_key=KEY, max_retries=0)
    asks = [("64x64", 1), ("64x64", 2), ("96x64", 3), ("64x64", 4)]
    videos: dict[int, object] = {}

    def create(size, seed):
        videos[seed] = client.videos.create_and_poll(
            prompt=f"a red circle moves right {seed}", seconds="1", size=size,
            extra_body={"seed": seed, "steps": 2}, poll_interval_ms=100)

    threads = [threading.Thread(target=create, args=ask) for ask in asks]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert sorted(videos) == [1, 2, 3, 4] and {v.status for v in videos.values()} == {"completed"}

    text = httpx.get(f"{base}/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    # one batch of the three 64x64 clips, the 96x64 clip alone: 3 + 3 + 3 + 1
    assert metric(text, "reel_render_batch_size_count") == 4
    assert metric(text, "reel_render_batch_size_sum") == 10

    threads = torch.get_num_threads()
    generator = load_generator("tiny", num_threads=1)  # as a render replica runs it
    meta_dir = storage.join(cfg.out, "metadata")
    alone, served_clips = {}, {}
    for seed, video in videos.items():
        meta = storage.read_parquet_dataset(storage.join(meta_dir, f"{video.id}.parquet")).to_pylist()[0]
        [out] = generator.generate([RenderRequest(meta["caption"], meta["width"], meta["height"], meta["frames"],
                                                  meta["fps"], seed, meta["steps"], meta["guidance"])])
        alone[seed] = embed_watermark(out.frames)  # as every output carries it
        served = decode_mp4(client.videos.download_content(video.id).read()).astype(float)
        assert served.shape == alone[seed].shape
        served_clips[seed] = served
    torch.set_num_threads(threads)
    encoded = {seed: decode_mp4(encode_mp4(frames, 8)).astype(float) for seed, frames in alone.items()}
    for seed, served in served_clips.items():  # each served MP4 is its request's clip sampled alone, encoded
        gaps = {other: np.abs(served - frames).mean() for other, frames in encoded.items()
                if frames.shape == served.shape}
        # measured: 0 to 0.001 from its own clip (the batch's rounding), about 11 from the other seeds'
        assert gaps[seed] < 0.5 and all(gap > 5 for other, gap in gaps.items() if other != seed)
