"""Offline at scale: python -m classify from local disk and from an S3-compatible server, the Ray Data run on a
local cluster, 100,000 objects listed and skipped by --resume, and kill -9 then --resume, in one run.

    python -m bench.offline [--out docs/results/offline.json]

Photos: PHOTOS JPEGs of four sizes (ImageNet's 500x375 to a phone's 12 MP) made from scikit-image's photos with
sensor-like noise. The S3-compatible server is moto's, a process on this machine sharing its cores: each GET costs
the machine CPU a real store would spend elsewhere. Every run is a process as a user starts it, timed from its start
to its exit (the model's load included); local and S3 runs are interleaved. Run by make bench; the performance page
publishes its file with its machine and date, and the offline page's cost table is computed from it.
"""

from __future__ import annotations

import io
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image

from bench.harness import (REPO, ObjectStore, Verdict, free_port, measure_and_write, photo, print_rows, rss_mib,
                           service_env)
from bench.latency import verdict

PHOTOS = 240
SIZES = ((500, 375), (1024, 768), (2000, 1500), (4000, 3000))
SOURCES = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png", "hubble_deep_field.jpg")
ROUNDS = 2
LISTED = 100_000
# Prices on paper for the cost table (assumed, not measured: edit them to yours). An on-demand x86 vCPU-hour of a
# compute-optimised instance, and S3 Standard's request prices (GET per 1,000, LIST per 1,000).
PRICES = {"vcpu_hour_usd": 0.0425, "get_per_1000_usd": 0.0004, "list_per_1000_usd": 0.005}


def photos() -> dict[str, bytes]:
    made = {}
    for i in range(PHOTOS):
        size, source = SIZES[i % len(SIZES)], SOURCES[i % len(SOURCES)]
        pixels = np.asarray(photo(source).convert("RGB").resize(size, Image.BICUBIC), dtype=np.float32)
        noisy = np.clip(pixels + np.random.default_rng(i).normal(0, 3, pixels.shape), 0, 255).astype(np.uint8)
        out = io.BytesIO()
        Image.fromarray(noisy).save(out, "JPEG", quality=90)
        made[f"{size[0]}x{size[1]}/{i:04d}.jpg"] = out.getvalue()
    return made


def run(command: list[str], env: dict[str, str], cwd: Path = REPO) -> dict:
    """A process to its exit: wall seconds, peak RSS (MiB), its stderr."""
    started = time.perf_counter()
    process = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, stderr = process.communicate()
    return {"wall_s": time.perf_counter() - started, "returncode": process.returncode, "stderr": stderr}


def run_measured(command: list[str], env: dict[str, str], cwd: Path = REPO) -> dict:
    """As run, and the child's peak resident memory: its VmHWM, read every 20 ms until it exits (wait4's
    ru_maxrss would count this process's memory at the fork)."""
    started = time.perf_counter()
    process = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peak = [0.0]

    def watch() -> None:
        while process.poll() is None:
            try:
                peak[0] = max(peak[0], rss_mib(process.pid, "VmHWM"))
            except (OSError, ValueError):
                pass
            time.sleep(0.02)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    _, stderr = process.communicate()
    watcher.join()
    return {"wall_s": time.perf_counter() - started, "returncode": process.returncode, "stderr": stderr,
            "peak_rss_mib": round(peak[0], 1)}


def checked(result: dict, what: str) -> dict:
    if result["returncode"] not in (0, 1):
        raise RuntimeError(f"{what} exited with {result['returncode']}: {result['stderr'][-2000:]}")
    return result


def classify_command(source: str, out: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "classify", source, "--out", out, *extra]


def pipeline_rate(stderr: str) -> float:
    """classify's own figure: images per second from its first read to its last line (the model loaded)."""
    return float(re.search(r"([\d.]+) images/s", stderr).group(1))


def lines_in(store: ObjectStore, bucket: str, prefix: str) -> list[dict]:
    client, lines = store.client(), []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for item in page.get("Contents", []):
            data = client.get_object(Bucket=bucket, Key=item["Key"])["Body"].read()
            lines += [json.loads(line) for line in data.decode().splitlines() if line.strip()]
    return lines


def ray_cluster(folder: Path, env: dict[str, str]) -> dict[str, str]:
    """A one-machine Ray cluster (its head node on 127.0.0.2: Ray turns 127.0.0.1 into the machine's outward
    address), with token authentication; the variables a driver needs. It offers a logical CPU per core and one
    more: a decode task per core beside the model actor, as classify runs a decoder per core beside its forward
    pass (with as many logical CPUs as cores, the actor's CPU would sit idle between batches, and decoding
    would have one core)."""
    port = free_port()
    ray_env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    subprocess.run([str(Path(sys.executable).parent / "ray"), "start", "--head", "--node-ip-address=127.0.0.2",
                    f"--port={port}", f"--num-cpus={len(os.sched_getaffinity(0)) + 1}", "--include-dashboard=false",
                    "--disable-usage-stats", f"--temp-dir={folder}"], env={**env, **ray_env}, check=True, capture_output=True, timeout=300)
    return {**ray_env, "RAY_ADDRESS": f"127.0.0.2:{port}"}


