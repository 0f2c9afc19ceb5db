"""What the benchmarks and the tests share: photos made from scikit-image's (nothing is downloaded),
multipart bodies, the service started in a subprocess and waited on until ready, hey as the load, the CPU's name.
"""

from __future__ import annotations

import csv
import importlib.resources
import io
import os
import re
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import httpx
import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
BOUNDARY = "benchmark-boundary"


def photo(name: str) -> Image.Image:
    return Image.open(importlib.resources.files("skimage") / "data" / name).convert("RGB")


def jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def imagenet_size_jpeg() -> bytes:
    return jpeg(photo("chelsea.png").resize((500, 375), Image.BICUBIC))


def phone_size_jpeg(name: str = "astronaut.png", seed: int = 0) -> bytes:
    """12 megapixels with a little sensor-like noise, so it weighs (and decodes) like a phone photo."""
    big = np.asarray(photo(name).resize((4000, 3000), Image.BICUBIC), dtype=np.float32)
    noise = np.random.default_rng(seed).normal(0, 3, big.shape)
    return jpeg(Image.fromarray(np.clip(big + noise, 0, 255).astype(np.uint8)))


def multipart(data: bytes, filename: str = "photo.jpg") -> bytes:
    head = f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="{filename}"\r\n'
    return head.encode() + b"Content-Type: image/jpeg\r\n\r\n" + data + f"\r\n--{BOUNDARY}--\r\n".encode()


def cpu_description() -> str:
    """The CPU's name and the vector extensions that decide these figures (AVX-512, 8-bit dot products, bfloat16)."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    name = re.search(r"^model name\s*:\s*(.*)$", info, re.M)
    flags = re.search(r"^flags\s*:\s*(.*)$", info, re.M)
    present = set(flags.group(1).split()) if flags else set()
    shown = [flag for flag in ("avx2", "avx_vnni", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8")
             if flag in present]
    return f"{name.group(1) if name else 'unknown'}, {' '.join(shown) or 'no AVX2'}"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def rss_mib(pid: int, field_name: str = "VmRSS") -> float:
    """A process's resident memory (VmRSS), or its peak (VmHWM), in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


@dataclass
class Server:
    url: str
    process: subprocess.Popen
    startup_s: float  # from the process's start to its first 200 on /ready

    def rss_mib(self, field_name: str = "VmRSS") -> float:
        return rss_mib(self.process.pid, field_name)

    def stop(self, timeout: float = 30) -> int:
        """SIGTERM (the service drains), then its exit status; killed if it outlives timeout."""
        self.process.terminate()
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()


def start_server(env: dict[str, str], *, cwd: Path = REPO, output: IO | None = None, timeout: float = 300,
                 app: str = "app:app", app_dir: Path = REPO) -> Server:
    """The service as the image runs it, `python -m app` (another app: with uvicorn), on a free port of 127.0.0.1
    with exactly env (and HOST, PORT), from cwd; returns once /ready answers 200. output: where its logs go
    (default: this process's)."""
    port = free_port()
    started = time.perf_counter()
    command = ["-m", "app"] if app == "app:app" else ["-m", "uvicorn", app, "--port", str(port)]
    path = os.pathsep.join(filter(None, [str(app_dir), env.get("PYTHONPATH")]))  # cwd need not be the code's folder
    process = subprocess.Popen([sys.executable, *command], cwd=cwd, stdout=output, stderr=output,
                               env={**env, "PYTHONPATH": path, "HOST": "127.0.0.1", "PORT": str(port)})
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_ready(url, process, timeout)
    except RuntimeError:
        process.kill()
        raise
    return Server(url, process, time.perf_counter() - started)


def wait_until_ready(url: str, process: subprocess.Popen, timeout: float = 300) -> None:
    """Until url/ready answers 200; RuntimeError if the process exits first or timeout passes."""
    deadline = time.perf_counter() + timeout
    while time.perf_counter() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the service exited with {process.returncode} before it was ready; see its output")
        try:
            if httpx.get(f"{url}/ready", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"the service was not ready within {timeout:g} s")


