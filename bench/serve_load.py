"""A small bounded load against a running `reel serve`: N concurrent creates, then M status polls
(spread over the created videos, C at a time), then a wait for the renders to finish.

    REEL_API_KEYS=bench reel serve --model tiny --out /tmp/online &
    .venv/bin/python bench/serve_load.py --url http://127.0.0.1:8000 --key bench --creates 16 --polls 400

Prints create and status latencies (p50 / p99), the 429 rejections, and how long the accepted
videos took to complete. No assertions: a benchmark prints figures.

    .venv/bin/python bench/serve_load.py --key bench --throughput --clients 8 --clips 32

measures batched serving instead, with the real `openai` client: `--clips` videos one at a time
(one client: create_and_poll, then the next), then the same number from `--clients` concurrent
clients; prints each side's clips per second and p50 / p99 latency (create to completed), their
ratios, and the server's `reel_render_batch_size` histogram (how full the batches were).
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
    body = {"prompt": "a red ball moves right on black", "seconds": a.seconds, "size": a.size, "steps": a.steps or 4}
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


def host_cpu() -> tuple[float, float] | None:
    """(busy, total) jiffies of this machine so far (Linux /proc/stat), None elsewhere."""
    try:
        with open("/proc/stat") as f:
            fields = [float(v) for v in f.readline().split()[1:]]
    except OSError:
        return None
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields) - idle, sum(fields)


def busy_cores(before: tuple[float, float] | None, after: tuple[float, float] | None) -> str:
    """How many of this machine's cores were busy on average between two `host_cpu` readings (server, clients and
    all: meaningful when the server runs here), e.g. "1.93 of 2"."""
    import os

    if before is None or after is None or after[1] == before[1]:
        return "n/a"
    cores = os.cpu_count() or 1
    return f"{(after[0] - before[0]) / (after[1] - before[1]) * cores:.2f} of {cores}"


def throughput(a: argparse.Namespace) -> None:
    """One client at a time against `a.clients` at once, the same number of clips each way."""
    import concurrent.futures
    import warnings

    import openai

    warnings.filterwarnings("ignore", category=DeprecationWarning)  # the SDK marks videos.* deprecated
    client = openai.OpenAI(base_url=f"{a.url}/v1", api_key=a.key, max_retries=0, timeout=600)
    extra = {"steps": a.steps} if a.steps else {}

    def one(i: int) -> float:
        t0 = time.perf_counter()
        video = client.videos.create_and_poll(prompt=f"a red ball moves right {i}", seconds=a.seconds, size=a.size,
                                              extra_body={"seed": i, **extra}, poll_interval_ms=a.poll_ms)
        if video.status != "completed":
            raise SystemExit(f"video {video.id} {video.status}: {video.error}")
        return time.perf_counter() - t0

    one(10**6)  # warm: the first render pays for lazy loads
    results = {}
    for name, workers in (("one at a time", 1), (f"{a.clients} clients", a.clients)):
        t0, cpu0 = time.perf_counter(), host_cpu()
        with concurrent.futures.ThreadPoolExecutor(workers) as pool:
            latencies = list(pool.map(one, range(a.clips * len(results), a.clips * (len(results) + 1))))
        wall = time.perf_counter() - t0
        busy = busy_cores(cpu0, host_cpu())
        results[name] = (a.clips / wall, percentile(latencies, 50), percentile(latencies, 99))
        print(f"{name:<14} {a.clips} clips in {wall:6.1f} s: {a.clips / wall:6.3f} clips/s   latency p50 "
              f"{results[name][1]:6.2f} s   p99 {results[name][2]:6.2f} s   this machine's cores busy {busy}",
              flush=True)
    (base, base_p50, _), (batched, p50, _) = results.values()
    print(f"throughput ratio {batched / base:.2f}x   p50 latency ratio {p50 / base_p50:.2f}x")
    metrics = httpx.get(f"{a.url}/metrics", headers={"Authorization": f"Bearer {a.key}"}).text
    print("\n".join(line for line in metrics.splitlines() if line.startswith("reel_render_batch_size")))


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--key", required=True, help="an API key the server accepts")
    p.add_argument("--creates", type=int, default=16, help="concurrent creates (default: %(default)s)")
    p.add_argument("--polls", type=int, default=400, help="status polls (default: %(default)s)")
    p.add_argument("--concurrency", type=int, default=16, help="polls in flight at once (default: %(default)s)")
    p.add_argument("--seconds", default="2")
    p.add_argument("--size", default="64x64")
    p.add_argument("--steps", type=int, help="sampling steps (default: 4; --throughput: the model's own)")
    p.add_argument("--timeout", type=float, default=300, help="give up waiting for renders after this many seconds")
    p.add_argument("--throughput", action="store_true", help="one client at a time against --clients at once")
    p.add_argument("--clients", type=int, default=8, help="--throughput: concurrent clients (default: %(default)s)")
    p.add_argument("--clips", type=int, default=32, help="--throughput: clips each way (default: %(default)s)")
    p.add_argument("--poll-ms", type=int, default=50, help="--throughput: client poll interval (default: %(default)s)")
    args = p.parse_args()
    if args.throughput:
        throughput(args)
    else:
        asyncio.run(main(args))
