"""Reading a Wan folder in diffusers' layout: what is checked before any weight loads, the one-line
errors of a folder that cannot be used, the weights' digest, folders at a URI."""

import json
import os
import shutil
import subprocess
import sys

import fsspec
import pytest

from models.interface import UserError, describe_model, is_wan_folder, load_generator
from models.wan import digest
from models.wan.folder import WanFolderError, read_wan_folder


@pytest.fixture
def folder(wan_folders, tmp_path):
    """A copy of the tiny Wan 2.1 folder to break."""
    return shutil.copytree(wan_folders["wan21"], tmp_path / "Wan-copy")


def _edit_index(folder, **changes):
    path = folder / "model_index.json"
    index = json.loads(path.read_text())
    index.update(changes)
    path.write_text(json.dumps(index))


def one_line_error(spec) -> str:
    """The message both describe_model and load_generator give for a folder (the same, one line)."""
    with pytest.raises(WanFolderError) as described:
        describe_model(str(spec))
    with pytest.raises(WanFolderError) as loaded:
        load_generator(str(spec), device="cpu")
    message = str(described.value)
    assert str(loaded.value) == message and "\n" not in message and isinstance(described.value, UserError)
    return message


def test_a_wrong_model_index_is_refused_in_one_line(folder):
    _edit_index(folder, _class_name="WanVACEPipeline")
    assert one_line_error(folder) == (
        f"Wan folder {folder}: model_index.json is for 'WanVACEPipeline'; only WanPipeline and "
        f"WanImageToVideoPipeline folders are supported (e.g. Wan-AI/Wan2.1-T2V-1.3B-Diffusers, "
        f"...-I2V-14B-480P-Diffusers)")
    _edit_index(folder, _class_name="WanImageToVideoPipeline")  # a text-to-video transformer under it
    assert one_line_error(folder) == (
        f"Wan folder {folder}: an image-to-video transformer takes 36 input channels (latents, mask, picture "
        f"latents), this one 16; supply the release's transformer/")
    (folder / "model_index.json").write_text("{not json")
    assert one_line_error(folder) == (f"Wan folder {folder}: {folder}/model_index.json is not readable JSON "
                                      f"(JSONDecodeError); supply the release's copy")
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "WanPipeline",
                                                         "vae": ["diffusers", "AutoencoderKL"]}))
    assert one_line_error(folder) == (f"Wan folder {folder}: vae is diffusers.AutoencoderKL; only "
                                      f"diffusers.AutoencoderKLWan is supported")


def test_a_missing_component_is_named_with_what_to_supply(folder):
    shutil.rmtree(folder / "vae")
    assert one_line_error(folder) == (f"Wan folder {folder}: model_index.json names a vae but there is no vae/ "
                                      f"folder; supply it (from the same release)")
    _edit_index(folder, vae=[None, None], text_encoder=[None, None])
    assert one_line_error(folder) == (f"Wan folder {folder}: no vae, text_encoder in model_index.json; supply the "
                                      f"complete release (vae, text_encoder, tokenizer, scheduler and a transformer)")


def test_a_truncated_or_missing_shard_is_refused_before_loading(folder):
    shards = sorted(p for p in (folder / "transformer").iterdir() if p.name.endswith(".safetensors"))
    assert len(shards) > 1  # the fixture's folders are sharded
    data = shards[1].read_bytes()
    shards[1].write_bytes(data[:-100])
    where = f"Wan folder {folder}: transformer/{shards[1].name}"
    assert one_line_error(folder) == (f"{where} is {len(data) - 100} bytes but its header describes {len(data)}: "
                                      f"truncated or damaged; copy it again")
    shards[1].unlink()
    assert one_line_error(folder) == (f"Wan folder {folder}: transformer: shard {shards[1].name} is missing; "
                                      f"supply every shard its index lists")
    for p in (folder / "transformer").glob("*.safetensors*"):
        p.unlink()
    assert one_line_error(folder) == (
        f"Wan folder {folder}: transformer/ has no weights: supply diffusion_pytorch_model.safetensors or its "
        f"shards with diffusion_pytorch_model.safetensors.index.json (safetensors only)")


def test_two_experts_need_a_boundary(wan_folders, tmp_path):
    folder = shutil.copytree(wan_folders["a14b"], tmp_path / "a14b")
    _edit_index(folder, boundary_ratio=None)
    assert "transformer_2 is there but model_index.json gives no boundary_ratio" in one_line_error(folder)
    _edit_index(folder, boundary_ratio=0.875, transformer_2=[None, None])
    assert "gives boundary_ratio=0.875 but no transformer_2" in one_line_error(folder)


def test_which_specs_are_wan_folders(wan_folders, tmp_path):
    assert is_wan_folder(wan_folders["wan21"]) and is_wan_folder(f"file://{wan_folders['wan21']}")
    assert not any(is_wan_folder(s) for s in ("default", "tiny", str(tmp_path), str(tmp_path / "nothing"), None))
    assert [read_wan_folder(f).variant for f in wan_folders.values()] == ["wan2.1-t2v", "wan2.2-ti2v", "wan2.2-a14b"]


def test_describe_model_reads_configs_and_the_digest_only(wan_folders):
    code = ("import sys; from models.interface import describe_model; info, limits, _ = describe_model(sys.argv[1]); "
            "print(info.name, limits.max_frames, sorted(m for m in ('torch', 'diffusers', 'transformers') "
            "if m in sys.modules))")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    out = subprocess.run([sys.executable, "-c", code, wan_folders["ti2v"]], capture_output=True, text=True, env=env,
                         check=True).stdout
    assert out.split("\n")[0] == "Tiny-ti2v-Diffusers 481 []"


def test_the_digest_is_of_the_weight_files_and_cached(folder, wan_folders, monkeypatch):
    calls = []
    real = digest.file_sha256
    monkeypatch.setattr(digest, "file_sha256", lambda p: calls.append(p) or real(p))
    first = describe_model(str(folder))[0].weights_sha256
    files = len(calls)
    assert files == len(read_wan_folder(str(folder)).weight_files) > 3
    assert describe_model(str(folder))[0].weights_sha256 == first and len(calls) == files  # cached
    assert describe_model(wan_folders["wan21"])[0].weights_sha256 == first  # the same weights elsewhere
    files = len(calls)
    (folder / "model_index.json").write_text((folder / "model_index.json").read_text() + " ")
    assert describe_model(str(folder))[0].weights_sha256 == first  # configs are not weights

    vae = sorted((folder / "vae").glob("*.safetensors"))[0]
    data = bytearray(vae.read_bytes())
    data[-1] ^= 1
    vae.write_bytes(bytes(data))
    assert describe_model(str(folder))[0].weights_sha256 != first and len(calls) == files + 1


def test_a_folder_at_a_uri_is_copied_once_and_named_by_its_uri(wan_folders, tmp_path, monkeypatch):
    import models.files

    monkeypatch.setattr(models.files, "CACHE_DIR", tmp_path / "cache")
    mem = fsspec.filesystem("memory")
    local = wan_folders["wan21"]
    for root, _, files in os.walk(local):
        for f in files:
            mem.pipe(f"/reelforge-wan/Wan-Remote/{os.path.relpath(os.path.join(root, f), local)}",
                     open(os.path.join(root, f), "rb").read())
    uri = "memory://reelforge-wan/Wan-Remote"
    assert is_wan_folder(uri)
    info, limits, _ = describe_model(uri)
    assert info.name == "Wan-Remote" and info.weights_sha256 == describe_model(local)[0].weights_sha256
    assert limits == describe_model(local)[1]
