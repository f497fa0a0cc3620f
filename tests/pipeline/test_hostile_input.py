"""Bad input, the whole list (issue 23): hostile manifest rows and API requests, each refused with a
one-line reason while the good ones render, and nothing written outside OUT.

The manifest rows share one `reel render` run (one JSON Lines manifest with every bad row and two
good ones) on the session's local Ray; a second run checks that resume renders again what was deleted
or truncated under kept metadata. The API requests go to one real Serve deployment of the tiny model.
The DNS-rebinding case resolves through a resolver the test controls (the only stand-in here: no
real DNS server answers differently on the second lookup).
"""

import json
import socket
import struct
import threading
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx2 as httpx
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import storage
from pipeline.batch.manifest import read_manifest, validate
from pipeline.cli import main
from pipeline.serve.errors import APIError
from pipeline.serve.requests import fetch_url
from tests.waiting import wait_for

MODEL = "tiny"
QUICK = {"steps": 2}


def png_declaring(width: int, height: int) -> bytes:
    """A few dozen bytes of PNG whose header declares width x height (one row of pixel data): what a
    decompression bomb looks like to a decoder that trusts the header."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit greyscale
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * (width + 1)))
            + chunk(b"IEND", b""))


# --------------------------------------------------------------------------------------------
# The manifest: (case, the JSON Lines line, a few words its one-line reason must hold)

MEDIA = {"corrupt.png": b"\x13\x37 not an image at all " * 8, "text.png": b"\x89PNG\r\n\x1a\nhello, I am text\n",
         "bomb.png": png_declaring(16000, 16000), "big.png": png_declaring(12000, 12000)}
ROWS = [
    ("id-with-slash", {"id": "a/b", "prompt": "p"}, "id 'a/b'"),
    ("id-dot-dot", {"id": "..", "prompt": "p"}, "is not allowed"),
    ("id-200-chars", {"id": "x" * 200, "prompt": "p"}, "is 200 characters; the limit is 128"),
    ("id-control-char", {"id": "a\u0007b", "prompt": "p"}, "id 'a\\x07b'"),
    ("id-list", {"id": ["a"], "prompt": "p"}, "id must be a string"),
    ("prompt-nul", {"id": "prompt-nul", "prompt": "a \u0000 ball"}, "control character U+0000"),
    ("prompt-escape", {"id": "prompt-esc", "prompt": "a \u001b[31m ball"}, "control character U+001B"),
    ("prompt-number", {"id": "prompt-number", "prompt": 5}, "prompt must be text"),
    ("prompt-too-long", {"id": "prompt-long", "prompt": "p" * 2001}, "the limit is 2000"),
    ("seconds-nan", '{"id": "seconds-nan", "prompt": "p", "seconds": NaN}', "seconds must be a finite number"),
    ("width-infinity", '{"id": "width-inf", "prompt": "p", "width": Infinity}', "width must be a finite number"),
    ("guidance-nan", '{"id": "guidance-nan", "prompt": "p", "guidance": NaN}', "guidance must be a finite number"),
    ("guidance-huge", {"id": "guidance-huge", "prompt": "p", "guidance": 1e308}, "guidance=1e+308 is outside 0..30"),
    ("seconds-huge", {"id": "seconds-huge", "prompt": "p", "seconds": 1e308}, "the model's maximum is 240 frames"),
    ("seed-huge", {"id": "seed-huge", "prompt": "p", "seed": 2**70}, "is outside 0..4294967295"),
    ("seconds-negative", {"id": "seconds-neg", "prompt": "p", "seconds": -1}, "seconds must be positive"),
    ("steps-negative", {"id": "steps-neg", "prompt": "p", "steps": -3}, "steps=-3 is outside 1..50"),
    ("width-zero", {"id": "width-zero", "prompt": "p", "width": 0, "height": 0}, "width must be positive"),
    ("seconds-true", {"id": "seconds-true", "prompt": "p", "seconds": True}, "seconds must be a number, got a bool"),
    ("steps-text", {"id": "steps-text", "prompt": "p", "steps": "many"}, "steps must be a number, got 'many'"),
    ("mode-unknown", {"id": "mode-unknown", "prompt": "p", "mode": 7}, "unknown mode 7"),
    ("not-json", '{"id": "broken", "prompt": ', "is not valid JSON"),
    ("json-array", "[1, 2]", "is a JSON list, not an object"),
    ("lone-surrogate", '{"id": "surrogate", "prompt": "a \\ud800 ball"}', "lone surrogate"),
    ("raw-ff-byte", b'{"id": "raw-ff", "prompt": "a \xff ball"}', "is not UTF-8 text"),
    ("media-missing", {"id": "media-missing", "prompt": "p", "image": "{dir}/nowhere.png"}, "does not exist"),
    ("media-corrupt", {"id": "media-corrupt", "prompt": "p", "image": "{dir}/corrupt.png"},
     "is not a PNG, JPEG or WebP image"),
    ("png-header-on-text", {"id": "png-text", "prompt": "p", "image": "{dir}/text.png"},
     "text.png is not a PNG, JPEG or WebP image"),
    ("decompression-bomb", {"id": "bomb", "prompt": "p", "image": "{dir}/bomb.png"}, "a decompression bomb"),
    ("image-too-large", {"id": "big", "prompt": "p", "image": "{dir}/big.png"}, "is 12000x12000; the limit is"),
]
GOOD = [{"id": "good-1", "prompt": "a red ball moves right", **QUICK},
        {"id": "good-2", "prompt": "a blue square drifts left", "width": 32, "height": 32, **QUICK}]


def manifest_line(row, folder) -> bytes:
    if isinstance(row, bytes):
        return row
    text = row if isinstance(row, str) else json.dumps(row, ensure_ascii=False)
    return text.replace("{dir}", str(folder)).encode("utf-8", "surrogatepass")


def tree(folder):
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}


def render(*args):
    return main(["render", *map(str, args), "--model", MODEL, "--no-progress"])


@pytest.fixture(scope="module")
def hostile_run(ray_session, tmp_path_factory):
    """One `reel render` of every bad row between two good ones; (exit code, folder, OUT, reasons by
    manifest row, files before)."""
    folder = tmp_path_factory.mktemp("hostile")
    for name, data in MEDIA.items():
        (folder / name).write_bytes(data)
    lines = [manifest_line(GOOD[0], folder)] + [manifest_line(row, folder) for _, row, _ in ROWS]
    lines.append(manifest_line(GOOD[1], folder))
    (folder / "m.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    before = tree(folder)
    out = folder / "out"
    code = render(folder / "m.jsonl", "--out", out)
    errors = pq.read_table(out / "errors" / "errors.parquet").to_pylist()
    return code, folder, out, {e["row"]: e for e in errors}, before


@pytest.mark.parametrize("case,row,words", ROWS, ids=[c for c, _, _ in ROWS])
def test_a_bad_row_fails_alone_in_one_line(hostile_run, case, row, words):
    code, _, _, errors, _ = hostile_run
    index = 1 + [c for c, _, _ in ROWS].index(case)  # good-1 is row 0
    assert code == 3
    reason = errors[index]["reason"]
    assert words in reason, (case, reason)
    assert "\n" not in reason and "Traceback" not in reason and len(reason) <= 500


def test_the_good_rows_render_and_nothing_lands_outside_out(hostile_run):
    code, folder, out, errors, before = hostile_run
    assert len(errors) == len(ROWS)
    assert sorted(storage.list_names(str(out / "videos"))) == ["good-1.mp4", "good-2.mp4"]
    assert sorted(storage.list_names(str(out / "metadata"))) == ["good-1.parquet", "good-2.parquet"]
    written = tree(folder) - before
    assert all(p.startswith("out/") for p in written), written
    assert {p.split("/")[1] for p in written} == {"videos", "thumbnails", "metadata", "errors", "run.json"}
    assert json.loads((out / "run.json").read_text())["counts"] == {"rows": len(ROWS) + 2, "rendered": 2,
                                                                    "skipped": 0, "failed": len(ROWS)}


def test_resume_renders_again_a_video_deleted_or_truncated_under_kept_metadata(hostile_run):
    code, folder, out, _, _ = hostile_run
    first = {n: (out / "videos" / n).read_bytes() for n in ("good-1.mp4", "good-2.mp4")}
    (out / "videos" / "good-1.mp4").unlink()
    (out / "videos" / "good-2.mp4").write_bytes(first["good-2.mp4"][:100])
    # the good rows alone (the same requests, so the same resume keys; no inputs stage to start)
    (folder / "good.jsonl").write_bytes(b"".join(manifest_line(row, folder) + b"\n" for row in GOOD))
    assert render(folder / "good.jsonl", "--out", out) == 0
    counts = json.loads((out / "run.json").read_text())["counts"]
    assert (counts["rendered"], counts["skipped"]) == (2, 0)
    assert {n: (out / "videos" / n).read_bytes() for n in first} == first  # the same bytes again


@pytest.mark.parametrize("name,data,words", [
    ("csv-named-parquet.parquet", b"id,prompt\na,a red ball\n", "not a readable Parquet file"),
    ("empty.jsonl", b"", "has no rows"),
    ("blank-lines.jsonl", b"\n\n  \n", "has no rows"),
    ("zero-rows.parquet", None, "has no rows"),
    ("binary.bin", b"\x00\x01\x02", "not a Parquet or JSON Lines manifest"),
])
def test_an_unusable_manifest_exits_2_in_one_line(tmp_path, capsys, name, data, words):
    path = tmp_path / name
    if data is None:
        pq.write_table(pa.table({"id": pa.array([], pa.string()), "prompt": pa.array([], pa.string())}), path)
    else:
        path.write_bytes(data)
    assert render(path, "--out", tmp_path / "out") == 2
    err = capsys.readouterr().err.strip()
    assert words in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("options,words", [
    (["--replicas", "0"], "--replicas must be 1 or more, got 0"),
    (["--threads", "0"], "--threads must be 1 or more, got 0"),
    (["--cpus-per-replica", "-1"], "--cpus-per-replica must be a positive number, got -1"),
    (["--gpus-per-replica", "nan"], "--gpus-per-replica must be 0 or a positive number, got nan"),
    (["--out-is-a-file"], "is an existing file"),
    (["--address", "127.0.0.1:1"], "cannot reach the Ray cluster at 127.0.0.1:1"),
    (["--gpus-per-replica", "64"], "a render replica needs 64 GPU (the largest node has"),
], ids=["replicas-0", "threads-0", "cpus-negative", "gpus-nan", "out-is-a-file", "address-closed", "gpus-64"])
def test_an_unusable_option_exits_2_in_one_line(ray_session, tmp_path, capsys, options, words):
    """Options that could only hang or fail deep inside Ray: refused before anything is written
    (the GPU check on the session's Ray: no node has 64 GPUs)."""
    (tmp_path / "m.jsonl").write_text(json.dumps(GOOD[0]) + "\n")
    out = tmp_path / "out"
    if options == ["--out-is-a-file"]:
        out, options = tmp_path / "file", []
        out.write_text("not a folder")
    assert render(tmp_path / "m.jsonl", "--out", out, *options) == 2
    err = capsys.readouterr().err.strip()
    assert words in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


def test_parquet_rows_binary_prompts_and_nan(tmp_path):
    """Parquet-only shapes of the same mistakes: a binary column holding UTF-8 text is read; one
    holding other bytes, or a NaN in a number column, fails its row (NaN is not "the default")."""
    from models.interface import describe_model

    limits = describe_model(MODEL)[1]
    pq.write_table(pa.table({"id": ["utf8", "latin1", "nan"],
                             "prompt": pa.array([b"a red ball", b"caf\xe9", b"p"], pa.binary()),
                             "guidance": [None, None, float("nan")]}), tmp_path / "m.parquet")
    specs, errors = validate(read_manifest(str(tmp_path / "m.parquet")), limits)
    assert [(s.id, s.prompt) for s in specs] == [("utf8", "a red ball")]
    assert {e.row: e.reason for e in errors} == {
        1: "prompt is binary data that is not UTF-8 text",
        2: "guidance must be a finite number, got nan (leave it empty for the default)"}


# --------------------------------------------------------------------------------------------
# The API


KEY = "key-hostile"


@pytest.fixture(scope="module")
def api(ray_session, tmp_path_factory):
    from ray import serve

    from pipeline.serve.app import APP_NAME, build_app
    from pipeline.serve.config import ServeConfig, key_hash

    folder = tmp_path_factory.mktemp("hostile-api")
    cfg = ServeConfig(model=MODEL, out=str(folder / "out"), store=str(folder / "jobs.sqlite"),
                      api_key_sha256=(key_hash(KEY),), max_queued=4, max_inflight_per_key=4,
                      max_upload_bytes=64 << 10, poll_after_ms=100, graceful_shutdown_s=1)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(cfg), name=APP_NAME, route_prefix="/")
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {KEY}"},
                          timeout=30)
    wait_for(lambda: client.get("/readyz").status_code == 200, 120, interval=0.2)
    yield client, folder
    client.close()
    serve.shutdown()


