"""The `reel` command."""

from __future__ import annotations

import argparse
import sys

RENDER_HELP = """\
Render every row of a manifest into videos, thumbnails and metadata under OUT.

MANIFEST is a Parquet file, a folder of Parquet files, or a JSON Lines file, at any fsspec URI
(local path, file://, s3://, gs://). One row per clip; columns: id and prompt (required),
negative_prompt, seconds, fps, width, height, seed, steps, guidance, mode; any other column is
copied into the clip's metadata. S3-compatible stores are reached with the usual AWS settings
(AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or a profile).

Under OUT: videos/{id}.mp4, thumbnails/{id}.jpg, metadata/ (Parquet, one row per clip),
errors/ (Parquet: row, id, stage, reason for each row that failed in this run) and run.json.

Exit status: 0 every row rendered or skipped as already done; 3 some rows failed (the others
are rendered, errors/ says why); 2 the manifest, model or options are unusable (nothing written).
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="reel", description="reelforge: text-to-video batch rendering on Ray.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    render = sub.add_parser("render", help="render a manifest of prompts into videos",
                            description=RENDER_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    render.add_argument("manifest", metavar="MANIFEST", help="manifest URI (Parquet file or folder, or JSON Lines)")
    render.add_argument("--out", required=True, metavar="OUT", help="output URI (local folder, s3://bucket/prefix, …)")
    render.add_argument("--model", default="default", metavar="NAME|URI",
                        help="a shipped model name (default: %(default)s) or a folder/URI holding config.json "
                             "and its safetensors weights")
    render.add_argument("--address", metavar="auto|HOST:PORT",
                        help="join this Ray cluster ('auto' finds the local one); default: RAY_ADDRESS if set, "
                             "else start a local Ray for this run")
    render.add_argument("--limit", type=int, metavar="N", help="render only the manifest's first N rows")
    render.add_argument("--resume", action=argparse.BooleanOptionalAction, default=True,
                        help="skip clips already under OUT with the same parameters (default: on)")
    render.add_argument("--recaptioner", metavar="NAME", help="recaptioner (default: the model's own, else 'plain')")
    render.add_argument("--replicas", type=int, metavar="N",
                        help="render replicas (default: one per GPU, or one on a CPU-only cluster)")
    render.add_argument("--gpus-per-replica", type=float, metavar="G", help="GPUs per render replica (default: 1 if the cluster has GPUs)")
    render.add_argument("--cpus-per-replica", type=float, default=1.0, metavar="C", help="CPUs reserved per render replica (default: %(default)s)")
    render.add_argument("--threads", type=int, metavar="T", help="torch threads per CPU replica (default: the node's cores)")
    render.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")

    args = parser.parse_args(argv)
    if args.command == "render":
        return _render(args)
    parser.error(f"unknown command {args.command}")
    return 2


def _render(args: argparse.Namespace) -> int:
    from pipeline.render import RenderConfig, UsageError, render_manifest

    if args.limit is not None and args.limit < 0:
        print("reel render: --limit must be 0 or more", file=sys.stderr)
        return 2
    cfg = RenderConfig(
        manifest=args.manifest, out=args.out, model=args.model, recaptioner=args.recaptioner,
        address=args.address, limit=args.limit, resume=args.resume, replicas=args.replicas,
        gpus_per_replica=args.gpus_per_replica, cpus_per_replica=args.cpus_per_replica,
        threads_per_replica=args.threads, progress=args.progress,
    )
    try:
        summary = render_manifest(cfg)
    except UsageError as e:
        print(f"reel render: {e}", file=sys.stderr)
        return 2
    line = (f"rendered {summary.rendered}, skipped {summary.skipped}, failed {summary.failed} "
            f"of {summary.rows} rows in {summary.wall_seconds:.1f} s → {args.out}")
    print(line, file=sys.stderr)
    for err in summary.errors[:10]:
        print(f"  row {err.row} ({err.id or '-'}) {err.stage}: {err.reason}", file=sys.stderr)
    if len(summary.errors) > 10:
        print(f"  … {len(summary.errors) - 10} more in {args.out}/errors/", file=sys.stderr)
    return summary.exit_code


if __name__ == "__main__":
    sys.exit(main())
