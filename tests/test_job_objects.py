"""Jobs by reference: POST /jobs naming objects in S3 (keys or a prefix) instead of uploading them, read by the
worker that claims each image, and results written to an object when the job ends; only in the buckets an
operator allows (JOBS_ALLOWED_BUCKETS), anything else 403 and never fetched. Against a real S3-compatible server."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from support import Server, assert_online_answers, large_jpeg, metric, photo_bytes, results, start_server, wait_for

pytestmark = pytest.mark.server


@pytest.fixture(scope="module")
def by_reference(weights_file, object_store_server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A replica allowed two buckets (the setting's default allows none: the default server below refuses)."""
    server = start_server(tmp_path_factory.mktemp("objects"), JOBS_ALLOWED_BUCKETS="job-photos,job-results",
                          **object_store_server.env)
    yield server
    server.stop()


def post(server: Server, fields: list[tuple[str, str]], files: list | None = None) -> httpx.Response:
    return httpx.post(f"{server.url}/jobs", data=None, files=[(name, (None, value)) for name, value in fields] + (files or []),
                      timeout=60)


def test_a_job_of_objects_gets_the_answers_of_uploads_and_writes_its_results(by_reference, object_store_server):
    photos = {"in/cat.png": photo_bytes("chelsea.png"), "in/sub/coffee.png": photo_bytes("coffee.png"),
              "in/big.jpg": large_jpeg("astronaut.png", 2000), "in/notes.txt": b"skipped: not an image by its name",
              "one/rocket.jpg": photo_bytes("rocket.jpg")}
    object_store_server.fill("job-photos", photos)
    object_store_server.fill("job-results", {})
    response = post(by_reference, [("objects", "s3://job-photos/in/"), ("objects", "s3://job-photos/one/rocket.jpg"),
                                   ("objects", "s3://job-photos/gone.jpg"), ("results_to", "s3://job-results/run/1.jsonl")])
    assert response.status_code == 202, response.text
    job = wait_for(by_reference, response.json()["id"])
    assert (job["status"], job["total"], job["failed"]) == ("succeeded", 5, 1)
    assert job["results_to"] == "s3://job-results/run/1.jsonl"
    entries = results(by_reference, job["id"])
    names = ["s3://job-photos/in/big.jpg", "s3://job-photos/in/cat.png", "s3://job-photos/in/sub/coffee.png",
             "s3://job-photos/one/rocket.jpg"]
    assert [entry["filename"] for entry in entries] == [*names, "s3://job-photos/gone.jpg"]
    assert_online_answers(by_reference, entries[:4], [(name, photos[name.removeprefix("s3://job-photos/")]) for name in names])
    assert entries[4]["error"] == {"status": 404, "detail": "s3://job-photos/gone.jpg: no such object"}

    def written() -> bytes | None:
        try:
            return object_store_server.client().get_object(Bucket="job-results", Key="run/1.jsonl")["Body"].read()
        except Exception:
            return None

    from support import wait_until

    wait_until(written)  # the delivery follows the job's end by at most a second
    jsonl = httpx.get(f"{by_reference.url}/jobs/{job['id']}/results?format=jsonl", timeout=30).content
    assert written() == jsonl
    assert metric(httpx.get(f"{by_reference.url}/metrics").text, "job_results_written_total", outcome="written") == 1


@pytest.mark.parametrize("fields", [
    [("objects", "s3://elsewhere/in/cat.png")],
    [("objects", "s3://job-photos/in/"), ("results_to", "s3://elsewhere/out.jsonl")],
    [("objects", "s3://job-photos-evil/in/")],
], ids=["object", "results_to", "a longer name"])
def test_a_bucket_not_allowed_is_403_and_no_job(by_reference, fields):
    before = httpx.get(f"{by_reference.url}/jobs").json()["jobs"]
    response = post(by_reference, fields)
    assert response.status_code == 403
    assert "JOBS_ALLOWED_BUCKETS" in response.json()["detail"]
    assert httpx.get(f"{by_reference.url}/jobs").json()["jobs"] == before


def test_by_default_no_bucket_is_allowed(server):
    response = post(server, [("objects", "s3://job-photos/in/")])
    assert response.status_code == 403 and "JOBS_ALLOWED_BUCKETS" in response.json()["detail"]
    spec = httpx.get(f"{server.url}/openapi.json").json()
    body = spec["paths"]["/jobs"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert "objects" not in body["properties"]  # /docs offers only what this replica takes


@pytest.mark.parametrize(("fields", "status"), [
    ([("objects", "http://photos/in/cat.png")], 422),
    ([("objects", "s3://job-photos/nothing-here/")], 422),
])
def test_malformed_or_empty_references(by_reference, object_store_server, fields, status):
    object_store_server.fill("job-photos", {})
    response = post(by_reference, fields)
    assert response.status_code == status, response.text


def test_a_prefix_holding_more_images_than_a_job_may_is_413(by_reference, object_store_server):
    # MAX_JOB_FILES is 1000 by default: 1001 tiny objects below one prefix.
    tiny = photo_bytes("coffee.png")
    object_store_server.fill("job-photos", {f"many/{i:04d}.png": tiny for i in range(1001)})
    response = post(by_reference, [("objects", "s3://job-photos/many/")])
    assert response.status_code == 413 and "MAX_JOB_FILES" in response.json()["detail"]
