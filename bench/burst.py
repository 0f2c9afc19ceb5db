"""Burst: many large uploads at once; memory must stay bounded and go back afterwards.

    python -m bench.burst [--clients 160] [--budget-mib 512]

Starts the service (MAX_BODY_BUFFER_BYTES from --budget-mib), warms it up, measures its RSS (the baseline),
then sends --clients uploads of a 24-megapixel, ~19 MB JPEG all at once, sampling the process's RSS every
20 ms. Prints the statuses, the peak over the baseline, and the RSS 10 seconds after the burst. The test
suite runs the same burst (tests/test_memory.py).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from bench.harness import BOUNDARY, imagenet_size_jpeg, multipart, photo, rss_mib, service_env, start_server


def phone_photo_19mb() -> bytes:
    """6000x4000 with sensor-like noise, JPEG quality 94 without chroma subsampling: about 19 MB."""
    image = photo("astronaut.png").resize((6000, 4000), Image.BICUBIC)
    noisy = np.asarray(image, dtype=np.float32) + np.random.default_rng(0).normal(0, 8, (4000, 6000, 3))
    buffer = io.BytesIO()
    Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=94, subsampling=0)
    return buffer.getvalue()


class RssSampler(threading.Thread):
    """The peak RSS of a process, sampled every 20 ms until stopped."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid, self.peak_mib, self._finished = pid, 0.0, threading.Event()

    def run(self) -> None:
        while not self._finished.wait(0.02):
            self.peak_mib = max(self.peak_mib, rss_mib(self.pid))

    def stop(self) -> float:
        self._finished.set()
        self.join()
        return self.peak_mib


async def _burst(url: str, body: bytes, clients: int, small: bytes) -> tuple[Counter, list[int]]:
    """clients uploads of body at once; meanwhile small /predict requests, one after another."""
    headers = {"content-type": f"multipart/form-data; boundary={BOUNDARY}"}
    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:

        async def upload() -> str:
            try:
                return str((await client.post(f"{url}/predict", content=body, headers=headers)).status_code)
            except httpx.HTTPError as error:
                return type(error).__name__  # a reset connection or a timeout: never acceptable

        async def normal_traffic(done: asyncio.Event) -> list[int]:
            statuses = []
            while not done.is_set():
                statuses.append((await client.post(f"{url}/predict", content=small, headers=headers)).status_code)
                await asyncio.sleep(0.1)
            return statuses

        done = asyncio.Event()
        during = asyncio.create_task(normal_traffic(done))
        statuses = Counter(await asyncio.gather(*(upload() for _ in range(clients))))
        done.set()
        return statuses, await during


def burst(url: str, pid: int, clients: int, body: bytes, small: bytes) -> dict:
    """Fire the burst at a running service; RSS figures in MiB."""
    baseline = rss_mib(pid)
    sampler = RssSampler(pid)
    sampler.start()
    started = time.monotonic()
    statuses, during = asyncio.run(_burst(url, body, clients, small))
    seconds = time.monotonic() - started
    peak = sampler.stop()
    time.sleep(10)
    return {"statuses": dict(statuses), "during": dict(Counter(during)), "seconds": seconds,
            "baseline_mib": baseline, "peak_mib": peak, "settled_mib": rss_mib(pid)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=160)
    parser.add_argument("--budget-mib", type=int, default=512, help="MAX_BODY_BUFFER_BYTES, in MiB")
    args = parser.parse_args()

    env = service_env(Path(tempfile.mkdtemp(prefix="burst-")))
    env["MAX_BODY_BUFFER_BYTES"] = str(args.budget_mib * 1024 * 1024)
    photo_bytes = phone_photo_19mb()
    body, small = multipart(photo_bytes), multipart(imagenet_size_jpeg())
    service = start_server(env)
    try:
        for _ in range(20):  # warm-up: every code path has run once
            httpx.post(f"{service.url}/predict", content=small,
                       headers={"content-type": f"multipart/form-data; boundary={BOUNDARY}"}, timeout=30)
        print(f"burst: {args.clients} clients at once, each a {len(photo_bytes) / 1e6:.1f} MB JPEG (6000x4000); "
              f"MAX_BODY_BUFFER_BYTES {args.budget_mib} MiB", flush=True)
        result = burst(service.url, service.process.pid, args.clients, body, small)
    finally:
        service.stop()
    print(f"statuses: {result['statuses']} in {result['seconds']:.1f} s; normal /predict during the burst: {result['during']}")
    print(f"RSS: baseline {result['baseline_mib']:.0f} MiB, peak {result['peak_mib']:.0f} MiB "
          f"(+{result['peak_mib'] - result['baseline_mib']:.0f}), 10 s after the burst {result['settled_mib']:.0f} MiB "
          f"(+{result['settled_mib'] - result['baseline_mib']:.0f})")


if __name__ == "__main__":
    main()
