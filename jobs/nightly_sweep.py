"""The nightly sweep: `ray job submit -- python -m jobs.nightly_sweep MANIFEST_PREFIX --out OUT_PREFIX [...]`.

Renders every manifest (*.parquet, *.jsonl, or a folder of Parquet files) directly under
MANIFEST_PREFIX whose OUT_PREFIX/<name>/run.json is missing or records failed rows; idempotent.
Prints one summary at the end and writes it to OUT_PREFIX/_sweeps/<run id>.json. Exit status: 0 all
complete, 3 some rows failed, 2 a manifest or the prefix is unusable. Logic: pipeline/batch/sweep.py.
"""

import sys

from pipeline.batch.sweep import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
