"""python -m classify on object storage: photos read from, and results written to, a real S3-compatible server
speaking HTTP (moto's standalone server, a process of its own; boto3 configured by the AWS variables)."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from support import REPO, assert_top_k, large_jpeg, photo, photo_bytes, wait_until

pytestmark = pytest.mark.server

SOURCES = {"chelsea.png": "chelsea.png", "nested/coffee.png": "coffee.png", "nested/deeper/rocket.jpg": "rocket.jpg",
           "astronaut.PNG": "astronaut.png", "big.jpg": None}


def photos() -> dict[str, bytes]:
    objects = {name: photo_bytes(source) if source else large_jpeg("chelsea.png", 2000) for name, source in SOURCES.items()}
    return {**objects, "corrupt.jpg": photo_bytes("rocket.jpg")[:3000], "notes.txt": b"not a photo"}


def run_job(runtime, *args: object) -> int:
    from classifier.cli import classify

    return classify.main([str(a) for a in args], runtime=runtime)


def jsonl_lines(data: bytes) -> list[dict]:
    return [json.loads(line) for line in data.decode().splitlines()]


def dataset(store, bucket: str, prefix: str) -> dict[str, bytes]:
    """Every object below prefix: name -> bytes."""
    client = store.client()
    listed = client.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])
    return {item["Key"][len(prefix):]: client.get_object(Bucket=bucket, Key=item["Key"])["Body"].read() for item in listed}


def parts_lines(store, bucket: str, prefix: str) -> list[dict]:
    return [line for name, data in sorted(dataset(store, bucket, prefix).items()) for line in jsonl_lines(data)]


def test_classifies_a_prefix_into_parts_with_the_answers_of_a_local_run(runtime, object_store, tmp_path, reference):
    objects = photos()
    object_store.fill("photos", {f"in/{name}": data for name, data in objects.items()} | {"inbox/other.png": objects["chelsea.png"]})
    object_store.fill("results", {})
    local = tmp_path / "local"
    for name, data in objects.items():
        (local / name).parent.mkdir(parents=True, exist_ok=True)
        (local / name).write_bytes(data)

    assert run_job(runtime, "s3://photos/in", "--out", "s3://results/run1", "--part-size", "2") == 1  # corrupt.jpg
    assert run_job(runtime, local, "--out", tmp_path / "local.jsonl") == 1

    written = dataset(object_store, "results", "run1/")
    assert sorted(written) == [f"part-00000-of-00001-{i:06d}.jsonl" for i in range(3)]  # 6 images, 2 a part
    lines = {line["path"]: line for line in parts_lines(object_store, "results", "run1/")}
    local_lines = {line["path"]: line for line in jsonl_lines((tmp_path / "local.jsonl").read_bytes())}
    assert set(lines) == {f"s3://photos/in/{name}" for name in objects if name != "notes.txt"}  # not inbox/
    for name in [*SOURCES, "corrupt.jpg"]:
        line, twin = lines[f"s3://photos/in/{name}"], local_lines[str(local / name)]
        assert line.keys() == twin.keys()
        if "error" in line:
            assert line["error"] == twin["error"] and line["error"]["status"] == 400
            continue
        assert line["model_version"] == runtime.version
        assert [p["index"] for p in line["predictions"]] == [p["index"] for p in twin["predictions"]]
        for got, expected in zip(line["predictions"], twin["predictions"]):
            assert got["score"] == pytest.approx(expected["score"], abs=1e-5)
    for name, source in SOURCES.items():
        if source:
            assert_top_k(lines[f"s3://photos/in/{name}"]["predictions"], reference(photo(source)), 5)


def test_a_key_that_cannot_be_read_is_an_error_line_naming_it(runtime, object_store):
    object_store.fill("archive", {"in/fine.png": photo_bytes("coffee.png")})
    object_store.client().put_object(Bucket="archive", Key="in/frozen.png", Body=photo_bytes("chelsea.png"),
                                     StorageClass="GLACIER")  # listed, but a GET is refused until it is restored
    assert run_job(runtime, "s3://archive/in/", "--out", "s3://archive/out/") == 1
    lines = {line["path"]: line for line in parts_lines(object_store, "archive", "out/")}
    assert "predictions" in lines["s3://archive/in/fine.png"]
    error = lines["s3://archive/in/frozen.png"]["error"]
    assert error["status"] == 409 and "s3://archive/in/frozen.png" in error["detail"] and "restore" in error["detail"]


def test_shards_and_resume_write_each_key_exactly_once(runtime, object_store, tmp_path, capsys):
    names = [f"in/{i:03d}.png" for i in range(12)]
    object_store.fill("sharded", {name: photo_bytes("coffee.png" if i % 2 else "chelsea.png") for i, name in enumerate(names)})
    for shard in ("0/2", "1/2"):
        assert run_job(runtime, "s3://sharded/in/", "--out", "s3://sharded/out", "--shard", shard, "--part-size", "4") == 0
    written = dataset(object_store, "sharded", "out/")
    assert {name[:20] for name in written} == {"part-00000-of-00002-", "part-00001-of-00002-"}
    paths = [line["path"] for line in parts_lines(object_store, "sharded", "out/")]
    assert sorted(paths) == [f"s3://sharded/{name}" for name in names]

    with pytest.raises(SystemExit) as exit_info:  # an output is never overwritten without --resume
        run_job(runtime, "s3://sharded/in/", "--out", "s3://sharded/out", "--shard", "0/2")
    assert exit_info.value.code == 2 and "--resume" in capsys.readouterr().err

    object_store.fill("sharded", {"in/new.png": photo_bytes("rocket.jpg")})
    for shard in ("0/2", "1/2"):
        assert run_job(runtime, "s3://sharded/in/", "--out", "s3://sharded/out", "--shard", shard, "--resume") == 0
    paths = [line["path"] for line in parts_lines(object_store, "sharded", "out/")]
    assert sorted(paths) == sorted([f"s3://sharded/{name}" for name in [*names, "in/new.png"]])
    assert len(dataset(object_store, "sharded", "out/")) == len(written) + 1  # one new part, in new.png's shard


def test_parquet_locally_and_on_object_storage(runtime, object_store, tmp_path):
    import pyarrow.parquet as pq

    object_store.fill("parquet", {f"in/{name}": data for name, data in photos().items()})
    assert run_job(runtime, "s3://parquet/in/", "--out", "s3://parquet/out", "--format", "parquet", "--k", "3") == 1
    assert run_job(runtime, "s3://parquet/in/", "--out", tmp_path / "out", "--format", "parquet", "--k", "3") == 1
    (name, data), = dataset(object_store, "parquet", "out/").items()
    assert name == "part-00000-of-00001-000000.parquet"
    remote = pq.read_table(io.BytesIO(data)).to_pylist()
    local = pq.read_table(tmp_path / "out").to_pylist()
    assert pq.read_schema(io.BytesIO(data)).names == ["path", "status", "error", "model_version", "predictions"]
    assert len(remote) == 6 and [row["path"] for row in remote] == [row["path"] for row in local]
    rows = {row["path"]: row for row in remote}
    corrupt = rows["s3://parquet/in/corrupt.jpg"]
    assert corrupt["status"] == 400 and "truncated" in corrupt["error"] and corrupt["predictions"] == []
    cat = rows["s3://parquet/in/chelsea.png"]
    assert cat["status"] is None and cat["model_version"] == runtime.version and len(cat["predictions"]) == 3
    assert set(cat["predictions"][0]) == {"label", "index", "score"}
    assert run_job(runtime, "s3://parquet/in/", "--out", "s3://parquet/out", "--format", "parquet", "--resume") == 0


@pytest.mark.parametrize(("given", "says"), [("s3://no-such-bucket/in/", "no such bucket"), ("s3://empty-bucket/in/", "no objects")])
def test_an_input_with_nothing_to_read_is_a_usage_error(runtime, object_store, tmp_path, given, says, capsys):
    object_store.client().create_bucket(Bucket="empty-bucket")
    with pytest.raises(SystemExit) as exit_info:
        run_job(runtime, given, "--out", tmp_path / "r.jsonl")
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert given.rstrip("/") in error and says in error


def test_killed_mid_run_then_resumed_writes_every_key_exactly_once(weights_file, object_store, tmp_path):
    """kill -9 while parts are being written: the part in progress is lost, never half-written; --resume
    classifies exactly what no finished part holds."""
    names = [f"in/{i:03d}.jpg" for i in range(48)]
    object_store.fill("crash", {name: large_jpeg("astronaut.png", 1200, seed=i) for i, name in enumerate(names)})
    env = {**os.environ, **object_store.env, "MODEL_WEIGHTS": str(weights_file)}
    command = [sys.executable, "-m", "classify", "s3://crash/in/", "--out", "s3://crash/out", "--part-size", "8",
               "--batch-size", "4"]
    job = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    wait_until(lambda: len(dataset(object_store, "crash", "out/")) >= 2 or job.poll() is not None, timeout_s=300)
    job.send_signal(signal.SIGKILL)
    job.wait()
    before = parts_lines(object_store, "crash", "out/")
    assert 16 <= len(before) < 48, "the run should have been killed part-way"
    resumed = subprocess.run([*command, "--resume"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert f"skipped {len(before)} already done" in resumed.stderr
    paths = [line["path"] for line in parts_lines(object_store, "crash", "out/")]
    assert sorted(paths) == [f"s3://crash/{name}" for name in names]  # each key once


def test_read_refuses_an_object_larger_than_its_limit(object_store):
    from classifier import storage
    from classifier.errors import NotFound, TooLarge

    object_store.fill("limits", {"big.jpg": b"x" * 5000})
    assert storage.read(storage.ObjectURL("limits", "big.jpg"), max_bytes=5000) == b"x" * 5000
    with pytest.raises(TooLarge, match="s3://limits/big.jpg"):
        storage.read(storage.ObjectURL("limits", "big.jpg"), max_bytes=4999)
    with pytest.raises(NotFound, match="s3://limits/nothing.jpg: no such object"):
        storage.read(storage.ObjectURL("limits", "nothing.jpg"))


def test_local_folder_dataset_parts_are_written_whole(runtime, tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(5):
        (folder / f"{i}.png").write_bytes(photo_bytes("coffee.png"))
    out = tmp_path / "out"
    assert run_job(runtime, folder, "--out", f"{out}/", "--part-size", "2") == 0
    assert sorted(path.name for path in out.iterdir()) == [f"part-00000-of-00001-{i:06d}.jsonl" for i in range(3)]
    assert sum(len(path.read_text().splitlines()) for path in out.iterdir()) == 5
