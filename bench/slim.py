"""Three replicas side by side in one run: torch (the default), torch with BACKEND=onnxruntime (the same
forward pass as the slim replica's), and the slim replica (MODEL_ONNX, python -m export's file, run where
torch cannot be imported).

    python -m bench.slim [--seconds 10] [--out bench/results/slim.json]

For each: process start to /ready, resident memory once ready and after the load runs and 1,000 more
requests at c=8, its peak, and /predict at c=1 and c=8 with ImageNet-size JPEGs (cache off). Also run by
bench/benchmark.py (make bench), which checks their targets and publishes these rows.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import httpx

from bench.harness import (REPO, cpu_description, hey, imagenet_size_jpeg, multipart, print_rows, service_env,
                           start_server, without_torch)

SOAK_REQUESTS = 1000


def export(env: dict[str, str], out: Path) -> Path:
    subprocess.run([sys.executable, "-m", "export", "--out", str(out)], env=env, cwd=REPO, check=True, capture_output=True)
    return out


def measure(seconds: float) -> list[dict]:
    work = Path(tempfile.mkdtemp(prefix="bench-slim-"))
    env = service_env(work)
    body = work / "imagenet.multipart"
    body.write_bytes(multipart(imagenet_size_jpeg()))
    replicas = {"torch": {}, "onnxruntime": {"BACKEND": "onnxruntime"},
                "slim": {"MODEL_ONNX": str(export(env, work / "resnet18.onnx")), "MODEL_WEIGHTS": "",
                         **without_torch(work / "guard")}}
    rows = []
    for name, overrides in replicas.items():
        service = start_server({**env, **overrides})
        try:
            ready_mib = service.rss_mib()
            difference = httpx.get(f"{service.url}/model").json()["max_score_difference"]
            for concurrency in (1, 8):
                load = hey(f"{service.url}/predict", concurrency, seconds=seconds, body=body)
                rows.append({"row": f"replica {name} c={concurrency}", "requests": load.requests, "statuses": load.statuses,
                             "ok_per_s": round(load.ok_per_s, 1), "p50_ms": round(load.percentile(50) * 1000, 1),
                             "p99_ms": round(load.percentile(99) * 1000, 1)})
            hey(f"{service.url}/predict", 8, requests=SOAK_REQUESTS, body=body)
            rows.append({"row": f"replica {name}: start-up and memory", "startup_s": round(service.startup_s, 2),
                         "rss_ready_mib": round(ready_mib), "rss_after_1000_mib": round(service.rss_mib()),
                         "peak_rss_mib": round(service.rss_mib("VmHWM")), "max_score_difference": difference})
        finally:
            service.stop()
    return rows


def targets(rows: list[dict]) -> list[tuple[str, bool, str]]:
    """The slim replica's targets (issue 23), on rows of one run."""
    by_name = {row["row"]: row for row in rows}
    slim, slim_c8, ort_c8 = (by_name["replica slim: start-up and memory"], by_name["replica slim c=8"],
                             by_name["replica onnxruntime c=8"])
    ratio = slim_c8["ok_per_s"] / max(ort_c8["ok_per_s"], 1e-9)
    return [("slim replica: process start to /ready <= 3 s", slim["startup_s"] <= 3, f"{slim['startup_s']} s"),
            # In MiB, as /proc reports it and every memory figure here is given (the "MB").
            ("slim replica: RSS after 1000 requests <= 350 MiB", slim["rss_after_1000_mib"] <= 350,
             f"{slim['rss_after_1000_mib']} MiB"),
            ("slim replica c=8 >= 0.95 x the onnxruntime backend c=8", ratio >= 0.95, f"{ratio:.2f}x"),
            ("slim replica: probe within 1e-4 of torch (tests: 1e-5 of the reference)", slim["max_score_difference"] <= 1e-4,
             f"{slim['max_score_difference']:.1e}")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "slim.json")
    args = parser.parse_args()
    started = datetime.now(timezone.utc)
    rows = measure(args.seconds)
    print_rows(rows)
    checked = targets(rows)
    for name, met, value in checked:
        print(f"{'met ' if met else 'MISS'} {name}: {value}")
    args.out.write_text(json.dumps({"date": started.isoformat(timespec="seconds"), "cpu": cpu_description(),
                                    "seconds_per_run": args.seconds, "rows": rows,
                                    "targets": [{"target": name, "met": met, "value": value} for name, met, value in checked]},
                                   indent=1) + "\n")
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
