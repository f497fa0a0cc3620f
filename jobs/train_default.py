"""Train the shipped default model on the shapes world (also `reel train`).

    python -m jobs.train_default --out .train/default [--resume] [--vae-steps N] [--dit-steps N]
                                 [--minutes M] [--workers N [--gpu]] [--model default] ...
    ray job submit -- python -m jobs.train_default --out /shared/train --workers 8 --gpu

Without `--workers` the job runs in this process (no Ray); with it, under Ray Train's TorchTrainer.
Checkpoints, caches and the loss curves (loss_vae.csv, loss_dit.csv, train_log.jsonl) go to --out;
--resume continues from the latest checkpoints there. The final weights are written to
--out/model.safetensors (or --export) with their sha256.
"""

from __future__ import annotations

import argparse
import json
import sys

from pipeline.train import add_train_arguments, run_from_args


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m jobs.train_default", description=__doc__.split("\n")[0])
    add_train_arguments(p)
    summary = run_from_args(p.parse_args(argv))
    print(json.dumps(summary, default=str), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