def bomb_upload():
    return {"files": {"input_reference": ("bomb.png", png_declaring(16000, 16000), "image/png")},
            "data": {"prompt": "p"}}


REQUESTS = [  # (case, httpx post arguments, status, param, words)
    ("prompt-lone-surrogate", {"content": b'{"prompt": "a \\ud800 ball"}'}, 400, "prompt", "lone surrogate"),
    ("prompt-control-char", {"json": {"prompt": "a \u0000 ball"}}, 400, "prompt", "control character U+0000"),
    ("prompt-number", {"json": {"prompt": 5}}, 400, "prompt", "non-empty string"),
    ("prompt-twice-in-a-form", {"files": {"x": ("x", b"", "text/plain")},
                                "data": {"prompt": ["a cat", "a dog"]}}, 400, "prompt", "more than once"),
    ("guidance-huge", {"json": {"prompt": "p", "guidance": 1e308}}, 400, "guidance", "outside 0..30"),
    ("guidance-nan", {"content": b'{"prompt": "p", "guidance": NaN}'}, 400, "guidance", "finite number"),
    ("seed-negative", {"json": {"prompt": "p", "seed": -1}}, 400, "seed", "outside 0..4294967295"),
    ("steps-text", {"json": {"prompt": "p", "steps": "many"}}, 400, "steps", "must be a number"),
    ("seconds-true", {"json": {"prompt": "p", "seconds": True}}, 400, "seconds", "seconds must be a string"),
    ("seconds-huge", {"json": {"prompt": "p", "seconds": "1e308"}}, 400, "seconds", "not a length"),
    ("seconds-negative", {"json": {"prompt": "p", "seconds": "-2"}}, 400, "seconds", "not a length"),
    ("size-zero", {"json": {"prompt": "p", "size": "0x0"}}, 400, "size", "must be positive"),
    ("size-huge", {"json": {"prompt": "p", "size": "99999x99999"}}, 400, "size", "not on the model's grid"),
    ("png-header-on-text", {"files": {"input_reference": ("t.png", b"\x89PNG\r\n\x1a\nhello", "image/png")},
                            "data": {"prompt": "p"}}, 400, "input_reference", "is not a PNG, JPEG or WebP"),
    ("corrupt-image", {"files": {"input_reference": ("c.png", b"\x13\x37" * 40, "image/png")},
                       "data": {"prompt": "p"}}, 400, "input_reference", "PNG, JPEG or WebP"),
    ("decompression-bomb", bomb_upload(), 400, "input_reference", "a decompression bomb"),
    ("image-url-loopback", {"json": {"prompt": "p", "input_reference": {"image_url": "http://127.0.0.1:9/a.png"}}},
     400, "input_reference", "private or local address"),
    ("image-url-loopback-v6", {"json": {"prompt": "p", "input_reference": {"image_url": "http://[::1]:9/a.png"}}},
     400, "input_reference", "private or local address"),
    ("image-url-link-local", {"json": {"prompt": "p", "input_reference": {
        "image_url": "http://169.254.169.254/latest/meta-data"}}}, 400, "input_reference", "private or local address"),
    ("image-url-localhost-name", {"json": {"prompt": "p", "input_reference": {
        "image_url": "http://localhost:9/a.png"}}}, 400, "input_reference", "private or local address"),
]


