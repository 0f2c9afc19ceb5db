"""Throughput and latency on a CUDA GPU, fp32 beside fp16, at c=1, 8 and 64.

    python -m bench.gpu [--seconds 10]

Same service, same 500x375 JPEG and same `hey` load as bench/benchmark.py, with DEVICE=cuda. Decoding and
preprocessing stay on the CPU threads (DECODE_WORKERS), so on a GPU they are what bounds throughput.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import httpx

from bench.harness import hey, imagenet_size_jpeg, ms, multipart, service_env, start_server


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-gpu-"))
    env = {**service_env(work), "DEVICE": "cuda"}
    body = work / "imagenet.multipart"
    body.write_bytes(multipart(imagenet_size_jpeg()))
    print(f"{len(os.sched_getaffinity(0))} CPUs, {args.seconds:g} s per run", flush=True)
    for precision in ("fp32", "fp16", "bf16"):
        service = start_server({**env, "PRECISION": precision})
        info = httpx.get(f"{service.url}/model").json()
        print(f"{info['device']}, {precision}, batch <= {info['max_batch_size']}, "
              f"score difference from fp32 CPU {info['max_score_difference']:.1e}", flush=True)
        for concurrency in (1, 8, 64):
            load = hey(f"{service.url}/predict", concurrency, seconds=args.seconds, body=body)
            print(f"  {precision} c={concurrency:<3} {load.ok_per_s:7.1f} req/s  p50 {ms(load.percentile(50)):>7}"
                  f"  p99 {ms(load.percentile(99)):>7}  {load.statuses}", flush=True)
        service.stop()


if __name__ == "__main__":
    main()