NO_TORCH = """import sys


class NoTorch:  # a slim replica must never import torch or torchvision (bench/harness.py's guard)
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in ("torch", "torchvision"):
            raise ModuleNotFoundError(f"No module named {name!r}: torch is not importable here")


sys.meta_path.insert(0, NoTorch())
"""


def without_torch(folder: Path) -> dict[str, str]:
    """The environment of a process in which importing torch or torchvision fails (a sitecustomize guard)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(NO_TORCH)
    return {"PYTHONPATH": str(folder)}


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class Load:
    requests: int = 0
    seconds: float = 0
    cpu_s: float | None = None  # the service's CPU time during the run, when its pid was given
    statuses: dict[str, int] = field(default_factory=dict)
    latencies_s: dict[str, list[float]] = field(default_factory=dict)  # by status

    @property
    def ok_per_s(self) -> float:
        return self.statuses.get("200", 0) / self.seconds if self.seconds else 0.0

    def percentile(self, q: int, status: str = "200") -> float:
        return percentile(self.latencies_s.get(status, []), q)


def percentile(values: list[float], q: int) -> float:
    """The q-th percentile of values (q from 1 to 99; statistics' inclusive method), nan when there are none:
    every figure of the benchmarks is read this one way."""
    if len(values) < 2:
        return values[0] if values else float("nan")
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def drive(call: Callable[[], object], concurrency: int, seconds: float) -> dict:
    """Call `call` from `concurrency` threads at once, again and again, for `seconds`: answers per second and
    p50/p99 latency. The load for what hey cannot send: gRPC, Triton's clients, a different body each time."""
    latencies: list[float] = []
    lock = threading.Lock()
    deadline = time.perf_counter() + seconds

    def client() -> None:
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            if call() is False:  # nothing left to send
                return
            with lock:
                latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return {"ok_per_s": round(len(latencies) / (time.perf_counter() - started), 1),
            "p50_ms": round(percentile(latencies, 50) * 1000, 1), "p99_ms": round(percentile(latencies, 99) * 1000, 1)}


def hey(url: str, concurrency: int, *, seconds: float | None = None, requests: int | None = None,
        body: Path | None = None, pid: int | None = None, headers: dict[str, str] | None = None) -> Load:
    """Drive url with hey; per-request results come back as CSV. pid: the service's, to measure its CPU time."""
    command = ["hey", "-c", str(concurrency), "-o", "csv", "-t", "60"]
    command += ["-z", f"{seconds}s"] if seconds else ["-n", str(requests)]
    for name, value in (headers or {}).items():
        command += ["-H", f"{name}: {value}"]
    if body:
        command += ["-m", "POST", "-D", str(body), "-T", f"multipart/form-data; boundary={BOUNDARY}"]
    started, cpu_started = time.perf_counter(), cpu_seconds(pid) if pid else 0.0
    output = subprocess.run(command + [url], capture_output=True, text=True, check=True).stdout
    load = Load(seconds=time.perf_counter() - started, cpu_s=cpu_seconds(pid) - cpu_started if pid else None)
    for row in csv.DictReader(io.StringIO(output)):
        status = row["status-code"]
        load.requests += 1
        load.statuses[status] = load.statuses.get(status, 0) + 1
        load.latencies_s.setdefault(status, []).append(float(row["response-time"]))
    return load


def ms(seconds: float) -> str:
    return "-" if seconds != seconds else f"{seconds * 1000:.0f} ms"


def served_model():  # noqa: ANN201 (model.Runtime, and bytes -> input)
    """In a process whose environment chose the settings (service_env): the model as the service loads it, and
    the service's decoding and preprocessing of one upload."""
    import model
    from classifier.settings import get_settings

    settings = get_settings()
    runtime = model.load(settings)

    def prepare(data: bytes) -> np.ndarray:
        return runtime.prepare(data, settings.max_image_pixels, settings.jpeg_draft)

    return runtime, prepare


@dataclass
class ObjectStore:
    """An S3-compatible server speaking HTTP on 127.0.0.1 (moto's standalone server, a process of its own), and
    the AWS variables that point boto3 at it."""

    process: subprocess.Popen
    env: dict[str, str]

    @classmethod
    def start(cls, timeout: float = 60) -> ObjectStore:
        port = free_port()
        process = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        url = f"http://127.0.0.1:{port}"
        deadline = time.perf_counter() + timeout
        while True:
            try:
                httpx.get(url, timeout=1)
                break
            except httpx.TransportError:
                if process.poll() is not None or time.perf_counter() > deadline:
                    process.kill()
                    raise RuntimeError(f"moto's server did not answer on {url}") from None
                time.sleep(0.1)
        env = {"AWS_ENDPOINT_URL": url, "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
               "AWS_DEFAULT_REGION": "us-east-1"}
        return cls(process, env)

    def client(self):  # noqa: ANN201 (a boto3 S3 client)
        import boto3

        return boto3.client("s3", endpoint_url=self.env["AWS_ENDPOINT_URL"], region_name="us-east-1",
                            aws_access_key_id="test", aws_secret_access_key="test")

    def fill(self, bucket: str, objects: dict[str, bytes], threads: int = 16) -> None:
        """The bucket (created if new) with these objects."""
        from concurrent.futures import ThreadPoolExecutor

        client = self.client()
        if bucket not in {b["Name"] for b in client.list_buckets().get("Buckets", [])}:
            client.create_bucket(Bucket=bucket)
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(lambda item: client.put_object(Bucket=bucket, Key=item[0], Body=item[1]), objects.items()))

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(30)


