"""Shared fixtures: seeded weights, torchvision's reference pipeline, the app in process and as a server.

Pretrained weights cannot be downloaded here, so the service is pointed at a seeded, randomly
initialised ResNet18. Correctness is proven by parity with torchvision's own pipeline.

One model is loaded per session (`runtime`); every in-process app is built on it by the factory
(app.create_app), from the settings a user gets by default (`settings`) or a variant of them (`app_with`).
Servers in subprocesses are for what needs a process: start-up, signals, memory, ports, replicas.
"""

from __future__ import annotations

import importlib.resources
import io
import os
import shutil
import struct
import subprocess
import sys
import threading
import warnings
import zlib
from collections.abc import Callable, Iterator
from typing import Any
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.models import ResNet18_Weights, resnet18

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))
import harness  # noqa: E402
from harness import free_port, without_torch  # noqa: E402
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


@pytest.fixture(scope="session")
def weights_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("weights") / "resnet18-seeded.pth"
    torch.manual_seed(0)
    torch.save(resnet18().state_dict(), path)
    os.environ["MODEL_WEIGHTS"] = str(path)
    # The in-process app's job store: a temporary file, never the working directory's data/.
    os.environ["JOBS_DATABASE_URL"] = f"sqlite:///{path.parent / 'jobs.sqlite3'}"
    os.environ["GRPC_PORT"] = "0"  # no gRPC server unless a test asks for one on a free port
    return path


@pytest.fixture(scope="session")
def reference_network(weights_file: Path) -> torch.nn.Module:
    """torchvision's ResNet18 with the seeded weights, in eval mode: images -> logits."""
    network = resnet18()
    network.load_state_dict(torch.load(weights_file, weights_only=True))
    return network.eval()


@pytest.fixture(scope="session")
def reference(reference_network: torch.nn.Module) -> Callable[[Image.Image], torch.Tensor]:
    """torchvision's reference pipeline: official transforms + the same weights + softmax."""
    network = reference_network
    transforms = ResNet18_Weights.DEFAULT.transforms()

    def probabilities(image: Image.Image) -> torch.Tensor:
        with torch.inference_mode():
            return torch.softmax(network(transforms(image.convert("RGB")).unsqueeze(0)), dim=1)[0]

    return probabilities


@pytest.fixture(scope="session")
def settings(weights_file: Path):
    """The settings a user gets by default, with the seeded weights, the job store in a temporary file (never
    the working directory's data/) and no gRPC server (a test that needs one asks for it on a free port)."""
    from settings import Settings

    return Settings.from_env({"MODEL_WEIGHTS": str(weights_file), "GRPC_PORT": "0",
                              "JOBS_DATABASE_URL": f"sqlite:///{weights_file.parent / 'jobs.sqlite3'}"})


@pytest.fixture(scope="session")
def runtime(settings):
    """The model, loaded once for every in-process app of the session."""
    import model

    return model.load(settings)


def in_process(app) -> Any:
    """A TestClient that runs the app's lifespan (its service starts and stops with it)."""
    with warnings.catch_warnings():
        # Starlette suggests httpx2 for its TestClient; httpx works the same.
        warnings.filterwarnings("ignore", message=".*httpx2.*")
        from fastapi.testclient import TestClient

    return TestClient(app, raise_server_exceptions=False)


@pytest.fixture(scope="session")
def client(settings, runtime) -> Iterator:
    from app import create_app

    with in_process(create_app(settings, runtime)) as client:
        yield client


@pytest.fixture(scope="session")
def service(client):
    """The in-process app's service: its batcher, cache, job worker."""
    return client.app.state.service


@pytest.fixture
def app_with(settings, runtime, tmp_path) -> Callable[..., Any]:
    """app_with(NAME=value, ...): a client of an app built on the session's model with these settings changed
    (as environment variables name them) and a job store of its own; use it in a `with` block."""
    from app import create_app

    def variant(**changes: str):
        from settings import Settings

        env = {"MODEL_WEIGHTS": str(settings.model_weights), "GRPC_PORT": "0",
               "JOBS_DATABASE_URL": f"sqlite:///{tmp_path / f'jobs-{len(changes)}-{abs(hash(str(changes)))}.sqlite3'}",
               **changes}
        return in_process(create_app(Settings.from_env(env), runtime))

    return variant


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


