"""The `reel` command."""

from __future__ import annotations

import argparse
import os
import sys

RENDER_HELP = """\
Render every row of a manifest into videos, thumbnails and metadata under OUT.

MANIFEST is a Parquet file, a folder of Parquet files, or a JSON Lines file, at any fsspec URI
(local path, file://, s3://, gs://). One row per clip; columns: id and prompt (required),
negative_prompt, seconds, fps, width, height, seed, steps, guidance, mode, blur_faces; any other
column is copied into the clip's metadata. S3-compatible stores are reached with the usual AWS
settings (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or a profile).

Modes (the mode column; inferred from the columns a row fills when it names none):
  t2v          text → video (default)
  image        a single frame, written as images/{id}.png
  i2v          image (a PNG/JPEG/WebP URI) becomes the first frame
  extend       video (URI) + seconds more; direction forward (default) or backward; the output
               holds the input plus the new part unless extension_only is true
  interpolate  image + image_end (keyframes) or video + video_end (clips): fill the gap
  remix        video + a new prompt + strength in [0, 1] (0 keeps the video, 1 ignores it)
  storyboard   shots: a list of {prompt, seconds}; one video, each shot continuing the last
Rows with inputs and no width/height take the input's size, snapped to the model's grid.

Under OUT: videos/{id}.mp4 (videos/{id}.mkv with --codec ffv1; images/{id}.png for stills),
thumbnails/{id}.jpg, metadata/
(Parquet, one row per clip), errors/ (Parquet: row, id, stage, reason for each row that failed
in this run, e.g. stage safety: "blocked by policy: <category>") and run.json.

One replica over several devices: --sp, --tp and --cfg-parallel (default: the model config's
parallel section) spread each render replica over sp x tp x cfg ranks, a group of Ray actors in a
placement group of one bundle per rank (1 GPU + 1 CPU with GPUs, NCCL; without GPUs, gloo and the
replica's --cpus-per-replica split over the ranks), packed onto as few nodes as hold it; rank 0
returns the frames. Replicas: GPUs / (sp x tp x cfg), or one without GPUs. A layout the model
cannot take (tp not dividing the heads, cfg with guidance 1, ...) is refused before Ray starts.

Exit status: 0 every row rendered or skipped as already done; 3 some rows failed (the others
are rendered, errors/ says why); 2 the manifest, model or options are unusable (nothing written);
130 stopped by Ctrl-C or SIGTERM (run.json records what finished; the same command resumes).
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="reel", description="reelforge: text-to-video batch rendering on Ray.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    render = sub.add_parser("render", help="render a manifest of prompts into videos",
                            description=RENDER_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    render.add_argument("manifest", metavar="MANIFEST", help="manifest URI (Parquet file or folder, or JSON Lines)")
    render.add_argument("--out", required=True, metavar="OUT", help="output URI (local folder, s3://bucket/prefix, …)")
    render.add_argument("--model", default="default", metavar="NAME|URI",
                        help="a shipped model name (default: %(default)s), a folder/URI holding config.json "
                             "and its safetensors weights, or a diffusers Wan text-to-video folder/URI "
                             "(model_index.json)")
    _add_render_options(render)

    _add_campaign_parser(sub)
    _add_eval_parser(sub)
    _add_train_parser(sub)
    _add_serve_parser(sub)
    _add_verify_parser(sub)
    _add_gallery_parser(sub)

    args = parser.parse_args(argv)
    if args.command == "render":
        return _render(args)
    if args.command == "campaign":
        return _campaign(args)
    if args.command == "eval":
        return _eval(args)
    if args.command == "train":
        return _train(args)
    if args.command == "serve":
        return _serve(args)
    if args.command == "verify":
        return _verify(args)
    if args.command == "gallery":
        return _gallery(args)
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
    p.add_argument("--gpus-per-replica", type=float, metavar="G",
                   help="GPUs per render replica (default: 1 if the cluster has GPUs; 1 per rank of a "
                        "--sp/--tp/--cfg-parallel group)")
    p.add_argument("--cpus-per-replica", type=float, metavar="C",
                   help="CPUs a render replica reserves in Ray (default: 1 with GPUs, 0.5 without; a "
                        "group's are split over its ranks, 1 per rank with GPUs)")
    p.add_argument("--threads", type=int, metavar="T",
                   help="torch threads per replica, or per rank of a group (default: 1 on CPU; raise it "
                        "for big models, fewer replicas use less memory)")
    _add_parallel_options(p)
    p.add_argument("--policy", metavar="FILE|URI|none",
                   help="safety policy (JSON/YAML, see docs/SAFETY.md) checked on every prompt and caption "
                        "before sampling; blocked rows land in errors/ (default: the shipped policy; "
                        "'none' turns the gate off)")
    p.add_argument("--blur-faces", action="store_true",
                   help="blur faces in every output (a row can also ask with blur_faces=true)")
    p.add_argument("--codec", choices=("h264", "ffv1"), default="h264",
                   help="videos as H.264 MP4s (videos/{id}.mp4, default) or lossless RGB masters for grading "
                        "and editing, FFV1 in Matroska (videos/{id}.mkv); a changed codec renders again")
    _add_precision_options(p)
    _add_speed_options(p)
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


def _render(args: argparse.Namespace) -> int:
    from pipeline.batch.driver import RenderConfig, render_manifest
    from pipeline.errors import EXIT_INTERRUPTED, UsageError

    cfg = RenderConfig(
        manifest=args.manifest, out=args.out, model=args.model, recaptioner=args.recaptioner,
        address=args.address, limit=args.limit, resume=args.resume, replicas=args.replicas,
        gpus_per_replica=args.gpus_per_replica, cpus_per_replica=args.cpus_per_replica,
        threads_per_replica=args.threads, progress=args.progress, policy=args.policy,
        blur_faces=args.blur_faces, parallel=_parallel_overrides(args), codec=args.codec,
        dtype=args.dtype, offload=args.offload, step_cache=args.step_cache, compile=args.compile,
        disaggregate=args.disaggregate, stage_gpus=args.stage_gpus,
    )
    try:
        summary = render_manifest(cfg)
    except UsageError as e:
        print(f"reel render: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # before any clip was under way: nothing to record
        print("reel render: interrupted before rendering started; nothing written", file=sys.stderr)
        return EXIT_INTERRUPTED
    if summary.interrupted:
        print(f"reel render: interrupted; rendered {summary.rendered}, skipped {summary.skipped}, failed "
              f"{summary.failed} of {summary.rows} rows (run.json written; run it again to resume)", file=sys.stderr)
        return summary.exit_code
    line = (f"rendered {summary.rendered}, skipped {summary.skipped}, failed {summary.failed} "
            f"of {summary.rows} rows in {summary.wall_seconds:.1f} s → {args.out}")
    print(line, file=sys.stderr)
    if summary.report_error:  # errors/ was not written: every row's reason goes here
        print(f"reel render: {summary.report_error}", file=sys.stderr)
    shown = summary.errors if summary.report_error else summary.errors[:10]
    for err in shown:
        print(f"  row {err.row} ({err.id or '-'}) {err.stage}: {err.reason}", file=sys.stderr)
    if len(summary.errors) > len(shown):
        print(f"  … {len(summary.errors) - 10} more in {args.out}/errors/", file=sys.stderr)
    return summary.exit_code


def _add_parallel_options(p: argparse.ArgumentParser) -> None:
    """--sp / --tp / --cfg-parallel: one render replica over a group of ranks (reel render, reel serve)."""
    p.add_argument("--sp", type=int, metavar="N",
                   help="sequence parallelism: each replica's tokens split over N ranks (Ulysses x ring "
                        "attention; N may exceed the heads) (default: the model config's parallel.sp, 1)")
    p.add_argument("--tp", type=int, metavar="N",
                   help="tensor parallelism: each replica's heads and MLP split over N ranks; N must divide "
                        "the heads and widths (default: the model config's parallel.tp, 1)")
    p.add_argument("--cfg-parallel", action=argparse.BooleanOptionalAction, default=None,
                   help="run the conditional and unconditional passes of guidance on two ranks (needs "
                        "guidance != 1) (default: the model config's parallel.cfg)")


def _add_speed_options(p: argparse.ArgumentParser, render: bool = True) -> None:
    """--step-cache: skip the DiT's later blocks on steps where its input barely changed; --compile (render)."""
    from models.interface import DEFAULT_STEP_CACHE

    p.add_argument("--step-cache", type=float, nargs="?", const=DEFAULT_STEP_CACHE, metavar="THRESHOLD",
                   help="first-block step cache: a step whose first block's residual changed by less than "
                        f"THRESHOLD (relative) reuses the other blocks' last residual (default {DEFAULT_STEP_CACHE} "
                        "when given without a value; a row's step_cache column wins); part of each clip's "
                        "request; the metadata records the steps computed")
    if render:
        p.add_argument("--compile", action="store_true",
                       help="torch.compile the DiT's blocks in each replica (compiled at its first clip of each "
                            "size: minutes on CPUs, worth it on GPUs for long runs); frames equal to rounding")
        p.add_argument("--disaggregate", action="store_true",
                       help="text encoding and VAE decoding in actor pools of their own, so the render replicas "
                            "hold the DiT alone and only sample (for a text encoder or decode that does not fit "
                            "beside the DiT; docs/THROUGHPUT.md); the same frames. Off by default: on CPUs every "
                            "stage competes for the same cores")
        p.add_argument("--stage-gpus", type=float, default=0.0, metavar="G",
                       help="with --disaggregate: GPUs each text-encoding and decoding actor reserves (default 0: "
                            "CPU actors; 0.5 puts both on one GPU beside the DiT replicas' own)")


