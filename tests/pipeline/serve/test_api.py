"""`reel serve`: the OpenAI Videos API on a real local Ray Serve, talked to with the real `openai`
client and plain HTTP, rendering the tiny model into a loopback S3 bucket.

One app is deployed for the module (Serve start-up is slow on 2 cores); the restart test takes it
down and deploys it again on the same job store.
"""

import io
import json
import socket
import warnings

import boto3
import httpx2 as httpx
import openai
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from pipeline import storage
from pipeline.media.encode import probe_mp4
from pipeline.serve.jobs_store import JobStore
from tests.waiting import wait_for

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the SDK marks videos.* deprecated
warnings.filterwarnings("ignore", category=DeprecationWarning)

KEY, OTHER_KEY, FUZZ_KEY = "key-alpha", "key-bravo", "key-fuzz"
QUICK = {"steps": 2}  # ~0.2 s renders of a 64x64, 2 s clip
SLOW = {"steps": 20, "size": "128x128", "seconds": "2"}  # a few seconds each: something to queue behind
PNG = b"\x89PNG\r\n\x1a\n" + b"\0" * 64


class Server:
    def __init__(self, cfg, port):
        self.cfg, self.port = cfg, port
        self.base = f"http://127.0.0.1:{port}"

    def deploy(self):
        from ray import serve

        from pipeline.serve.app import APP_NAME, build_app

        serve.run(build_app(self.cfg), name=APP_NAME, route_prefix="/")
        wait_for(lambda: self.http().get("/readyz").status_code == 200, timeout=120)

    def undeploy(self):
        from ray import serve

        from pipeline.serve.app import APP_NAME

        serve.delete(APP_NAME)

    def http(self, key=KEY):
        return httpx.Client(base_url=self.base, headers={"Authorization": f"Bearer {key}"} if key else {}, timeout=30)

    def sdk(self, key=KEY):
        return openai.OpenAI(base_url=f"{self.base}/v1", api_key=key, max_retries=0)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(ray_session, s3_server, tmp_path_factory):
    from ray import serve

    from pipeline.serve.config import ServeConfig, key_hash

    bucket = "serve-test"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=bucket)
    cfg = ServeConfig(
        model="tiny", out=f"s3://{bucket}/online", store=str(tmp_path_factory.mktemp("serve") / "jobs.sqlite"),
        api_key_sha256=tuple(key_hash(k) for k in (KEY, OTHER_KEY, FUZZ_KEY)), max_queued=4,
        max_inflight_per_key=3, max_upload_bytes=64 << 10, poll_after_ms=100, graceful_shutdown_s=1,
    )
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    srv = Server(cfg, port)
    srv.deploy()
    yield srv
    serve.shutdown()


def create(srv, key=KEY, **fields):
    r = srv.http(key).post("/v1/videos", json={"prompt": "a red ball moves right", **QUICK, **fields})
    assert r.status_code == 200, r.text
    return r.json()


def wait_done(srv, video_id, key=KEY, timeout=90):
    out = {}

    def done():
        out.update(srv.http(key).get(f"/v1/videos/{video_id}").json())
        return out["status"] in ("completed", "failed")

    wait_for(done, timeout=timeout, interval=0.2)
    return out


def metadata(srv, video_id):
    table = storage.read_parquet_dataset(storage.join(srv.cfg.out, "metadata", f"{video_id}.parquet"))
    return table.to_pylist()[0] if table is not None else None


def metric(text, name):
    return float(next(line.split()[-1] for line in text.splitlines() if line.startswith(name + " ")))


