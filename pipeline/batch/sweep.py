"""The nightly sweep: render every manifest under a prefix that has no complete run yet.

    MANIFESTS/spring.parquet      → OUT/spring/        (run.json says complete: skipped)
    MANIFESTS/summer.jsonl        → OUT/summer/        (no run.json yet: rendered)
    MANIFESTS/autumn/ (Parquet)   → OUT/autumn/        (run.json with failed > 0: rendered again)

A manifest is a `*.parquet` / `*.jsonl` object directly under the prefix, or a folder of Parquet
files; its name (the file's stem, or the folder's name) names its output folder. A run is complete
when OUT/<name>/run.json exists with exit_code 0 and no failed rows. Rendering again resumes: clips
already rendered with the same parameters are skipped, so the sweep is idempotent and safe to
rerun after a crash. One manifest that cannot be used (exit 2) does not stop the others.
"""

from __future__ import annotations

import json
import posixpath
import sys
import time
from dataclasses import asdict, dataclass, field, replace

from pipeline import storage
from pipeline.batch.driver import RenderConfig, render_manifest
from pipeline.errors import EXIT_OK, EXIT_ROWS_FAILED, EXIT_USAGE, UsageError

MANIFEST_SUFFIXES = (".parquet", ".jsonl")


@dataclass
class ManifestResult:
    name: str
    manifest: str
    out: str
    status: str  # "complete" (skipped), "rendered", "failed" (rows failed), "unusable"
    rendered: int = 0
    skipped: int = 0
    failed: int = 0
    reason: str = ""


@dataclass
class SweepSummary:
    manifests: list[ManifestResult] = field(default_factory=list)
    wall_seconds: float = 0.0

    @property
    def exit_code(self) -> int:
        if any(m.status == "unusable" for m in self.manifests):
            return EXIT_USAGE
        if any(m.status == "failed" for m in self.manifests):
            return EXIT_ROWS_FAILED
        return EXIT_OK

    def counts(self) -> dict[str, int]:
        out = {"manifests": len(self.manifests)}
        for status in ("complete", "rendered", "failed", "unusable"):
            out[status] = sum(m.status == status for m in self.manifests)
        for n in ("rendered", "skipped", "failed"):
            out[f"clips_{n}"] = sum(getattr(m, n) for m in self.manifests)
        return out

    def line(self) -> str:
        c = self.counts()
        return (f"sweep: {c['manifests']} manifests — {c['rendered']} rendered, {c['complete']} already complete, "
                f"{c['failed']} with failed rows, {c['unusable']} unusable; clips: {c['clips_rendered']} rendered, "
                f"{c['clips_skipped']} skipped, {c['clips_failed']} failed in {self.wall_seconds:.1f} s")


def find_manifests(prefix: str) -> list[tuple[str, str]]:
    """(name, manifest URI) for every manifest directly under `prefix`, sorted by name."""
    fs, path = storage.resolve(prefix)
    if not fs.exists(path):
        raise UsageError(f"manifest prefix not found: {prefix}")
    found: dict[str, str] = {}
    for entry in fs.ls(path, detail=True):
        base = posixpath.basename(entry["name"].rstrip("/"))
        if not base or base.startswith((".", "_")) or entry["name"].rstrip("/") == path.rstrip("/"):
            continue
        if entry.get("type") == "directory":
            name = base
        elif base.endswith(MANIFEST_SUFFIXES):
            name = base.rsplit(".", 1)[0]
        else:
            continue
        if name in found:
            raise UsageError(f"two manifests under {prefix} share the name {name!r} "
                             f"({posixpath.basename(found[name])}, {base}); their outputs would collide")
        found[name] = storage.join(prefix, base)
    return sorted(found.items())


def run_is_complete(out: str) -> bool:
    """True when OUT/run.json records a finished run with no failed rows and exit code 0."""
    uri = storage.join(out, "run.json")
    try:
        run = json.loads(storage.read_bytes(uri))
    except FileNotFoundError:
        return False
    except Exception:
        return False  # unreadable or half-written by an older tool: render again (resume skips done clips)
    return run.get("exit_code") == EXIT_OK and int(run.get("counts", {}).get("failed", 1)) == 0


