"""Build the container image (the Dockerfile at the root) with Docker, or else Buildah; measure it.

    python3 tools/image_build.py [--tag registry.example.com/classifier:1.0.0] [--torch-index-url URL]
                                 [--results bench/results/image.json]

make image runs this. It needs only Python's standard library. With Buildah, a base image that no registry
can provide is made locally (debootstrap, once: it stays in the local image store), and this machine's pip
wheel cache and certificate bundle, if pip is configured with any, are mounted into the build so that torch
comes from disk rather than the network. The tests (tests/test_image.py) build through the same function.
With --results it writes the image's size, the build time and the machine to a results file.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BASE = "debian:bookworm-slim"
TAG = "registry.example.com/classifier:1.0.0"  # what deploy/ runs
TEST_TAG = "localhost/classifier:test"
SLIM_TEST_TAG = "localhost/classifier:slim-test"
# PyTorch's CPU-only wheel index is the Dockerfile's default; machines that cannot reach it (these) pass ""
# (PyPI's torch: the CUDA build) and build from their wheel cache.
DEFAULT_TORCH_INDEX_URL = "https://download.pytorch.org/whl/cpu"


def builder() -> str:
    if shutil.which("docker") and subprocess.run(["docker", "info"], capture_output=True).returncode == 0:
        return "docker"
    if shutil.which("buildah"):
        return "buildah"
    raise SystemExit("neither a running Docker nor Buildah is installed (apt-get install buildah)")


def has_image(name: str) -> bool:
    return subprocess.run(["buildah", "inspect", "--type", "image", name], capture_output=True).returncode == 0


def ensure_base() -> None:
    """debian:bookworm-slim in Buildah's local store: pulled where a registry answers, else made with
    debootstrap (minbase, the same packages the official image starts from)."""
    if has_image(BASE) or subprocess.run(["buildah", "pull", "--quiet", BASE], capture_output=True).returncode == 0:
        return
    if not shutil.which("debootstrap"):
        raise SystemExit("no registry serves debian:bookworm-slim and debootstrap is not installed")
    container = subprocess.run(["buildah", "from", "scratch"], check=True, capture_output=True, text=True).stdout.strip()
    try:
        root = subprocess.run(["buildah", "mount", container], check=True, capture_output=True, text=True).stdout.strip()
        subprocess.run(["debootstrap", "--variant=minbase", "bookworm", root, "http://deb.debian.org/debian"],
                       check=True, capture_output=True)
        # As the official image: no package archives or lists left behind (debootstrap keeps ~115 MB of .debs).
        for leftovers in ("var/cache/apt/archives", "var/lib/apt/lists"):
            for path in Path(root, leftovers).glob("*"):
                if path.is_file():
                    path.unlink()
        subprocess.run(["buildah", "umount", container], check=True, capture_output=True)
        subprocess.run(["buildah", "config", "--cmd", "bash", container], check=True)
        subprocess.run(["buildah", "commit", "--quiet", container, BASE], check=True, capture_output=True)
    finally:
        subprocess.run(["buildah", "rm", container], capture_output=True)


def local_wheel_mounts(work: Path) -> list[str]:
    """buildah -v arguments that give the build this machine's pip configuration: its local indexes and
    wheel folders, and its certificate bundle (a TLS proxy's own CA), from `pip config list`."""
    listed = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True).stdout
    settings = dict(re.findall(r"^(?:global|:env:)\.([\w-]+)='(.*)'$", listed, re.M))
    folders, config = [], ["[global]"]
    for key in ("extra-index-url", "find-links"):
        locations = settings.get(key, "").split()
        local = [location for location in locations if location.startswith(("file://", "/"))]
        folders += [Path(location.removeprefix("file://")) for location in local]
        if local:
            config.append(f"{key} = {' '.join(local)}")
    # An index's pages link to its files beside it (/opt/pypi/simple -> /opt/pypi/files): mount its parent.
    folders = [folder.parent if folder.name == "simple" else folder for folder in folders]
    mounts = [f"-v={folder}:{folder}:ro" for folder in dict.fromkeys(folders) if folder.exists()]
    if settings.get("cert") and Path(settings["cert"]).exists():
        shutil.copy(settings["cert"], work / "ca.crt")
        mounts.append(f"-v={work / 'ca.crt'}:/etc/pip-ca.crt:ro")  # not /etc/ssl: ca-certificates' own file
        config.append("cert = /etc/pip-ca.crt")
    (work / "pip.conf").write_text("\n".join(config) + "\n")
    return [*mounts, f"-v={work / 'pip.conf'}:/etc/pip.conf:ro"]