def _add_precision_options(p: argparse.ArgumentParser, offload_default: bool | None = False) -> None:
    """--dtype / --offload: the precision the model renders in, and a Wan folder's CPU offload."""
    from models.interface import DTYPES

    p.add_argument("--dtype", choices=DTYPES,
                   help="precision of the model (default: bfloat16 on GPUs, float32 on CPUs; a Wan folder keeps "
                        "its VAE and diffusers' fp32 modules in float32; the default model takes float32 and "
                        "bfloat16, as autocast); part of each clip's request (a change re-renders)")
    p.add_argument("--offload", action="store_true", default=offload_default,
                   help="a Wan folder's text encoder and idle expert (A14B) live on the CPU between uses: less "
                        "GPU memory, the same frames, slower")


def _parallel_overrides(args: argparse.Namespace) -> dict[str, int]:
    """--sp / --tp / --cfg-parallel as overrides of the model config's parallel section."""
    from pipeline.stages.replica import cfg_degree

    overrides = (("sp", args.sp), ("tp", args.tp), ("cfg", cfg_degree(args.cfg_parallel)))
    return {k: v for k, v in overrides if v is not None}


CAMPAIGN_HELP = """\
Expand a campaign spec (YAML: a prompt template, variant axes, placements, seeds, exclusions)
into a render manifest, or expand and render it in one go. Ids are derived from each variant's
values, so a re-expanded campaign maps to the same ids and a rerun renders nothing twice.
The spec format is described in pipeline/batch/campaign.py and README.md. A malformed spec exits 2
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
                           help="output URI, as for `reel render`; the expanded manifest is kept as "
                                "OUT/manifest.parquet")
        p.add_argument("--sample", type=int, metavar="N", help="a seeded sample of N variants instead of all")
        p.add_argument("--sample-seed", type=int, default=0, metavar="S",
                       help="seed of the sample (default: %(default)s)")
        p.add_argument("--model", default=None, metavar="NAME|URI",
                       help="the model whose grid sizes the placements (default: the spec's model, else 'default')")
        if name == "render":
            _add_render_options(p)
    export = csub.add_parser("export", help="write the approved clips of a render OUT as a manifest",
                             description="Write a manifest of the clips whose latest verdict in the gallery "
                                         "(OUT/reviews/) is approved: their rows as rendered, seeds and the "
                                         "campaign's columns included, to render them again.")
    export.add_argument("out", metavar="OUT", help="a reel render / reel campaign render output (any fsspec URI)")
    export.add_argument("--approved", action="store_true", required=True, help="export the approved clips")
    export.add_argument("--out", dest="picks", metavar="PICKS", help="manifest URI to write (.parquet, or .jsonl "
                                                                     "for JSON Lines; default: OUT/picks.parquet)")


def _campaign(args: argparse.Namespace) -> int:
    from pipeline import storage
    from pipeline.batch import campaign
    from pipeline.batch.manifest import write_manifest

    prog = f"reel campaign {args.campaign_command}"
    if args.campaign_command == "export":
        from pipeline.errors import UserError
        from pipeline.gallery.export import export_approved

        picks = args.picks or storage.join(args.out, "picks.parquet")
        try:
            count = export_approved(args.out, picks)
        except UserError as e:
            print(f"{prog}: {e}", file=sys.stderr)
            return 2
        print(f"{count} approved clips → {picks}", file=sys.stderr)
        return 0
    try:
        text = args.spec if args.spec.endswith((".yaml", ".yml")) else storage.read_bytes(args.spec).decode()
        spec = campaign.load_spec(text, model=args.model, source=args.spec)
        rows = campaign.expand(spec, sample=args.sample, seed=args.sample_seed)
    except FileNotFoundError:
        print(f"{prog}: campaign spec not found: {args.spec}", file=sys.stderr)
        return 2
    except campaign.CampaignError as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return 2
    if args.campaign_command == "expand":
        write_manifest(rows, args.out)
        print(f"{len(rows)} rows ({len({r['variant'] for r in rows})} variants x {len(spec.placements)} placements) "
              f"→ {args.out}", file=sys.stderr)
        return 0
    manifest = storage.join(args.out, "manifest.parquet")
    write_manifest(rows, manifest)
    args.manifest, args.model = manifest, args.model or spec.model or "default"
    return _render(args)


EVAL_HELP = """\
Render a prompt set and judge every clip by its pixels (docs/SHAPES_WORLD.md): adherence per
attribute (shape, colour, background, motion), for held-in and held-out colour-shape pairs apart,
and permanence (the share of frames in which the object is visible).

