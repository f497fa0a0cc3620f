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
    _add_render_options(render)

    _add_campaign_parser(sub)

    args = parser.parse_args(argv)
    if args.command == "render":
        return _render(args)
    if args.command == "campaign":
        return _campaign(args)
    parser.error(f"unknown command {args.command}")
    return 2


def _add_render_options(p: argparse.ArgumentParser) -> None:
    """The options of a render run, shared by `reel render` and `reel campaign render`."""
    p.add_argument("--address", metavar="auto|HOST:PORT",
                        help="join this Ray cluster ('auto' finds the local one); default: RAY_ADDRESS if set, "
                             "else start a local Ray for this run")
    p.add_argument("--limit", type=int, metavar="N", help="render only the manifest's first N rows")
    p.add_argument("--resume", action=argparse.BooleanOptionalAction, default=True,
                        help="skip clips already under OUT with the same parameters (default: on)")
    p.add_argument("--recaptioner", metavar="NAME", help="recaptioner (default: the model's own, else 'plain')")
    p.add_argument("--replicas", type=int, metavar="N",
                        help="render replicas (default: one per GPU; without GPUs, one per CPU core / --threads)")
    p.add_argument("--gpus-per-replica", type=float, metavar="G", help="GPUs per render replica (default: 1 if the cluster has GPUs)")
    p.add_argument("--cpus-per-replica", type=float, metavar="C",
                   help="CPUs a render replica reserves in Ray (default: 1 with GPUs, 0.5 without)")
    p.add_argument("--threads", type=int, metavar="T",
                   help="torch threads per replica (default: 1 on CPU; raise it for big models, "
                        "fewer replicas use less memory)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


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


CAMPAIGN_HELP = """\
Expand a campaign spec (YAML: a prompt template, variant axes, placements, seeds, exclusions)
into a render manifest, or expand and render it in one go. Ids are derived from each variant's
values, so a re-expanded campaign maps to the same ids and a rerun renders nothing twice.
The spec format is described in pipeline/campaign.py and README.md. A malformed spec exits 2
with one line naming the line of the spec.
"""


def _add_campaign_parser(sub) -> None:
    campaign = sub.add_parser("campaign", help="expand (and render) a campaign of ad variants",
                              description=CAMPAIGN_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    csub = campaign.add_subparsers(dest="campaign_command", required=True, metavar="ACTION")
    for name, help_ in (("expand", "write the campaign's manifest"), ("render", "expand, then render the manifest")):
        p = csub.add_parser(name, help=help_, description=CAMPAIGN_HELP,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("spec", metavar="SPEC.yaml", help="campaign spec (local path or any fsspec URI)")
        if name == "expand":
            p.add_argument("--out", required=True, metavar="MANIFEST",
                           help="manifest URI to write (.parquet, or .jsonl for JSON Lines)")
        else:
            p.add_argument("--out", required=True, metavar="OUT",
                           help="output URI, as for `reel render`; the expanded manifest is kept as OUT/manifest.parquet")
        p.add_argument("--sample", type=int, metavar="N", help="a seeded sample of N variants instead of all")
        p.add_argument("--sample-seed", type=int, default=0, metavar="S", help="seed of the sample (default: %(default)s)")
        p.add_argument("--model", default=None, metavar="NAME|URI",
                       help="the model whose grid sizes the placements (default: the spec's model, else 'default')")
        if name == "render":
            _add_render_options(p)


def _campaign(args: argparse.Namespace) -> int:
    from pipeline import campaign, storage

    prog = f"reel campaign {args.campaign_command}"
    try:
        spec = campaign.load_spec(args.spec, model=args.model, source=args.spec) if args.spec.endswith((".yaml", ".yml")) \
            else campaign.load_spec(storage.read_bytes(args.spec).decode(), model=args.model, source=args.spec)
        rows = campaign.expand(spec, sample=args.sample, seed=args.sample_seed)
    except FileNotFoundError:
        print(f"{prog}: campaign spec not found: {args.spec}", file=sys.stderr)
        return 2
    except campaign.CampaignError as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return 2
    if args.campaign_command == "expand":
        campaign.write_manifest(rows, args.out)
        print(f"{len(rows)} rows ({len({r['variant'] for r in rows})} variants x {len(spec.placements)} placements) "
              f"→ {args.out}", file=sys.stderr)
        return 0
    manifest = storage.join(args.out, "manifest.parquet")
    campaign.write_manifest(rows, manifest)
    args.manifest, args.model = manifest, args.model or spec.model or "default"
    return _render(args)


if __name__ == "__main__":
    sys.exit(main())
