"""Prometheus metrics of the API replica."""

from __future__ import annotations


class Metrics:
    """Prometheus metrics of one ingress replica, in a registry of its own."""

    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = r = CollectorRegistry()
        self.requests = Counter("reel_http_requests", "HTTP requests by route and status",
                                ["method", "route", "status"], registry=r)
        self.queued = Gauge("reel_queue_depth", "Videos queued for a render slot", registry=r)
        self.in_progress = Gauge("reel_videos_in_progress", "Videos rendering now", registry=r)
        self.render_seconds = Histogram("reel_render_seconds", "Seconds from render start to stored clip", registry=r,
                                        buckets=(0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800))
        self.batch_size = Histogram("reel_render_batch_size", "Clips sampled in the same batch as each rendered one",
                                    registry=r, buckets=(1, 2, 3, 4, 6, 8, 12, 16, 32))
        self.renders = Counter("reel_renders", "Jobs finished by the render deployment, by outcome",
                               ["outcome"], registry=r)
        self.failures = Counter("reel_render_failures", "Videos that failed to render", registry=r)
        self.rejections = Counter("reel_rejections", "Creates refused with 429, by reason", ["reason"], registry=r)

    def text(self, counts: dict[str, int]) -> bytes:
        from prometheus_client import generate_latest

        self.queued.set(counts["queued"])
        self.in_progress.set(counts["in_progress"])
        return generate_latest(self.registry)
