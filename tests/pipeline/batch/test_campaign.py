"""Campaign specs: expansion, stable ids, seeded samples, exclusions, and errors that name the line."""

import textwrap

import pyarrow.parquet as pq
import pytest

from models.interface import describe_model
from pipeline.batch.campaign import CampaignError, expand, grid_size, load_spec
from pipeline.batch.manifest import ID_PATTERN, read_manifest, validate
from pipeline.cli import main

TINY = describe_model("tiny")[1]

SPEC = textwrap.dedent("""\
    campaign: spring
    template: "A {style} shot of {product} {setting}. {cta}"
    axes:
      product: [sneakers, backpack, bottle]
      setting: [on a ridge, in the rain]
      style: [cinematic, hand-drawn]
      cta: [Shop now., Limited drop.]
    placements:
      - {name: story, aspect: "9:16", seconds: 6}
      - {name: feed, aspect: "1:1", seconds: 4}
      - {name: banner, width: 128, height: 72, seconds: 2}
    seeds: 2
    exclude:
      - {product: backpack, setting: on a ridge}
      - {product: bottle, style: [hand-drawn]}
    """)


def spec(text=SPEC, **kw):
    return load_spec(text, limits=TINY, source="c.yaml", **kw)


def test_full_cross_product_with_exclusions():
    s = spec()
    rows = expand(s)
    # 3*2*2*2 = 24 variants; backpack on a ridge removes 4, bottle hand-drawn removes 4 → 16
    assert s.variant_count == 16
    assert len(rows) == 16 * 3 * 2
    assert not [r for r in rows if r["product"] == "backpack" and r["setting"] == "on a ridge"]
    assert not [r for r in rows if r["product"] == "bottle" and r["style"] == "hand-drawn"]
    ids = [r["id"] for r in rows]
    assert len(set(ids)) == len(ids) and all(ID_PATTERN.fullmatch(i) and i.startswith("spring-") for i in ids)
    r = next(r for r in rows if r["placement"] == "story")
    assert (r["width"], r["height"], r["seconds"]) == (72, 128, 6.0)
    assert r["prompt"] == f"A {r['style']} shot of {r['product']} {r['setting']}. {r['cta']}"
    assert {"campaign", "placement", "aspect", "product", "setting", "style", "cta"} <= set(r)
    # Every row is a valid manifest row for the model.
    from pipeline.batch.manifest import manifest_table

    specs, errors = validate(manifest_table(rows), TINY)
    assert not errors and len(specs) == len(rows)


def test_ids_are_stable_across_reexpansion_reordering_and_growth():
    def variant(r):
        return r["product"], r["setting"], r["style"], r["cta"], r["placement"], r["seed"]

    before = {variant(r): r["id"] for r in expand(spec())}
    # Axes and placements reordered, a new axis value and a changed template: the old variants keep their ids.
    reordered = SPEC.replace("product: [sneakers, backpack, bottle]", "product: [hoodie, bottle, backpack, sneakers]")
    reordered = reordered.replace('template: "A {style} shot', 'template: "Ad: a {style} shot')
    reordered = reordered.replace("  cta: [Shop now., Limited drop.]\n", "")
    reordered = reordered.replace("axes:\n", "axes:\n  cta: [Limited drop., Shop now.]\n")
    after = {variant(r): r["id"] for r in expand(spec(reordered))}
    assert before.items() <= after.items()
    assert len(after) > len(before)


def test_sample_is_seeded_and_grows_monotonically():
    s = spec()
    a, b = expand(s, sample=5, seed=7), expand(s, sample=5, seed=7)
    assert [r["id"] for r in a] == [r["id"] for r in b]
    assert len({r["variant"] for r in a}) == 5 and len(a) == 5 * 3 * 2
    other = expand(s, sample=5, seed=8)
    assert {r["variant"] for r in other} != {r["variant"] for r in a}
    bigger = expand(s, sample=8, seed=7)
    assert {r["id"] for r in a} <= {r["id"] for r in bigger}


