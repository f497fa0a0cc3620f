"""The processor (pipeline/batch/processor.py) on a real local Ray: the stages and the resources they run
under, the row a clip starts as, and a render replica killed mid-job replaced by Ray Data."""

import json
import os
import signal
import threading
import time

import pytest

from models.interface import ParallelConfig
from pipeline import storage
from pipeline.batch.manifest import ClipSpec, write_manifest
from pipeline.batch.processor import build_stages, clip_item
from pipeline.cli import main
from pipeline.errors import UsageError
from pipeline.stages.apart import DecodeUDF, TextStatesUDF
from pipeline.stages.base import FusedUDF
from pipeline.stages.inputs import InputsUDF
from pipeline.stages.prompt import RecaptionUDF
from pipeline.stages.render import RenderUDF
from pipeline.stages.write import WriteUDF

MODEL = "tiny"
WRITER = {"out": "/tmp/never-written", "model": {"name": "tiny", "version": "0", "weights_sha256": "0" * 64},
          "run_id": "run-1"}


def test_stages_and_their_resources_on_a_cpu_cluster(ray_session):
    """The session's Ray has 2 CPUs and no GPU: two 1-thread replicas of 0.5 CPU, light stages at 0.25
    when apart; by default the light stages run inside the CPU replicas (one fused stage)."""
    [fused] = build_stages(model_spec=MODEL, recaptioner="plain", policy=None, clips=5, **WRITER)
    apart = build_stages(model_spec=MODEL, recaptioner="plain", policy=None, clips=5, fuse=False, **WRITER)
    assert fused.udf is FusedUDF and fused.map_batches_kwargs == apart[1].map_batches_kwargs
    assert fused.constructor_kwargs["stages"] == [(s.udf, s.constructor_kwargs) for s in apart]
    llm = build_stages(model_spec=MODEL, recaptioner="openai:m@http://127.0.0.1:9", policy=None, **WRITER)
    assert [s.udf for s in llm] == [RecaptionUDF, RenderUDF, WriteUDF]  # an LLM is not loaded into every replica

    stages = build_stages(model_spec=MODEL, recaptioner="plain", policy=None, clips=5, fuse=False, **WRITER)
    assert [s.udf for s in stages] == [RecaptionUDF, RenderUDF, WriteUDF]
    recaption, render, write = stages
    assert recaption.constructor_kwargs == {"recaptioner": "plain", "policy": None}
    assert render.constructor_kwargs == {"model": MODEL, "num_threads": 1, "dtype": None, "offload": False,
                                         "compile": False}
    assert (render.map_batches_kwargs["num_cpus"], render.map_batches_kwargs["num_gpus"]) == (0.5, 0)
    pool = render.map_batches_kwargs["compute"]
    assert (pool.min_size, pool.max_size, pool.initial_size, render.map_batches_kwargs["batch_size"]) == (1, 2, 2, 1)
    assert write.constructor_kwargs == {**WRITER, "blur_faces": False, "c2pa": None, "codec": "h264"}
    assert recaption.map_batches_kwargs["num_cpus"] == write.map_batches_kwargs["num_cpus"] == 0.25

    # media rows add the inputs stage; fewer clips or more threads make fewer replicas
    stages = build_stages(model_spec=MODEL, recaptioner="plain", policy=None, clips=1, inputs_limits="limits",
                          fuse=False, **WRITER)
    assert [s.udf for s in stages] == [RecaptionUDF, InputsUDF, RenderUDF, WriteUDF]
    assert stages[1].constructor_kwargs == {"limits": "limits"}
    assert stages[2].map_batches_kwargs["compute"].max_size == 1
    stages = build_stages(model_spec=MODEL, recaptioner="plain", policy=None, threads_per_replica=2, **WRITER)
    assert stages[0].map_batches_kwargs["compute"].max_size == 1


