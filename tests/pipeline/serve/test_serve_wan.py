"""`reel serve --model <Wan folder>`: the OpenAI Videos API over a tiny diffusers Wan 2.1 folder on a
real local Ray Serve, talked to with the real `openai` client: create → poll → download, our extra
fields and vLLM-Omni's names for them, and lengths on Wan's 4k+1 frame grid.

One app for the module (Serve start-up is slow on 2 cores); every render is 32x32, 5 frames, 2 steps.
"""

import dataclasses
import hashlib
import os
import socket
import warnings

import httpx2 as httpx
import openai
import pytest
import torch

from models.render_types import GridLimits, RenderRequest
from pipeline import storage
from pipeline.media.encode import probe_mp4
from pipeline.media.watermark import embed_watermark
from pipeline.serve.errors import APIError
from pipeline.serve.requests import (
    CREATE_FIELDS,
    EDIT_FIELDS,
    EXTEND_FIELDS,
    FIELD_ALIASES,
    REMIX_FIELDS,
    requested_seconds,
)
from pipeline.serve.schemas import CREATE_SCHEMA, EDIT_SCHEMA, EXTEND_SCHEMA, REMIX_SCHEMA

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the SDK marks videos.* deprecated
warnings.filterwarnings("ignore", category=DeprecationWarning)

KEY = "key-wan"
PROMPT = "a red circle moves right"
SMALL = {"size": "32x32", "seconds": "0.25"}  # 0.25 s at Wan's 16 fps: 4 frame steps, rendered as 4 + 1 = 5 frames


class WanServer:
    def __init__(self, cfg, port):
        self.cfg, self.base = cfg, f"http://127.0.0.1:{port}"

    def http(self):
        return httpx.Client(base_url=self.base, headers={"Authorization": f"Bearer {KEY}"}, timeout=30)

    def sdk(self):
        return openai.OpenAI(base_url=f"{self.base}/v1", api_key=KEY, max_retries=0)

    def metadata(self, video_id):
        table = storage.read_parquet_dataset(storage.join(self.cfg.out, "metadata", f"{video_id}.parquet"))
        return table.to_pylist()[0]


