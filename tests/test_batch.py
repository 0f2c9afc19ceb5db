"""Many images at once: POST /predict/batch and the offline job `python -m classify`."""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from support import PHOTOS, REPO, assert_top_k, photo, photo_bytes, upload

pytestmark = pytest.mark.app


def batch_files(*items: tuple[str, bytes]) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("files", (name, data, "application/octet-stream")) for name, data in items]


def test_batch_mixes_good_and_bad_files_each_in_its_own_entry(client):
    files = batch_files(
        ("chelsea.png", photo_bytes("chelsea.png")),
        ("notes.txt", b"not a photo"),
        ("../../etc/passwd", photo_bytes("coffee.png")),
        ("empty.jpg", b""),
        ("drawing.svg", b'<svg xmlns="http://www.w3.org/2000/svg"/>'),
        ("rocket.jpg", photo_bytes("rocket.jpg")),
    )
    response = client.post("/predict/batch?k=3", files=files)
    assert response.status_code == 200
    results = response.json()["results"]
    assert [r["filename"] for r in results] == ["chelsea.png", "notes.txt", "../../etc/passwd", "empty.jpg", "drawing.svg", "rocket.jpg"]
    assert [r.get("error", {}).get("status") for r in results] == [None, 400, None, 400, 415, None]
    assert "empty" in results[3]["error"]["detail"]
    for result, name in ((results[0], "chelsea.png"), (results[2], "coffee.png"), (results[5], "rocket.jpg")):
        assert "error" not in result
        single = client.post("/predict/topk?k=3", files=upload(photo_bytes(name))).json()["predictions"]
        assert [p["index"] for p in result["predictions"]] == [p["index"] for p in single]
        for got, expected in zip(result["predictions"], single):
            assert got["score"] == pytest.approx(expected["score"], abs=1e-5)


def test_batch_scores_match_torchvision_reference(client, reference):
    files = batch_files(*((name, photo_bytes(name)) for name in PHOTOS))
    results = client.post("/predict/batch?k=5", files=files).json()["results"]
    for name, result in zip(PHOTOS, results):
        assert_top_k(result["predictions"], reference(photo(name)), 5)


def test_batch_default_k_is_five(client):
    results = client.post("/predict/batch", files=batch_files(("a.png", photo_bytes("coffee.png")))).json()["results"]
    assert len(results[0]["predictions"]) == 5


def test_too_many_files_is_413(client, settings):
    too_many = settings.max_batch_files + 1
    response = client.post("/predict/batch", files=batch_files(*[("x.png", b"x")] * too_many))
    assert response.status_code == 413
    assert "MAX_BATCH_FILES" in response.json()["detail"]


@pytest.mark.parametrize(
    ("options", "status"),
    [({}, 422), ({"files": upload(photo_bytes("coffee.png"), field="file")}, 422), ({"json": {"files": []}}, 422)],
    ids=["no body", "single-file field name", "json"],
)
def test_malformed_batch_request(client, options, status):
    response = client.post("/predict/batch", **options)
    assert response.status_code == status
    assert "files" in response.json()["detail"]


def test_batch_k_is_validated(client):
    response = client.post("/predict/batch?k=0", files=batch_files(("a.png", photo_bytes("coffee.png"))))
    assert response.status_code == 422


def test_openapi_documents_batch_upload(client):
    spec = client.get("/openapi.json").json()
    body = spec["paths"]["/predict/batch"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]["$ref"]
    schema = spec["components"]["schemas"][body.rsplit("/", 1)[-1]]
    assert schema["properties"]["files"]["type"] == "array"


# --- the offline job ---------------------------------------------------------------------------------


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    photos = tmp_path / "photos"
    (photos / "nested" / "deeper").mkdir(parents=True)
    (photos / "chelsea.png").write_bytes(photo_bytes("chelsea.png"))
    (photos / "nested" / "coffee.png").write_bytes(photo_bytes("coffee.png"))
    (photos / "nested" / "deeper" / "rocket.jpg").write_bytes(photo_bytes("rocket.jpg"))
    (photos / "astronaut.PNG").write_bytes(photo_bytes("astronaut.png"))
    (photos / "corrupt.jpg").write_bytes(photo_bytes("rocket.jpg")[:3000])
    (photos / "notes.txt").write_text("not a photo")
    return photos