By default the shipped set of free-form user prompts (models/shapes/eval_prompts.jsonl: JSON Lines of
{"prompt", "shape", "colour", "background", "motion"}, an attribute null when the prompt leaves it
open) goes through the whole pipeline, as `reel render` would run it (recaptioner, model, H.264),
and the MP4s are judged. OUT gets render/ (resumable), clips.parquet (per prompt: caption,
intended and found attributes) and eval.json (the summary).

With --scenes N the model alone is judged instead: N fresh held-in and N held-out scenes rendered
from their canonical captions, no recaptioner (the summary goes to OUT/scenes.json).
"""


def _add_eval_parser(sub) -> None:
    p = sub.add_parser("eval", help="render a prompt set and judge the clips' adherence by their pixels",
                       description=EVAL_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, metavar="OUT", help="output URI for the renders and the report")
    p.add_argument("--prompts", metavar="URI", help="prompt set, JSON Lines (default: the shipped user-prompt set)")
    p.add_argument("--model", default="default", metavar="NAME|URI", help="model to judge (default: %(default)s)")
    p.add_argument("--recaptioner", metavar="NAME", help="recaptioner (default: the model's own)")
    p.add_argument("--steps", type=int, metavar="N", help="sampling steps (default: the model's)")
    p.add_argument("--guidance", type=float, metavar="G", help="guidance scale (default: the model's)")
    p.add_argument("--limit", type=int, metavar="N", help="only the first N prompts")
    p.add_argument("--scenes", type=int, metavar="N", help="judge the model alone on N held-in + N held-out scenes")
    p.add_argument("--seed", type=int, default=12345, metavar="S",
                   help="seed of the --scenes draw (default: %(default)s)")
    p.add_argument("--address", metavar="auto|HOST:PORT", help="Ray cluster to join (default: a local Ray)")
    p.add_argument("--replicas", type=int, metavar="N", help="render replicas (as for reel render)")
    p.add_argument("--threads", type=int, metavar="T", help="torch threads per replica (as for reel render)")
    _add_speed_options(p, render=False)
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


def _eval(args: argparse.Namespace) -> int:
    from pipeline import storage
    from pipeline.evaluate import EvalError, PromptEval, evaluate_prompts, evaluate_scenes, format_summary

    try:
        if args.scenes is not None:
            if args.scenes < 1:
                raise EvalError("--scenes must be 1 or more")
            summary = evaluate_scenes(args.model, clips=args.scenes, seed=args.seed, steps=args.steps,
                                      guidance=args.guidance, threads=args.threads, progress=args.progress,
                                      step_cache=args.step_cache)
            storage.write_json_atomic(storage.join(args.out, "scenes.json"), summary)
            report = storage.join(args.out, "scenes.json")
        else:
            summary = evaluate_prompts(PromptEval(
                out=args.out, model=args.model, recaptioner=args.recaptioner, steps=args.steps,
                guidance=args.guidance, limit=args.limit, address=args.address, replicas=args.replicas,
                threads_per_replica=args.threads, progress=args.progress, step_cache=args.step_cache,
                **({"prompts": args.prompts} if args.prompts else {})))
            report = storage.join(args.out, "eval.json")
    except EvalError as e:
        print(f"reel eval: {e}", file=sys.stderr)
        return 2
    print(format_summary(summary))
    print(f"→ {report}", file=sys.stderr)
    return 0


def _add_train_parser(sub) -> None:
    from pipeline.train import add_train_arguments

    p = sub.add_parser("train", help="train the default model on the shapes world (jobs/train_default.py)",
                       description="Train a model on the shapes world: the VAE, then the DiT, on DeepSpeed, "
                                   "resumable (--resume); in this process, or under Ray Train with --workers.")
    add_train_arguments(p)


def _train(args: argparse.Namespace) -> int:
    import json

    from pipeline.train import config_from_args, run_from_args

    try:
        config_from_args(args).check_init_from()
    except ValueError as e:  # ConfigError too: no such model
        print(f"reel train: {e}", file=sys.stderr)
        return 2
    print(json.dumps(run_from_args(args), default=str), flush=True)
    return 0


SERVE_HELP = """\
Serve the OpenAI Videos API (POST/GET /v1/videos, /v1/videos/{id}, /content, …) on Ray Serve.
Videos render with the same model, recaptioner, encoder and storage layout as `reel render`,
into OUT; accepted jobs are kept in a SQLite file (--store) and survive a restart.