def build(tag: str, torch_index_url: str = "", cache: bool = True, target: str | None = None) -> str:
    """Build the image as tag (target "slim": the slim replica's); with Buildah, from this machine's wheel cache.
    Returns the tag."""
    tool = builder()
    arguments = ["--build-arg", f"TORCH_INDEX_URL={torch_index_url}", "-t", tag, *([] if cache else ["--no-cache"]),
                 *(["--target", target] if target else []), str(REPO)]
    if tool == "docker":
        subprocess.run(["docker", "build", *arguments], check=True)
        return tag
    ensure_base()
    replaced = image_id(tag)
    with tempfile.TemporaryDirectory() as work:
        subprocess.run(["buildah", "bud", "--isolation", "chroot", "--network", "host", "--layers",
                        *local_wheel_mounts(Path(work)), *arguments], check=True)
    if replaced and replaced != image_id(tag):
        # The image the tag named before; its layers that the new one shares stay. The stages' layers stay too:
        # they are the cache that lets changed code rebuild only the code stage (seconds) instead of
        # reinstalling torch (minutes). Since the code is copied last, a change of code adds megabytes to the
        # store, not the gigabytes that once filled a test machine's disk (buildah rmi --prune frees them).
        subprocess.run(["buildah", "rmi", replaced], capture_output=True)
    return tag


def image_id(name: str) -> str | None:
    found = subprocess.run(["buildah", "inspect", "--type", "image", "--format", "{{.FromImageID}}", name],
                           capture_output=True, text=True)
    return found.stdout.strip() or None if found.returncode == 0 else None


def size_bytes(tag: str) -> int:
    """The image's size as stored (its layers, uncompressed), from Buildah's listing ("6.21 GB")."""
    listing = json.loads(subprocess.run(["buildah", "images", "--json", tag], check=True, capture_output=True,
                                        text=True).stdout)
    number, unit = listing[0]["size"].split()
    return round(float(number) * {"B": 1, "kB": 1e3, "KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12}[unit])


def free_port() -> int:
    """A port of 127.0.0.1 free now (harness.free_port's twin: this file needs only the standard library)."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def cold_start(tag: str, model: Path, setting: str = "MODEL_WEIGHTS") -> float:
    """Seconds from starting a container of the image (Buildah) to its first 200 on /ready; model: the weights
    (MODEL_WEIGHTS) or the exported file (setting MODEL_ONNX) it serves."""
    import urllib.request

    port, grpc_port = free_port(), free_port()
    container = subprocess.run(["buildah", "from", tag], check=True, capture_output=True, text=True).stdout.strip()
    started = time.perf_counter()
    # The image's command, gRPC included; on loopback, as this machine's network is shared with the container.
    process = subprocess.Popen(["buildah", "run", "--isolation", "chroot", "--network", "host",
                                f"-v={model.parent}:/models:ro", f"-e={setting}=/models/{model.name}", "-e=HOST=127.0.0.1",
                                f"-e=PORT={port}", f"-e=GRPC_PORT={grpc_port}", container, "--", "python", "-m", "app"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while True:
            try:
                if urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=1).status == 200:
                    return time.perf_counter() - started
            except OSError:
                if process.poll() is not None:
                    raise SystemExit("the service in the image exited before it was ready") from None
                time.sleep(0.1)
    finally:
        process.terminate()
        process.wait(60)
        subprocess.run(["buildah", "rm", container], capture_output=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tag", default=TAG)
    parser.add_argument("--torch-index-url", default=DEFAULT_TORCH_INDEX_URL,
                        help='where torch comes from; "" for PyPI (the CUDA build)')
    parser.add_argument("--results", type=Path, help="write size, build time and cold start here (JSON), after a "
                        "build without the layer cache")
    parser.add_argument("--weights", type=Path, help="a weights file for the cold start measurement")
    parser.add_argument("--model-file", type=Path, help="an exported model file (python -m export) for the slim "
                        "image's cold start")
    args = parser.parse_args()
    started = time.perf_counter()
    build(args.tag, args.torch_index_url, cache=args.results is None)
    seconds = time.perf_counter() - started
    slim_tag = f"{args.tag}-slim" if ":" in args.tag.rsplit("/", 1)[-1] else f"{args.tag}:slim"
    build(slim_tag, args.torch_index_url, cache=args.results is None, target="slim")
    print(f"built {args.tag} in {seconds:.0f} s, and the slim replica's {slim_tag}")
    if args.results and builder() == "buildah":
        cpu = re.search(r"^model name\s*:\s*(.*)$", Path("/proc/cpuinfo").read_text(), re.M)
        args.results.parent.mkdir(parents=True, exist_ok=True)
        args.results.write_text(json.dumps({
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": platform.node(),
            "cpu": cpu.group(1) if cpu else "unknown", "cores": os.cpu_count(), "tag": args.tag,
            "torch_index_url": args.torch_index_url, "build_s": round(seconds), "size_bytes": size_bytes(args.tag),
            **({"cold_start_s": round(cold_start(args.tag, args.weights), 1)} if args.weights else {}),
            "slim": {"tag": slim_tag, "size_bytes": size_bytes(slim_tag),
                     **({"cold_start_s": round(cold_start(slim_tag, args.model_file, "MODEL_ONNX"), 1)}
                        if args.model_file else {})}},
            indent=1) + "\n")


if __name__ == "__main__":
    main()