@pytest.fixture(scope="module")
def wan_server(ray_session, wan_folders, tmp_path_factory):
    from ray import serve

    from pipeline.serve.app import APP_NAME, build_app
    from pipeline.serve.config import ServeConfig, key_hash

    root = tmp_path_factory.mktemp("serve-wan")
    (root / "loras").mkdir()
    cfg = ServeConfig(model=wan_folders["wan21"], out=str(root / "out"), store=str(root / "jobs.sqlite"),
                      api_key_sha256=(key_hash(KEY),), poll_after_ms=100, graceful_shutdown_s=1,
                      lora_roots=(str(root / "loras"), "s3://adapters/loras/"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(cfg), name=APP_NAME, route_prefix="/")
    yield WanServer(cfg, port)
    serve.shutdown()


def generator_frames(folder, request):
    """What reelforge's Wan generator (equal to diffusers' WanPipeline: tests/models/wan) renders for
    `request` on one thread, as a render replica runs it, with the watermark every output carries."""
    from models.interface import load_generator

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        [out] = load_generator(folder, device="cpu").generate([request])
    finally:
        torch.set_num_threads(threads)
    return embed_watermark(out.frames)


def test_create_poll_and_download_a_wan_clip_with_the_openai_client(wan_server, wan_folders):
    client = wan_server.sdk()
    created = client.videos.create(prompt=PROMPT, **SMALL,
                                   extra_body={"seed": 11, "steps": 2, "guidance": 4.0, "negative_prompt": "blurry"})
    assert created.seconds == "0.3125"  # the 5 frames it renders, at 16 fps (a string, as OpenAI's API has it)
    video = client.videos.poll(created.id, poll_interval_ms=100)
    assert (video.status, video.progress, video.error) == ("completed", 100, None)
    assert (video.seconds, video.size, video.model) == ("0.3125", "32x32", "Tiny-wan21-Diffusers")

    mp4 = client.videos.download_content(video.id).read()
    info = probe_mp4(mp4)
    assert (info["codec"], info["width"], info["height"], info["frames"], info["fps"]) == ("h264", 32, 32, 5, 16)
    assert client.videos.download_content(video.id, variant="thumbnail").read()[:3] == b"\xff\xd8\xff"

    meta = wan_server.metadata(video.id)
    assert (meta["frames"], meta["fps"], meta["steps"], meta["guidance"], meta["seed"]) == (5, 16, 2, 4.0, 11)
    assert (meta["negative_prompt"], meta["model"]["name"]) == ("blurry", "Tiny-wan21-Diffusers")
    # every extra field reached the sampler: the frames are the Wan generator's for the same caption (the
    # prompt as written: Wan's recaptioner is verbatim) and settings, to the bit
    assert meta["caption"] == PROMPT
    expected = generator_frames(wan_folders["wan21"], RenderRequest(
        caption=meta["caption"], negative_caption="blurry", width=32, height=32, frames=5, fps=16, seed=11, steps=2,
        guidance=4.0))
    assert meta["frames_sha256"] == hashlib.sha256(expected.tobytes()).hexdigest()


def test_a_lora_extra_field_applies_an_adapter_under_the_lora_root(wan_server, wan_folders, tmp_path):
    from models.interface import LoraAdapter
    from tests.conftest import write_wan_lora

    folder, root = wan_folders["wan21"], wan_server.cfg.lora_roots[0]
    path = write_wan_lora(f"{root}/style.safetensors", folder, seed=1)
    client = wan_server.sdk()
    # one adapter as an object (the SDK sends a form: lora[uri], lora[scale]); a list goes as JSON text in a form
    created = client.videos.create(prompt=PROMPT, **SMALL, extra_body={
        "seed": 3, "steps": 2, "lora": {"uri": path, "scale": 0.6}})
    video = client.videos.poll(created.id, poll_interval_ms=100)
    assert (video.status, video.error) == ("completed", None)
    meta = wan_server.metadata(video.id)
    assert meta["lora"] == [{"uri": path, "scale": 0.6, "sha256": hashlib.sha256(open(path, "rb").read()).hexdigest()}]
    expected = generator_frames(folder, RenderRequest(caption=PROMPT, width=32, height=32, frames=5, fps=16, seed=3,
                                                      steps=2, guidance=5.0, lora=(LoraAdapter(path, 0.6),)))
    assert meta["frames_sha256"] == hashlib.sha256(expected.tobytes()).hexdigest()

    r = wan_server.http().post("/v1/videos", json={"prompt": PROMPT, **SMALL, "lora": "none.safetensors"})
    error = r.json()["error"]  # relative: under the first root
    assert (r.status_code, error["param"]) == (400, "lora")
    assert error["message"] == f"lora: file not found: {root}/none.safetensors"


def test_a_lora_outside_the_roots_is_refused_before_it_is_looked_up(wan_server, wan_folders, tmp_path):
    from tests.conftest import write_wan_lora

    root = wan_server.cfg.lora_roots[0]
    outside = write_wan_lora(tmp_path / "outside.safetensors", wan_folders["wan21"], seed=1)
    os.symlink(outside, f"{root}/link.safetensors")
    os.symlink(tmp_path, f"{root}/linked-dir")
    client = wan_server.sdk()
    for lora in (outside, f"{root}/../{os.path.basename(root)}-x/a.safetensors", "../outside.safetensors",
                 "link.safetensors", f"{root}/linked-dir/outside.safetensors", "/etc/passwd",
                 f"file://{outside}", "s3://other-bucket/loras/a.safetensors", "s3://adapters/loras/../a.safetensors",
                 "s3://adapters/loras-x/a.safetensors", "simplecache::s3://adapters/loras/a.safetensors"):
        with pytest.raises(openai.BadRequestError) as e:
            client.videos.create(prompt=PROMPT, **SMALL, extra_body={"lora": {"uri": lora, "scale": 0.5}})
        error = e.value.body
        assert (error["param"], error["code"]) == ("lora", "invalid_value"), (lora, error)
        assert "is not under a LoRA root this server allows" in error["message"] and "--lora-root" in error["message"]
        assert "\n" not in error["message"]
    inside = write_wan_lora(f"{root}/inside.safetensors", wan_folders["wan21"], seed=2)
    r = wan_server.http().post("/v1/videos", json={"prompt": PROMPT, **SMALL, "lora": [inside, outside]})
    assert (r.status_code, r.json()["error"]["param"]) == (400, "lora")  # a list: every adapter is checked
    assert r.json()["error"]["message"].startswith(f"lora: {outside} is not under a LoRA root")


def test_vllm_omni_names_are_aliases_of_ours(wan_server):
    client = wan_server.sdk()
    settings = {"seed": 5, "fps": 8}
    by_alias = client.videos.create(prompt=PROMPT, size="32x32", extra_body={
        **settings, "num_frames": 5, "num_inference_steps": 2, "guidance_scale": 1.0})
    ours = client.videos.create(prompt=PROMPT, size="32x32", extra_body={
        **settings, "frames": 5, "steps": 2, "guidance": 1.0, "num_inference_steps": "2"})  # the same value twice
    assert by_alias.seconds == ours.seconds == "0.625"  # 5 frames at 8 fps
    done = [client.videos.poll(v.id, poll_interval_ms=100) for v in (by_alias, ours)]
    assert [v.status for v in done] == ["completed", "completed"]
    alias_meta, our_meta = (wan_server.metadata(v.id) for v in done)
    assert (alias_meta["frames"], alias_meta["fps"], alias_meta["steps"], alias_meta["guidance"]) == (5, 8, 2, 1.0)
    assert alias_meta["frames_sha256"] == our_meta["frames_sha256"]  # one clip under either name


@pytest.mark.parametrize(("extra", "param", "message"), [
    ({"steps": 2, "num_inference_steps": 3}, "num_inference_steps",
     "steps=2 and num_inference_steps=3 disagree: num_inference_steps is another name for steps; give one of them"),
    ({"guidance": 5, "guidance_scale": 1.5}, "guidance_scale", "guidance=5 and guidance_scale=1.5 disagree"),
    ({"frames": 5, "num_frames": 9}, "num_frames", "frames=5 and num_frames=9 disagree"),
    ({"frames": 6}, "frames", "frames=6 is not on the model's grid; nearest allowed is 5 "
                              "(1 + a multiple of 4, from 1 to 321)"),
    ({"num_frames": 8}, "frames", "frames=8 is not on the model's grid; nearest allowed is 9"),
    ({"frames": 325}, "frames", "frames=325 is not on the model's grid; nearest allowed is 321"),
    ({"seconds": "0.3"}, "seconds", "seconds='0.3' is not a length this model renders: multiples of 0.25 s up to "
                                    "20 s (at 16 fps, 1 + 4k frames: N s renders N x 16 + 1)"),
    ({"seconds": "0.25", "frames": 5}, "frames", "give seconds or frames, not both"),
    ({"fps": 0, "frames": 5}, "fps", "fps=0 is outside"),
])
def test_conflicting_aliases_and_lengths_off_the_grid_are_refused(wan_server, extra, param, message):
    r = wan_server.http().post("/v1/videos", json={"prompt": PROMPT, "size": "32x32", **extra})
    error = r.json()["error"]
    assert (r.status_code, error["param"], error["code"]) == (400, param, "invalid_value"), error
    assert message in error["message"]


def test_an_alias_is_only_taken_where_its_field_is(wan_server):
    r = wan_server.http().post("/v1/videos/video_none/remix", json={"prompt": PROMPT, "num_frames": 5})
    assert (r.status_code, r.json()["error"]["code"]) == (400, "unknown_parameter")
    assert r.json()["error"]["message"] == "Unknown parameter: 'num_frames'."


def test_the_openapi_document_lists_the_new_fields(wan_server):
    doc = wan_server.http().get("/openapi.json").json()
    body = doc["paths"]["/v1/videos"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    for name in ("frames", "fps", "num_frames", "num_inference_steps", "guidance_scale"):
        assert name in body["properties"], name


@pytest.mark.parametrize(("schema", "fields"), [(CREATE_SCHEMA, CREATE_FIELDS), (REMIX_SCHEMA, REMIX_FIELDS),
                                                (EDIT_SCHEMA, EDIT_FIELDS), (EXTEND_SCHEMA, EXTEND_FIELDS)],
                         ids=["create", "remix", "edit", "extend"])
def test_each_schema_lists_exactly_its_endpoints_fields_and_their_aliases(schema, fields):
    aliases = {alias for alias, name in FIELD_ALIASES.items() if name in fields}
    assert set(schema["properties"]) == set(fields) | aliases


def test_a_wan_folder_is_deployed_without_reading_it_as_a_reelforge_config(wan_folders):
    from models.interface import ParallelConfig, ParallelConfigError
    from pipeline.serve.config import ServeConfig
    from pipeline.stages.replica import replica_deployment_options

    folder = wan_folders["wan21"]
    assert ServeConfig(model=folder).layout() == ParallelConfig()
    assert replica_deployment_options(folder, use_gpus=True) == {"ray_actor_options": {"num_cpus": 1.0,
                                                                                       "num_gpus": 1.0}}
    # a group replica of the folder: the replica in bundle 0, its two ranks in the others
    options = replica_deployment_options(folder, ParallelConfig(sp=2), use_gpus=True)
    assert options["placement_group_bundles"][1:] == [{"CPU": 1.0, "GPU": 1.0}] * 2
    assert ServeConfig(model=folder, sp=2).layout() == ParallelConfig(sp=2)
    too_wide = r"^parallel layout sp=1 x tp=8 x cfg=1: tp=8 must divide the "
    with pytest.raises(ParallelConfigError, match=too_wide):
        ServeConfig(model=folder, tp=8).layout()
    with pytest.raises(ParallelConfigError, match=too_wide):
        replica_deployment_options(folder, ParallelConfig(tp=8))


WAN_LIKE = GridLimits(
    size_multiple=16, min_size=16, max_size=1280, max_pixels=1280 * 720, frame_multiple=4, frame_offset=1,
    max_frames=81, window_frames=81, context_frames=0, min_fps=1, max_fps=60, max_steps=100, default_width=832,
    default_height=480, default_fps=16, default_seconds=81 / 16, default_steps=50, default_guidance=5.0)
DEFAULT_LIKE = dataclasses.replace(WAN_LIKE, frame_offset=0, max_frames=240, default_fps=8, default_seconds=2.0)


def test_seconds_on_the_frame_grid():
    # Wan: N s at 16 fps renders N x 16 + 1 frames; the length of an allowed count is taken as well
    for seconds, frames in (("5", 81), ("5.0625", 81), ("1", 17), ("0.25", 5), ("0.0625", 1), (2, 33)):
        assert WAN_LIKE.frames_for(requested_seconds(seconds, WAN_LIKE), 16) == frames, seconds
    assert requested_seconds("0.5", WAN_LIKE, fps=8) == 0.5  # 4 frame steps at 8 fps: 5 frames
    assert requested_seconds(None, WAN_LIKE) == 81 / 16
    for off_grid in ("0.125", "0.3", "5.25", "0", "-1", "nan"):
        with pytest.raises(APIError, match="multiples of 0.25 s up to 5 s"):
            requested_seconds(off_grid, WAN_LIKE)
    # the default model: multiples of a frame step, as before
    assert requested_seconds("1.5", DEFAULT_LIKE) == 1.5
    for off_grid in ("1.3", "0.125", "31"):
        with pytest.raises(APIError) as e:
            requested_seconds(off_grid, DEFAULT_LIKE)
        assert e.value.message == (f"seconds={off_grid!r} is not a length this model renders: multiples of 0.5 s "
                                   "up to 30 s (at 8 fps, frames in multiples of 4)")
