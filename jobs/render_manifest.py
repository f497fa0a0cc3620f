"""Render one manifest: `ray job submit -- python -m jobs.render_manifest MANIFEST --out OUT [...]`.

Takes the same options as `reel render`; inside a Ray job it joins the job's cluster.
"""

import sys

from pipeline.cli import main

if __name__ == "__main__":
    sys.exit(main(["render", *sys.argv[1:]]))
