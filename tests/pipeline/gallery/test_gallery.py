"""The review gallery in a real headless Chromium (Debian's chromium, driven by Playwright) over a real
uvicorn server: one OUT of 4 clips written by the real writer (ClipWriter: watermark, H.264 / FFV1 /
PNG, thumbnails, metadata with a campaign's pass-through columns) plus a failed row in errors/."""

from __future__ import annotations

import json
import shutil
import threading
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import requests

from pipeline import storage
from pipeline.batch.driver import ERRORS_SCHEMA
from pipeline.cli import main as reel
from pipeline.gallery.app import build_app, is_loopback
from pipeline.gallery.reviews import append_verdict, latest_verdicts
from pipeline.stages.metadata import passthrough_bytes
from pipeline.stages.write import ClipWriter

MODEL = {"name": "default", "version": "0.5.0", "weights_sha256": "ab" * 32}
PASSTHROUGH = pa.schema([("placement", pa.string()), ("aspect", pa.string()), ("variant", pa.string())])
# (id, mode, codec, placement): two H.264 clips, an FFV1 master and a still
CLIPS = [("spring-a", "t2v", "h264", "feed"), ("spring-b", "t2v", "h264", "feed"),
         ("spring-c", "t2v", "ffv1", "story"), ("spring-d", "image", "h264", "banner")]
CHROMIUM = shutil.which("chromium")
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium on PATH (apt-get install "
                                                              "chromium; .ci/run installs it)")


def moving_square(seed: int, frames: int = 8, size: int = 32) -> np.ndarray:
    """A coloured square crossing a gradient: frames that differ, so a spritesheet and playback show motion."""
    rng = np.random.default_rng(seed)
    clip = np.zeros((frames, size, size, 3), np.uint8)
    clip[..., 2] = np.linspace(40, 200, size, dtype=np.uint8)[None, :, None]
    colour = rng.integers(80, 255, 3)
    for t in range(frames):
        x = t * (size - 8) // max(1, frames - 1)
        clip[t, 12:20, x:x + 8] = colour
    return clip


def write_run(out: str, clips=CLIPS) -> None:
    for i, (clip_id, mode, codec, placement) in enumerate(clips):
        row = {"id": clip_id, "row": i, "prompt": f"a red ball moves right ({placement})", "negative_prompt": "",
               "caption": f"a red ball moves right, clip {i}", "recaptioner": "shapes", "mode": mode, "seed": 100 + i,
               "fps": 8, "steps": 2, "guidance": 3.0, "request_sha256": f"{i:064x}",
               "timings": json.dumps({"sample": 0.5}),
               "passthrough": passthrough_bytes({"placement": placement, "aspect": "1:1", "variant": f"v{i}"},
                                                PASSTHROUGH)}
        frames = moving_square(i)[:1] if mode == "image" else moving_square(i)
        ClipWriter(out, MODEL, "run-1", c2pa=None, codec=codec).write(row, frames)
    failed = [{"row": len(clips), "id": "spring-e", "stage": "validate", "reason": "width 30 is not a multiple of 8",
               "run_id": "run-1"}]
    storage.write_parquet_atomic(storage.join(out, "errors", "errors.parquet"),
                                 pa.Table.from_pylist(failed, schema=ERRORS_SCHEMA))


class Server:
    """A real uvicorn server for an app on a free loopback port, in a thread."""

    def __init__(self, app):
        import uvicorn

        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            assert time.time() < deadline and self.thread.is_alive(), "the gallery server did not start"
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{self.server.servers[0].sockets[0].getsockname()[1]}/"

    def stop(self):
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("gallery") / "renders")
    write_run(out)
    return out


