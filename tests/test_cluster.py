"""The Ray Data run (python -m classifier.cli.cluster) on a real local Ray cluster, a head and a worker node
started by `ray start`, reading photos from and writing results to a real S3-compatible server: the same
answers as python -m classify."""

from __future__ import annotations

import io
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from support import REPO, free_port, large_jpeg, photo_bytes

pytestmark = pytest.mark.system

RAY = str(Path(sys.executable).parent / "ray")


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[dict[str, str]]:
    """A head node (127.0.0.2) and a worker node (127.0.0.3), one CPU each, with token authentication; the
    variables a driver needs to join it. Not 127.0.0.1: Ray swaps that for the machine's outward address, and
    test traffic stays on loopback."""
    folder = tempfile.mkdtemp(prefix="ray-")  # short: Ray's socket paths must fit in 107 characters
    port = free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    common = ["--num-cpus=1", "--disable-usage-stats"]
    try:
        subprocess.run([RAY, "start", "--head", "--node-ip-address=127.0.0.2", f"--port={port}",
                        "--include-dashboard=false", f"--temp-dir={folder}", *common],
                       check=True, capture_output=True, timeout=180, env=env)
        subprocess.run([RAY, "start", "--address", f"127.0.0.2:{port}", "--node-ip-address=127.0.0.3", *common],
                       check=True, capture_output=True, timeout=180, env=env)
        yield {name: env[name] for name in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN")} | {"RAY_ADDRESS": f"127.0.0.2:{port}"}
    finally:
        subprocess.run([RAY, "stop", "--force"], capture_output=True, timeout=120)
        shutil.rmtree(folder, ignore_errors=True)


def test_the_ray_run_gives_classifys_answers_from_and_to_object_storage(ray_cluster, runtime, weights_file, model_file,
                                                                         object_store, tmp_path):
    """Parquet from torch actors, JSON lines from slim ones (MODEL_ONNX: no torch in the actors)."""
    import pyarrow.parquet as pq

    objects = {f"in/{i:02d}.jpg": large_jpeg("astronaut.png", 500 + 40 * i, seed=i) for i in range(24)}
    objects |= {"in/cat.png": photo_bytes("chelsea.png"), "in/broken.jpg": photo_bytes("rocket.jpg")[:2000],
                "in/notes.txt": b"not a photo"}
    object_store.fill("cluster", objects)
    env = {**os.environ, **object_store.env, **ray_cluster, "MODEL_WEIGHTS": str(weights_file),
           "RUNTIME_CACHE_DIR": str(tmp_path / "cache")}
    slim = {"MODEL_ONNX": str(model_file), "MODEL_WEIGHTS": ""}
    for format, model in (("parquet", {}), ("jsonl", slim)):
        run = subprocess.run([sys.executable, "-m", "classifier.cli.cluster", "s3://cluster/in/", "--out",
                              f"s3://cluster/ray-{format}", "--format", format, "--batch-size", "8", "--actors", "2"],
                             cwd=tmp_path, env={**env, **model, "PYTHONPATH": str(REPO)}, capture_output=True,
                             text=True, timeout=600)
        assert run.returncode == 0, run.stderr[-3000:]
        assert "classified 26 images" in run.stderr

    from classifier.cli import classify

    assert classify.main(["s3://cluster/in/", "--out", str(tmp_path / "local.jsonl")], runtime=runtime) == 1
    expected = {line["path"]: line for line in map(json.loads, (tmp_path / "local.jsonl").read_text().splitlines())}

    client = object_store.client()
    for format in ("parquet", "jsonl"):
        rows = []
        for item in client.list_objects_v2(Bucket="cluster", Prefix=f"ray-{format}/")["Contents"]:
            data = client.get_object(Bucket="cluster", Key=item["Key"])["Body"].read()
            if format == "parquet" and data:
                rows += pq.read_table(io.BytesIO(data)).to_pylist()
            elif data:
                rows += [json.loads(line) for line in data.decode().splitlines()]
        assert sorted(row["path"] for row in rows) == sorted(expected)
        for row in rows:
            line = expected[row["path"]]
            if "error" in line:
                assert (row["status"], row["error"]) == (line["error"]["status"], line["error"]["detail"])
                assert row["predictions"] == [] and row["model_version"] is None
                continue
            assert row["status"] is None and row["model_version"] == line["model_version"] == runtime.version
            assert [p["index"] for p in row["predictions"]] == [p["index"] for p in line["predictions"]]
            for got, want in zip(row["predictions"], line["predictions"]):
                assert got["label"] == want["label"] and abs(got["score"] - want["score"]) <= 1e-5
    assert expected["s3://cluster/in/broken.jpg"]["error"]["status"] == 400


def test_a_replica_and_classify_never_import_ray():
    code = ("import sys, app, classifier.cli.classify, classifier.jobs.worker; "
            "assert 'ray' not in sys.modules, 'ray imported'")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=120)
