"""A small bounded load against a running `reel serve`: N concurrent creates, then M status polls
(spread over the created videos, C at a time), then a wait for the renders to finish.

    REEL_API_KEYS=bench reel serve --model tiny --out /tmp/online &
    .venv/bin/python bench/serve_load.py --url http://127.0.0.1:8000 --key bench --creates 16 --polls 400

Prints create and status latencies (p50 / p99), the 429 rejections, and how long the accepted
videos took to complete. No assertions: a benchmark prints figures.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

import httpx2 as httpx


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))] if ordered else float("nan")


def line(name: str, seconds: list[float]) -> str:
    ms = [s * 1000 for s in seconds]
    return (f"{name:<8} n={len(ms):<5} p50 {percentile(ms, 50):7.1f} ms   p99 {percentile(ms, 99):7.1f} ms   "
            f"max {max(ms, default=float('nan')):7.1f} ms")


async def main(a: argparse.Namespace) -> None:
    headers = {"Authorization": f"Bearer {a.key}"}
    body = {"prompt": "a red ball moves right on black", "seconds": a.seconds, "size": a.size, "steps": a.steps}
    limits = httpx.Limits(max_connections=a.concurrency)
    async with httpx.AsyncClient(base_url=a.url, headers=headers, timeout=60, limits=limits) as client:
        create_s: list[float] = []
        status: list[float] = []
        rejected, ids = 0, []

        async def create_one() -> None:
            nonlocal rejected
            t0 = time.perf_counter()
            r = await client.post("/v1/videos", json=body)
            create_s.append(time.perf_counter() - t0)
            if r.status_code == 429:
                rejected += 1
            elif r.status_code == 200:
                ids.append(r.json()["id"])
            else:
                raise SystemExit(f"create answered {r.status_code}: {r.text[:200]}")

        t_start = time.perf_counter()
        await asyncio.gather(*(create_one() for _ in range(a.creates)))
        sem = asyncio.Semaphore(a.concurrency)

        async def poll(i: int) -> None:
            async with sem:
                t0 = time.perf_counter()
                r = await client.get(f"/v1/videos/{ids[i % len(ids)]}")
                status.append(time.perf_counter() - t0)
                r.raise_for_status()

        if ids:
            await asyncio.gather(*(poll(i) for i in range(a.polls)))
        t_polled = time.perf_counter()
        pending = set(ids)
        while pending and time.perf_counter() - t_start < a.timeout:
            for video_id in list(pending):
                if (await client.get(f"/v1/videos/{video_id}")).json()["status"] in ("completed", "failed"):
                    pending.discard(video_id)
            await asyncio.sleep(0.5)
        t_done = time.perf_counter()

    print(line("create", create_s))
    print(line("status", status) + f"   ({a.polls / max(t_polled - t_start, 1e-9):.0f} polls/s with renders running)")
    print(f"rejected {rejected} of {a.creates} creates (429); accepted {len(ids)}")
    print(f"accepted videos done in {t_done - t_start:.1f} s ({len(ids) - len(pending)} finished"
          f"{', ' + str(len(pending)) + ' still pending' if pending else ''})"
          + (f"; {statistics.mean(create_s) * 1000:.1f} ms mean create" if create_s else ""))


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--key", required=True, help="an API key the server accepts")
    p.add_argument("--creates", type=int, default=16, help="concurrent creates (default: %(default)s)")
    p.add_argument("--polls", type=int, default=400, help="status polls (default: %(default)s)")
    p.add_argument("--concurrency", type=int, default=16, help="polls in flight at once (default: %(default)s)")
    p.add_argument("--seconds", default="2")
    p.add_argument("--size", default="64x64")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--timeout", type=float, default=300, help="give up waiting for renders after this many seconds")
    asyncio.run(main(p.parse_args()))
