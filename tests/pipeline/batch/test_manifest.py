import dataclasses
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from models.interface import GridLimits
from pipeline.batch.manifest import ManifestError, default_seed, read_manifest, validate

LIMITS = GridLimits(
    size_multiple=16, min_size=32, max_size=256, max_pixels=256 * 256, frame_multiple=2, max_frames=64,
    window_frames=64, context_frames=32,
    min_fps=4, max_fps=30, max_steps=100, default_width=64, default_height=64, default_fps=8,
    default_seconds=2.0, default_steps=20, default_guidance=4.0,
)


def write_jsonl(path, rows):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return str(path)


def reasons(errors):
    return {e.row: e.reason for e in errors}


def test_defaults_and_passthrough(tmp_path):
    table = pa.table({"id": ["a"], "prompt": ["  a red   ball "], "campaign": ["spring"]})
    pq.write_table(table, tmp_path / "m.parquet")
    specs, errors = validate(read_manifest(str(tmp_path / "m.parquet")), LIMITS)
    assert errors == []
    (s,) = specs
    assert (s.prompt, s.width, s.height, s.frames, s.fps, s.steps, s.guidance, s.mode) == (
        "a red ball", 64, 64, 16, 8, 20, 4.0, "t2v")
    assert s.seed == default_seed("a") and default_seed("a") != default_seed("b")
    assert s.passthrough == {"campaign": "spring"}


def test_every_bad_row_gets_a_reason_and_good_rows_survive(tmp_path):
    uri = write_jsonl(tmp_path / "m.jsonl", [
        {"id": "ok-1", "prompt": "a blue square"},
        {"id": "ok-1", "prompt": "duplicate"},
        {"id": "../x", "prompt": "traversal"},
        {"id": "empty", "prompt": "   "},
        {"id": "long", "prompt": "x" * 2001},
        {"id": "neg", "prompt": "p", "seconds": -1},
        {"id": "toolong", "prompt": "p", "seconds": 60},
        {"id": "offgrid", "prompt": "p", "width": 70},
        {"id": "huge", "prompt": "p", "width": 4096},
        {"prompt": "no id"},
        {"id": "nullprompt", "prompt": None},
        {"id": "badtype", "prompt": "p", "seconds": "soon"},
        {"id": "badsteps", "prompt": "p", "steps": 2.5},
        "{not json",
        {"id": "ok-2", "prompt": "a green circle", "seconds": "3", "width": 96},
        {"id": "mode", "prompt": "p", "mode": "warp"},
    ])
    specs, errors = validate(read_manifest(uri), LIMITS)
    assert [s.id for s in specs] == ["ok-1", "ok-2"]
    assert specs[1].frames == 24 and specs[1].width == 96
    r = reasons(errors)
    assert r[1] == "duplicate id 'ok-1' (first used on row 0)"
    assert "id" in r[2] and "../x" in r[2]
    assert r[3] == "prompt is empty"
    assert "2001 characters" in r[4]
    assert "positive" in r[5]
    assert "maximum is 64 frames" in r[6]
    assert "nearest allowed is 64" in r[7]
    assert "nearest allowed is 256" in r[8]
    assert r[9] == "id is missing"
    assert r[10] == "prompt is missing"
    assert "seconds must be a number" in r[11]
    assert "whole number" in r[12]
    assert "line 14 is not valid JSON" in r[13]
    assert "unknown mode 'warp'" in r[15]
    assert all("\n" not in reason for reason in r.values())
    assert len(errors) == 14


def test_wrong_column_types_in_parquet_fail_rows_not_the_run(tmp_path):
    pq.write_table(pa.table({"id": ["a", "b"], "prompt": ["p", "q"], "width": ["64", "wide"]}), tmp_path / "m.parquet")
    specs, errors = validate(read_manifest(str(tmp_path / "m.parquet")), LIMITS)
    assert [s.id for s in specs] == ["a"]
    assert reasons(errors) == {1: "width must be a number, got 'wide'"}


def test_null_means_missing_and_nan_is_refused(tmp_path):
    """A null takes the default; a NaN is a value no model can use (pandas writes missing values
    as nulls), so its row fails rather than render with a default nobody asked for."""
    table = pa.table({"id": ["a", "b", "c"], "prompt": ["p", "q", "r"], "seed": [None, 5.0, float("nan")]})
    pq.write_table(table, tmp_path / "m.parquet")
    specs, errors = validate(read_manifest(str(tmp_path / "m.parquet")), LIMITS)
    assert [s.seed for s in specs] == [default_seed("a"), 5]
    assert reasons(errors) == {2: "seed must be a finite number, got nan (leave it empty for the default)"}


def test_folder_of_parquet(tmp_path):
    (tmp_path / "m").mkdir()
    pq.write_table(pa.table({"id": ["a"], "prompt": ["p"]}), tmp_path / "m" / "part-0.parquet")
    pq.write_table(pa.table({"id": ["b"], "prompt": ["q"]}), tmp_path / "m" / "part-1.parquet")
    specs, _ = validate(read_manifest(str(tmp_path / "m")), LIMITS)
    assert [s.id for s in specs] == ["a", "b"]


@pytest.mark.parametrize("make, message", [
    (lambda p: None, "manifest not found"),
    (lambda p: p.write_bytes(b"id,prompt\na,b\n"), "not a Parquet or JSON Lines manifest"),
    (lambda p: pq.write_table(pa.table({"id": ["a"], "text": ["b"]}), p), "no 'prompt' column"),
    (lambda p: p.write_bytes(b"PAR1 truncated"), "not a readable Parquet file"),
])
def test_unusable_manifest(tmp_path, make, message):
    path = tmp_path / "manifest.bin"
    make(path)
    with pytest.raises(ManifestError, match=message):
        read_manifest(str(path))