def test_explicit_seeds_and_aspect_mapping():
    rows = expand(spec(SPEC.replace("seeds: 2", "seeds: [11, 12, 13]")))
    assert {r["seed"] for r in rows} == {11, 12, 13}
    for aspect, (w, h) in {16 / 9: (128, 72), 1.0: (64, 64), 9 / 16: (72, 128), 4 / 5: (64, 80)}.items():
        assert grid_size(aspect, TINY) == (w, h)
        assert w % TINY.size_multiple == 0 and h % TINY.size_multiple == 0


@pytest.mark.parametrize("edit, line, words", [
    (('"A {style} shot', '"A {mood} shot'), 2, "unknown variable {mood}"),
    (("setting: [on a ridge, in the rain]", "setting: []"), 5, "axis 'setting' is empty"),
    (('{name: feed, aspect: "1:1", seconds: 4}', '{name: feed, aspect: "wide", seconds: 4}'), 10, "aspect 'wide'"),
    (("width: 128, height: 72", "width: 130, height: 72"), 11, "nearest allowed is 128"),
    (('aspect: "9:16", seconds: 6', 'aspect: "9:16", seconds: 40'), 9, "maximum of 30 s at 8 fps"),
    (("seeds: 2", "seeds: 2\ncolour: red"), 13, "unknown key 'colour'"),
    (('{name: story, aspect: "9:16", seconds: 6}', '{name: story, ratio: "9:16", seconds: 6}'), 9,
     "unknown key 'ratio'"),
    (("- {product: backpack, setting: on a ridge}", "- {product: kayak}"), 14, "'kayak' is not a value"),
    (("- {product: backpack, setting: on a ridge}", "- {colour: red}"), 14, "unknown axis 'colour'"),
])
def test_errors_name_the_line(edit, line, words):
    with pytest.raises(CampaignError) as e:
        spec(SPEC.replace(*edit))
    msg = str(e.value)
    assert msg.startswith(f"c.yaml:{line}: "), msg
    assert words in msg and "\n" not in msg


def test_exclusions_removing_everything_and_bad_yaml():
    with pytest.raises(CampaignError, match=r"c.yaml:13: the exclusions remove every variant"):
        spec(SPEC.replace("- {product: backpack, setting: on a ridge}", "- {cta: [Shop now., Limited drop.]}"))
    with pytest.raises(CampaignError, match=r"c.yaml:4: not valid YAML"):
        spec("campaign: x\naxes:\n  a: [1\nplacements: []\n")


def test_cli_expand_and_bad_spec(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text(SPEC)
    out = tmp_path / "m.parquet"
    assert main(["campaign", "expand", str(path), "--out", str(out), "--model", "tiny", "--sample", "3"]) == 0
    table = read_manifest(str(out))
    assert table.num_rows == 3 * 3 * 2 and "product" in table.column_names
    assert main(["campaign", "expand", str(path), "--out", str(out), "--model", "tiny", "--sample", "3"]) == 0
    assert pq.read_table(out).column("id").to_pylist() == table.column("id").to_pylist()

    path.write_text(SPEC.replace("setting: [on a ridge, in the rain]", "setting: []"))
    capsys.readouterr()
    assert main(["campaign", "expand", str(path), "--out", str(tmp_path / "n.parquet"), "--model", "tiny"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"reel campaign expand: {path}:5: axis 'setting' is empty: give it at least one value"
    assert not (tmp_path / "n.parquet").exists()


def test_cli_render_expands_then_renders_and_rerun_skips(ray_session, tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text(SPEC.replace("seeds: 2", "seeds: 1\nsteps: 2").replace(
        '  - {name: story, aspect: "9:16", seconds: 6}\n  - {name: feed, aspect: "1:1", seconds: 4}\n', ""
    ).replace("width: 128, height: 72, seconds: 2", "width: 64, height: 32, seconds: 0.5"))
    out = tmp_path / "out"
    argv = ["campaign", "render", str(path), "--out", str(out), "--model", "tiny", "--sample", "1",
            "--cpus-per-replica", "0.5", "--no-progress"]
    assert main(argv) == 0
    videos = sorted(p.name for p in (out / "videos").iterdir())
    assert len(videos) == 1 and videos[0].startswith("spring-")
    assert read_manifest(str(out / "manifest.parquet")).num_rows == 1
    capsys.readouterr()
    assert main(argv) == 0
    assert "rendered 0, skipped 1, failed 0" in capsys.readouterr().err