@pytest.fixture
def uncached(service, monkeypatch) -> None:
    """The in-process service with its cache off: every image is decoded and goes through a forward pass."""
    monkeypatch.setattr(service.batcher, "cache", None)


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


@pytest.fixture(scope="session")
def server(weights_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    server = start_server(tmp_path_factory.mktemp("server"))
    yield server
    server.stop()


# --- The slim replica: the seeded weights exported by python -m export, served where torch cannot be imported ---

def torch_is_mapped(pid: int) -> bool:
    """Whether a running process has any of torch's libraries loaded."""
    return "libtorch" in Path(f"/proc/{pid}/maps").read_text()


def export(out: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "export", "--out", str(out)], cwd=REPO, capture_output=True,
                          text=True, timeout=300, env={**os.environ, **env})


@pytest.fixture(scope="session")
def model_file(weights_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The seeded weights, exported by python -m export: what a slim replica serves."""
    path = tmp_path_factory.mktemp("export") / "resnet18.onnx"
    result = export(path, MODEL_WEIGHTS=str(weights_file))
    assert result.returncode == 0, result.stderr
    return path


@pytest.fixture(scope="session")
def slim_server(model_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A slim replica (MODEL_ONNX) in a process where torch cannot be imported."""
    tmp = tmp_path_factory.mktemp("slim")
    server = start_server(tmp, MODEL_ONNX=str(model_file), MODEL_WEIGHTS="", **without_torch(tmp / "guard"))
    yield server
    server.stop()


@pytest.fixture(scope="session", params=["torch", "slim"])
def any_server(request: pytest.FixtureRequest) -> Server:
    """The service as a server, with torch and as a slim replica: every answer must be the same."""
    return request.getfixturevalue("server" if request.param == "torch" else "slim_server")


API_KEY = "s3cret-key-for-tests"
ALLOWED_ORIGIN = "https://app.example.com"


@pytest.fixture(scope="session")
def guarded(weights_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, Path]]:
    """A server with an API key, a web origin allowed (CORS) and JSON logs, its output in a file."""
    tmp = tmp_path_factory.mktemp("guarded")
    log = tmp / "server.log"
    server = start_server(tmp, log=log, API_KEY=API_KEY, LOG_FORMAT="json", LOG_LEVEL="info", CORS_ORIGINS=ALLOWED_ORIGIN)
    yield server, log
    server.stop()


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


@pytest.fixture(scope="session")
def postgres() -> Iterator[Postgres]:
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix="pg-"))  # not under pytest's 0700 folders: the postgres user works in it
    server = Postgres(postgres_bin(), folder / "data", free_port())
    if os.geteuid() == 0:
        shutil.chown(folder, "postgres", "postgres")
    server.run("initdb", "-D", str(server.data), "-U", "postgres", "-A", "trust", "-E", "UTF8", "--no-sync")
    server.start()
    yield server
    server.stop()
    shutil.rmtree(folder, ignore_errors=True)


# --- A small disk: a tmpfs the test fills, then grows (mount needs root, as make test does) ------------


@dataclass
class SmallDisk:
    path: Path

    def resize(self, megabytes: int) -> None:
        subprocess.run(["mount", "-o", f"remount,size={megabytes}m", str(self.path)], check=True)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[SmallDisk]:
    """A 4 MB tmpfs, not under pytest's 0700 folders (the postgres user writes in it too)."""
    import tempfile

    path = Path(tempfile.mkdtemp(prefix="small-disk-"))
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m,mode=0777", "tmpfs", str(path)], check=True)
    try:
        yield SmallDisk(path)
    finally:
        subprocess.run(["umount", "--lazy", str(path)], check=False)
        path.rmdir()