def other_weights(folder: Path) -> Path:
    """Weights another seed makes: another model, as a fine-tuned one is to the first (service_env's are seed 0)."""
    import torch
    from torchvision.models import resnet18

    torch.manual_seed(1)
    path = folder / "resnet18-other.pth"
    torch.save(resnet18().state_dict(), path)
    return path


def service_env(work: Path) -> dict[str, str]:
    """The environment for the service: MODEL_WEIGHTS as given, or seeded random weights saved in work; the
    response cache off (hey sends one photo again and again: every request would be a hit)."""
    env = {**os.environ, "LOG_LEVEL": "warning", "CACHE_ENTRIES": "0",  # no row flattered by repeats (bench/repeats.py)
           "GRPC_PORT": "0",  # the gRPC rows ask for a port of their own
           "RUNTIME_CACHE_DIR": str(work / "runtime-cache")}  # the run's own: never the user's ~/.cache
    if not env.get("MODEL_WEIGHTS"):
        import torch
        from torchvision.models import resnet18

        torch.manual_seed(0)
        torch.save(resnet18().state_dict(), work / "resnet18-random.pth")
        env["MODEL_WEIGHTS"] = str(work / "resnet18-random.pth")
    return env


def print_rows(rows: list[dict]) -> None:
    """A benchmark's rows, one line each: its name, then its figures."""
    for row in rows:
        print(f"{row['row']:48} " + ", ".join(f"{key}={value}" for key, value in row.items() if key != "row"), flush=True)


Verdict = tuple[str, str, str]  # target, met / MISS / measured / ..., the value as said


def measure_and_write(description: str, default_out: Path,
                      measure: Callable[[float], tuple[list[dict], list[Verdict]]], **extra: object) -> None:
    """A benchmark's command line: --seconds per load run and --out; measure, print the verdicts, and write the
    results file (date, CPU, rows, targets) the performance page renders."""
    import argparse
    import json
    from datetime import datetime, timezone

    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--out", type=Path, default=default_out)
    args = parser.parse_args()
    started = datetime.now(timezone.utc)
    rows, targets = measure(args.seconds)
    print("\ntargets")
    for name, verdict, value in targets:
        print(f"  {verdict:8} {name:64} {value}")
    args.out.write_text(json.dumps({"date": started.isoformat(timespec="seconds"), "cpu": cpu_description(),
                                    "seconds_per_run": args.seconds, **extra, "rows": rows,
                                    "targets": [{"target": n, "verdict": v, "value": x} for n, v, x in targets]},
                                   indent=1) + "\n")
    print(f"written to {args.out}")
