"""A render replica spread over a group of Ray actors (pipeline/stages/replica.py) against the single-process
render: real Ray, one real process per rank, gloo, the tiny model at 32-64 px and few steps, in
8-frame windows (a 16-frame clip is 3 windows, each conditioned on the frames before it).

* `reel render --sp 2` on the session's local Ray: the MP4s hold the frames the single-process
  generator makes (Ulysses attention over 2 ranks, the tiled decode, the broadcast to rank 1), also
  after the render actor is killed mid-run and restarted into its placement group.
* tp=2 on a two-node cluster (this file run as a script, so that the test session's own Ray stays
  up), as the render stage makes it and as `reel serve`'s app asked by the openai client: each rank
  reserves 0.6 of a node's one CPU, so the PACK placement group has to spill over both nodes; the
  ranks must land on different nodes, and the frames match the single process.
* a layout the model cannot take, or a group the cluster cannot hold, is refused in one line.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

ROOT = Path(__file__).resolve().parents[3]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from models.config import ParallelConfig, load_config  # noqa: E402
from models.interface import ParallelConfigError, RenderRequest  # noqa: E402

MODEL = "tiny"
ROWS = [
    {"id": "ball", "prompt": "a red ball moves right on black", "seed": 3, "width": 32, "height": 32, "seconds": 1,
     "steps": 3},
    {"id": "wide", "prompt": "a blue square drifts left, gray backdrop", "seed": 4, "width": 64, "height": 32,
     "seconds": 2, "steps": 40},  # 3 windows: still rendering when the actor is killed
]
# what the two-node group samples directly (the generator seam), and the reference with it
REQUESTS = [RenderRequest(caption="A red ball moves right.", width=32, height=32, frames=8, fps=8, seed=1, steps=3,
                          guidance=4.5),
            RenderRequest(caption="A blue square.", width=64, height=32, frames=16, fps=8, seed=2, steps=3,
                          guidance=4.5, negative_caption="blurry")]
CLUSTER_LAYOUT = ParallelConfig(tp=2)
CLUSTER_CPUS_PER_REPLICA = 1.2  # 0.6 a rank: no 1-CPU node holds both


def write_manifest(path: Path, rows: list[dict]) -> str:
    columns = list(dict.fromkeys(k for r in rows for k in r))
    pq.write_table(pa.table({c: [r.get(c) for r in rows] for c in columns}), path)
    return str(path)


def render(*args, model: str = MODEL) -> int:
    from pipeline.cli import main

    return main(["render", *map(str, args), "--model", model, "--no-progress"])


@pytest.fixture(scope="module")
def windowed_model(tmp_path_factory) -> str:
    """The tiny model sampling 8-frame windows that share 4 frames: a 16-frame clip is 3 windows, each
    conditioned on frames the group decoded on rank 0 and broadcast to the others."""
    path = tmp_path_factory.mktemp("model") / "tiny-windowed.json"
    path.write_text(json.dumps({"base": MODEL, "grid": {"window_frames": 8, "context_frames": 4}}))
    return str(path)


@pytest.fixture(scope="module")
def reference_generator(windowed_model):
    """The single-process generator every layout is compared with."""
    import torch

    from models.interface import load_generator

    torch.set_num_threads(1)
    return load_generator(windowed_model, device="cpu")


def test_a_layout_the_model_cannot_take_is_refused_before_ray_starts(tmp_path, capsys):
    import ray

    from pipeline.stages.replica import ModelParallelReplica, replica_deployment_options

    ray_was_up = ray.is_initialized()
    out = tmp_path / "out"
    manifest = write_manifest(tmp_path / "m.parquet", ROWS[:1])
    assert render(manifest, "--out", out, "--tp", "4") == 2
    err = capsys.readouterr().err.strip()
    assert err == ("reel render: parallel layout sp=1 x tp=4 x cfg=1: tp=4 must divide the heads (2), "
                   "the width (64) and the MLP width (128)")
    assert not out.exists()
    # the replica and the Serve options refuse it too, before any actor (or Ray) starts
    with pytest.raises(ParallelConfigError, match="tp=4 must divide the heads"):
        ModelParallelReplica(MODEL, ParallelConfig(tp=4))
    with pytest.raises(ParallelConfigError, match="tp=4 must divide the heads"):
        replica_deployment_options(MODEL, ParallelConfig(tp=4), use_gpus=True)
    unguided = load_config(MODEL, overrides={"sampler": {"guidance": 1.0}})
    with pytest.raises(ParallelConfigError, match="cfg=2 needs classifier-free guidance"):
        ModelParallelReplica(unguided, ParallelConfig(cfg=2))
    assert ray.is_initialized() == ray_was_up


def test_serve_options_for_a_group_replica():
    from pipeline.stages.replica import HOST_CPUS, replica_deployment_options

    assert replica_deployment_options(MODEL, ParallelConfig(), use_gpus=True) == {
        "ray_actor_options": {"num_cpus": 1.0, "num_gpus": 1.0}}
    gpu = replica_deployment_options(MODEL, ParallelConfig(sp=2, cfg=2), use_gpus=True)
    assert gpu == {"placement_group_bundles": [{"CPU": HOST_CPUS}] + [{"CPU": 1.0, "GPU": 1.0}] * 4,
                   "placement_group_strategy": "PACK",
                   "ray_actor_options": {"num_cpus": HOST_CPUS, "num_gpus": 0}}
    cpu = replica_deployment_options(MODEL, ParallelConfig(sp=2), use_gpus=False)
    assert cpu["placement_group_bundles"] == [{"CPU": HOST_CPUS}, {"CPU": 0.25}, {"CPU": 0.25}]


def test_replica_resources_defaults_are_one_place():
    """(CPUs, GPUs) of a replica: what is given, else 1 GPU + 1 CPU a rank with GPUs, 0.5 CPU without."""
    from pipeline.stages.replica import rank_bundle, replica_resources

    assert replica_resources(1, use_gpus=True) == (1.0, 1.0)
    assert replica_resources(4, use_gpus=True) == (4.0, 4.0)
    assert replica_resources(1, use_gpus=False) == replica_resources(2, use_gpus=False) == (0.5, 0.0)
    assert replica_resources(2, use_gpus=True, cpus_per_replica=3, gpus_per_replica=4) == (3.0, 4.0)
    assert rank_bundle(2, use_gpus=True) == {"CPU": 1.0, "GPU": 1.0}
    assert rank_bundle(2, use_gpus=False) == {"CPU": 0.25}
    with pytest.raises(ValueError, match="3 GPUs per replica do not split over 2 ranks"):
        rank_bundle(2, use_gpus=True, gpus_per_replica=3)


def test_the_layout_is_the_model_configs_unless_a_flag_overrides_it():
    from models.interface import model_layout

    config = load_config(MODEL, overrides={"parallel": {"sp": 2, "cfg": 2}})
    assert model_layout(config) == ParallelConfig(sp=2, cfg=2)
    assert model_layout(config, tp=2, cfg=1) == ParallelConfig(sp=2, tp=2, cfg=1)
    assert model_layout(MODEL) == ParallelConfig()


def test_a_group_the_cluster_cannot_hold_is_refused_in_one_line(ray_session, tmp_path, capsys):
    out = tmp_path / "out"
    manifest = write_manifest(tmp_path / "m.parquet", ROWS[:1])
    assert render(manifest, "--out", out, "--sp", "2", "--cpus-per-replica", "64") == 2
    err = capsys.readouterr().err.strip()
    assert err == ("reel render: a render replica of 2 ranks (sp=2 x tp=1 x cfg=1) needs 64 CPU; "
                   "the Ray cluster has 2 CPU")


def kill_the_render_actor_after_the_first_clip(out: Path, killed: list[int], done, timeout: float = 900,
                                               written: dict[str, int] | None = None) -> None:
    """SIGKILL the render actor (Ray titles its process "ray::MapWorker(MapBatches(RenderUDF))…") once
    the first MP4 is in storage; records how many MP4s there were then (and in `written` their inode
    numbers: a clip rendered again after the kill is written anew, under a new inode). Gives up when
    `done` (an Event) is set, i.e. the run ended, however slow the machine."""
    import signal

    import psutil

    deadline = time.time() + timeout
    while time.time() < deadline and not done.is_set():
        videos = list((out / "videos").glob("*.mp4")) if (out / "videos").exists() else []
        if videos:
            for proc in psutil.process_iter(["pid", "cmdline"]):
                if "RenderUDF" in " ".join(proc.info["cmdline"] or []):
                    os.kill(proc.info["pid"], signal.SIGKILL)
                    killed.append(len(videos))
                    if written is not None:
                        written.update({v.name: v.stat().st_ino for v in videos})
                    return
        time.sleep(0.1)


def test_a_group_replica_samples_from_text_states_handed_over(ray_session, windowed_model, reference_generator):
    """The sampling stage of `--disaggregate` as a group of 2 ranks (no text encoder in them): a one-window
    request comes back as latents that a decode-only generator turns into the single-process frames; a
    3-window one decodes in the group (its windows condition on decoded frames), from the same handed-over states."""
    from models.interface import load_generator
    from pipeline.stages.render import RenderUDF

    replica = RenderUDF(windowed_model, num_threads=1, parallel=ParallelConfig(sp=2), rank_bundle={"CPU": 0.25},
                        disaggregated=True).generator
    try:
        text = load_generator(windowed_model, device="cpu", parts=("text",))
        decoder = load_generator(windowed_model, device="cpu", parts=("vae",))
        short, long = REQUESTS
        states = text.encode_captions([c for r in REQUESTS for c in (r.caption, r.negative_caption)])
        assert replica.hands_over(short) and not replica.hands_over(long)
        [out] = replica.generate_latents([short], text_states=states)
        got = {"short": decoder.decode_latents(out.latents),
               "long": replica.generate([long], text_states=states)[0].frames}
    finally:
        replica.shutdown()
    for name, r in (("short", short), ("long", long)):
        want = reference_generator.generate([r])[0].frames
        assert got[name].shape == want.shape and np.abs(got[name].astype(int) - want).max() <= 1, name


def test_reel_render_sp2_gives_the_single_process_frames(ray_session, tmp_path, windowed_model,
                                                         reference_generator):
    """The whole pipeline with each replica a group of 2 ranks; its render actor is killed after the
    first clip: Ray restarts it into its placement group, the group starts again there, and the
    run ends with every clip and with its one placement group removed."""
    import threading

    from ray.util.placement_group import placement_group_table

    from pipeline import storage
    from pipeline.batch.processor import render_placement_prefix
    from pipeline.media.encode import decode_mp4, encode_mp4
    from pipeline.media.watermark import embed_watermark

    out = tmp_path / "out"
    killed: list[int] = []
    written: dict[str, int] = {}
    done = threading.Event()
    killer = threading.Thread(target=kill_the_render_actor_after_the_first_clip, args=(out, killed, done),
                              kwargs={"written": written})
    killer.start()
    t0 = time.perf_counter()
    try:
        code = render(write_manifest(tmp_path / "m.parquet", ROWS), "--out", out, "--sp", "2", model=windowed_model)
    finally:
        done.set()
    seconds = time.perf_counter() - t0
    killer.join()
    assert code == 0 and killed == [1]
    run = json.loads((out / "run.json").read_text())
    assert run["parallel"] == {"sp": 2, "tp": 1, "cfg": 1, "ulysses": None} and run["counts"]["rendered"] == 2
    deadline = time.time() + 10  # removing a placement group is asynchronous
    while True:
        groups = [g for g in placement_group_table().values()
                  if g["name"].startswith(render_placement_prefix(run["run_id"]))]
        if all(g["state"] == "REMOVED" for g in groups) or time.time() > deadline:
            break
        time.sleep(0.2)
    assert [(g["state"], list(g["bundles"].values())) for g in groups] == [("REMOVED", [{"CPU": 0.25}] * 2)]

    meta = pq.read_table(out / "metadata").to_pylist()
    assert sorted(m["id"] for m in meta) == ["ball", "wide"] and {m["run_id"] for m in meta} == {run["run_id"]}
    # exactly once: the clip complete before the kill was not rendered again (its MP4 never rewritten)
    assert len(written) == 1 and all((out / "videos" / name).stat().st_ino == ino for name, ino in written.items())
    assert not list((out / "videos").glob(".*.tmp"))  # no temp file left by the killed group
    diffs = {}
    for m in meta:
        request = RenderRequest(caption=m["caption"], negative_caption=m["negative_prompt"], width=m["width"],
                                height=m["height"], frames=m["frames"], fps=m["fps"], seed=m["seed"],
                                steps=m["steps"], guidance=m["guidance"])
        expected = embed_watermark(reference_generator.generate([request])[0].frames)
        got = decode_mp4(storage.read_bytes(m["video_uri"]))
        want = decode_mp4(encode_mp4(expected, m["fps"]))  # the same frames through the same encoder
        assert got.shape == want.shape == expected.shape
        diffs[m["id"]] = int(np.abs(got.astype(int) - want).max())
        # the frames themselves (watermarked, before H.264), whose hash the metadata records
        diffs[m["id"] + " frames identical"] = \
            m["frames_sha256"] == hashlib.sha256(np.ascontiguousarray(expected).tobytes()).hexdigest()
    print(f"\nreel render --sp 2, render actor killed after clip 1: {seconds:.1f} s; max abs diff of the "
          f"decoded MP4s: {diffs}")
    assert all(diffs[m["id"]] <= 1 for m in meta), diffs


# --- the two-node cluster (this file run as a script) ---------------------------------------------


def cluster_main(out_dir: str, model: str) -> None:
    """A two-node Ray cluster on this machine (1 CPU each) and a tp=2 replica in it twice: the render
    stage's UDF making its own PACK placement group (as in a Ray Data render actor), then the
    `reel serve` app (`build_app` with tp=2: the Renderer replica in bundle 0 of Serve's placement
    group, its ranks in 1 and 2) asked for a video with the openai client. Writes the frames / the
    video's metadata, the ranks' nodes and the placement groups' bundles."""
    import socket
    import warnings

    import openai
    import ray
    from ray import serve
    from ray.cluster_utils import Cluster
    from ray.util.placement_group import placement_group_table
    from ray.util.state import list_actors

    from pipeline.serve.app import APP_NAME, build_app
    from pipeline.serve.config import ServeConfig, key_hash
    from pipeline.stages.render import RenderUDF
    from pipeline.stages.replica import rank_bundle

    seconds, results = {}, {}
    t0 = time.perf_counter()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "object_store_memory": 200 << 20})
    cluster.add_node(num_cpus=1, object_store_memory=200 << 20)
    try:
        ray.init(address=cluster.address, logging_level=logging.WARNING, log_to_driver=False)
        cluster.wait_for_nodes()
        nodes = sorted(n["NodeID"] for n in ray.nodes() if n["Alive"])
        seconds["cluster"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        bundle = rank_bundle(CLUSTER_LAYOUT.world_size, use_gpus=False, cpus_per_replica=CLUSTER_CPUS_PER_REPLICA)
        replica = RenderUDF(model, num_threads=1, parallel=CLUSTER_LAYOUT, rank_bundle=bundle).generator
        table = placement_group_table(replica.placement_group)
        results["render stage"] = {"frames": [o.frames for o in replica.generate(REQUESTS)],
                                   "rank_nodes": replica.rank_nodes, "bundles": list(table["bundles"].values()),
                                   "strategy": table["strategy"]}
        replica.shutdown()
        seconds["render stage"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        cfg = ServeConfig(model=model, out=str(Path(out_dir, "online")), store=str(Path(out_dir, "jobs.sqlite")),
                          api_key_sha256=(key_hash("k"),), tp=CLUSTER_LAYOUT.tp,
                          cpus_per_replica=CLUSTER_CPUS_PER_REPLICA, poll_after_ms=200)
        serve.run(build_app(cfg), name=APP_NAME, route_prefix="/")
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="k", max_retries=0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # the SDK marks videos.* deprecated
            video = client.videos.create_and_poll(prompt="a red ball moves right", seconds="2", size="32x32",
                                                  extra_body={"seed": 5, "steps": 3}, poll_interval_ms=200)
        groups = [g for g in placement_group_table().values() if g["state"] == "CREATED"]
        ranks = list_actors(filters=[("class_name", "=", "RenderRank"), ("state", "=", "ALIVE")])
        results["serve"] = {"video": video.model_dump(), "rank_nodes": [a.node_id for a in ranks],
                            "bundles": [list(g["bundles"].values()) for g in groups],
                            "strategy": [g["strategy"] for g in groups]}
        serve.shutdown()
        seconds["serve"] = time.perf_counter() - t0
    finally:
        ray.shutdown()
        cluster.shutdown()
    frames = results["render stage"].pop("frames")
    np.savez(Path(out_dir, "render stage.npz"), *frames)
    Path(out_dir, "cluster.json").write_text(json.dumps({"results": results, "seconds": seconds, "nodes": nodes}))


@pytest.fixture(scope="module")
def two_node_cluster(tmp_path_factory, windowed_model):
    out = tmp_path_factory.mktemp("cluster")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu",
           "HF_HUB_OFFLINE": "1", "RAY_AUTH_MODE": "disabled"}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, str(out), windowed_model], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((out / "cluster.json").read_text())
    print(f"\ntwo-node cluster, tp=2 ({time.perf_counter() - t0:.1f} s in all): {result['seconds']}")
    assert len(result["nodes"]) == 2
    return out, result["nodes"], result["results"]


