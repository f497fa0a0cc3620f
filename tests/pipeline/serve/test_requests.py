"""Request fields → clips: the URL fetch behind input_reference image_urls (its limits and
private-address guard), against a local HTTP server."""

import pytest


def test_image_urls_are_fetched_within_limits(tmp_path, png):
    import http.server
    import threading

    from pipeline.serve.errors import APIError
    from pipeline.serve.requests import fetch_url

    image = png(8, 8, (1, 2, 3))

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path == "/hop":
                self.send_response(302)
                self.send_header("Location", "/a.png")
                self.end_headers()
                return
            body = image if self.path == "/a.png" else b"x" * 5000
            self.send_response(200 if self.path != "/missing" else 404)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{httpd.server_address[1]}"
    try:
        def fetch(path, **kw):
            return fetch_url(base + path, "input_reference", max_bytes=4096, timeout_s=5, **kw)

        assert fetch("/a.png", allow_private=True) == image
        assert fetch("/hop", allow_private=True) == image  # a redirect is followed, its target checked
        for path, allow, words in [("/a.png", False, "private or local address"), ("/big", True, "larger than 4096"),
                                   ("/missing", True, "HTTP 404")]:
            with pytest.raises(APIError) as e:
                fetch(path, allow_private=allow)
            assert e.value.status == 400 and words in e.value.message
    finally:
        httpd.shutdown()


def test_lora_uris_resolve_under_the_operator_roots(tmp_path):
    from pipeline.serve.config import ServeConfig
    from pipeline.serve.errors import APIError
    from pipeline.serve.requests import adapters_in_roots

    (tmp_path / "loras").mkdir()
    cfg = ServeConfig(lora_roots=(str(tmp_path / "loras/"), "S3://bucket/team//"))
    roots = cfg.lora_roots
    assert roots == (str(tmp_path / "loras"), "s3://bucket/team/")
    assert adapters_in_roots("a.safetensors", roots) == [str(tmp_path / "loras" / "a.safetensors")]
    assert adapters_in_roots('[{"uri": "s3://bucket/team/a.safetensors", "scale": 2}]', roots) == [
        {"uri": "s3://bucket/team/a.safetensors", "scale": 2}]
    assert adapters_in_roots({"uri": "sub/../b.safetensors"}, roots) == [{"uri": str(tmp_path / "loras/b.safetensors")}]
    assert adapters_in_roots(f"file://{tmp_path}/loras/c", roots) == [str(tmp_path / "loras" / "c")]
    for none in (None, "", []):
        assert adapters_in_roots(none, ()) == none
    assert adapters_in_roots("[not json", ()) == "[not json"  # the manifest's message names it
    for uri in ("s3://bucket/team/%2e%2e/x", "s3://bucket/teamx/a", "gs://bucket/team/a", "../a"):
        with pytest.raises(APIError, match="is not under a LoRA root"):
            adapters_in_roots(uri, roots)
    with pytest.raises(APIError, match="this server takes no LoRA adapters; start reel serve with --lora-root"):
        adapters_in_roots("s3://bucket/team/a", ())
    with pytest.raises(ValueError, match="lora root"):
        ServeConfig(lora_roots=("simplecache::s3://bucket/",))
