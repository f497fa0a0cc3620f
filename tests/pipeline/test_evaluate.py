"""`reel eval`: the judge through the real H.264 codec, partial targets, the prompt set's checks,
the whole evaluation on a real local Ray, and the contact sheet."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from models.shapes.judge import JudgeResult, adherence, aggregate, is_held_out, judge_clip
from models.shapes.world import Scene, render_scene
from pipeline import storage
from pipeline.cli import main
from pipeline.evaluate import DEFAULT_PROMPTS, EvalError, extension_seam, load_prompt_set
from pipeline.media.contact_sheet import sheet, sheet_of_run
from pipeline.media.encode import decode_mp4, encode_mp4

SCENES = [Scene("triangle", "green", "navy", "up"), Scene("diamond", "orange", "black", "left"),
          Scene("circle", "yellow", "brown", "grows"), Scene("square", "purple", "gray", "shrinks"),
          Scene("circle", "white", "black", "still"), Scene("triangle", "red", "gray", "right")]


def test_judge_finds_every_attribute_after_an_h264_round_trip():
    rng = np.random.default_rng(3)
    for scene in SCENES:
        clip = render_scene(scene, width=64, height=64, frames=16, rng=rng)
        decoded = decode_mp4(encode_mp4(clip, fps=8))
        assert decoded.shape == clip.shape and decoded.dtype == np.uint8
        assert np.abs(decoded.astype(int) - clip).mean() < 4  # H.264 at CRF 18: close, not equal
        result = judge_clip(decoded)
        assert all(adherence(result, scene).values()), (scene, result)


@pytest.mark.parametrize("motion", ["right", "up"])
def test_extension_seam_is_one_for_the_true_continuation_and_large_for_a_jump(motion):
    clip = render_scene(Scene("circle", "red", "gray", motion), rng=3)  # constant speed
    source, rest = clip[:8], clip[8:]
    assert extension_seam(source, rest) == pytest.approx(1.0, abs=0.05)
    assert extension_seam(rest, source, "backward") == pytest.approx(1.0, abs=0.05)
    assert extension_seam(source, clip[14:]) > 3  # six frames of motion in one step
    assert extension_seam(source, np.repeat(source[-1:], 4, axis=0)) == 0.0  # held still
    with pytest.raises(ValueError, match="forward or backward"):
        extension_seam(source, rest, "sideways")


def test_partial_targets_are_judged_on_the_attributes_they_name():
    result = JudgeResult("circle", "red", "black", "left", 1.0)
    assert adherence(result, {"shape": "circle", "colour": None, "motion": "right"}) == {"shape": True, "motion": False}
    assert is_held_out({"colour": "yellow", "shape": "circle"}) is True
    assert is_held_out({"colour": "red", "shape": "circle"}) is False
    assert is_held_out({"shape": "circle"}) is None
    summary = aggregate([result, result, result], [{"shape": "circle", "colour": "red"},            # held in, 2/2
                                                   {"shape": "circle", "colour": "yellow"},         # held out, 1/2
                                                   {"motion": "left"}])                             # neither, 1/1
    assert summary["clips"] == 3 and summary["adherence"] == pytest.approx((1 + 0.5 + 1) / 3)
    assert summary["attributes"] == {"shape": 1.0, "colour": 0.5, "motion": 1.0}  # background: never named
    assert summary["held_in"]["clips"] == 1 and summary["held_out"]["adherence"] == 0.5


@pytest.mark.parametrize("line, message", [
    ('{"prompt": "a red ball"', "line 2: not JSON"),
    ('{"prompt": ""}', "line 2: needs a non-empty \"prompt\""),
    ('{"prompt": "a ball", "colour": "crimson"}', "line 2: unknown colour 'crimson'"),
])
def test_a_bad_prompt_set_line_is_named(tmp_path, line, message):
    path = tmp_path / "set.jsonl"
    path.write_text('{"prompt": "a red ball", "colour": "red"}\n' + line + "\n")
    with pytest.raises(EvalError, match=message):
        load_prompt_set(str(path))


def test_the_shipped_prompt_set_is_large_and_mixes_held_in_and_held_out_pairs():
    rows = load_prompt_set(DEFAULT_PROMPTS)
    assert len(rows) >= 100 and len({r["prompt"] for r in rows}) == len(rows)
    held = [is_held_out(r) for r in rows]
    assert held.count(True) >= 20 and held.count(False) >= 50
    assert any(r["background"] is None for r in rows)  # prompts that leave an attribute open


def test_reel_eval_renders_judges_and_resumes(ray_session, tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in [
        {"prompt": "a red ball rolling right on black", "shape": "circle", "colour": "red", "background": "black",
         "motion": "right"},
        {"prompt": "yellow circle shrinking", "shape": "circle", "colour": "yellow", "motion": "shrinks"},
        {"prompt": "something drifting down", "motion": "down"}]))
    out = tmp_path / "eval"
    args = ["eval", "--out", str(out), "--prompts", str(prompts), "--model", "tiny", "--steps", "2", "--no-progress"]
    assert main(args) == 0
    assert "held-out" in capsys.readouterr().out
    summary = json.loads((out / "eval.json").read_text())
    assert summary["clips"] == 3 and summary["rendered"] == 3 and summary["failed"] == []
    assert summary["held_in"]["clips"] == 1 and summary["held_out"]["clips"] == 1
    clips = pq.read_table(out / "clips.parquet").to_pylist()
    assert [c["intended_motion"] for c in clips] == ["right", "shrinks", "down"]
    meta = {r["id"]: r for r in pq.read_table(out / "render" / "metadata").to_pylist()}
    for c in clips:  # what the report says is what the judge sees in the MP4 under render/
        result = judge_clip(decode_mp4(storage.read_bytes(meta[c["id"]]["video_uri"])))
        assert [c[f"found_{a}"] for a in ("shape", "colour", "background", "motion")] == \
               [result.shape, result.colour, result.background, result.motion]
        assert meta[c["id"]]["steps"] == 2

    assert main(args) == 0  # a rerun renders nothing twice
    run = json.loads((out / "render" / "run.json").read_text())
    assert run["counts"] == {"rows": 3, "rendered": 0, "skipped": 3, "failed": 0}

    image, lines = sheet_of_run(str(out / "render"), clips=3, frames=4)
    assert image.shape == (3 * 128 + 2 * 2, 4 * 128 + 3 * 2, 3) and lines[0].startswith("p0000: a red ball")


def test_reel_eval_rejects_a_bad_prompt_set_in_one_line(tmp_path, capsys):
    assert main(["eval", "--out", str(tmp_path / "o"), "--prompts", str(tmp_path / "missing.jsonl")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("reel eval: prompt set not found") and "\n" not in err
    assert not (tmp_path / "o").exists()


def test_contact_sheet_places_every_clip_row_by_row():
    a = np.zeros((8, 4, 6, 3), np.uint8)
    a[..., 0] = np.arange(8)[:, None, None] * 10  # frame index in red
    b = np.full((2, 2, 2, 3), 200, np.uint8)
    img = sheet([a, b], frames=3, scale=1)
    assert img.shape == (4 + 2 + 4, 3 * 6 + 2 * 2, 3)
    assert [img[0, x, 0] for x in (0, 8, 16)] == [0, 40, 70]  # frames 0, 4 (rounded from 3.5), 7
    assert (img[4:6] == 255).all()  # the gap between rows
    assert (img[7:9, 2:4] == 200).all() and (img[6, 0] == 255).all()  # the small clip, centred


@pytest.mark.parametrize("extra", [[], ["--scenes", "1"]])
def test_reel_eval_rejects_an_unknown_model_in_one_line(tmp_path, capsys, extra):
    out = tmp_path / "o"
    assert main(["eval", "--out", str(out), "--model", "no-such-model", "--no-progress", *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("reel eval: cannot load model 'no-such-model'") and "\n" not in err
    assert not out.exists() or not any(p.is_file() for p in out.rglob("*"))
