"""`ServeConfig`: what the app is configured with (`reel serve` options or REELFORGE_* variables),
and the API keys it accepts (held as hashes)."""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pipeline import storage


@dataclass(frozen=True)
class ServeConfig:
    """Everything the app is configured with. `api_key_sha256` holds hashes of the keys, so no
    key travels to (or is checkpointed by) the Serve controller."""

    model: str = "default"
    out: str = "renders/online"
    store: str | None = None  # SQLite file; None: OUT/.serve/jobs.sqlite (local OUT), else ~/.reelforge/
    recaptioner: str | None = None  # None: the model's own, else "plain"
    api_key_sha256: tuple[str, ...] = ()
    replicas: int = 1  # render replicas (fixed); ignored when max_replicas is set
    min_replicas: int | None = None  # with max_replicas: autoscale the render deployment
    max_replicas: int | None = None
    cpus_per_replica: float = 0.5
    gpus_per_replica: float = 0.0
    threads_per_replica: int | None = 1  # torch threads per render replica (None: torch's default)
    # One render replica over several devices (pipeline/stages/replica.py); None: the model config's `parallel`
    sp: int | None = None  # sequence-parallel ranks
    tp: int | None = None  # tensor-parallel ranks
    cfg_parallel: bool | None = None  # guidance's two passes on two ranks
    dtype: str | None = None  # the model's precision (float32, bfloat16, float16); None: bf16 on GPUs, fp32 on CPUs
    offload: bool = False  # a Wan folder's text encoder and idle expert on the CPU between uses
    # Batched serving: a render replica samples up to max_batch_size concurrent text→video requests
    # of one shape and settings as one batch, waiting up to batch_wait_ms for the batch to fill;
    # None: 8 on GPU replicas, 1 (one at a time) on CPU ones, where a batch costs the same per
    # clip and only adds waiting (docs/THROUGHPUT.md)
    max_batch_size: int | None = None
    batch_wait_ms: int = 50
    ingress_cpus: float = 0.1
    max_queued: int = 64  # jobs waiting for a render slot; beyond: 429
    max_inflight_per_key: int = 8  # queued + in-progress jobs per API key; beyond: 429
    max_upload_bytes: int = 10 << 20  # request bodies (input_reference uploads)
    poll_after_ms: int = 2000  # the openai-poll-after-ms header on queued / in-progress videos
    graceful_shutdown_s: float = 20.0
    allow_private_urls: bool = False  # fetch input_reference image_urls on private/loopback addresses
    fetch_timeout_s: float = 10.0  # an input_reference image_url must answer within this
    # Where a request's `lora` adapters may come from: local folders or object-store prefixes
    # (s3://bucket/loras/); () takes no adapters. REELFORGE_LORA_ROOTS: comma-separated.
    lora_roots: tuple[str, ...] = ()

    def __post_init__(self):
        if (self.max_batch_size is not None and self.max_batch_size < 1) or self.batch_wait_ms < 0:
            raise ValueError(f"max_batch_size must be at least 1 and batch_wait_ms at least 0, got "
                             f"{self.max_batch_size} and {self.batch_wait_ms}")
        # Replicas do not share this process's working directory: local paths become absolute.
        object.__setattr__(self, "out", storage.absolute(self.out))
        if self.store:
            object.__setattr__(self, "store", os.path.abspath(os.path.expanduser(self.store)))
        object.__setattr__(self, "lora_roots", tuple(lora_root(r) for r in self.lora_roots))

    @property
    def store_path(self) -> str:
        if self.store:
            return self.store
        if storage.is_local(self.out):
            return os.path.join(self.out, ".serve", "jobs.sqlite")
        return os.path.expanduser("~/.reelforge/jobs.sqlite")

    def layout(self):
        """The render replica's parallel layout (`ParallelConfigError` when it cannot work)."""
        from models.interface import model_layout
        from pipeline.stages.replica import cfg_degree

        return model_layout(self.model, sp=self.sp, tp=self.tp, cfg=cfg_degree(self.cfg_parallel))

    def recaptioner_for(self, model_recaptioner: str | None) -> str:
        """The recaptioner spec: the configured one, else the model's own, else "plain"."""
        return self.recaptioner or model_recaptioner or "plain"

    @property
    def batch_size(self) -> int:
        """The most clips a render replica samples as one batch (`max_batch_size`, or its default)."""
        return self.max_batch_size or (8 if self.gpus_per_replica else 1)

    @property
    def render_slots(self) -> int:
        """Renders the dispatcher keeps in flight: a batch's worth per (maximum) render replica."""
        return max(1, self.max_replicas or self.replicas) * self.batch_size

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None, **overrides: Any) -> ServeConfig:
        """REELFORGE_<FIELD> variables (e.g. REELFORGE_MODEL, REELFORGE_OUT, REELFORGE_MAX_QUEUED),
        keys from REEL_API_KEYS (comma-separated) and REELFORGE_API_KEY_FILE; `overrides` win."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            raw = env.get(f"REELFORGE_{f.name.upper()}")
            if raw is None or f.name == "api_key_sha256":
                continue
            if f.name == "lora_roots":
                values[f.name] = tuple(r.strip() for r in raw.split(",") if r.strip())
                continue
            kind = str(f.type)
            if kind.startswith("bool"):
                values[f.name] = raw.strip().lower() in ("1", "true", "yes", "on")
                continue
            values[f.name] = ((int(raw) if "int" in kind else float(raw) if "float" in kind else raw)
                              if raw != "" else None)
        values["api_key_sha256"] = key_hashes(env)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


def lora_root(uri: str) -> str:
    """A LoRA root as the config holds it: a local folder absolute (replicas do not share the CLI's
    working directory; symlinks are resolved where requests are checked), an object-store prefix
    with its scheme lower-cased and one trailing "/" (s3://bucket/loras/ admits no s3://bucket/loras-x/).
    ValueError for an empty root or a chained fsspec URL (a::b), which no prefix comparison can judge."""
    uri = str(uri).strip()
    if not uri or "::" in uri or not (storage.is_local(uri) or "://" in uri):
        raise ValueError(f"lora root {uri!r}: give a local folder or a prefix such as s3://bucket/loras/")
    if storage.is_local(uri):
        return storage.absolute(uri)
    scheme, _, rest = uri.partition("://")
    return f"{scheme.lower()}://{rest.strip('/')}/" if rest.strip("/") else f"{scheme.lower()}://"


def read_key_file(path: str) -> list[str]:
    """One key per line; blank lines and lines starting with # are skipped."""
    text = storage.read_bytes(path).decode("utf-8")
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def key_hash(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def key_hashes(env: Mapping[str, str], key_file: str | None = None) -> tuple[str, ...]:
    """The hashes of the API keys a server accepts: REEL_API_KEYS (comma-separated), REELFORGE_API_KEY_FILE's
    and `key_file`'s (one a line)."""
    keys = [k.strip() for k in env.get("REEL_API_KEYS", "").split(",") if k.strip()]
    for path in (env.get("REELFORGE_API_KEY_FILE"), key_file):
        if path:
            keys += read_key_file(path)
    return tuple(sorted({key_hash(k) for k in keys}))


def known_key(key: str, hashes: Sequence[str]) -> str | None:
    """The hash of `key` when it is one of `hashes` (compared in constant time), else None."""
    digest = key_hash(key.strip())
    return digest if any(hmac.compare_digest(digest, known) for known in hashes) else None