def sweep(manifest_prefix: str, out_prefix: str, template: RenderConfig | None = None,
          *, dry_run: bool = False, log=None) -> SweepSummary:
    """Render each manifest under `manifest_prefix` whose OUT_PREFIX/<name>/run.json is not complete.

    `template` carries the render options (model, address, replicas, …); its manifest/out are replaced.
    """
    log = log or (lambda msg: print(msg, file=sys.stderr))
    template = template or RenderConfig(manifest="", out="")
    t0 = time.perf_counter()
    summary = SweepSummary()
    for name, manifest in find_manifests(manifest_prefix):
        out = storage.join(out_prefix, name)
        result = ManifestResult(name, manifest, out, "complete")
        if run_is_complete(out):
            summary.manifests.append(result)
            continue
        if dry_run:
            result.status = "pending"
            summary.manifests.append(result)
            continue
        log(f"sweep: rendering {manifest} → {out}")
        try:
            run = render_manifest(replace(template, manifest=manifest, out=out))
        except UsageError as e:
            result.status, result.reason = "unusable", str(e)
        else:
            result.rendered, result.skipped, result.failed = run.rendered, run.skipped, run.failed
            result.status = "failed" if run.failed else "rendered"
            if run.errors:
                result.reason = f"{run.errors[0].stage}: {run.errors[0].reason}"
        summary.manifests.append(result)
    summary.wall_seconds = time.perf_counter() - t0
    return summary


def write_summary(summary: SweepSummary, out_prefix: str, run_id: str) -> str:
    """OUT_PREFIX/_sweeps/<run_id>.json: counts and one entry per manifest."""
    uri = storage.join(out_prefix, "_sweeps", f"{run_id}.json")
    storage.write_json_atomic(uri, {"counts": summary.counts(), "exit_code": summary.exit_code,
                                    "wall_seconds": round(summary.wall_seconds, 3),
                                    "manifests": [asdict(m) for m in summary.manifests]})
    return uri


def main(argv: list[str] | None = None) -> int:
    """`python -m jobs.nightly_sweep MANIFEST_PREFIX --out OUT_PREFIX [render options]`."""
    import argparse
    import datetime as dt
    import uuid

    p = argparse.ArgumentParser(prog="nightly_sweep", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("prefix", metavar="MANIFEST_PREFIX", help="folder/prefix holding the manifests (any fsspec URI)")
    p.add_argument("--out", required=True, metavar="OUT_PREFIX", help="outputs go to OUT_PREFIX/<manifest name>/")
    p.add_argument("--model", default="default", metavar="NAME|URI")
    p.add_argument("--address", metavar="auto|HOST:PORT", help="Ray cluster (default: RAY_ADDRESS, else a local Ray)")
    p.add_argument("--recaptioner", metavar="NAME")
    p.add_argument("--replicas", type=int, metavar="N")
    p.add_argument("--gpus-per-replica", type=float, metavar="G")
    p.add_argument("--cpus-per-replica", type=float, default=1.0, metavar="C")
    p.add_argument("--threads", type=int, metavar="T")
    p.add_argument("--dry-run", action="store_true", help="list what would render; render nothing")
    args = p.parse_args(argv)
    template = RenderConfig(manifest="", out="", model=args.model, recaptioner=args.recaptioner,
                            address=args.address, replicas=args.replicas, gpus_per_replica=args.gpus_per_replica,
                            cpus_per_replica=args.cpus_per_replica, threads_per_replica=args.threads, progress=False)
    try:
        summary = sweep(args.prefix, args.out, template, dry_run=args.dry_run)
    except UsageError as e:
        print(f"nightly_sweep: {e}", file=sys.stderr)
        return EXIT_USAGE
    for m in summary.manifests:
        extra = f" — {m.reason}" if m.reason else ""
        print(f"  {m.status:9} {m.name}: rendered {m.rendered}, skipped {m.skipped}, failed {m.failed}{extra}",
              file=sys.stderr)
    if not args.dry_run:
        run_id = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ-") + uuid.uuid4().hex[:6]
        write_summary(summary, args.out, run_id)
    print(summary.line(), file=sys.stderr)
    return summary.exit_code
