"""Render a campaign: `ray job submit -- python -m jobs.render_campaign SPEC.yaml --out OUT [...]`.

Takes the same options as `reel campaign render` (expand the spec, keep the manifest as
OUT/manifest.parquet, render it); inside a Ray job it joins the job's cluster.
"""

import sys

from pipeline.cli import main

if __name__ == "__main__":
    sys.exit(main(["campaign", "render", *sys.argv[1:]]))
