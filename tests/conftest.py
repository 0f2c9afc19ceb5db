"""Shared fixtures: seeded weights, torchvision's reference pipeline, the app in process and as a server.

Pretrained weights cannot be downloaded here, so the service is pointed at a seeded, randomly
initialised ResNet18. Correctness is proven by parity with torchvision's own pipeline.

One model is loaded per session (`runtime`); every in-process app is built on it by the factory
(app.create_app), from the settings a user gets by default (`settings`) or a variant of them (`app_with`).
Servers in subprocesses are for what needs a process: start-up, signals, memory, ports, replicas.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image
from torchvision.models import ResNet18_Weights, resnet18

from support import (ALLOWED_ORIGIN, API_KEY, ObjectStore, Postgres, Server, SmallDisk, export, free_port, in_process, postgres_bin,
                     start_server, without_torch)


@pytest.fixture(scope="session")
def weights_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("weights") / "resnet18-seeded.pth"
    torch.manual_seed(0)
    torch.save(resnet18().state_dict(), path)
    os.environ["MODEL_WEIGHTS"] = str(path)
    # The in-process app's job store: a temporary file, never the working directory's data/.
    os.environ["JOBS_DATABASE_URL"] = f"sqlite:///{path.parent / 'jobs.sqlite3'}"
    os.environ["GRPC_PORT"] = "0"  # no gRPC server unless a test asks for one on a free port
    # Not the user's ~/.cache: one folder for the session, so every process of it (the in-process model, each
    # server) reads the export and the runtime BACKEND=auto chose from the first start, and serves alike.
    os.environ["RUNTIME_CACHE_DIR"] = str(path.parent / "runtime-cache")
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
    from classifier.settings import Settings

    return Settings.from_env({"MODEL_WEIGHTS": str(weights_file), "GRPC_PORT": "0",
                              "RUNTIME_CACHE_DIR": os.environ["RUNTIME_CACHE_DIR"],
                              "JOBS_DATABASE_URL": f"sqlite:///{weights_file.parent / 'jobs.sqlite3'}"})


@pytest.fixture(scope="session")
def runtime(settings):
    """The model, loaded once for every in-process app of the session."""
    import model

    return model.load(settings)


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
        from classifier.settings import Settings

        env = {"MODEL_WEIGHTS": str(settings.model_weights), "GRPC_PORT": "0",
               "RUNTIME_CACHE_DIR": str(settings.runtime_cache_dir),
               "JOBS_DATABASE_URL": f"sqlite:///{tmp_path / f'jobs-{len(changes)}-{abs(hash(str(changes)))}.sqlite3'}",
               **changes}
        return in_process(create_app(Settings.from_env(env), runtime))

    return variant


@pytest.fixture
def uncached(service, monkeypatch) -> None:
    """The in-process service with its cache off: every image is decoded and goes through a forward pass."""
    monkeypatch.setattr(service.batcher, "cache", None)


@pytest.fixture(scope="session")
def server(weights_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    server = start_server(tmp_path_factory.mktemp("server"))
    yield server
    server.stop()


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


@pytest.fixture(scope="session")
def guarded(weights_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, Path]]:
    """A server with an API key, a web origin allowed (CORS) and JSON logs, its output in a file."""
    tmp = tmp_path_factory.mktemp("guarded")
    log = tmp / "server.log"
    server = start_server(tmp, log=log, API_KEY=API_KEY, LOG_FORMAT="json", LOG_LEVEL="info", CORS_ORIGINS=ALLOWED_ORIGIN)
    yield server, log
    server.stop()


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


# --- Tiers: every test has one (docs/development.md); make test-fast runs the first two ---------------------

TIERS = ("unit", "app", "server", "system")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--tiers", default=",".join(TIERS), help="the tiers to run, comma-separated (make test-fast: unit,app)")


def tier(item: pytest.Item) -> str:
    """The heaviest tier a test is marked with: its module's, raised by its own mark or its parameter's."""
    marked = {mark.name for mark in item.iter_markers() if mark.name in TIERS}
    if not marked:
        raise pytest.UsageError(f"{item.nodeid} has no tier: mark it (or its module) with one of {', '.join(TIERS)}")
    return max(marked, key=TIERS.index)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    wanted = set(config.getoption("tiers").split(","))
    if unknown := wanted - set(TIERS):
        raise pytest.UsageError(f"--tiers: unknown {', '.join(sorted(unknown))}; the tiers are {', '.join(TIERS)}")
    deselected = [item for item in items if tier(item) not in wanted]
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = [item for item in items if tier(item) in wanted]


@pytest.fixture(scope="session")
def object_store_server() -> Iterator[ObjectStore]:
    server = ObjectStore.start()
    yield server
    server.stop()


@pytest.fixture
def object_store(object_store_server: ObjectStore, monkeypatch: pytest.MonkeyPatch) -> Iterator[ObjectStore]:
    """The S3-compatible server, with this process's AWS variables pointing at it (as a user's would)."""
    from classifier import storage

    for name, value in object_store_server.env.items():
        monkeypatch.setenv(name, value)
    storage.client.cache_clear()  # the next client reads these
    yield object_store_server
    storage.client.cache_clear()  # and no later test's client does
