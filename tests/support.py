"""What the tests share besides fixtures (conftest.py holds those): real photos and the uploads made from them,
torchvision's answers to compare with, the service started as a server (bench/harness.py, which the benchmarks
use too), a PostgreSQL server, a small disk. Test modules import from here, never from each other.
"""

from __future__ import annotations

import importlib.resources
import io
import os
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
import warnings
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.models import ResNet18_Weights

from bench import harness
from bench.harness import ObjectStore, free_port, other_weights, without_torch  # noqa: F401 (for the tests)

REPO = Path(__file__).resolve().parent.parent
PHOTOS = ("chelsea.png", "coffee.png", "astronaut.png", "rocket.jpg")
TOLERANCE = 1e-5  # parity of scores with the reference pipeline


def photo_bytes(name: str) -> bytes:
    """A real photo that ships inside the scikit-image wheel."""
    return (importlib.resources.files("skimage") / "data" / name).read_bytes()


def photo(name: str) -> Image.Image:
    return Image.open(io.BytesIO(photo_bytes(name)))


def encode(image: Image.Image, format: str = "PNG", **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format, **options)
    return buffer.getvalue()


def large_jpeg(name: str, shorter_side: int = 3000, seed: int = 0) -> bytes:
    """A scikit-image photo enlarged to a camera's size, with sensor-like noise so it keeps fine detail."""
    image = photo(name).convert("RGB")
    scale = shorter_side / min(image.size)
    image = image.resize((round(image.width * scale), round(image.height * scale)), Image.BICUBIC)
    noisy = np.asarray(image, dtype=np.float32) + np.random.default_rng(seed).normal(0, 3, (image.height, image.width, 3))
    return encode(Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)), "JPEG", quality=90)


def png(width: int, height: int, idat: bytes) -> bytes:
    """A greyscale PNG with the given size and compressed pixel data, written by hand."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def decompression_bomb() -> bytes:
    """64 megapixels of zeros in about 60 KB."""
    side = 8000
    return png(side, side, zlib.compress(b"\x00" * ((side + 1) * side), 9))


def corrupt_png() -> bytes:
    data = bytearray(photo_bytes("chelsea.png"))
    start = data.index(b"IDAT") + 200
    data[start : start + 2000] = bytes(2000)
    return bytes(data)


def upload(data: bytes, name: str = "photo.png", field: str = "file") -> dict:
    return {field: (name, data, "application/octet-stream")}


def in_process(app) -> Any:
    """A TestClient that runs the app's lifespan (its service starts and stops with it)."""
    with warnings.catch_warnings():
        # Starlette suggests httpx2 for its TestClient; httpx works the same.
        warnings.filterwarnings("ignore", message=".*httpx2.*")
        from fastapi.testclient import TestClient

    return TestClient(app, raise_server_exceptions=False)


def assert_top_k(predictions: list[dict], expected: torch.Tensor, k: int) -> None:
    """predictions are a correct top-k of the expected probabilities, best first."""
    labels = ResNet18_Weights.DEFAULT.meta["categories"]
    assert len(predictions) == k
    scores = [p["score"] for p in predictions]
    assert scores == sorted(scores, reverse=True)
    for p in predictions:
        assert p["label"] == labels[p["index"]]
        assert p["score"] == pytest.approx(expected[p["index"]].item(), abs=TOLERANCE)
    left_out = torch.ones_like(expected, dtype=torch.bool)
    left_out[[p["index"] for p in predictions]] = False
    if left_out.any():
        assert scores[-1] >= expected[left_out].max().item() - TOLERANCE


def block_the_worker(service, monkeypatch) -> tuple[threading.Event, threading.Event]:
    """Make the next forward pass wait (the cache off, so images reach it): (started, release) events for the
    test to watch and end it."""
    monkeypatch.setattr(service.batcher, "cache", None)
    started, release = threading.Event(), threading.Event()
    real_predict = service.batcher.predict

    def blocked_predict(batch):
        started.set()
        assert release.wait(30), "the test never released the forward pass"
        return real_predict(batch)

    monkeypatch.setattr(service.batcher, "predict", blocked_predict)
    return started, release


@dataclass
class Server(harness.Server):
    workdir: Path = REPO  # the server's current directory
    tmpdir: Path = REPO  # the server's TMPDIR


def start_server(tmp: Path, log: Path | None = None, **env: str) -> Server:
    """The service in a subprocess (bench/harness.py), started from an empty folder with an empty TMPDIR of its
    own, waited on until /ready. log: a file for the server's output (its logs); by default the test's output."""
    workdir, tmpdir = tmp / "cwd", tmp / "tmp"
    workdir.mkdir(parents=True)
    tmpdir.mkdir()
    env.setdefault("JOBS_DATABASE_URL", f"sqlite:///{tmp / 'jobs.sqlite3'}")
    environment = {**os.environ, "TMPDIR": str(tmpdir), "PYTHONDONTWRITEBYTECODE": "1", "LOG_LEVEL": "warning", **env}
    started = harness.start_server(environment, cwd=workdir, output=log.open("w") if log else None)
    return Server(started.url, started.process, started.startup_s, workdir, tmpdir)


