"""A Wan folder at an s3:// URI (the loopback S3 server): copied once per machine into a cache keyed by
the URI and the folder's content, shared by the processes there, never used half-copied."""

import os
import subprocess
import sys

import numpy as np
import pytest

import models.files
from models.files import local_model_dir
from models.interface import RenderRequest, describe_model, load_generator
from models.wan.folder import WanFolderError


@pytest.fixture
def wan_uri(wan_folders, bucket, tmp_path, monkeypatch):
    """The tiny Wan 2.1 folder uploaded to s3://<fresh bucket>/Wan-S3; this test's own model cache."""
    import fsspec

    monkeypatch.setattr(models.files, "CACHE_DIR", tmp_path / "cache")
    fsspec.filesystem("s3").put(wan_folders["wan21"] + "/", f"{bucket}/Wan-S3", recursive=True)
    return f"s3://{bucket}/Wan-S3"


def _files(root: str) -> dict[str, tuple[int, int]]:
    """relative path → (inode, mtime_ns) of every file under a local folder."""
    out = {}
    for base, _, names in os.walk(root):
        for n in names:
            st = os.stat(os.path.join(base, n))
            out[os.path.relpath(os.path.join(base, n), root)] = (st.st_ino, st.st_mtime_ns)
    return out


def test_a_folder_on_s3_loads_once_and_renders_as_the_local_one(wan_uri, wan_folders, caplog):
    caplog.set_level("INFO", logger="models.files")
    info, limits, _ = describe_model(wan_uri)
    local_info, local_limits, _ = describe_model(wan_folders["wan21"])
    assert (info.name, info.weights_sha256, limits) == ("Wan-S3", local_info.weights_sha256, local_limits)
    copy = local_model_dir(wan_uri)
    before = _files(copy)
    assert copy.startswith(str(models.files.CACHE_DIR)) and ".complete" in before

    request = RenderRequest(caption="a red circle", width=32, height=32, frames=1, fps=16, seed=1, steps=2,
                            guidance=5.0)
    [remote] = load_generator(wan_uri, device="cpu").generate([request])  # the second load: no second copy
    [local] = load_generator(wan_folders["wan21"], device="cpu").generate([request])
    assert np.array_equal(remote.frames, local.frames)
    assert local_model_dir(wan_uri) == copy and _files(copy) == before  # the same files, untouched
    assert len([r for r in caplog.records if r.getMessage().startswith("copying ")]) == 1


def test_a_changed_file_at_the_same_uri_is_fetched_again(wan_uri, wan_folders):
    import fsspec

    first = local_model_dir(wan_uri)
    digest = describe_model(wan_uri)[0].weights_sha256
    fs = fsspec.filesystem("s3")
    shard = sorted(p for p in fs.ls(f"{wan_uri}/vae") if p.endswith(".safetensors"))[0]
    data = bytearray(fs.cat(shard))
    data[-1] ^= 1  # one weight's last byte: same size, another ETag
    fs.pipe(shard, bytes(data))
    second = local_model_dir(wan_uri)
    assert second != first and not os.path.exists(first)  # a fresh copy; the stale one is gone
    assert os.path.dirname(second) == os.path.dirname(first)
    assert describe_model(wan_uri)[0].weights_sha256 != digest


def test_a_truncated_or_missing_shard_at_the_uri_is_one_line(wan_uri):
    import fsspec

    fs = fsspec.filesystem("s3")
    shards = sorted(p for p in fs.ls(f"{wan_uri}/transformer") if p.endswith(".safetensors"))
    name = shards[1].rsplit("/", 1)[1]
    data = fs.cat(shards[1])
    fs.pipe(shards[1], data[:-100])
    with pytest.raises(WanFolderError) as e:
        describe_model(wan_uri)
    assert str(e.value) == (f"Wan folder {wan_uri}: transformer/{name} is {len(data) - 100} bytes but its header "
                            f"describes {len(data)}: truncated or damaged; copy it again")
    fs.rm(shards[1])
    with pytest.raises(WanFolderError) as e:
        load_generator(wan_uri, device="cpu")
    assert str(e.value) == (f"Wan folder {wan_uri}: transformer: shard {name} is missing; supply every shard its "
                            f"index lists")
    fs.rm(f"{wan_uri}/model_index.json")
    fs.pipe(f"{wan_uri}/model_index.json", b"{not json")
    with pytest.raises(WanFolderError, match=f"^Wan folder {wan_uri}: {wan_uri}/model_index.json is not readable"):
        describe_model(wan_uri)
    with pytest.raises(FileNotFoundError, match=f"^model folder not found: {wan_uri}-nothing$"):
        local_model_dir(f"{wan_uri}-nothing")


def test_processes_on_one_machine_share_one_copy(wan_uri, tmp_path):
    """Two processes asking at once: one copies (under the lock), the other waits and uses that copy."""
    code = ("import logging, sys; logging.basicConfig(level=logging.INFO, format='%(message)s'); "
            "from models.files import local_model_dir; print(local_model_dir(sys.argv[1]))")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path), REELFORGE_CACHE=str(tmp_path / "shared"))
    procs = [subprocess.Popen([sys.executable, "-c", code, wan_uri], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=env) for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    paths = {out.strip() for out, _ in outs}
    assert len(paths) == 1 and paths.pop().startswith(str(tmp_path / "shared" / "models"))
    assert sum(err.count("copying s3://") for _, err in outs) == 1
    [home] = (tmp_path / "shared" / "models").iterdir()
    entries = sorted(p.name for p in home.iterdir())  # one complete copy beside the lock, no temporary folder
    assert len(entries) == 2 and entries[0] == ".lock" and (home / entries[1] / ".complete").is_file()


def test_a_copy_without_its_completion_marker_is_never_used(wan_uri, caplog):
    """A copy cut short (no `.complete`, a file missing) is made again, whole."""
    caplog.set_level("INFO", logger="models.files")
    copy = local_model_dir(wan_uri)
    files = _files(copy)
    os.remove(os.path.join(copy, ".complete"))
    os.remove(os.path.join(copy, "vae", "config.json"))
    assert local_model_dir(wan_uri) == copy and set(_files(copy)) == set(files)
    assert len([r for r in caplog.records if r.getMessage().startswith("copying ")]) == 2