def test_disaggregated_stages_and_their_resources(ray_session, tmp_path, capsys):
    """--disaggregate: text encoding and decoding in pools of their own (CPU actors of 0.25 CPU here, as many as
    the replicas at most), loading only their part of the model; the replicas sample without a text encoder."""
    stages = build_stages(model_spec=MODEL, recaptioner="plain", policy=None, clips=5, disaggregate=True, **WRITER)
    assert [s.udf for s in stages] == [RecaptionUDF, TextStatesUDF, RenderUDF, DecodeUDF, WriteUDF]
    text, render, decode = stages[1:4]
    assert render.constructor_kwargs["disaggregated"] is True
    assert text.constructor_kwargs == decode.constructor_kwargs == {"model": MODEL, "num_threads": 1, "dtype": None}
    for stage in (text, decode):
        pool = stage.map_batches_kwargs["compute"]
        assert (pool.min_size, pool.max_size) == (1, 2)
        assert (stage.map_batches_kwargs["num_cpus"], stage.map_batches_kwargs["num_gpus"]) == (0.25, 0)
    with pytest.raises(UsageError, match="cannot fuse them into the render replicas"):
        build_stages(model_spec=MODEL, recaptioner="plain", policy=None, disaggregate=True, fuse=True, **WRITER)
    manifest = tmp_path / "m.jsonl"
    manifest.write_text('{"prompt": "a red circle"}\n')
    assert main(["render", str(manifest), "--out", str(tmp_path / "out"), "--stage-gpus", "0.5", "--no-progress"]) == 2
    assert "--stage-gpus is for the text and decode stages of --disaggregate" in capsys.readouterr().err


def test_a_group_replica_the_cluster_cannot_hold_is_refused_in_one_line(ray_session):
    layout = ParallelConfig(sp=2)
    stages = build_stages(model_spec=MODEL, recaptioner="plain", policy=None, layout=layout, **WRITER)
    render = stages[1]
    assert render.constructor_kwargs["rank_bundle"] == {"CPU": 0.25}
    assert render.constructor_kwargs["placement_prefix"] == "reelforge-render-run-1-"
    assert (render.map_batches_kwargs["num_cpus"], render.map_batches_kwargs["num_gpus"]) == (0.1, 0)
    with pytest.raises(UsageError, match=r"^a render replica of 2 ranks \(sp=2 x tp=1 x cfg=1\) needs 2 GPU; "
                                         r"the Ray cluster has 0 GPU$"):
        build_stages(model_spec=MODEL, recaptioner="plain", policy=None, layout=layout, gpus_per_replica=2, **WRITER)


def test_clip_item_is_the_row_the_stages_pass_along():
    spec = ClipSpec(row=3, id="a", prompt="p", negative_prompt="", width=32, height=32, frames=8, fps=8, seed=1,
                    steps=3, guidance=4.5, mode="t2v", passthrough={"campaign": "spring"}, shots=(("p", 8),))
    item = clip_item(spec, "hash", b"ipc")
    assert (item["row"], item["id"], item["request_sha256"], item["passthrough"]) == (3, "a", "hash", b"ipc")
    assert json.loads(item["shots"]) == [["p", 8]] and item["timings"] == "{}" and item["error"] == ""


def test_render_replica_killed_mid_job_is_replaced(ray_session, tmp_path):
    import psutil

    rows = [{"id": f"clip-{i}", "prompt": f"a red square moves left {i}", "steps": 40} for i in range(8)]
    out = tmp_path / "out"
    killed = []

    def kill_one_render_replica():
        deadline = time.time() + 120
        while time.time() < deadline and not killed:
            if (out / "videos").exists() and any((out / "videos").iterdir()):
                # Ray titles an actor's process "ray::MapWorker(MapBatches(FusedUDF))…" (the render
                # replica with the light stages in it, on this CPU-only cluster)
                for proc in psutil.process_iter(["pid", "cmdline"]):
                    if "MapBatches(FusedUDF)" in " ".join(proc.info["cmdline"] or []):
                        videos_before_kill = len(list((out / "videos").iterdir()))
                        os.kill(proc.info["pid"], signal.SIGKILL)
                        killed.append(videos_before_kill)
                        return
            time.sleep(0.2)

    killer = threading.Thread(target=kill_one_render_replica)
    killer.start()
    write_manifest(rows, str(tmp_path / "m.parquet"))
    code = main(["render", str(tmp_path / "m.parquet"), "--out", str(out), "--model", MODEL, "--no-progress"])
    killer.join()
    assert killed, "no render replica was found to kill"
    # streaming: the first MP4 was in storage while later clips were still being sampled
    assert 1 <= killed[0] < len(rows)
    assert code == 0
    meta = storage.read_parquet_dataset(str(out / "metadata")).to_pylist()
    assert sorted(m["id"] for m in meta) == sorted(r["id"] for r in rows)
    assert len(list((out / "videos").iterdir())) == len(rows)