def run_job(runtime, *args: str) -> int:
    """python -m classify in this process, on the session's model."""
    from classifier.cli import classify

    return classify.main([str(a) for a in args], runtime=runtime)


def read_jsonl(path: Path) -> dict[str, dict]:
    return {line["path"]: line for line in map(json.loads, path.read_text().splitlines())}


SOURCES = {"chelsea.png": "chelsea.png", "nested/coffee.png": "coffee.png",
           "nested/deeper/rocket.jpg": "rocket.jpg", "astronaut.PNG": "astronaut.png"}


def test_job_classifies_a_folder_recursively_like_the_reference(runtime, folder, tmp_path, reference):
    out = tmp_path / "results.jsonl"
    assert run_job(runtime, folder, "--out", out, "--k", "5", "--batch-size", "3", "--workers", "2") == 1  # corrupt.jpg
    lines = read_jsonl(out)
    assert set(lines) == {str(folder / name) for name in [*SOURCES, "corrupt.jpg"]}
    for name, source in SOURCES.items():
        assert_top_k(lines[str(folder / name)]["predictions"], reference(photo(source)), 5)
        assert lines[str(folder / name)]["model_version"] == runtime.version  # which model made each line
    assert "model_version" not in lines[str(folder / "corrupt.jpg")]  # no model made an error
    assert lines[str(folder / "corrupt.jpg")]["error"]["status"] == 400
    assert "truncated" in lines[str(folder / "corrupt.jpg")]["error"]["detail"]
    assert not any("notes.txt" in path for path in lines)


def test_job_resume_skips_what_is_done_and_repairs_a_torn_line(runtime, folder, tmp_path):
    out = tmp_path / "results.jsonl"
    (folder / "corrupt.jpg").unlink()
    run_job(runtime, folder, "--out", out)
    first = out.read_text().splitlines()
    assert len(first) == 4
    # A crash mid-write leaves half a line; a new photo arrives meanwhile.
    out.write_text("\n".join(first[:3]) + "\n" + first[3][:20])
    (folder / "new.png").write_bytes(photo_bytes("coffee.png"))
    assert run_job(runtime, folder, "--out", out, "--resume") == 0
    lines = out.read_text().splitlines()
    assert len(lines) == 5 and all(json.loads(line) for line in lines)
    assert lines[:3] == first[:3]
    assert {json.loads(line)["path"] for line in lines[3:]} == {json.loads(first[3])["path"], str(folder / "new.png")}
    assert run_job(runtime, folder, "--out", out, "--resume") == 0
    assert len(out.read_text().splitlines()) == 5


@pytest.mark.parametrize("format", ["jsonl", "csv"])
def test_job_refuses_to_continue_a_file_of_another_model_version(runtime, folder, tmp_path, format):
    out = tmp_path / f"results.{format}"
    (folder / "corrupt.jpg").unlink()
    run_job(runtime, folder, "--out", out, "--format", format)
    written = out.read_text().replace(runtime.version, "0123456789ab")  # as other weights would have written it
    out.write_text(written)
    (folder / "new.png").write_bytes(photo_bytes("coffee.png"))
    with pytest.raises(SystemExit) as exit_info:
        run_job(runtime, folder, "--out", out, "--format", format, "--resume")
    assert exit_info.value.code == 2 and out.read_text() == written


def test_job_survives_a_forward_pass_that_fails_for_one_image(runtime, settings, folder, tmp_path, reference):
    """As the service's batcher does: a batch whose forward pass fails is retried image by image, so only the
    image that breaks it gets an error line."""
    import numpy as np

    (folder / "corrupt.jpg").unlink()
    breaking = runtime.prepare(photo_bytes("chelsea.png"), settings.max_image_pixels)

    def predict(batch):
        if any(np.array_equal(image, breaking) for image in batch):
            raise RuntimeError("this image breaks the forward pass")
        return runtime.predict(batch)

    out = tmp_path / "results.jsonl"
    assert run_job(dataclasses.replace(runtime, predict=predict), folder, "--out", out, "--batch-size", "4") == 1
    lines = read_jsonl(out)
    assert lines[str(folder / "chelsea.png")]["error"] == {"status": 500, "detail": "internal error; it has been logged"}
    for name, source in SOURCES.items():
        if source != "chelsea.png":
            assert_top_k(lines[str(folder / name)]["predictions"], reference(photo(source)), 5)