def largest_difference(ray_rows: list[dict], lines: list[dict]) -> tuple[int, float]:
    """(rows whose labels differ, the largest score difference) between the Ray run's rows and classify's lines."""
    expected = {line["path"]: line for line in lines}
    differing, largest = 0, 0.0
    for row in ray_rows:
        line = expected[row["path"]]
        if [p["index"] for p in row["predictions"]] != [p["index"] for p in line.get("predictions", [])]:
            differing += 1
        for got, want in zip(row["predictions"], line.get("predictions", [])):
            largest = max(largest, abs(got["score"] - want["score"]))
    return differing, largest


def measure(seconds: float) -> tuple[list[dict], list[Verdict]]:
    del seconds  # each run is a fixed amount of work, not a time
    import pyarrow.parquet as pq

    work = Path(tempfile.mkdtemp(prefix="bench-offline-"))
    env = service_env(work)
    store = ObjectStore.start()
    env = {**env, **store.env}
    rows: list[dict] = []
    targets: list[Verdict] = []
    try:
        made = photos()
        local = work / "photos"
        for name, data in made.items():
            (local / name).parent.mkdir(parents=True, exist_ok=True)
            (local / name).write_bytes(data)
        store.fill("photos", {f"in/{name}": data for name, data in made.items()})
        store.fill("results", {})
        megabytes = sum(map(len, made.values())) / 1e6
        print(f"{PHOTOS} photos, {megabytes:.0f} MB, sizes {', '.join(f'{w}x{h}' for w, h in SIZES)}", flush=True)

        # 1. Local disk and S3, interleaved; the runtime cache warmed first (BACKEND=auto's choice, made once).
        checked(run(classify_command(str(local / "500x375"), str(work / "warm.jsonl")), env), "the warm-up")
        runs: dict[str, list[dict]] = {"local": [], "s3": []}
        for round_ in range(ROUNDS):
            for where, source, out in (("local", str(local), str(work / f"local-{round_}.jsonl")),
                                       ("s3", "s3://photos/in/", f"s3://results/s3-{round_}")):
                result = checked(run_measured(classify_command(source, out), env), f"classify from {where}")
                runs[where].append({"wall_s": round(result["wall_s"], 2), "images_per_s": pipeline_rate(result["stderr"]),
                                    "peak_rss_mib": result["peak_rss_mib"]})
                print(f"classify from {where}: {runs[where][-1]}", flush=True)
        for where, measured in runs.items():
            rows.append({"row": f"classify from {'local disk' if where == 'local' else 'S3 (moto, this machine)'}",
                         "images": PHOTOS, "wall_s": round(sum(r["wall_s"] for r in measured) / ROUNDS, 2),
                         "images_per_s": round(sum(r["images_per_s"] for r in measured) / ROUNDS, 1),
                         "end_to_end_images_per_s": round(PHOTOS * ROUNDS / sum(r["wall_s"] for r in measured), 1),
                         "runs": measured})
        local_row, s3_row = rows[0], rows[1]
        targets.append(verdict("classify from S3 >= 0.9x from local disk (images/s, same photos)",
                               s3_row["images_per_s"], local_row["images_per_s"], least=0.9, what=" img/s"))
        local_lines = [json.loads(line) for line in (work / "local-0.jsonl").read_text().splitlines()]
        s3_lines = lines_in(store, "results", "s3-0/")
        same = {line["path"].removeprefix(str(local) + "/"): line.get("predictions") for line in local_lines} == \
               {line["path"].removeprefix("s3://photos/in/"): line.get("predictions") for line in s3_lines}
        targets.append(("classify from S3: the same answers as from local disk", "met" if same else "MISS",
                        f"{len(s3_lines)} lines, identical: {same}"))

        # 2. The Ray Data run on a one-machine cluster, the same photos from S3, against classify's from S3.
        cluster = ray_cluster(Path(tempfile.mkdtemp(prefix="ray-")), env)
        try:
            ray_runs = []
            for round_ in range(ROUNDS):
                result = run([sys.executable, "-m", "classifier.cli.cluster", "s3://photos/in/", "--out",
                              f"s3://results/ray-{round_}", "--format", "parquet"],
                             {**env, **cluster, "PYTHONPATH": str(REPO)}, work)
                if result["returncode"] != 0:
                    raise RuntimeError(f"the Ray run exited with {result['returncode']}: {result['stderr'][-3000:]}")
                executed = re.search(r"execution finished in ([\d.]+) seconds", result["stderr"])
                ray_runs.append({"wall_s": round(result["wall_s"], 2),
                                 "ray_execution_s": float(executed.group(1)) if executed else None})
                print(f"Ray Data run: {ray_runs[-1]}", flush=True)
        finally:
            subprocess.run([str(Path(sys.executable).parent / "ray"), "stop", "--force"], capture_output=True, timeout=120)
        client = store.client()
        ray_rows = []
        for item in client.list_objects_v2(Bucket="results", Prefix="ray-0/")["Contents"]:
            data = client.get_object(Bucket="results", Key=item["Key"])["Body"].read()
            if data:
                ray_rows += pq.read_table(io.BytesIO(data)).to_pylist()
        differing, largest = largest_difference(ray_rows, s3_lines)
        ray_wall = sum(r["wall_s"] for r in ray_runs) / ROUNDS
        rows.append({"row": "Ray Data run (1 machine, 2 CPUs, from S3)", "images": PHOTOS, "wall_s": round(ray_wall, 2),
                     "end_to_end_images_per_s": round(PHOTOS / ray_wall, 1),
                     "ray_execution_s": ray_runs[0]["ray_execution_s"], "runs": ray_runs,
                     "rows_written": len(ray_rows), "labels_differing": differing,
                     "largest_score_difference": largest})
        targets.append(verdict("Ray Data run >= 0.8x classify (end to end, same photos from S3)",
                               PHOTOS / ray_wall, s3_row["end_to_end_images_per_s"], least=0.8, what=" img/s"))
        targets.append(("Ray Data run: classify's answers (<= 1e-5)", "met" if not differing and largest <= 1e-5 and
                        len(ray_rows) == PHOTOS else "MISS",
                        f"{len(ray_rows)} rows, {differing} with other labels, largest score difference {largest:.1e}"))

        # 3. 100,000 objects listed, all but 1,000 skipped by --resume (their lines written beforehand by the same
        # part writer: classifying 100,000 images here would take an hour), against 1,000 objects alone.
        tiny = made[next(iter(made))]
        started = time.perf_counter()
        store.fill("many", {f"in/{i:06d}.jpg": tiny for i in range(LISTED)}, threads=32)
        fill_s = time.perf_counter() - started
        version = local_lines[0]["model_version"]
        os.environ.update(store.env)
        from classifier import storage
        from classifier.cli.results import ResultsDataset

        storage.client.cache_clear()
        done = ResultsDataset(storage.ObjectURL("many", "out"), "jsonl", 5, (0, 1), 1000)
        prediction = local_lines[0]["predictions"]
        done.append([{"path": f"s3://many/in/{i:06d}.jpg", "predictions": prediction, "model_version": version}
                     for i in range(LISTED - 1000)])
        done.finish()
        store.fill("few", {f"in/{i:06d}.jpg": tiny for i in range(1000)})
        few = checked(run_measured(classify_command("s3://few/in/", "s3://few/out"), env), "1,000 objects")
        many = checked(run_measured(classify_command("s3://many/in/", "s3://many/out", "--resume"), env), "100,000 objects")
        written = lines_in(store, "many", "out/")
        paths = [line["path"] for line in written]
        exactly_once = len(paths) == len(set(paths)) == LISTED
        rows.append({"row": f"{LISTED:,} objects listed, {LISTED - 1000:,} skipped by --resume, 1,000 classified",
                     "wall_s": round(many["wall_s"], 1), "peak_rss_mib": many["peak_rss_mib"],
                     "fill_s": round(fill_s, 1), "every_key_once": exactly_once})
        rows.append({"row": "1,000 objects listed and classified", "wall_s": round(few["wall_s"], 1),
                     "peak_rss_mib": few["peak_rss_mib"]})
        growth = many["peak_rss_mib"] - few["peak_rss_mib"]
        targets.append((f"{LISTED:,} objects: peak RSS bounded (printed; vs 1,000 objects)",
                        "met" if exactly_once and growth < 200 else "MISS",
                        f"{many['peak_rss_mib']:.0f} MiB vs {few['peak_rss_mib']:.0f} MiB (+{growth:.0f} MiB for 99,000 "
                        f"more keys and their lines), every key once: {exactly_once}"))

        # 4. kill -9 in the middle of an object-storage run, then --resume.
        command = classify_command("s3://photos/in/", "s3://results/crash", "--part-size", "16")
        job = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 600
        while len(client.list_objects_v2(Bucket="results", Prefix="crash/").get("Contents", [])) < 3:
            if job.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the run to kill ended (or stalled) before writing 3 parts")
            time.sleep(0.05)
        job.send_signal(signal.SIGKILL)
        job.wait()
        before = len(lines_in(store, "results", "crash/"))
        checked(run(command + ["--resume"], env), "the resumed run")
        paths = [line["path"] for line in lines_in(store, "results", "crash/")]
        once = sorted(paths) == sorted(f"s3://photos/in/{name}" for name in made)
        rows.append({"row": "kill -9 mid-run, then --resume", "lines_before_resume": before, "lines_after": len(paths),
                     "every_key_exactly_once": once})
        targets.append(("kill -9 mid-run, then --resume: every key exactly once", "met" if once else "MISS",
                        f"killed after {before} lines in whole parts; {len(paths)} lines for {PHOTOS} keys after --resume"))
    finally:
        store.stop()
        shutil.rmtree(work, ignore_errors=True)
    print_rows(rows)
    return rows, targets


def main() -> None:
    measure_and_write(__doc__, REPO / "docs" / "results" / "offline.json", measure, photos=PHOTOS,
                      sizes=[f"{w}x{h}" for w, h in SIZES], cores=len(os.sched_getaffinity(0)), prices=PRICES)


if __name__ == "__main__":
    main()