def test_create_poll_and_download_with_the_openai_client(server):
    client = server.sdk()
    video = client.videos.create_and_poll(prompt="a blue square drifts left", seconds="1", size="96x64",
                                          extra_body={"seed": 7, "steps": 3, "negative_prompt": "blur"},
                                          poll_interval_ms=100)
    assert (video.object, video.status, video.progress, video.error) == ("video", "completed", 100, None)
    assert (video.seconds, video.size, video.model, video.prompt) == ("1", "96x64", "reelforge-tiny",
                                                                       "a blue square drifts left")
    assert video.completed_at >= video.created_at and video.expires_at is None and video.id.startswith("video_")

    info = probe_mp4(client.videos.download_content(video.id).read())
    assert (info["codec"], info["width"], info["height"], info["frames"]) == ("h264", 96, 64, 8)
    assert info["duration"] == pytest.approx(1.0, abs=0.01)
    assert client.videos.download_content(video.id, variant="thumbnail").read()[:3] == b"\xff\xd8\xff"
    from PIL import Image

    sheet = Image.open(io.BytesIO(client.videos.download_content(video.id, variant="spritesheet").read()))
    assert (sheet.format, sheet.size) == ("JPEG", (4 * 96 + 3 * 2, 2 * 64 + 2))  # 8 frames: 2 rows of 4

    # the batch layout, the same metadata row `reel render` writes
    meta = metadata(server, video.id)
    assert (meta["seed"], meta["steps"], meta["negative_prompt"], meta["frames"]) == (7, 3, "blur", 8)
    assert meta["video_uri"] == storage.join(server.cfg.out, "videos", f"{video.id}.mp4")
    assert storage.exists(storage.join(server.cfg.out, "thumbnails", f"{video.id}.jpg"))


def test_a_cached_request_skips_steps(server):
    """The step cache through `reel serve`: the request's `step_cache` reaches the replica's generator, the
    clip's metadata records the threshold and the steps that ran every block; a bad threshold is a 400."""
    client = server.sdk()
    video = client.videos.create_and_poll(prompt="a green triangle grows", size="64x64", poll_interval_ms=100,
                                          extra_body={"seed": 3, "steps": 8, "step_cache": 0.5})
    assert video.status == "completed"
    meta = metadata(server, video.id)
    assert meta["step_cache"] == 0.5 and 1 <= meta["steps_computed"] < meta["steps"] == 8
    r = server.http().post("/v1/videos", json={"prompt": "x", "step_cache": -1})
    assert (r.status_code, r.json()["error"]["param"]) == (400, "step_cache"), r.text