@pytest.mark.parametrize("case,post,status,param,words", REQUESTS, ids=[r[0] for r in REQUESTS])
def test_a_bad_request_gets_one_line_and_no_5xx(api, case, post, status, param, words):
    client, _ = api
    headers = {"Content-Type": "application/json"} if "content" in post else {}
    r = client.post("/v1/videos", headers=headers, **post)
    error = r.json()["error"]
    assert (r.status_code, error["param"]) == (status, param), (case, r.status_code, error)
    assert words in error["message"] and "\n" not in error["message"], (case, error)


def test_a_good_request_renders_and_nothing_lands_outside_out(api):
    client, folder = api
    r = client.post("/v1/videos", json={"prompt": "a red ball moves right", **QUICK})
    assert r.status_code == 200, r.text
    video_id, done = r.json()["id"], {}

    def finished():
        done.update(client.get(f"/v1/videos/{video_id}").json())
        return done["status"] in ("completed", "failed")

    wait_for(finished, 120, interval=0.2)
    assert done["status"] == "completed", done
    assert client.get("/v1/videos", params={"limit": 100}).json()["data"][0]["id"] == video_id  # the only job
    assert all(p.startswith(("out/", "jobs.sqlite")) for p in tree(folder)), tree(folder)


def test_the_url_fetch_connects_to_the_address_it_checked(monkeypatch):
    """DNS rebinding: a name that answers a public address to the check and 127.0.0.1 afterwards.
    The fetch must not reach the loopback server (before the fix, urllib looked the name up again
    and fetched from it)."""
    hits = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            hits.append(self.path)
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"\x89PNG\r\n\x1a\n secret")

        def log_message(self, *args):
            pass

    local = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=local.serve_forever, daemon=True).start()
    real = socket.getaddrinfo
    answers = iter(["93.184.216.34"])  # the first answer: a public address; every later one: loopback

    def rebinding(host, port, *args, **kwargs):
        if host != "rebind.example":
            return real(host, port, *args, **kwargs)
        address = next(answers, "127.0.0.1")
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, port))]

    monkeypatch.setattr(socket, "getaddrinfo", rebinding)
    try:
        with pytest.raises(APIError) as e:
            fetch_url(f"http://rebind.example:{local.server_address[1]}/a.png", "input_reference",
                      max_bytes=1 << 16, timeout_s=2)
        assert e.value.status == 400 and "cannot be fetched" in str(e.value), str(e.value)
        assert hits == []  # the loopback server was never reached
    finally:
        local.shutdown()