Clients authenticate with a bearer key from REEL_API_KEYS (comma-separated) or --api-key-file
(one key a line); without any key the server does not start. /healthz and /readyz are open.
Every option has a REELFORGE_<OPTION> variable used by the application builder
`pipeline.serve.app:app_from_env` (cluster/rayservice.yaml).
"""


def _add_serve_parser(sub) -> None:
    p = sub.add_parser("serve", help="serve the OpenAI Videos API on Ray Serve",
                       description=SERVE_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    p.add_argument("--port", type=int, default=8000, help="port (default: %(default)s)")
    p.add_argument("--model", metavar="NAME|URI", help="model to serve (default: REELFORGE_MODEL, else 'default')")
    p.add_argument("--out", metavar="OUT", help="output URI (default: REELFORGE_OUT, else renders/online)")
    p.add_argument("--store", metavar="PATH", help="job store, a SQLite file (default: OUT/.serve/jobs.sqlite "
                                                   "for a local OUT, else ~/.reelforge/jobs.sqlite)")
    p.add_argument("--address", metavar="auto|HOST:PORT",
                   help="Ray cluster to join (default: RAY_ADDRESS, else a local Ray)")
    p.add_argument("--api-key-file", metavar="PATH", help="file of API keys, one a line (adds to REEL_API_KEYS)")
    p.add_argument("--recaptioner", metavar="NAME", help="recaptioner (default: the model's own, else 'plain')")
    p.add_argument("--replicas", type=int, metavar="N", help="render replicas (default: 1)")
    p.add_argument("--min-replicas", type=int, metavar="N", help="autoscaling: fewest render replicas")
    p.add_argument("--max-replicas", type=int, metavar="N", help="autoscaling: most render replicas (turns it on)")
    p.add_argument("--cpus-per-replica", type=float, metavar="C", help="CPUs a render replica reserves (default: 0.5)")
    p.add_argument("--gpus-per-replica", type=float, metavar="G", help="GPUs per render replica (default: 0)")
    p.add_argument("--threads", dest="threads_per_replica", type=int, metavar="T",
                   help="torch threads per render replica (default: 1)")
    p.add_argument("--max-batch-size", type=int, metavar="N",
                   help="concurrent text-to-video requests of one shape a replica samples as one batch (default: 8 "
                        "on GPU replicas, 1 (one at a time) on CPU ones)")
    p.add_argument("--batch-wait-ms", type=int, metavar="MS",
                   help="how long a replica waits for a batch to fill (default: 50)")
    p.add_argument("--max-queued", type=int, metavar="N", help="queued videos before creates get 429 (default: 64)")
    p.add_argument("--max-inflight-per-key", type=int, metavar="N",
                   help="queued + rendering videos per API key before 429 (default: 8)")
    p.add_argument("--max-upload-mb", type=float, metavar="MB", help="largest request body / upload (default: 10)")
    _add_parallel_options(p)
    _add_precision_options(p, offload_default=None)
    p.add_argument("--allow-private-urls", action="store_true", default=None,
                   help="fetch input_reference image_urls that resolve to private, loopback or link-local "
                        "addresses (default: refused; set it only where clients are trusted)")
    p.add_argument("--lora-root", action="append", dest="lora_roots", metavar="URI",
                   help="a local folder or object-store prefix (s3://bucket/loras/) a request's lora adapters "
                        "may come from; repeatable; relative URIs resolve under the first "
                        "(default: REELFORGE_LORA_ROOTS, comma-separated; none: requests naming lora get 400)")


def _serve(args: argparse.Namespace) -> int:
    from pipeline.batch.local_ray import local_ray_on_loopback
    from pipeline.errors import UsageError

    local_ray_on_loopback(args.address or os.environ.get("RAY_ADDRESS"))  # before serve.app imports ray
    from pipeline.serve.app import run
    from pipeline.serve.config import ServeConfig, key_hashes

    options = {k: getattr(args, k) for k in (
        "model", "out", "store", "recaptioner", "replicas", "min_replicas", "max_replicas", "cpus_per_replica",
        "gpus_per_replica", "threads_per_replica", "max_queued", "max_inflight_per_key", "allow_private_urls",
        "lora_roots", "max_batch_size", "batch_wait_ms", "sp", "tp", "cfg_parallel", "dtype", "offload")}
    if args.max_upload_mb is not None:
        options["max_upload_bytes"] = int(args.max_upload_mb * (1 << 20))
    try:
        cfg = ServeConfig.from_env(**options, api_key_sha256=key_hashes(os.environ, args.api_key_file))
    except (OSError, ValueError) as e:
        print(f"reel serve: {e}", file=sys.stderr)
        return 2
    if not cfg.api_key_sha256:
        print("reel serve: no API key: set REEL_API_KEYS (comma-separated) or pass --api-key-file", file=sys.stderr)
        return 2
    try:
        run(cfg, host=args.host, port=args.port, address=args.address)
    except UsageError as e:
        print(f"reel serve: {e}", file=sys.stderr)
        return 2
    return 0


VERIFY_HELP = """\
Check the provenance of rendered outputs: the invisible watermark in the frames (score and
verdict), the container tags (generator, model, weights sha256, caption hash) and the C2PA
manifest (validity and signer; REEL_C2PA_TRUST_ANCHORS names CA certificates to trust).
FILE is an MP4, Matroska (--codec ffv1), PNG or JPEG at a local path or any fsspec URI.

