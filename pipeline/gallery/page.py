"""The gallery page: one server-rendered HTML document (templates/gallery.html, with its CSS and plain
JavaScript inlined, so the static copy is one file), and `write_static`, the read-only copy at
OUT/gallery/index.html whose links are relative (for a bucket with static hosting, or file://)."""

from __future__ import annotations

import json
import posixpath
from concurrent.futures import ThreadPoolExecutor
from functools import cache

import jinja2

from pipeline import storage
from pipeline.gallery.clips import SPRITES, Run, ensure_sprite, load_run

STATIC_PAGE = "gallery/index.html"


@cache
def _environment() -> jinja2.Environment:
    return jinja2.Environment(loader=jinja2.PackageLoader("pipeline.gallery", "templates"),
                              autoescape=True, trim_blocks=True, lstrip_blocks=True, undefined=jinja2.StrictUndefined)


def render_page(run: Run, *, static: bool, base: str, reviewer: str = "") -> str:
    """The page over `run`; media links are `base` + their key under OUT ("files/" when served,
    "../" in the static copy); `static` leaves out the review controls."""
    review = dict(next(f.counts for f in run.facets if f.key == "review"))
    totals = {state: review[state] for state in ("approved", "rejected")}
    # embedded in a <script> element: "</" must not close it
    clips_json = json.dumps(run.clips, ensure_ascii=False, default=str).replace("</", "<\\/")
    title = posixpath.basename(run.out.rstrip("/")) or run.out
    return _environment().get_template("gallery.html").render(
        title=title, out=run.out, clips=run.clips, errors=run.errors, facets=run.facets, totals=totals,
        static=static, base=base, reviewer=reviewer, clips_json=clips_json)


def write_static(out: str) -> str:
    """Write the read-only page to OUT/gallery/index.html (spritesheets under OUT/gallery/sprites/,
    made where missing); returns its URI."""
    run = load_run(out)
    made = set(storage.list_names(storage.join(out, SPRITES)))  # one listing, not a download of each
    missing = [clip for clip in run.clips if posixpath.basename(clip["sprite"]) not in made]
    with ThreadPoolExecutor(max_workers=4) as pool:  # ffmpeg decodes in its own processes
        list(pool.map(lambda clip: ensure_sprite(out, clip), missing))
    uri = storage.join(out, STATIC_PAGE)
    storage.write_bytes_atomic(uri, render_page(run, static=True, base="../").encode("utf-8"))
    return uri


def login_page(error: str = "") -> str:
    """The login form (POSTs the key; the answer sets an HttpOnly session cookie)."""
    return _environment().get_template("login.html").render(error=error)