def test_json_body_poll_header_and_validation_errors(server):
    http = server.http()
    r = http.post("/v1/videos", json={"prompt": "a green triangle", "seconds": "2", "size": "64x64", **QUICK})
    assert r.status_code == 200 and r.headers["openai-poll-after-ms"] == "100"
    assert r.json()["status"] in ("queued", "in_progress") and r.json()["seconds"] == "2"
    assert wait_done(server, r.json()["id"])["status"] == "completed"

    for body, param, words in [
        ({"prompt": "x", "size": "70x64"}, "size", "nearest allowed is 72"),
        ({"prompt": "x", "size": "big"}, "size", "WIDTHxHEIGHT"),
        ({"prompt": "x", "seconds": "3.3"}, "seconds", "multiples of 0.5 s up to 30 s"),
        ({"prompt": "x", "seconds": "40"}, "seconds", "up to 30 s"),
        ({"prompt": "x", "steps": 500}, "steps", "steps=500 is outside 1..50"),
        ({"prompt": "x", "seed": 1.5}, "seed", "whole number"),
        ({"prompt": "x", "model": "sora-2"}, "model", "serves 'reelforge-tiny'"),
        ({"prompt": "x", "fps": 99}, "fps", "fps=99 is outside 1..30"),
        ({"prompt": "x", "duration": 2}, "duration", "Unknown parameter"),
        ({"size": "64x64"}, "prompt", "prompt is required"),
    ]:
        r = http.post("/v1/videos", json=body)
        error = r.json()["error"]
        assert (r.status_code, error["param"], error["type"]) == (400, param, "invalid_request_error"), body
        assert words in error["message"], (body, error)
    r = http.post("/v1/videos", content=b"{not json", headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    with pytest.raises(openai.NotFoundError):
        server.sdk().videos.retrieve("video_doesnotexist")


def test_list_pages_and_delete(server):
    client, http = server.sdk(OTHER_KEY), server.http(OTHER_KEY)
    ids = [create(server, OTHER_KEY, prompt=f"clip {i}")["id"] for i in range(3)]
    for video_id in ids:
        assert wait_done(server, video_id, OTHER_KEY)["status"] == "completed"

    first = http.get("/v1/videos", params={"limit": 2, "order": "asc"}).json()
    assert (first["object"], [v["id"] for v in first["data"]], first["has_more"]) == ("list", ids[:2], True)
    assert (first["first_id"], first["last_id"]) == (ids[0], ids[1])
    second = http.get("/v1/videos", params={"limit": 2, "order": "asc", "after": first["last_id"]}).json()
    assert ([v["id"] for v in second["data"]], second["has_more"], second["last_id"]) == ([ids[2]], False, ids[2])
    assert [v.id for v in client.videos.list(limit=2)] == ids[::-1]  # the SDK follows pages; newest first
    assert http.get("/v1/videos", params={"limit": 0}).status_code == 400
    assert http.get("/v1/videos", params={"after": "video_nope"}).status_code == 400
    with pytest.raises(openai.NotFoundError):  # one key's videos are invisible to another's
        server.sdk(KEY).videos.retrieve(ids[0])

    deleted = client.videos.delete(ids[0])
    assert (deleted.id, deleted.object, deleted.deleted) == (ids[0], "video.deleted", True)
    with pytest.raises(openai.NotFoundError):
        client.videos.retrieve(ids[0])
    assert metadata(server, ids[0]) is None
    assert not storage.exists(storage.join(server.cfg.out, "videos", f"{ids[0]}.mp4"))
    assert [v.id for v in client.videos.list()] == ids[:0:-1]


def test_auth_health_and_metrics(server):
    with pytest.raises(openai.AuthenticationError):
        server.sdk("wrong-key").videos.list()
    for key in (None, "wrong-key"):
        r = server.http(key).get("/v1/videos")
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert server.http(None).get("/metrics").status_code == 401
    assert server.http(None).get("/healthz").status_code == 200
    assert server.http(None).get("/readyz").json() == {"status": "ready"}
    text = server.http().get("/metrics").text
    assert 'reel_http_requests_total{method="GET",route="/v1/videos",status="401"}' in text
    assert 'reel_http_requests_total{method="POST",route="/v1/videos",status="200"}' in text
    for name in ("reel_queue_depth", "reel_render_seconds_count", "reel_render_failures_total"):
        assert name in text


def mp4_frames(data):
    """The frames of an MP4 as uint8 (T, H, W, 3)."""
    import av
    import numpy as np

    with av.open(io.BytesIO(data)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def test_image_to_video_from_an_upload_and_a_data_url(server, png):
    import base64

    import numpy as np

    client = server.sdk()
    orange = png(96, 64, (230, 120, 20))
    video = client.videos.create_and_poll(prompt="the ball starts moving", seconds="1",  # no size: the image's
                                          input_reference=("ref.png", orange, "image/png"),
                                          extra_body={"steps": 2}, poll_interval_ms=100)
    assert (video.status, video.size, video.seconds) == ("completed", "96x64", "1")
    frames = mp4_frames(client.videos.download_content(video.id).read())
    assert frames.shape == (8, 64, 96, 3)
    assert np.abs(frames[0].astype(int) - [230, 120, 20]).mean() < 6  # frame 0 is the image (through H.264)
    meta = metadata(server, video.id)
    assert meta["mode"] == "i2v"
    assert meta["inputs"]["image"].startswith(storage.join(server.cfg.out, "inputs", video.id))

    url = "data:image/png;base64," + base64.b64encode(png(300, 200, (20, 40, 200))).decode()
    r = server.http().post("/v1/videos", json={"prompt": "a blue field", "size": "64x64", "seconds": "1",
                                               "input_reference": {"image_url": url}, **QUICK})
    assert r.status_code == 200, r.text
    done = wait_done(server, r.json()["id"])
    assert (done["status"], done["size"]) == ("completed", "64x64")
    first = mp4_frames(server.sdk().videos.download_content(done["id"]).read())[0]
    assert np.abs(first.astype(int) - [20, 40, 200]).mean() < 6  # 300x200 cropped to the middle, resized

    client.videos.delete(video.id)  # the upload goes with the video
    assert not storage.exists(meta["inputs"]["image"])


def test_remix_edit_and_extend_a_stored_or_uploaded_video(server):
    import numpy as np

    client, http = server.sdk(), server.http()
    source = client.videos.create_and_poll(prompt="a red ball moves right", seconds="1", size="64x64",
                                           extra_body={"steps": 2, "seed": 3}, poll_interval_ms=100)
    mp4 = client.videos.download_content(source.id).read()
    source_frames = mp4_frames(mp4)

    remix = client.videos.remix(source.id, prompt="a red ball moves right on a green floor",
                                extra_body={"steps": 2, "strength": 0.6})
    assert remix.remixed_from_video_id == source.id
    remix = client.videos.poll(remix.id, poll_interval_ms=100)
    assert (remix.status, remix.size, remix.seconds) == ("completed", "64x64", "1")
    assert metadata(server, remix.id)["mode"] == "remix"
    assert mp4_frames(client.videos.download_content(remix.id).read()).shape == source_frames.shape

    # an edit at strength 0 keeps the video (one more watermark and H.264 pass: unrelated clips differ by ~30+)
    r = http.post("/v1/videos/edits", json={"prompt": "the same", "video": {"id": source.id}, "strength": 0})
    assert r.status_code == 200 and r.json()["remixed_from_video_id"] == source.id
    kept = mp4_frames(client.videos.download_content(wait_done(server, r.json()["id"])["id"]).read())
    assert kept.shape == source_frames.shape and np.abs(kept.astype(int) - source_frames).mean() < 6

    # the SDK uploads the clip (multipart); the result is the clip plus the new second
    longer = client.videos.extend(prompt="and then it keeps rolling", seconds="1",
                                  video=("clip.mp4", mp4, "video/mp4"), extra_body={"steps": 2})
    assert longer.seconds == "2" and longer.remixed_from_video_id is None
    longer = client.videos.poll(longer.id, poll_interval_ms=100)
    assert (longer.status, longer.seconds) == ("completed", "2")
    frames = mp4_frames(client.videos.download_content(longer.id).read())
    assert frames.shape == (16, 64, 64, 3)
    assert np.abs(frames[:8].astype(int) - source_frames).mean() < 6  # the clip itself opens it
    meta = metadata(server, longer.id)
    assert (meta["mode"], meta["direction"]) == ("extend", "forward")

    r = http.post("/v1/videos/extensions", json={"prompt": "before that", "seconds": "1", "video": {"id": source.id},
                                                 "direction": "backward", "extension_only": True, **QUICK})
    assert r.status_code == 200 and r.json()["seconds"] == "1"
    done = wait_done(server, r.json()["id"])
    assert (done["status"], done["seconds"]) == ("completed", "1")
    assert probe_mp4(client.videos.download_content(done["id"]).read())["frames"] == 8


def test_lora_on_a_server_without_lora_roots_is_refused(server):
    with pytest.raises(openai.BadRequestError) as e:
        server.sdk().videos.create(prompt="p", extra_body={"lora": "/etc/passwd"})
    assert (e.value.status_code, e.value.body["param"]) == (400, "lora")
    assert e.value.body["message"] == ("lora: this server takes no LoRA adapters; start reel serve with --lora-root "
                                       "URI (REELFORGE_LORA_ROOTS) naming where adapters may come from")


def test_mode_requests_are_checked_before_they_are_queued(server):
    client, http = server.sdk(), server.http()
    with pytest.raises(openai.BadRequestError) as e:
        client.videos.create(prompt="p", input_reference=("ref.txt", b"hello", "text/plain"))
    assert e.value.body["code"] == "invalid_image_format"
    with pytest.raises(openai.BadRequestError) as e:  # a PNG signature, then nothing decodable
        client.videos.create(prompt="p", input_reference=("ref.png", PNG, "image/png"))
    assert e.value.body["code"] == "invalid_image_format" and "the image is not a PNG" in e.value.body["message"]
    for padding, code in ((80 << 10, "file_too_large"), (400 << 10, "request_too_large")):  # limit: 64 KiB
        r = http.post("/v1/videos", files={"input_reference": ("big.png", PNG + b"\0" * padding, "image/png")},
                      data={"prompt": "p"})
        assert (r.status_code, r.json()["error"]["code"]) == (413, code)
    for reference, code, words in [
        ({"image_url": "data:image/png;base64,aGk="}, "invalid_image_format", "PNG, JPEG or WebP"),
        ({"image_url": "http://127.0.0.1:9/a.png"}, "invalid_url", "private or local address"),
        ({"image_url": "ftp://example.com/a.png"}, None, "http(s) URL"),
        ({"file_id": "file_123"}, "unsupported_value", "no Files API"),
    ]:
        r = http.post("/v1/videos", json={"prompt": "p", "input_reference": reference})
        error = r.json()["error"]
        assert (r.status_code, error["code"], error["param"]) == (400, code, "input_reference"), error
        assert words in error["message"]

    done = client.videos.retrieve(wait_done(server, create(server)["id"])["id"])
    with pytest.raises(openai.NotFoundError):
        client.videos.remix("video_nope", prompt="x")
    with pytest.raises(openai.BadRequestError) as e:
        client.videos.edit(prompt="brighter", video=("clip.mp4", b"not an mp4 at all", "video/mp4"))
    assert e.value.body["code"] == "invalid_video_format"
    with pytest.raises(openai.BadRequestError) as e:  # an MP4 box, then nothing ffmpeg can read
        client.videos.edit(prompt="brighter", video=("clip.mp4", b"\0\0\0\x18ftypisom" + b"\0" * 64, "video/mp4"))
    assert e.value.body["code"] == "invalid_video_format" and "not a readable video" in e.value.body["message"]
    for path, body, status, param, code in [
        ("/v1/videos/extensions", {"prompt": "and then", "video": {"id": done.id}}, 400, "seconds", None),
        ("/v1/videos/extensions", {"prompt": "and then", "seconds": "3.3", "video": {"id": done.id}}, 400,
         "seconds", "invalid_value"),
        ("/v1/videos/extensions", {"prompt": "and then", "seconds": "1", "video": {"id": done.id},
                                   "direction": "sideways"}, 400, "direction", "invalid_value"),
        ("/v1/videos/edits", {"prompt": "brighter", "video": {"id": done.id}, "strength": 2}, 400, "strength",
         "invalid_value"),
        ("/v1/videos/edits", {"prompt": "brighter", "video": {"id": "video_nope"}}, 404, "video", "not_found"),
        ("/v1/videos/edits", {"prompt": "brighter"}, 400, "video", None),
        (f"/v1/videos/{done.id}/remix", {"prompt": "x", "fps": 3}, 400, "fps", "unknown_parameter"),
        ("/v1/videos", {"prompt": "x", "seconds": "2", "shots": [{"prompt": "a", "seconds": 1}]}, 400, "shots", None),
    ]:
        r = http.post(path, json=body)
        error = r.json()["error"]
        assert (r.status_code, error["param"], error["code"]) == (status, param, code), (path, body, error)
    r = http.post("/v1/videos/characters", files={"video": ("c.mp4", b"\0\0\0\x18ftypisom", "video/mp4")},
                  data={"name": "Ava"})
    assert (r.status_code, r.json()["error"]["code"]) == (400, "mode_not_available")


def test_a_storyboard_and_a_refused_prompt(server):
    http = server.http()
    r = http.post("/v1/videos", json={"prompt": "two shots", "size": "64x64", "shots": [
        {"prompt": "a red ball moves right", "seconds": 1}, {"prompt": "the ball turns blue", "seconds": 1}], **QUICK})
    assert r.status_code == 200 and r.json()["seconds"] == "2"
    assert wait_done(server, r.json()["id"])["status"] == "completed"
    assert metadata(server, r.json()["id"])["mode"] == "storyboard"

    r = http.post("/v1/videos", json={"prompt": "a red circle dripping with gore", **QUICK})
    assert r.status_code == 200  # the gate runs where the caption is made, as in the batch job
    failed = wait_done(server, r.json()["id"])
    assert (failed["status"], failed["error"]["code"]) == ("failed", "moderation_blocked")
    assert failed["error"]["message"].startswith("blocked by policy: ")


def test_an_accepted_job_survives_a_restart_and_renders_once(server):
    http = server.http()
    done = [v for v in server.sdk().videos.list().data if v.status == "completed"][0]
    before = metadata(server, done.id)
    ids = [create(server, prompt=f"restart {i}", **SLOW)["id"] for i in range(3)]
    doomed = create(server, OTHER_KEY, prompt="restart 3")["id"]
    wait_for(lambda: http.get(f"/v1/videos/{ids[0]}").json()["status"] == "in_progress", timeout=30)
    server.undeploy()  # mid-queue: one rendering, the others queued (Serve itself stays up)

    store = JobStore(server.cfg.store_path)
    try:
        assert {store.get(i).status for i in ids[1:]} <= {"queued", "in_progress"}
        assert store.get(doomed).status == "queued"
        rendered_before = {i: metadata(server, i) for i in ids}
        # A job whose render finished but whose completion was never recorded (the app died in between):
        store.update(done.id, status="in_progress", progress=40, completed_at=None)
        # A job the model will refuse when it gets to it (its stored request no longer on the grid):
        spec = store.get(doomed).spec
        store.update(doomed, spec=json.dumps({**spec, "width": 70}))
    finally:
        store.close()
        server.deploy()
    for video_id in ids + [done.id]:
        assert wait_done(server, video_id, timeout=120)["status"] == "completed"
        info = probe_mp4(server.sdk().videos.download_content(video_id).read())
        assert info["frames"] > 0
    for video_id, meta in [(done.id, before)] + [(i, m) for i, m in rendered_before.items() if m]:
        assert metadata(server, video_id)["created_at"] == meta["created_at"]  # not rendered again
    failed = wait_done(server, doomed, OTHER_KEY)
    assert (failed["status"], failed["error"]["code"]) == ("failed", "render_failed")
    assert "width=70" in failed["error"]["message"]
    text = http.get("/metrics").text
    # at least `done`; also the first job if it was stored during the shutdown but not recorded
    assert metric(text, 'reel_renders_total{outcome="already_rendered"}') >= 1
    assert metric(text, "reel_render_failures_total") == 1
    r = server.http(OTHER_KEY).get(f"/v1/videos/{doomed}/content")
    assert (r.status_code, r.json()["error"]["code"]) == (400, "video_not_ready")
    assert metadata(server, ids[-1])["run_id"] != before["run_id"]  # rendered by the new deployment


def test_full_queue_and_per_key_limit_answer_429(server):
    a, b, c = server.http(KEY), server.http(OTHER_KEY), server.http(FUZZ_KEY)
    body = {"prompt": "a slow one", **SLOW}
    taken = [a.post("/v1/videos", json=body).json()["id"] for _ in range(3)]
    wait_for(lambda: a.get(f"/v1/videos/{taken[0]}").json()["status"] == "in_progress", timeout=30)
    r = a.post("/v1/videos", json=body)  # the key's 4th in flight
    assert r.status_code == 429 and int(r.headers["Retry-After"]) >= 1
    assert (r.json()["error"]["code"], r.json()["error"]["type"]) == ("rate_limit_exceeded", "requests")
    assert "this API key already has 3" in r.json()["error"]["message"]
    taken += [b.post("/v1/videos", json=body).json()["id"] for _ in range(2)]  # 2 + 2 queued: full
    r = c.post("/v1/videos", json=body)
    assert r.status_code == 429 and "queue is full" in r.json()["error"]["message"]
    with pytest.raises(openai.RateLimitError):
        server.sdk(FUZZ_KEY).videos.create(prompt="p")
    assert 'reel_rejections_total{reason="queue"}' in a.get("/metrics").text
    for video_id, client in zip(taken, [a] * 3 + [b] * 2):  # cancel: the queue drains at once
        assert client.delete(f"/v1/videos/{video_id}").json()["deleted"] is True
    assert c.post("/v1/videos", json={"prompt": "after the drain", **QUICK}).status_code == 200


# --------------------------------------------------------------------------------------------
# A short bounded fuzz run over the OpenAPI document the app publishes: nothing answers 5xx.


def test_fuzz_no_server_errors(server):
    document = server.http(FUZZ_KEY).get("/openapi.json").json()
    headers = {"Authorization": f"Bearer {FUZZ_KEY}"}
    calls = []
    for result in schemathesis.openapi.from_dict(document).get_all_operations():
        operation = result.ok()

        @given(case=operation.as_strategy())
        @settings(max_examples=6, deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))
        def check(case):
            case.headers = {**(case.headers or {}), **headers}  # the generated bearer value is never a key
            response = case.call(base_url=server.base, timeout=30)
            calls.append(response.status_code)
            assert response.status_code < 500, (case.method, case.path, response.status_code, response.text[:300])
            if response.status_code >= 400:
                assert set(response.json()["error"]) == {"message", "type", "param", "code"}

        check()
    assert len(calls) >= 30 and any(c >= 400 for c in calls)
