"""The response cache under load: distinct photos (every image computed), 30 % repeats, and all repeats.

    python -m bench.repeats [--seconds 10] [--concurrency 8]

One service with the cache on (CACHE_ENTRIES default); c clients send ImageNet-size JPEGs made from
scikit-image's photos, each request's photo chosen from a plan: new ones, or with the given share an
earlier one. Prints throughput, p50/p99 of all answers and of the repeats alone (the hits), and the service's
own hit count. Every other benchmark row runs with CACHE_ENTRIES=0, so no row is flattered by the cache.
Also run by bench/benchmark.py (make bench).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import re
import tempfile
import time
from pathlib import Path

import httpx

from bench.async_jobs import photos
from bench.harness import BOUNDARY, multipart, percentile, print_rows, service_env, start_server


def plan(distinct: list[bytes], requests: int, repeat_share: float, seed: int = 0) -> list[tuple[bytes, bool]]:
    """(body, is a repeat) for each request: a new photo, or with repeat_share one already sent."""
    rng, sent, fresh, out = random.Random(seed), [], iter(distinct), []
    for _ in range(requests):
        if sent and rng.random() < repeat_share:
            out.append((rng.choice(sent), True))
        else:
            body = multipart(next(fresh))
            sent.append(body)
            out.append((body, False))
    return out


async def drive(url: str, requests: list[tuple[bytes, bool]], concurrency: int, seconds: float) -> dict:
    headers = {"content-type": f"multipart/form-data; boundary={BOUNDARY}"}
    latencies: dict[bool, list[float]] = {True: [], False: []}
    statuses: dict[int, int] = {}
    queue = iter(requests)
    deadline = time.perf_counter() + seconds
    async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=concurrency)) as client:

        async def one_client() -> None:
            for body, repeat in queue:
                if time.perf_counter() >= deadline:
                    return
                started = time.perf_counter()
                response = await client.post(f"{url}/predict", content=body, headers=headers)
                latencies[repeat].append(time.perf_counter() - started)
                statuses[response.status_code] = statuses.get(response.status_code, 0) + 1

        started = time.perf_counter()
        await asyncio.gather(*(one_client() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    everything = latencies[True] + latencies[False]
    return {"ok_per_s": round(statuses.get(200, 0) / elapsed, 1), "statuses": statuses,
            "p50_ms": ms(everything, 50), "p99_ms": ms(everything, 99),
            "repeats": len(latencies[True]), "hit_p50_ms": ms(latencies[True], 50), "hit_p99_ms": ms(latencies[True], 99)}


def ms(values: list[float], q: int) -> float | None:
    return round(percentile(values, q) * 1000, 1) if values else None


ROWS = (("distinct photos, cache off", 0.0, "0"), ("distinct photos (cache on, every one a miss)", 0.0, "10000"),
        ("30 % repeats", 0.3, "10000"), ("all repeats (one photo)", 1.0, "10000"))  # name, repeat share, CACHE_ENTRIES


def measure(seconds: float, concurrency: int = 8) -> list[dict]:
    work = Path(tempfile.mkdtemp(prefix="bench-repeats-"))
    env = {**service_env(work), "JOBS_DATABASE_URL": f"sqlite:///{work / 'jobs.sqlite3'}"}
    distinct = photos(int(seconds * 120))  # more than any service here answers in `seconds`
    return [cache_row(env, distinct, name, share, entries, concurrency, seconds) for name, share, entries in ROWS]


def cache_row(env: dict[str, str], distinct: list[bytes], name: str, share: float, entries: str, concurrency: int,
              seconds: float) -> dict:
    """One row: a fresh service with an empty cache of `entries`, sent distinct photos with `share` repeats."""
    service = start_server({**env, "CACHE_ENTRIES": entries})
    try:
        requests = plan(distinct, len(distinct), share, seed=7) if share < 1 else [(multipart(distinct[0]), True)] * 100_000
        result = asyncio.run(drive(service.url, requests, concurrency, seconds))
        hits = float(re.search(r"^cache_hits_total (\S+)$", httpx.get(f"{service.url}/metrics").text, re.M).group(1))
        return {"row": f"cache: {name}, c={concurrency}", **result, "cache_hits": int(hits)}
    finally:
        service.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--concurrency", type=int, default=8)
    args = parser.parse_args()
    print_rows(measure(args.seconds, args.concurrency))


if __name__ == "__main__":
    main()