@pytest.fixture(scope="module")
def server(out):
    server = Server(build_app(out))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None:
        pytest.skip("needs Debian's chromium on PATH (apt-get install chromium; .ci/run installs it)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield browser
        browser.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    page = context.new_page()
    yield page
    context.close()


def clip_ids(page, selector=".clip[data-clip-id]"):
    return [el.get_attribute("data-clip-id") for el in page.query_selector_all(selector)]


def wait_playing(page):
    """The panel's video reaches readyState 2 (current data) and its clock advances."""
    page.wait_for_function("() => { const v = document.querySelector('#panel video'); return v && v.readyState >= 2 }",
                           timeout=15000)
    start = page.evaluate("document.querySelector('#panel video').currentTime")
    page.wait_for_function(f"() => document.querySelector('#panel video').currentTime > {start} + 0.2", timeout=15000)


@needs_chromium
def test_page_shows_every_clip_filters_groups_and_scrubs(page, server):
    page.goto(server.url)
    assert sorted(clip_ids(page)) == [c[0] for c in CLIPS]
    assert page.locator("#failed tr.failed-row").count() == 1
    assert "width 30 is not a multiple of 8" in page.inner_text("#failed")
    counts = {el.get_attribute("data-value"): el.inner_text()
              for el in page.query_selector_all('[data-facet-count="columns.placement"]')}
    assert counts == {"feed": "2", "story": "1", "banner": "1"}
    assert page.locator('[data-facet="columns.variant"]').count() == 0  # one value per clip: panel only
    page.check('input[data-facet="columns.placement"][value="feed"]')
    assert clip_ids(page, ".clip:not([hidden])") == ["spring-a", "spring-b"]
    assert page.inner_text("#shown-count") == "2"
    page.check('input[data-facet="mode"][value="image"]')  # AND across facets: nothing is a feed still
    assert clip_ids(page, ".clip:not([hidden])") == []
    page.uncheck('input[data-facet="columns.placement"][value="feed"]')
    assert clip_ids(page, ".clip:not([hidden])") == ["spring-d"]
    page.uncheck('input[data-facet="mode"][value="image"]')
    page.select_option("#group-by", "columns.placement")
    assert page.locator(".group-head").all_inner_texts() == ["feed 2", "story 1", "banner 1"]
    # hover scrubs the spritesheet (made from the video on first use)
    frame = page.locator('[data-clip-id="spring-b"] .frame')
    box = frame.bounding_box()
    with page.expect_response(lambda r: "/files/gallery/sprites/spring-b.jpg" in r.url) as sprite:
        page.mouse.move(box["x"] + box["width"] * 0.9, box["y"] + box["height"] / 2)
    assert sprite.value.status == 200 and sprite.value.headers["content-type"] == "image/jpeg"
    assert page.get_attribute('[data-clip-id="spring-b"]', "data-scrub-tile") == "7"  # the last of 4x2 tiles


@needs_chromium
def test_keyboard_verdicts_survive_a_reload_and_export(page, server, out, tmp_path):
    page.goto(server.url)
    page.click('[data-clip-id="spring-a"]')
    page.keyboard.press("a")
    page.wait_for_selector('[data-clip-id="spring-a"][data-review="approved"]')
    page.keyboard.press("j")
    page.keyboard.press("r")
    page.wait_for_selector('[data-clip-id="spring-b"][data-review="rejected"]')
    page.keyboard.press("k")
    page.keyboard.press("n")
    page.keyboard.type("hero shot")
    page.keyboard.press("Enter")
    page.wait_for_function("() => document.querySelector('#panel textarea').value === 'hero shot'")
    page.wait_for_function("() => document.getElementById('approved-count').textContent === '1'")
    page.reload()
    states = {el.get_attribute("data-clip-id"): el.get_attribute("data-review")
              for el in page.query_selector_all(".clip")}
    assert states == {"spring-a": "approved", "spring-b": "rejected", "spring-c": "none", "spring-d": "none"}
    assert latest_verdicts(out)["spring-a"]["note"] == "hero shot"

    picks = str(tmp_path / "picks.parquet")
    assert reel(["campaign", "export", out, "--approved", "--out", picks]) == 0
    table = pq.read_table(picks)
    assert table.column("id").to_pylist() == ["spring-a"]
    row = table.to_pylist()[0]
    assert (row["seed"], row["frames"], row["width"], row["steps"], row["placement"]) == (100, 8, 32, 2, "feed")
    from pipeline.batch.manifest import read_manifest

    assert read_manifest(picks).column("prompt").to_pylist() == ["a red ball moves right (feed)"]


@needs_chromium
def test_a_clip_plays_with_range_requests(page, server):
    page.goto(server.url)
    page.click('[data-clip-id="spring-a"]')
    wait_playing(page)
    page.wait_for_function("() => document.getElementById('provenance').textContent.includes('watermark found')",
                           timeout=30000)
    whole = requests.get(server.url + "files/videos/spring-a.mp4").content
    part = requests.get(server.url + "files/videos/spring-a.mp4", headers={"Range": "bytes=100-199"})
    assert part.status_code == 206 and part.content == whole[100:200]
    assert part.headers["content-range"] == f"bytes 100-199/{len(whole)}"
    page.click('[data-clip-id="spring-c"]')  # an FFV1 master: its poster and a download link, no player
    assert page.locator("#panel video").count() == 0 and "FFV1" in page.inner_text("#panel")


@needs_chromium
def test_static_page_opens_from_file_url(page, out):
    assert reel(["gallery", out, "--static"]) == 0
    page.goto(f"file://{out}/gallery/index.html")
    assert sorted(clip_ids(page)) == [c[0] for c in CLIPS]
    assert page.locator(".actions button").count() == 0 and page.locator("#reviewer").count() == 0
    page.click('[data-clip-id="spring-b"]')
    wait_playing(page)
    page.keyboard.press("a")  # read-only: keys review nothing
    assert page.get_attribute('[data-clip-id="spring-b"]', "data-review") in ("none", "rejected")
    assert storage.exists(storage.join(out, "gallery", "sprites", "spring-c.jpg"))  # from the FFV1 master


def test_two_reviewers_at_once_lose_no_verdict(tmp_path):
    out = str(tmp_path)

    def reviewer(name):
        for i in range(20):
            append_verdict(out, f"clip-{i % 5}", "approved" if name == "ann" else "rejected", f"{name} {i}", name)

    threads = [threading.Thread(target=reviewer, args=(name,)) for name in ("ann", "bob")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    table = storage.read_parquet_dataset(storage.join(out, "reviews"))
    assert table.num_rows == 40 and len(storage.list_names(storage.join(out, "reviews"))) == 40
    append_verdict(out, "clip-0", "none", "second look", "cy")
    assert latest_verdicts(out)["clip-0"]["verdict"] == "none"


def test_s3_out_serves(bucket):
    out = f"s3://{bucket}/renders/spring"
    write_run(out, CLIPS[:2])
    server = Server(build_app(out))
    try:
        html = requests.get(server.url).text
        assert html.count('<figure class="clip"') == 2
        whole = storage.read_bytes(f"{out}/videos/spring-b.mp4")
        part = requests.get(server.url + "files/videos/spring-b.mp4", headers={"Range": "bytes=-64"})
        assert part.status_code == 206 and part.content == whole[-64:]
        verdict = requests.post(server.url + "api/reviews", json={"id": "spring-b", "verdict": "approved"})
        assert verdict.status_code == 200
        assert 'data-clip-id="spring-b" data-review="approved"' in requests.get(server.url).text
        assert requests.post(server.url + "api/reviews", json={"id": "nope", "verdict": "approved"}).status_code == 404
        assert requests.post(server.url + "api/reviews", json={"id": "spring-b", "verdict": "maybe"}).status_code == 400
        cross_site = requests.post(server.url + "api/reviews", data='{"id": "spring-b", "verdict": "rejected"}',
                                   headers={"Content-Type": "text/plain"})
        assert cross_site.status_code == 415
        assert storage.list_names(f"{out}/reviews")
    finally:
        server.stop()


def test_off_loopback_needs_a_key_through_the_login_form(out, monkeypatch, capsys):
    from pipeline.serve.config import key_hash

    assert is_loopback("127.0.0.1") and is_loopback("::1") and not is_loopback("0.0.0.0")
    monkeypatch.delenv("REEL_API_KEYS", raising=False)
    monkeypatch.delenv("REELFORGE_API_KEY_FILE", raising=False)
    assert reel(["gallery", out, "--host", "0.0.0.0"]) == 2  # no key: refused before listening
    assert reel(["gallery", out + "-missing", "--static"]) == 2  # no run there: one line, exit 2
    assert capsys.readouterr().err.splitlines()[-1].startswith("reel gallery: no rendered clips under")
    server = Server(build_app(out, api_key_sha256=(key_hash("sk-team"),)))
    try:
        s = requests.Session()
        first = s.get(server.url)
        assert first.url.endswith("/login") and 'type="password"' in first.text  # redirected to the form
        assert s.get(server.url + "api/clips").status_code == 401
        assert s.post(server.url + "login", data={"key": "wrong"}).status_code == 401
        answer = s.post(server.url + "login", data={"key": "sk-team"}, allow_redirects=False)
        assert answer.status_code == 303 and "sk-team" not in answer.headers["location"]
        cookie = answer.headers["set-cookie"]
        assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "sk-team" not in cookie
        assert s.get(server.url).text.count('<figure class="clip"') == len(CLIPS)
        bearer = requests.get(server.url + "api/clips", headers={"Authorization": "Bearer sk-team"})
        assert bearer.status_code == 200 and len(bearer.json()) == len(CLIPS)
    finally:
        server.stop()


def test_cached_datasets_read_what_the_folder_holds(tmp_path):
    """A reload reads only new or changed files, and still equals a fresh read: added, rewritten, deleted."""
    from pipeline.gallery.datasets import CachedDatasets

    folder = str(tmp_path / "reviews")
    cache = CachedDatasets()
    assert cache.read(folder) is None
    first = append_verdict(str(tmp_path), "clip-a", "approved")
    append_verdict(str(tmp_path), "clip-b", "rejected")
    assert cache.read(folder).equals(storage.read_parquet_dataset(folder))
    names = storage.list_names(folder)
    storage.write_parquet_atomic(storage.join(folder, names[0]), pa.Table.from_pylist(
        [{**first, "verdict": "none", "note": "rewritten"}], schema=storage.read_parquet_dataset(folder).schema))
    storage.delete(storage.join(folder, names[1]))
    append_verdict(str(tmp_path), "clip-c", "approved")
    assert cache.read(folder).equals(storage.read_parquet_dataset(folder))
    assert sorted(cache.read(folder).column("note").to_pylist()) == ["", "rewritten"]
