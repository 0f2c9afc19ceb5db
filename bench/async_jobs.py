"""Asynchronous jobs beside the other two ways of serving, measured side by side in one run.

    python -m bench.async_jobs [--images 500] [--seconds 10]

1. The same images through `python -m classify` and as one job (POST /jobs) on an otherwise idle
   service: the job's rate from its started_at to its finished_at, and from the submission on.
2. Online /predict at c=1 (hey) with no job, then while a long job runs: p50 and p99 with and without, and
   how many job images were classified meanwhile (the job gets only the capacity online traffic leaves idle).
3. Sporadic users: one /predict at a time with a random pause of 0-1 s after each answer (as people and
   most clients send), with no job and while a long job runs: p50, p90 and max with and without. Back-to-back
   load hides the wait behind a job batch (there is never a pause for a job batch to start in); this does not.
Also run by bench/benchmark.py (make bench).
"""

from __future__ import annotations

import argparse
import json
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import httpx
from PIL import Image

from bench.harness import (BOUNDARY, REPO, hey, imagenet_size_jpeg, jpeg, multipart, percentile, photo, print_rows,
                           service_env, start_server)

PHOTOS = ("chelsea.png", "coffee.png", "astronaut.png", "rocket.jpg", "motorcycle_left.png", "hubble_deep_field.jpg")


def photos(count: int) -> list[bytes]:
    """count distinct JPEGs about ImageNet's size (shorter side 300-500 px), cropped from scikit-image's photos."""
    out = []
    for i in range(count):
        image = photo(PHOTOS[i % len(PHOTOS)])
        side = 300 + (i * 13) % 200
        box = (i % 23, i % 17, image.width - (i % 19), image.height - (i % 11))
        out.append(jpeg(image.crop(box).resize((side * 4 // 3, side), Image.BICUBIC)))
    return out


def submit(url: str, images: list[bytes]) -> dict:
    files = [("files", (f"{i:05}.jpg", data, "image/jpeg")) for i, data in enumerate(images)]
    response = httpx.post(f"{url}/jobs?k=5", files=files, timeout=600)
    response.raise_for_status()
    return response.json()


def wait(url: str, job_id: str) -> dict:
    """The job once it has ended, asked with Prefer: wait, so polling does not take the CPU it measures."""
    while (job := httpx.get(f"{url}/jobs/{job_id}", headers={"Prefer": "wait=60"}, timeout=90).json())["status"] \
            not in ("succeeded", "failed", "canceled"):
        pass
    return job


def sporadic_users(url: str, body: bytes, seconds: float, seed: int = 0) -> list[float]:
    """One request at a time, a random pause of 0-1 s after each answer, for `seconds`: the latencies (s)."""
    pauses, latencies = random.Random(seed), []
    headers = {"content-type": f"multipart/form-data; boundary={BOUNDARY}"}
    deadline = time.perf_counter() + seconds
    with httpx.Client(timeout=60) as client:
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            client.post(f"{url}/predict", content=body, headers=headers).raise_for_status()
            latencies.append(time.perf_counter() - started)
            time.sleep(pauses.random())
    return latencies


def latency_row(name: str, latencies: list[float], **extra) -> dict:
    return {"row": name, "requests": len(latencies), "p50_ms": round(percentile(latencies, 50) * 1000, 1),
            "p90_ms": round(percentile(latencies, 90) * 1000, 1), "max_ms": round(max(latencies) * 1000, 1), **extra}


def seconds_between(start: str, end: str) -> float:
    return (datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds()


def measure(images: int, seconds: float) -> list[dict]:
    work = Path(tempfile.mkdtemp(prefix="bench-jobs-"))
    env = {**service_env(work), "JOBS_DATABASE_URL": f"sqlite:///{work / 'jobs.sqlite3'}", "MAX_JOB_FILES": "5000"}
    data = photos(images)
    folder = work / "photos"
    folder.mkdir()
    for i, image in enumerate(data):
        (folder / f"{i:05}.jpg").write_bytes(image)
    body = work / "online.multipart"
    body.write_bytes(multipart(imagenet_size_jpeg()))
    rows = []

    offline = subprocess.run([sys.executable, "-m", "classify", str(folder), "--out", str(work / "offline.jsonl")],
                             env=env, cwd=REPO, capture_output=True, text=True, check=True)
    offline_rate = float(re.search(r"([\d.]+) images/s", offline.stderr).group(1))

    service = start_server(env)
    try:
        submitted = time.perf_counter()
        job = wait(service.url, submit(service.url, data)["id"])
        total_s = time.perf_counter() - submitted
        job_rate = images / seconds_between(job["started_at"], job["finished_at"])
        rows.append({"row": f"offline job, python -m classify, {images} photos", "images_per_s": offline_rate})
        rows.append({"row": f"asynchronous job, {images} photos, no other traffic", "images_per_s": round(job_rate, 1),
                     "ratio_to_offline": round(job_rate / offline_rate, 2),
                     "images_per_s_from_submission": round(images / total_s, 1)})

        alone = hey(f"{service.url}/predict", 1, seconds=seconds, body=body)
        long_job = submit(service.url, data * max(1, round(seconds * offline_rate * 2 / images)))
        time.sleep(1)  # the job is running
        before = httpx.get(f"{service.url}/jobs/{long_job['id']}").json()["done"]
        beside = hey(f"{service.url}/predict", 1, seconds=seconds, body=body)
        after = httpx.get(f"{service.url}/jobs/{long_job['id']}").json()["done"]
        httpx.delete(f"{service.url}/jobs/{long_job['id']}")
        p50_alone, p50_beside = alone.percentile(50), beside.percentile(50)
        rows.append({"row": "online /predict c=1, no job", "ok_per_s": round(alone.ok_per_s, 1),
                     "p50_ms": round(p50_alone * 1000, 1), "p99_ms": round(alone.percentile(99) * 1000, 1)})
        rows.append({"row": "online /predict c=1 while a job runs", "ok_per_s": round(beside.ok_per_s, 1),
                     "p50_ms": round(p50_beside * 1000, 1), "p99_ms": round(beside.percentile(99) * 1000, 1),
                     "p50_ratio": round(p50_beside / p50_alone, 2),
                     "p99_ratio": round(beside.percentile(99) / alone.percentile(99), 2),
                     "job_images_per_s_meanwhile": round((after - before) / beside.seconds, 1)})

        online = body.read_bytes()
        quiet = sporadic_users(service.url, online, 2 * seconds)
        long_job = submit(service.url, data * max(1, round(seconds * offline_rate * 4 / images)))
        time.sleep(1)
        before = httpx.get(f"{service.url}/jobs/{long_job['id']}").json()["done"]
        started = time.perf_counter()
        busy = sporadic_users(service.url, online, 2 * seconds, seed=1)
        kept = (httpx.get(f"{service.url}/jobs/{long_job['id']}").json()["done"] - before) / (time.perf_counter() - started)
        httpx.delete(f"{service.url}/jobs/{long_job['id']}")
        rows.append(latency_row("sporadic online users, no job", quiet))
        rows.append(latency_row("sporadic online users while a job runs", busy,
                                p50_ratio=round(percentile(busy, 50) / percentile(quiet, 50), 2),
                                p90_ratio=round(percentile(busy, 90) / percentile(quiet, 90), 2),
                                job_images_per_s_meanwhile=round(kept, 1)))
    finally:
        service.stop()
        shutil.rmtree(work)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--seconds", type=float, default=10, help="duration of each online load run")
    args = parser.parse_args()
    rows = measure(args.images, args.seconds)
    print_rows(rows)
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
