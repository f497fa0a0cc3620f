"""The render deployment: one replica renders one clip at a time with the batch stages' per-row
methods (recaption → inputs → render → write), into the same layout as `reel render`, plus the
API's spritesheet."""

from __future__ import annotations

import datetime as dt
import time
import uuid
from collections.abc import Iterator
from typing import Any

from ray import serve

from pipeline import storage
from pipeline.errors import UserError, one_line
from pipeline.media.contact_sheet import spritesheet
from pipeline.serve.config import ServeConfig


def output_uris(out: str, video_id: str) -> dict[str, str]:
    """The batch layout's keys for a clip, plus the API's spritesheet and the folder of its uploaded inputs."""
    from pipeline.stages.metadata import output_keys

    return {**output_keys(out, video_id), "spritesheet": storage.join(out, "spritesheets", f"{video_id}.jpg"),
            "inputs": storage.join(out, "inputs", video_id)}


def recorded_clip(metadata_uri: str) -> dict[str, Any]:
    """The request hash and frame count a clip's metadata (written last) records; {} while there is none."""
    table = storage.read_parquet_dataset(metadata_uri, columns=["request_sha256", "frames"])
    return table.to_pylist()[0] if table is not None and table.num_rows else {}


@serve.deployment(name="Renderer", max_ongoing_requests=1)
class Renderer:
    """One render replica: the batch stages' per-row methods, called in sequence for one clip."""

    def __init__(self, cfg: ServeConfig):
        from models.interface import describe_model
        from pipeline.stages.inputs import InputsUDF
        from pipeline.stages.prompt import RecaptionUDF
        from pipeline.stages.render import RenderUDF
        from pipeline.stages.write import ClipWriter

        self.out = cfg.out
        self.renderer = RenderUDF(cfg.model, num_threads=cfg.threads_per_replica, parallel=cfg.layout(),
                                  dtype=cfg.dtype, offload=cfg.offload)
        generator = self.renderer.generator
        # The model's caption style as the ingress reads it (a Wan generator has no reelforge config).
        self.recaptioner = RecaptionUDF(cfg.recaptioner_for(describe_model(cfg.model)[2]))
        self.inputs = InputsUDF(generator.limits)
        model = {"name": generator.info.name, "version": generator.info.version,
                 "weights_sha256": generator.info.weights_sha256}
        run_id = dt.datetime.now(dt.timezone.utc).strftime("serve-%Y%m%dT%H%M%SZ-") + uuid.uuid4().hex[:8]
        self.writer = ClipWriter(cfg.out, model, run_id)

    def ping(self) -> str:
        return self.writer.run_id

    def render(self, item: dict[str, Any]) -> Iterator[dict[str, Any]]:
        """Stream progress events for one clip. The last has progress 100 and either whether it
        rendered (False: its metadata already recorded the same request, nothing was done), with
        the clip's frame count, or `failed` {code, message}: refused by the safety gate, or an
        input that cannot be used (the user's to fix; anything else raises)."""
        from pipeline.media.encode import encode_jpeg
        from pipeline.stages.render import row_frames

        uris = output_uris(self.out, item["id"])
        recorded = recorded_clip(uris["metadata"])
        if recorded.get("request_sha256") == item["request_sha256"]:
            yield {"progress": 100, "rendered": False, "frames": recorded["frames"]}
            return
        yield {"progress": 5}
        self.recaptioner.recaption_row(item)
        if item.get("error"):  # the safety gate said no
            yield {"progress": 100, "failed": {"code": "moderation_blocked", "message": item["error"]}}
            return
        try:
            self.inputs.inputs_row(item)
        except UserError as e:
            yield {"progress": 100, "failed": {"code": "invalid_input", "message": one_line(e)}}
            return
        yield {"progress": 10}
        t0 = time.perf_counter()
        self.renderer.render_row(item)
        yield {"progress": 85}
        frames = row_frames(item)
        storage.write_bytes_atomic(uris["spritesheet"], encode_jpeg(spritesheet(frames)))
        self.writer.write(item, frames)  # metadata last: the clip is complete once it exists
        yield {"progress": 100, "rendered": True, "frames": len(frames), "seconds": time.perf_counter() - t0}