Exit status: 0 every file carries the watermark; 1 some file does not; 2 a file cannot be read.
"""


def _add_verify_parser(sub) -> None:
    p = sub.add_parser("verify", help="check the watermark, tags and C2PA manifest of rendered files",
                       description=VERIFY_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("files", nargs="+", metavar="FILE",
                   help="MP4, Matroska, PNG or JPEG (local path or fsspec URI)")
    p.add_argument("--json", action="store_true", help="print one JSON report per file (JSON Lines)")


def _verify(args: argparse.Namespace) -> int:
    import json

    from pipeline.media.provenance import ProvenanceError, UnreadableInput, format_report, read_provenance

    unmarked = unreadable = False
    for path in args.files:
        try:
            report = read_provenance(path)
        except (UnreadableInput, ProvenanceError) as e:
            print(f"reel verify: {e}", file=sys.stderr)
            unreadable = True
            continue
        print(json.dumps(report) if args.json else format_report(report), flush=True)
        unmarked |= not report["ok"]
    return 2 if unreadable else 1 if unmarked else 0


GALLERY_HELP = """\
Review a render OUT (any fsspec URI: a folder, s3://bucket/renders/spring) in a browser: every clip's
thumbnail (hover scrubs its spritesheet; click plays it), filters and grouping by the manifest's columns,
mode, model and review state, the clip's prompt, caption, seed, model, timings and provenance, and the
failed rows. Keys: j/k move, a approve, r reject, n note. Verdicts go to OUT/reviews/ (one Parquet file
each; the latest per clip wins); `reel campaign export OUT --approved` writes the approved clips'
manifest. Off loopback (--host 0.0.0.0) a key is required: the keys of `reel serve` (REEL_API_KEYS,
REELFORGE_API_KEY_FILE, --api-key-file), entered once in a login form that sets an HttpOnly cookie.
--static writes a read-only copy to OUT/gallery/index.html with relative links (static hosting, file://).
"""


def _add_gallery_parser(sub) -> None:
    p = sub.add_parser("gallery", help="review a render output in a browser: approve, reject, note",
                       description=GALLERY_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", metavar="OUT", help="a reel render output (local folder or any fsspec URI)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    p.add_argument("--port", type=int, default=8090, help="port (default: %(default)s)")
    p.add_argument("--api-key-file", metavar="PATH", help="file of API keys, one a line (adds to REEL_API_KEYS)")
    p.add_argument("--static", action="store_true", help="write OUT/gallery/index.html (read-only) and exit")


def _gallery(args: argparse.Namespace) -> int:
    from pipeline.errors import UserError

    try:
        if args.static:
            from pipeline.gallery.page import write_static

            print(f"reel gallery: wrote {write_static(args.out)}", file=sys.stderr)
            return 0
        from pipeline.gallery.app import serve_gallery
        from pipeline.serve.config import key_hashes

        serve_gallery(args.out, host=args.host, port=args.port,
                      api_key_sha256=key_hashes(os.environ, args.api_key_file))
    except (UserError, OSError, ValueError) as e:
        print(f"reel gallery: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
