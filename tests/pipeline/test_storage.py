"""pipeline.storage on local paths, memory:// and a real S3 API server on loopback (moto)."""

import json
import os
import pickle

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import storage


class Boom(RuntimeError):
    pass


def failing_chunks(n_ok=3):
    """A producer that dies halfway, like an encoder crashing mid-stream."""
    for _ in range(n_ok):
        yield b"x" * 1024
    raise Boom("producer died")


def roots(kind, tmp_path, bucket=None):
    return {"local": str(tmp_path / "out"), "file": f"file://{tmp_path}/out", "s3": f"s3://{bucket}/renders/r1"}[kind]


# --------------------------------------------------------------------------------------------
# keys and URIs


@pytest.mark.parametrize("key", ["a", "red-ball", "A.b_c-9", "x" * 128, "0", "a..b"])
def test_valid_keys(key):
    assert storage.validate_key(key) is None


@pytest.mark.parametrize("key", ["", ".", "..", "../x", "a/b", "-a", ".hidden", "_a", "a b", "x" * 129,
                                 "é", "a\nb", "a\\b", None, 5])
def test_invalid_keys_get_a_one_line_reason(key):
    reason = storage.validate_key(key)
    assert reason and "\n" not in reason and "id" in reason
    if isinstance(key, str) and key and len(key) < 60:
        assert repr(key) in reason


def test_join_keeps_protocol_and_resolve():
    assert storage.join("s3://b/out", "videos", "a.mp4") == "s3://b/out/videos/a.mp4"
    assert storage.join("s3://b/out/", "/videos/") == "s3://b/out/videos"
    assert storage.join("/tmp/o", "a") == "/tmp/o/a"
    fs, path = storage.resolve("file:///tmp/x/y")
    assert path == "/tmp/x/y" and "file" in fs.protocol
    fs2, path = storage.resolve("rel/x")
    assert fs2 is fs and path == os.path.abspath("rel/x")
    _, path = storage.resolve("memory://a/b")
    assert path == "/a/b"


def test_a_runs_output_folder_is_absolute_so_its_metadata_reads_back_from_anywhere(tmp_path, monkeypatch):
    from pipeline.batch.driver import RenderConfig

    monkeypatch.chdir(tmp_path)
    assert storage.absolute("renders") == str(tmp_path / "renders")
    assert storage.absolute("~/r") == os.path.expanduser("~/r")
    assert storage.absolute("file:///tmp/out") == "/tmp/out"
    for uri in ("s3://b/out", "gs://b/out", "memory://out"):
        assert storage.absolute(uri) == uri
    assert RenderConfig(manifest="m.parquet", out="renders").out == str(tmp_path / "renders")


def test_gs_without_gcsfs_says_what_to_install():
    try:
        import gcsfs  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="gcsfs"):
            storage.resolve("gs://bucket/x")
    else:
        fs, path = storage.resolve("gs://bucket/x")
        assert path == "bucket/x"


# --------------------------------------------------------------------------------------------
# local


def test_local_atomic_write_leaves_no_temp_files(tmp_path):
    uri = storage.join(str(tmp_path), "deep", "er", "clip.mp4")
    storage.write_bytes_atomic(uri, b"one")
    storage.write_bytes_atomic(uri, b"two")
    assert storage.read_bytes(uri) == b"two"
    assert os.listdir(tmp_path / "deep" / "er") == ["clip.mp4"]
    mode = os.stat(uri).st_mode & 0o777
    umask = os.umask(0)
    os.umask(umask)
    assert mode == 0o666 & ~umask  # not mkstemp's 0600


def test_local_failed_write_never_appears_at_final_key(tmp_path):
    uri = str(tmp_path / "videos" / "clip.mp4")
    with pytest.raises(Boom):
        storage.write_bytes_atomic(uri, failing_chunks())
    assert not storage.exists(uri)
    assert os.listdir(tmp_path / "videos") == []  # the temp file went too
    storage.write_bytes_atomic(uri, b"good")
    with pytest.raises(Boom):
        storage.write_bytes_atomic(uri, failing_chunks())
    assert storage.read_bytes(uri) == b"good"  # the old object survives a failed overwrite
    assert os.listdir(tmp_path / "videos") == ["clip.mp4"]


def test_reader_never_sees_partial_object_while_writing(tmp_path):
    """While a chunked write is under way the final key is absent; then complete."""
    uri = str(tmp_path / "x.bin")
    seen = []

    def chunks():
        for i in range(4):
            seen.append(storage.exists(uri))
            yield bytes([i]) * 4096

    storage.write_bytes_atomic(uri, chunks())
    assert seen == [False] * 4
    assert storage.read_bytes(uri) == b"".join(bytes([i]) * 4096 for i in range(4))