def test_job_resume_skips_recorded_errors_too(runtime, folder, tmp_path):
    """An image whose error is recorded is done: --resume does not try it again (delete its line to retry it)."""
    out = tmp_path / "results.jsonl"
    assert run_job(runtime, folder, "--out", out) == 1
    before = out.read_text()
    assert "error" in read_jsonl(out)[str(folder / "corrupt.jpg")]
    assert run_job(runtime, folder, "--out", out, "--resume") == 0  # nothing left to do, so nothing failed
    assert out.read_text() == before


def test_job_refuses_to_overwrite_without_resume(runtime, folder, tmp_path):
    out = tmp_path / "results.jsonl"
    out.write_text("precious\n")
    with pytest.raises(SystemExit) as exit_info:
        run_job(runtime, folder, "--out", out)
    assert exit_info.value.code == 2
    assert out.read_text() == "precious\n"


def test_job_writes_csv(runtime, folder, tmp_path, reference):
    out = tmp_path / "results.csv"
    (folder / "corrupt.jpg").unlink()
    assert run_job(runtime, folder, "--out", out, "--format", "csv", "--k", "2") == 0
    rows = {row["path"]: row for row in csv.DictReader(out.open())}
    assert list(next(iter(rows.values()))) == ["path", "status", "error", "model_version", "label_1", "index_1", "score_1",
                                               "label_2", "index_2", "score_2"]
    assert {row["model_version"] for row in rows.values()} == {runtime.version}
    expected = reference(photo("coffee.png"))
    row = rows[str(folder / "nested" / "coffee.png")]
    assert float(row["score_1"]) == pytest.approx(expected[int(row["index_1"])].item(), abs=1e-5)
    assert int(row["index_1"]) == expected.argmax().item()
    assert run_job(runtime, folder, "--out", out, "--format", "csv", "--resume") == 0
    assert len(out.read_text().splitlines()) == 1 + 4


def test_job_shards_split_the_files_without_overlap(runtime, folder, tmp_path):
    (folder / "corrupt.jpg").unlink()
    for name in ("a", "b", "c", "d"):
        (folder / f"{name}.png").write_bytes(photo_bytes("coffee.png"))
    shards = []
    for i in range(3):
        out = tmp_path / f"shard{i}.jsonl"
        run_job(runtime, folder, "--out", out, "--shard", f"{i}/3")
        shards.append(set(read_jsonl(out)) if out.exists() else set())
    assert sum(len(s) for s in shards) == 8
    assert set.union(*shards) == {str(p) for p in folder.rglob("*") if p.suffix.lower() in (".png", ".jpg")}


@pytest.mark.parametrize("bad", [["--shard", "3/3"], ["--shard", "x"], ["--k", "0"], ["--k", "1001"], ["--batch-size", "0"]])
def test_job_rejects_bad_arguments(runtime, folder, tmp_path, bad):
    with pytest.raises(SystemExit) as exit_info:
        run_job(runtime, folder, "--out", tmp_path / "r.jsonl", *bad)
    assert exit_info.value.code == 2


@pytest.mark.parametrize("missing", ["s3://photos/in/", "no-such-folder"])
def test_job_refuses_an_input_that_is_not_there(runtime, folder, tmp_path, missing, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_job(runtime, folder, missing, "--out", tmp_path / "r.jsonl")
    assert exit_info.value.code == 2
    assert missing in capsys.readouterr().err
    assert not (tmp_path / "r.jsonl").exists()


@pytest.mark.server
def test_job_runs_as_a_module_with_exit_codes(weights_file, folder, tmp_path):
    out = tmp_path / "results.jsonl"
    env = {**os.environ, "MODEL_WEIGHTS": str(weights_file)}
    result = subprocess.run([sys.executable, "-m", "classify", str(folder), "--out", str(out)],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stderr
    assert "classified 4, failed 1, skipped 0 already done and 1 non-image files" in result.stderr
    assert "notes.txt" in result.stderr
    (folder / "corrupt.jpg").unlink()
    again = subprocess.run([sys.executable, "-m", "classify", str(folder / "nested"), "--out", str(tmp_path / "two.jsonl")],
                           cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert len((tmp_path / "two.jsonl").read_text().splitlines()) == 2
