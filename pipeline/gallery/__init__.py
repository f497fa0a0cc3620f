"""The review gallery over a run's OUT (`reel gallery`, `reel gallery --static`, `reel campaign export`).

    clips.py    OUT → display records, facets with counts, failed rows; spritesheets; provenance verdicts
    reviews.py  verdicts: one Parquet file per verdict under OUT/reviews/, the latest per clip wins
    page.py     the page (templates/: Jinja2 HTML with inlined CSS and plain JavaScript), the static copy
    app.py      the FastAPI app: the page, files with range requests, the review API, login off loopback
    export.py   the approved clips as a manifest to render again
"""