def test_a_replica_spread_over_two_nodes_gives_the_single_process_frames(two_node_cluster, reference_generator):
    out, nodes, results = two_node_cluster
    result = results["render stage"]
    assert result["strategy"] == "PACK" and result["bundles"] == [{"CPU": 0.6}, {"CPU": 0.6}]
    # no node holds both ranks: PACK spilled the group over the two nodes
    assert sorted(result["rank_nodes"]) == nodes, result
    with np.load(out / "render stage.npz") as z:
        got = [z[f"arr_{i}"] for i in range(len(REQUESTS))]
    for request, frames in zip(REQUESTS, got):
        want = reference_generator.generate([request])[0].frames
        assert frames.shape == want.shape == (request.frames, request.height, request.width, 3)
        assert np.abs(frames.astype(int) - want).max() <= 1  # tp sums partial products in another order


def test_reel_serve_with_a_replica_over_two_nodes_renders_the_single_process_video(two_node_cluster,
                                                                                   reference_generator):
    from pipeline.media.encode import decode_mp4, encode_mp4
    from pipeline.media.watermark import embed_watermark

    out, nodes, results = two_node_cluster
    result = results["serve"]
    video = result["video"]
    assert (video["status"], video["size"], video["seconds"]) == ("completed", "32x32", "2")
    # Serve's placement group for the Renderer replica: its own bundle, then one per rank, spread
    assert (result["strategy"], result["bundles"]) == (["PACK"], [[{"CPU": 0.1}, {"CPU": 0.6}, {"CPU": 0.6}]])
    assert sorted(result["rank_nodes"]) == nodes, result
    [meta] = pq.read_table(out / "online" / "metadata").to_pylist()
    assert (meta["id"], meta["frames"], meta["seed"]) == (result["video"]["id"], 16, 5)
    request = RenderRequest(caption=meta["caption"], negative_caption=meta["negative_prompt"], width=32, height=32,
                            frames=16, fps=meta["fps"], seed=5, steps=3, guidance=meta["guidance"])
    want = decode_mp4(encode_mp4(embed_watermark(reference_generator.generate([request])[0].frames), meta["fps"]))
    got = decode_mp4((out / "online" / "videos" / f"{meta['id']}.mp4").read_bytes())
    diff = np.abs(got.astype(int) - want)
    # tp's frames are within 1 of the single process's (above); H.264 can turn a 1-level change into a
    # few levels at a pixel, but not across the clip (another seed or caption differs by tens on average)
    assert got.shape == want.shape and diff.max() <= 6 and diff.mean() < 0.5, (diff.max(), diff.mean())


if __name__ == "__main__":
    cluster_main(sys.argv[1], sys.argv[2])