# --- The slim replica: the seeded weights exported by python -m export, served where torch cannot be imported ---


def torch_is_mapped(pid: int) -> bool:
    """Whether a running process has any of torch's libraries loaded."""
    return "libtorch" in Path(f"/proc/{pid}/maps").read_text()


def export(out: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "export", "--out", str(out)], cwd=REPO, capture_output=True,
                          text=True, timeout=300, env={**os.environ, **env})

API_KEY = "s3cret-key-for-tests"
ALLOWED_ORIGIN = "https://app.example.com"


# --- PostgreSQL: a real server for the job store's tests and the replica tests -------------------------
# Debian's postgresql package (make test installs it). initdb refuses to run as root, so as root the
# server runs as the postgres user (runuser), in a temporary folder on a free port; pytest-postgresql
# would run it as the current user, hence this small fixture of our own.


@dataclass
class Postgres:
    bin: Path
    data: Path
    port: int
    databases: int = 0

    def run(self, tool: str, *args: str) -> subprocess.CompletedProcess:
        as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        return subprocess.run([*as_postgres, str(self.bin / tool), *args], check=True, capture_output=True, text=True)

    def start(self) -> None:
        self.run("pg_ctl", "-D", str(self.data), "-l", str(self.data.parent / "server.log"), "-w", "-o",
                 f"-p {self.port} -k {self.data.parent} -c listen_addresses=127.0.0.1", "start")

    def stop(self) -> None:
        self.run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")

    def new_database(self, location: Path | None = None) -> str:
        """A fresh, empty database on this server: its SQLAlchemy URL. location: a folder for its files (a
        tablespace there), instead of the server's data folder."""
        import psycopg

        self.databases += 1
        name = f"test_{self.databases}"
        with psycopg.connect(f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres", autocommit=True) as db:
            if location is None:
                db.execute(f"CREATE DATABASE {name}")
            else:
                location.mkdir(exist_ok=True)
                if os.geteuid() == 0:
                    shutil.chown(location, "postgres", "postgres")
                db.execute(f"CREATE TABLESPACE space_{name} LOCATION '{location}'")
                db.execute(f"CREATE DATABASE {name} TABLESPACE space_{name}")
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{name}"

    def drop_database(self, url: str) -> None:
        """Drop a database new_database made, and its tablespace if it has one (before its folder goes away)."""
        import psycopg

        name = url.rsplit("/", 1)[1]
        with psycopg.connect(f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres", autocommit=True) as db:
            db.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
            db.execute(f"DROP TABLESPACE IF EXISTS space_{name}")


def postgres_bin() -> Path:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"))
    if not found:
        raise RuntimeError("PostgreSQL is not installed: make test installs Debian's postgresql package")
    return found[-1].parent


# --- A small disk: a tmpfs the test fills, then grows (mount needs root, as make test does) ------------


@dataclass
class SmallDisk:
    path: Path

    def resize(self, megabytes: int) -> None:
        subprocess.run(["mount", "-o", f"remount,size={megabytes}m", str(self.path)], check=True)


# --- A real browser: Debian's chromium, driven by playwright -------------------------------------------


CHROMIUM = "/usr/bin/chromium"
# Headless, and none of the background traffic a closed network refuses.
CHROMIUM_ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--disable-quic"]


def photo_path(name: str) -> Path:
    path = Path(str(importlib.resources.files("skimage") / "data" / name))
    assert path.is_file()
    return path


@contextmanager
def browser_page(width: int = 420, height: int = 900) -> Iterator:
    from playwright.sync_api import sync_playwright

    if not shutil.which(CHROMIUM):
        pytest.fail(f"{CHROMIUM} is missing: apt-get install chromium (make test does it)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield browser.new_page(viewport={"width": width, "height": height})
        finally:
            browser.close()


# --- Where a process listens, read from the kernel's table of sockets ------------------------------------


LISTEN = "0A"  # the TCP state in /proc/net/tcp*


def address(hex_address: str) -> str:
    """/proc/net/tcp's hex address -> text: 0100007F -> 127.0.0.1; an IPv6 one, IPv4-mapped ones as IPv4."""
    raw = bytes.fromhex(hex_address)
    if len(raw) == 4:
        return socket.inet_ntop(socket.AF_INET, raw[::-1])
    ipv6 = b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4))  # four little-endian words
    text = socket.inet_ntop(socket.AF_INET6, ipv6)
    return text.removeprefix("::ffff:") if text.startswith("::ffff:") and "." in text else text


def listening(pid: int) -> dict[int, set[str]]:
    """The ports a process listens on, each with the addresses it is bound to."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    ports: dict[int, set[str]] = {}
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state == LISTEN and inode in inodes:
                host, port = local.split(":")
                ports.setdefault(int(port, 16), set()).add(address(host))
    return ports


# --- What a service exposes: its metrics, its routes --------------------------------------------------


def every_route(app) -> list[tuple[str, str]]:
    """(method, path template) of every HTTP route of the app, those left out of the OpenAPI document too."""
    def flattened(routes):
        for route in routes:
            included = getattr(route, "original_router", None)  # FastAPI keeps an included router whole
            yield from flattened(included.routes) if included is not None else (route,)

    return sorted((method, route.path) for route in flattened(app.router.routes)
                  for method in (getattr(route, "methods", None) or ()) if method != "HEAD")


def wait_until(condition: Callable[[], object], timeout_s: float = 60) -> None:
    """Poll condition until it holds; fail after timeout_s (generous: the suite runs on slow machines too)."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "the condition did not hold in time"
        time.sleep(0.01)


def metric(text: str, name: str, **labels: str) -> float:
    wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith(f"{name}{{{wanted}}} ") or (not labels and line.startswith(f"{name} ")):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


# --- Jobs over HTTP ---------------------------------------------------------------------------------


def variants(count: int) -> list[tuple[str, bytes]]:
    """count distinct real photos: scikit-image's, cropped and re-encoded as JPEG at different sizes."""
    out = []
    for i in range(count):
        image = photo(PHOTOS[i % len(PHOTOS)]).convert("RGB")
        side = 180 + (i * 37) % 200
        crop = image.crop((i % 40, i % 30, i % 40 + min(image.width - 40, side * 2), i % 30 + min(image.height - 30, side * 2)))
        out.append((f"photo-{i:04d}.jpg", encode(crop.resize((side, side * 3 // 4)), "JPEG", quality=85)))
    return out


def multipart(files: list[tuple[str, bytes]]) -> list:
    return [("files", (name, data, "image/jpeg")) for name, data in files]


def submit(server: Server, files: list[tuple[str, bytes]], *, k: int = 5, headers: dict | None = None,
           data: dict | None = None) -> httpx.Response:
    return httpx.post(f"{server.url}/jobs?k={k}", files=multipart(files), data=data, headers=headers, timeout=120)


def wait_for(server: Server, job_id: str, until=lambda job: job["status"] in ("succeeded", "failed", "canceled"),
             timeout: float = 120, headers: dict | None = None) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        job = httpx.get(f"{server.url}/jobs/{job_id}", headers=headers, timeout=10).json()
        if until(job):
            return job
        assert time.monotonic() < deadline, f"job still {job}"
        time.sleep(0.05)


def results(server: Server, job_id: str) -> list[dict]:
    return httpx.get(f"{server.url}/jobs/{job_id}/results", timeout=60).json()["results"]


def assert_online_answers(server: Server, entries: list[dict], photos: list[tuple[str, bytes]]) -> None:
    """A job's results are /predict/batch's answers for the same photos: labels, order, scores within 1e-6."""
    online = []
    for start in range(0, len(photos), 30):
        batch = httpx.post(f"{server.url}/predict/batch?k=5", files=multipart(photos[start : start + 30]), timeout=60)
        online += batch.json()["results"]
    assert len(entries) == len(online) == len(photos)
    for entry, answer, (name, _) in zip(entries, online, photos):
        assert entry["filename"] == name == answer["filename"]
        assert [p["index"] for p in entry["predictions"]] == [p["index"] for p in answer["predictions"]]
        assert all(abs(a["score"] - b["score"]) < 1e-6 for a, b in zip(entry["predictions"], answer["predictions"]))


# --- Loading the model as start-up does -----------------------------------------------------------------


def load(env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Load the model as the service's start-up does (model.load, with the settings these variables give), with
    torchvision's cache under an empty TORCH_HOME of the test's."""
    import model
    from classifier.settings import Settings

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    for name, value in env.items():
        if name.lower() not in Settings.model_fields:  # the environment torch reads itself (a proxy)
            monkeypatch.setenv(name, value)
    # RUNTIME_CACHE_DIR: the test's own folder, never the user's ~/.cache.
    return model.load(Settings.from_env({"RUNTIME_CACHE_DIR": str(tmp_path / "runtime-cache"), **env}))


def assert_refused(env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *fragments: str) -> None:
    from classifier.errors import ModelLoadError

    with pytest.raises(ModelLoadError) as refused:
        load(env, tmp_path, monkeypatch)
    for fragment in fragments:
        assert fragment in str(refused.value)


class Handler(BaseHTTPRequestHandler):
    """A test server's request handler: nothing logged; answer(status) sends an empty answer."""

    def answer(self, status: int, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@contextmanager
def http_server(handler: type[BaseHTTPRequestHandler]) -> Iterator[str]:
    """A small HTTP server of the test's own (a webhook receiver, an OTLP collector) on a free port of 127.0.0.1,
    serving from a thread; its base URL."""
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