def test_frames_column_sets_the_count_on_the_models_grid(tmp_path):
    import dataclasses

    wan = dataclasses.replace(LIMITS, frame_multiple=4, frame_offset=1, max_frames=81, default_fps=16)
    uri = write_jsonl(tmp_path / "m.jsonl", [
        {"id": "direct", "prompt": "p", "frames": 33},
        {"id": "still", "prompt": "p", "frames": 1},
        {"id": "snapped", "prompt": "p", "seconds": 1.1},
        {"id": "offgrid", "prompt": "p", "frames": 32},
        {"id": "toolong", "prompt": "p", "frames": 97},
        {"id": "both", "prompt": "p", "frames": 5, "seconds": 1},
        {"id": "zero", "prompt": "p", "frames": 0},
        {"id": "half", "prompt": "p", "frames": 4.5},
        {"id": "image", "prompt": "p", "mode": "image", "frames": 5},
    ])
    specs, errors = validate(read_manifest(uri), wan)
    assert [(s.id, s.frames, s.seconds) for s in specs] == [("direct", 33, 33 / 16), ("still", 1, 1 / 16),
                                                            ("snapped", 17, 17 / 16)]
    assert "frames" not in specs[0].passthrough
    assert reasons(errors) == {
        3: "frames=32 is not on the model's grid; nearest allowed is 33 (1 + a multiple of 4, from 1 to 81)",
        4: "frames=97 is not on the model's grid; nearest allowed is 81 (1 + a multiple of 4, from 1 to 81)",
        5: "give seconds or frames, not both",
        6: "frames must be positive, got 0",
        7: "frames must be a whole number, got 4.5",
        8: "mode image does not use frames (a still is one frame)",
    }
    specs, errors = validate(read_manifest(write_jsonl(tmp_path / "d.jsonl", [
        {"id": "a", "prompt": "p", "frames": 24}, {"id": "b", "prompt": "p", "frames": 25}])), LIMITS)
    assert [s.frames for s in specs] == [24]
    assert reasons(errors) == {
        1: "frames=25 is not on the model's grid; nearest allowed is 24 (multiples of 2 up to 64)"}


def test_request_hash_changes_with_parameters():
    from pipeline.batch.manifest import ClipSpec

    a = ClipSpec(0, "a", "p", "", 64, 64, 16, 8, 1, 20, 4.0, "t2v", {"campaign": "x"})
    same = ClipSpec(5, "a", "p", "", 64, 64, 16, 8, 1, 20, 4.0, "t2v", {"campaign": "y"})
    other = ClipSpec(0, "a", "p", "", 64, 64, 16, 8, 2, 20, 4.0, "t2v")
    def h(s, m="m"):
        return s.request_sha256(model_sha256=m, recaptioner="plain-1")

    assert h(a) == h(same)
    assert h(a) != h(other)
    assert h(a) != h(a, "other-model")
    # the step cache's threshold enters the request; none leaves the key it had before the cache existed
    assert h(a) != h(dataclasses.replace(a, step_cache=0.1)) != h(dataclasses.replace(a, step_cache=0.2))
    assert h(dataclasses.replace(a, step_cache=None)) == h(a)


def test_step_cache_column(tmp_path):
    uri = write_jsonl(tmp_path / "m.jsonl", [
        {"id": "on", "prompt": "p", "step_cache": 0.2}, {"id": "off", "prompt": "p"},
        {"id": "neg", "prompt": "p", "step_cache": -0.1}, {"id": "word", "prompt": "p", "step_cache": "fast"}])
    specs, errors = validate(read_manifest(uri), LIMITS)
    assert [(s.id, s.step_cache) for s in specs] == [("on", 0.2), ("off", None)]
    assert reasons(errors) == {2: "step_cache=-0.1 must be 0 or more (the step cache's threshold)",
                               3: "step_cache must be a number, got 'fast'"}


def test_a_mode_the_model_cannot_render_fails_its_row_only(tmp_path):
    """A text-to-video checkpoint (`GridLimits.modes`): i2v, extend, interpolate and storyboard rows get a
    one-line reason naming what the model renders; t2v, still and remix rows go on."""
    import dataclasses

    t2v_only = dataclasses.replace(LIMITS, frame_multiple=4, frame_offset=1, max_frames=81, modes=("t2v", "image",
                                                                                                 "remix"))
    uri = write_jsonl(tmp_path / "m.jsonl", [
        {"id": "text", "prompt": "p"},
        {"id": "still", "prompt": "p", "mode": "image"},
        {"id": "remix", "prompt": "p", "video": "s3://b/in.mp4", "strength": 0.5},
        {"id": "i2v", "prompt": "p", "image": "s3://b/in.png"},
        {"id": "extend", "prompt": "p", "video": "s3://b/in.mp4", "mode": "extend"},
        {"id": "interpolate", "prompt": "p", "image": "s3://b/a.png", "image_end": "s3://b/b.png"},
        {"id": "storyboard", "shots": [{"prompt": "p", "seconds": 1}]},
    ])
    specs, errors = validate(read_manifest(uri), t2v_only)
    assert [(s.id, s.mode, s.frames) for s in specs] == [("text", "t2v", 17), ("still", "image", 1),
                                                         ("remix", "remix", 17)]
    assert reasons(errors) == {i: f"mode {m} is not one this model renders; it renders t2v, image, remix"
                               for i, m in enumerate(("i2v", "extend", "interpolate", "storyboard"), start=3)}
    assert len(validate(read_manifest(uri), LIMITS)[0]) == 7  # the default: every mode