@pytest.mark.parametrize("kind", ["local", "file", "memory"])
def test_list_exists_delete(kind, tmp_path):
    root = {"local": str(tmp_path / "o"), "file": f"file://{tmp_path}/o", "memory": f"memory://t-{os.getpid()}/o"}[kind]
    assert storage.list_names(storage.join(root, "videos")) == []
    assert not storage.exists(storage.join(root, "videos", "a.mp4"))
    for name in ("b.mp4", "a.mp4", "a.jpg"):
        storage.write_bytes_atomic(storage.join(root, "videos", name), name.encode())
    storage.write_bytes_atomic(storage.join(root, "videos", "sub", "c.mp4"), b"c")
    assert storage.list_names(storage.join(root, "videos")) == ["a.jpg", "a.mp4", "b.mp4", "sub"]
    assert storage.list_names(storage.join(root, "videos"), suffix=".mp4") == ["a.mp4", "b.mp4"]
    assert storage.exists(storage.join(root, "videos", "a.mp4"))
    assert storage.delete(storage.join(root, "videos", "a.mp4")) is True
    assert storage.delete(storage.join(root, "videos", "a.mp4")) is False  # idempotent
    assert storage.list_names(storage.join(root, "videos"), suffix=".mp4") == ["b.mp4"]
    assert storage.delete(storage.join(root, "videos"), recursive=True) is True
    assert storage.list_names(storage.join(root, "videos")) == []


def test_json_atomic(tmp_path):
    import datetime as dt

    uri = str(tmp_path / "run.json")
    when = dt.datetime(2026, 1, 2, tzinfo=dt.timezone.utc)
    storage.write_json_atomic(uri, {"counts": {"rendered": 2}, "when": when, "caption": "ünï"})
    assert json.loads(storage.read_bytes(uri)) == {"counts": {"rendered": 2}, "when": str(when), "caption": "ünï"}


def parquet_round_trip(root):
    meta = storage.join(root, "metadata")
    assert storage.read_parquet_dataset(meta) is None  # missing
    storage.write_parquet_atomic(storage.join(meta, "a.parquet"),
                                 pa.table({"id": ["a"], "request_sha256": ["1"], "campaign": ["spring"]}))
    storage.write_parquet_atomic(storage.join(meta, "b.parquet"),
                                 pa.table({"id": ["b", "c"], "request_sha256": ["2", "3"], "seed": [7, 8]}))
    storage.write_bytes_atomic(storage.join(meta, "_SUCCESS"), b"")  # ignored, like pyarrow does
    table = storage.read_parquet_dataset(meta)
    assert table.num_rows == 3 and sorted(table.column("id").to_pylist()) == ["a", "b", "c"]
    assert set(table.column_names) == {"id", "request_sha256", "campaign", "seed"}  # merged schemas
    rows = {r["id"]: r for r in table.to_pylist()}
    assert rows["a"]["seed"] is None and rows["b"]["campaign"] is None and rows["c"]["seed"] == 8
    cols = storage.read_parquet_dataset(meta, columns=["request_sha256", "id", "nope"])
    assert cols.column_names == ["request_sha256", "id", "nope"] and cols.column("nope").null_count == 3
    single = storage.read_parquet_dataset(storage.join(meta, "a.parquet"))
    assert single.column("id").to_pylist() == ["a"]
    assert storage.list_names(meta, suffix=".parquet") == ["a.parquet", "b.parquet"]
    # An existing but empty folder is None too.
    for name in storage.list_names(meta):
        storage.delete(storage.join(meta, name))
    assert storage.read_parquet_dataset(meta) is None


def test_parquet_dataset_local(tmp_path):
    parquet_round_trip(str(tmp_path / "out"))
    os.makedirs(tmp_path / "empty")
    assert storage.read_parquet_dataset(str(tmp_path / "empty")) is None


def test_parquet_dataset_memory():
    parquet_round_trip(f"memory://pq-{os.getpid()}/out")


def test_arrow_filesystem_local(tmp_path):
    storage.write_parquet_atomic(str(tmp_path / "m" / "a.parquet"), pa.table({"x": [1, 2]}))
    fs, path = storage.arrow_filesystem(str(tmp_path / "m"))
    assert pq.read_table(path, filesystem=fs).column("x").to_pylist() == [1, 2]


# --------------------------------------------------------------------------------------------
# S3 (moto server on loopback, reached through AWS_ENDPOINT_URL only)


def test_s3_endpoint_comes_from_the_environment(s3_server, bucket):
    fs, path = storage.resolve(f"s3://{bucket}/k")
    assert path == f"{bucket}/k"
    assert not fs.client_kwargs.get("endpoint_url")  # nothing passed: botocore reads AWS_ENDPOINT_URL
    storage.write_bytes_atomic(f"s3://{bucket}/k", b"v")
    import boto3

    body = boto3.client("s3", endpoint_url=s3_server).get_object(Bucket=bucket, Key="k")["Body"].read()
    assert body == b"v"


def test_s3_endpoint_url_s3_wins_and_cache_follows_env(s3_server, bucket, monkeypatch):
    storage.write_bytes_atomic(f"s3://{bucket}/k", b"v")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_server)  # the service-specific one takes precedence
    assert storage.read_bytes(f"s3://{bucket}/k") == b"v"


def test_s3_atomic_write_and_failed_write(bucket):
    import boto3

    uri = f"s3://{bucket}/renders/videos/clip.mp4"
    with pytest.raises(Boom):
        storage.write_bytes_atomic(uri, failing_chunks())
    assert not storage.exists(uri)
    client = boto3.client("s3")
    assert client.list_objects_v2(Bucket=bucket).get("KeyCount") == 0
    assert not client.list_multipart_uploads(Bucket=bucket).get("Uploads")
    storage.write_bytes_atomic(uri, b"good")
    with pytest.raises(Boom):
        storage.write_bytes_atomic(uri, failing_chunks())
    assert storage.read_bytes(uri) == b"good"


def test_s3_list_exists_delete(bucket):
    root = f"s3://{bucket}/renders/r1"
    assert storage.list_names(storage.join(root, "videos")) == []
    assert storage.list_names(f"s3://{bucket}") == []
    for name in ("b.mp4", "a.mp4", "a.jpg"):
        storage.write_bytes_atomic(storage.join(root, "videos", name), name.encode())
    assert storage.list_names(storage.join(root, "videos")) == ["a.jpg", "a.mp4", "b.mp4"]
    assert storage.list_names(storage.join(root, "videos"), suffix=".mp4") == ["a.mp4", "b.mp4"]
    assert storage.list_names(root) == ["videos"]
    assert storage.exists(storage.join(root, "videos", "a.mp4"))
    assert storage.delete(storage.join(root, "videos", "a.mp4")) is True
    assert storage.delete(storage.join(root, "videos", "a.mp4")) is False
    assert not storage.exists(storage.join(root, "videos", "a.mp4"))
    assert storage.list_names(storage.join(root, "videos")) == ["a.jpg", "b.mp4"]


def test_s3_listing_sees_writes_from_other_clients(bucket):
    """Another process (a Ray worker) writes: our next listing must see it (no stale listings cache)."""
    import boto3

    prefix = f"s3://{bucket}/metadata"
    assert storage.list_names(prefix) == []
    assert storage.read_parquet_dataset(prefix) is None
    boto3.client("s3").put_object(Bucket=bucket, Key="metadata/x.parquet", Body=_parquet_bytes({"id": ["x"]}))
    assert storage.list_names(prefix) == ["x.parquet"]
    assert storage.read_parquet_dataset(prefix).column("id").to_pylist() == ["x"]


def _parquet_bytes(cols):
    sink = pa.BufferOutputStream()
    pq.write_table(pa.table(cols), sink)
    return sink.getvalue().to_pybytes()


def test_s3_parquet_and_json(bucket):
    parquet_round_trip(f"s3://{bucket}/renders/r1")
    storage.write_json_atomic(f"s3://{bucket}/renders/r1/run.json", {"ok": True})
    assert json.loads(storage.read_bytes(f"s3://{bucket}/renders/r1/run.json")) == {"ok": True}


def test_s3_arrow_filesystem_pickles(bucket):
    """What Ray Data gets: a pyarrow filesystem that survives pickling to a worker."""
    storage.write_parquet_atomic(f"s3://{bucket}/m/a.parquet", pa.table({"x": [1, 2]}))
    fs, path = storage.arrow_filesystem(f"s3://{bucket}/m")
    fs = pickle.loads(pickle.dumps(fs))
    assert path == f"{bucket}/m"
    assert pq.read_table(path, filesystem=fs).column("x").to_pylist() == [1, 2]
    with fs.open_output_stream(f"{bucket}/m/b.bin") as f:
        f.write(b"hi")
    assert storage.read_bytes(f"s3://{bucket}/m/b.bin") == b"hi"


def test_every_s3_client_retries_in_standard_mode_and_the_aws_settings_override_it(s3_server, monkeypatch):
    """The pipeline's filesystems and models/' (model folders, configs, weights) get one retry config."""
    from models.store import store_fs

    for fs in (storage.resolve("s3://any-bucket/x")[0], store_fs("s3://any-bucket/x")[0]):
        assert fs.config_kwargs["retries"] == {"mode": "standard", "total_max_attempts": 6}
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "3")
    monkeypatch.setenv("AWS_RETRY_MODE", "adaptive")
    for fs in (storage.resolve("s3://any-bucket/x")[0], store_fs("s3://any-bucket/x")[0]):
        assert fs.config_kwargs["retries"] == {"mode": "adaptive", "total_max_attempts": 3}
    assert storage.resolve("/tmp/x")[0].protocol[0] == "file"  # local paths take no store options
