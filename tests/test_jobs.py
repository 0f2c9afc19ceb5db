"""Asynchronous jobs against real servers: the API and its errors, parity with the online path, durability
across SIGKILL, webhooks verified with Standard Webhooks, expiry and limits."""

from __future__ import annotations

import base64
import io
import json
import re
import signal
import socket
import sqlite3
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import httpx
import pytest
from PIL import Image

from support import (API_KEY, PHOTOS, Handler, Server, assert_online_answers, assert_top_k, corrupt_png, encode,
                     http_server, large_jpeg, multipart, photo_bytes, results, start_server, submit, variants, wait_for)

pytestmark = pytest.mark.server

WEBHOOK_SECRET = "whsec_" + base64.b64encode(b"0123456789abcdef01234567").decode()
ID_LENGTH = 32


@dataclass
class Receiver:
    """A local webhook receiver. /flaky answers 500 to its first delivery, 204 after; /failing always 500;
    /down 503 while `down` is set; /redirect 307; anything else 204. Records every request."""

    url: str
    received: list[tuple[str, dict, bytes, float]] = field(default_factory=list)  # path, headers, body, when
    down: threading.Event = field(default_factory=threading.Event)

    def deliveries(self, path: str) -> list[tuple[str, dict, bytes, float]]:
        return [delivery for delivery in self.received if delivery[0] == path]


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    state = Receiver("")

    class Receive(Handler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["content-length"]))
            state.received.append((self.path, dict(self.headers), body, time.monotonic()))
            if self.path == "/redirect":
                self.answer(307, {"Location": "/elsewhere"})
            elif self.path == "/flaky":
                self.answer(500 if len(state.deliveries("/flaky")) == 1 else 204)
            elif self.path == "/failing" or (self.path == "/down" and state.down.is_set()):
                self.answer(500 if self.path == "/failing" else 503)
            else:
                self.answer(204)

    with http_server(Receive) as state.url:
        yield state


@pytest.fixture(scope="module")
def jobs_server(weights_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    # The cache off: these tests send the same variants() again and again, and their jobs must take time.
    server = start_server(tmp_path_factory.mktemp("jobs"), CACHE_ENTRIES="0", WEBHOOK_ALLOWED_HOSTS="127.0.0.1",
                          WEBHOOK_SECRET=WEBHOOK_SECRET, WEBHOOK_FIRST_RETRY_S="0.2", MAX_JOB_FILES="300",
                          MAX_JOB_BYTES=str(8 * 1024 * 1024), MAX_UPLOAD_BYTES=str(2 * 1024 * 1024))
    yield server
    server.stop()


def test_a_job_answers_like_the_online_path_and_torchvision(jobs_server, reference):
    files = [(name, photo_bytes(name)) for name in PHOTOS]
    files += [("big.jpg", large_jpeg("coffee.png", 1500)), ("broken.png", corrupt_png()), ("empty.jpg", b""),
              ("notes.pdf", b"%PDF-1.7 ..."), ("huge.jpg", b"\xff\xd8" + bytes(3 * 1024 * 1024))]
    response = submit(jobs_server, files, k=3, headers={"Prefer": "wait=60"})
    assert response.status_code == 200, response.text
    job = response.json()
    assert response.headers["location"] == f"/jobs/{job['id']}"
    assert response.headers["preference-applied"] == "wait=60"
    assert (job["status"], job["total"], job["done"], job["failed"], job["k"]) == ("succeeded", 9, 9, 4, 3)
    assert job["results_url"] == f"/jobs/{job['id']}/results"
    assert job["created_at"].endswith("Z") and job["finished_at"] >= job["started_at"] >= job["created_at"]

    entries = results(jobs_server, job["id"])
    assert [entry["index"] for entry in entries] == list(range(9))
    assert [entry["filename"] for entry in entries] == [name for name, _ in files]
    for entry, (name, data) in zip(entries[:5], files):
        assert_top_k(entry["predictions"], reference(Image.open(io.BytesIO(data))), 3)
    # The errors are /predict/batch's, file by file (the too-large one within the job's own limits).
    online = httpx.post(f"{jobs_server.url}/predict/batch?k=3", files=multipart(files[5:8]), timeout=60).json()["results"]
    assert [entry["error"] for entry in entries[5:8]] == [item["error"] for item in online]
    assert entries[8]["error"]["status"] == 413 and "MAX_UPLOAD_BYTES" in entries[8]["error"]["detail"]

    streamed = httpx.get(f"{jobs_server.url}/jobs/{job['id']}/results?format=jsonl")
    assert streamed.headers["content-type"] == "application/x-ndjson"
    assert [json.loads(line) for line in streamed.text.splitlines()] == entries
    negotiated = httpx.get(f"{jobs_server.url}/jobs/{job['id']}/results", headers={"Accept": "application/x-ndjson"})
    assert negotiated.text == streamed.text


def test_submitting_answers_202_at_once_and_progress_advances(jobs_server):
    response = submit(jobs_server, variants(120))
    assert response.status_code == 202
    job = response.json()
    assert len(job["id"]) == ID_LENGTH and job["status"] in ("queued", "running") and job["done"] < 120
    assert job["webhook"] is None and job["finished_at"] is None
    assert response.headers["x-request-id"]
    seen = {wait_for(jobs_server, job["id"], lambda j: 0 < j["done"] < 120)["done"]}
    finished = wait_for(jobs_server, job["id"])
    assert finished["status"] == "succeeded" and finished["done"] == 120 and finished["failed"] == 0
    assert seen and len(results(jobs_server, job["id"])) == 120


def test_prefer_wait_answers_202_when_the_job_outlasts_it(jobs_server):
    response = submit(jobs_server, variants(60), headers={"Prefer": "respond-async, wait=0.2"})
    assert response.status_code == 202 and response.json()["status"] in ("queued", "running")
    assert response.headers["preference-applied"] == "wait=0.2"
    job_url = f"{jobs_server.url}/jobs/{response.json()['id']}"
    # GET with Prefer: wait is a long poll: one request until the job ends, instead of many.
    still_running = httpx.get(job_url, headers={"Prefer": "wait=0.1"})
    assert still_running.status_code == 200 and still_running.headers["preference-applied"] == "wait=0.1"
    assert still_running.json()["status"] in ("queued", "running")
    ended = httpx.get(job_url, headers={"Prefer": "wait=60"}, timeout=90)
    assert ended.json()["status"] == "succeeded" and ended.json()["done"] == 60


def test_prefer_wait_is_capped_at_a_minute(jobs_server):
    job = submit(jobs_server, variants(1), headers={"Prefer": "wait=3600"})
    assert job.status_code == 200 and job.headers["preference-applied"] == "wait=60"
    again = httpx.get(f"{jobs_server.url}/jobs/{job.json()['id']}", headers={"Prefer": "wait=100000"})
    assert again.headers["preference-applied"] == "wait=60"


def test_the_same_idempotency_key_returns_the_same_job(jobs_server):
    key = {"Idempotency-Key": "order-2026-0042"}
    first = submit(jobs_server, variants(3), headers=key)
    again = submit(jobs_server, variants(5), headers=key)
    assert (first.status_code, again.status_code) == (202, 200)
    assert again.json()["id"] == first.json()["id"] and again.json()["total"] == 3
    assert again.headers["location"] == first.headers["location"]
    # A repeated key does not excuse the body: what is no valid submission is refused, as without a key.
    stray = httpx.post(f"{jobs_server.url}/jobs", headers=key, files=[("files", ("a.png", photo_bytes("coffee.png"))),
                                                                      ("colour", (None, "blue"))])
    assert stray.status_code == 422 and "unknown field 'colour'" in stray.json()["detail"]
    assert httpx.post(f"{jobs_server.url}/jobs", headers=key, files=[("webhook", (None, "x"))]).status_code == 422
    assert httpx.delete(f"{jobs_server.url}/jobs/{first.json()['id']}").status_code == 204
    fresh = submit(jobs_server, variants(2), headers=key)  # the key's job is gone: a new one
    assert fresh.status_code == 202 and fresh.json()["id"] != first.json()["id"]


def test_cancel_keeps_what_was_answered_and_delete_removes_everything(jobs_server):
    job = submit(jobs_server, variants(250)).json()
    canceled = httpx.post(f"{jobs_server.url}/jobs/{job['id']}/cancel").json()
    assert canceled["status"] == "canceled" and canceled["done"] < 250 and canceled["finished_at"]
    # Job images are classified in claim order: once a job submitted after the cancel has ended, the batches
    # that were in flight at the cancel have come back (and were dropped).
    assert submit(jobs_server, variants(1), headers={"Prefer": "wait=60"}).json()["status"] == "succeeded"
    after = wait_for(jobs_server, job["id"])
    assert after["done"] == canceled["done"] and len(results(jobs_server, job["id"])) == after["done"]
    assert httpx.post(f"{jobs_server.url}/jobs/{job['id']}/cancel").json() == after  # unchanged
    assert httpx.delete(f"{jobs_server.url}/jobs/{job['id']}").status_code == 204
    for response in (httpx.get(f"{jobs_server.url}/jobs/{job['id']}"), httpx.get(f"{jobs_server.url}/jobs/{job['id']}/results"),
                     httpx.post(f"{jobs_server.url}/jobs/{job['id']}/cancel"), httpx.delete(f"{jobs_server.url}/jobs/{job['id']}")):
        assert response.status_code == 404 and "detail" in response.json()


def test_deleting_a_running_job_removes_its_images_and_results(jobs_server):
    job = submit(jobs_server, variants(200)).json()
    wait_for(jobs_server, job["id"], lambda j: j["done"] > 0)
    metrics_when(jobs_server, lambda m: m["job_images_pending"] > 0)
    assert httpx.delete(f"{jobs_server.url}/jobs/{job['id']}").status_code == 204
    with sqlite3.connect(jobs_server.workdir.parent / "jobs.sqlite3") as db:  # gone from the store itself
        for table, column in (("jobs", "id"), ("job_images", "job_id"), ("job_results", "job_id")):
            assert db.execute(f"select count(*) from {table} where {column} = ?", (job["id"],)).fetchone() == (0,)
    metrics_when(jobs_server, lambda m: m["job_images_pending"] == 0)


def test_jobs_are_listed_newest_first_a_page_at_a_time(jobs_server):
    made = [submit(jobs_server, variants(1)).json()["id"] for _ in range(3)]
    page = httpx.get(f"{jobs_server.url}/jobs?limit=2").json()
    assert [job["id"] for job in page["jobs"]] == made[::-1][:2]
    rest = httpx.get(f"{jobs_server.url}{page['next']}").json()
    assert rest["jobs"][0]["id"] == made[0]
    assert httpx.get(f"{jobs_server.url}/jobs?before={'f' * 32}").status_code == 404
    assert httpx.get(f"{jobs_server.url}/jobs?limit=101").status_code == 422


@pytest.mark.parametrize("job_id", ["0" * ID_LENGTH, "not-a-job", "x" * 300, "%00", "1' OR '1'='1"])
def test_unknown_and_malformed_ids_are_404(jobs_server, job_id):
    for response in (httpx.get(f"{jobs_server.url}/jobs/{job_id}"), httpx.get(f"{jobs_server.url}/jobs/{job_id}/results"),
                     httpx.post(f"{jobs_server.url}/jobs/{job_id}/cancel"), httpx.delete(f"{jobs_server.url}/jobs/{job_id}")):
        assert response.status_code == 404 and list(response.json()) == ["detail"]


def test_bad_submissions_are_refused_with_reasons(jobs_server):
    url = f"{jobs_server.url}/jobs"
    no_files = httpx.post(url, data={"webhook": ""}, files={"other": ("a.txt", b"x")})
    assert no_files.status_code == 422 and "files" in no_files.json()["detail"]
    assert httpx.post(url, json={"files": []}).status_code == 422
    assert httpx.post(f"{url}?k=0", files=multipart(variants(1))).status_code == 422
    too_many = submit(jobs_server, [("a.jpg", b"x")] * 301)
    assert too_many.status_code == 413 and "MAX_JOB_FILES" in too_many.json()["detail"]
    too_big = submit(jobs_server, [("a.jpg", bytes(1024 * 1024))] * 9)
    assert too_big.status_code == 413 and "MAX_JOB_BYTES" in too_big.json()["detail"]
    cut = httpx.post(url, content=b"--b\r\nContent-Disposition: form-data; name=\"files\"; filename=\"a\"\r\n\r\nabc",
                     headers={"content-type": "multipart/form-data; boundary=b"})
    assert cut.status_code == 422 and "files" in cut.json()["detail"]  # a part never closed is no file
    long_key = submit(jobs_server, variants(1), headers={"Idempotency-Key": "k" * 256})
    assert long_key.status_code == 422 and "idempotency-key" in long_key.json()["detail"].lower()
    assert list(jobs_server.workdir.iterdir()) == [] and list(jobs_server.tmpdir.iterdir()) == []


@pytest.mark.parametrize("webhook", ["http://10.0.0.1/hook", "http://169.254.169.254/latest/meta-data", "file:///etc/passwd",
                                     "http://user:pw@127.0.0.1/x", "gopher://127.0.0.1/", "not a url"])
def test_a_webhook_outside_the_allowed_hosts_is_refused(jobs_server, webhook):
    response = submit(jobs_server, variants(1), data={"webhook": webhook})
    assert response.status_code == 422, response.text
    assert "webhook" in response.json()["detail"]


def test_webhooks_are_signed_retried_and_never_follow_redirects(jobs_server, receiver):
    from standardwebhooks.webhooks import Webhook

    base, received = receiver.url, receiver.received
    flaky = submit(jobs_server, variants(2), data={"webhook": f"{base}/flaky"}).json()
    redirected = submit(jobs_server, variants(1), data={"webhook": f"{base}/redirect"}).json()
    assert flaky["webhook"] == {"url": f"{base}/flaky", "delivered": False, "attempts": 0, "last_status": None}
    done = wait_for(jobs_server, flaky["id"], lambda job: job["webhook"]["delivered"], timeout=30)
    assert done["webhook"] == {"url": f"{base}/flaky", "delivered": True, "attempts": 2, "last_status": 204}
    deliveries = [(headers, body) for _, headers, body, _ in receiver.deliveries("/flaky")]
    assert len(deliveries) == 2
    for headers, body in deliveries:
        job = Webhook(WEBHOOK_SECRET).verify(body, headers)
        assert job["id"] == flaky["id"] and job["status"] == "succeeded" and job["done"] == 2
        assert job["model_version"] == httpx.get(f"{jobs_server.url}/model").json()["version"]  # which model answered
    assert deliveries[0][0]["webhook-id"] == deliveries[1][0]["webhook-id"]  # the same message, retried
    with pytest.raises(Exception):
        Webhook("whsec_" + base64.b64encode(b"another secret, 24 bytes").decode()).verify(deliveries[0][1], deliveries[0][0])

    wait_for(jobs_server, redirected["id"], lambda job: job["webhook"]["attempts"] >= 2, timeout=30)
    assert not any(path == "/elsewhere" for path, _, _, _ in received)
    assert httpx.get(f"{jobs_server.url}/jobs/{redirected['id']}").json()["webhook"]["last_status"] == 307


def test_a_canceled_jobs_webhook_says_canceled(jobs_server, receiver):
    from standardwebhooks.webhooks import Webhook

    job = submit(jobs_server, variants(150), data={"webhook": f"{receiver.url}/canceled"}).json()
    assert httpx.post(f"{jobs_server.url}/jobs/{job['id']}/cancel").json()["status"] == "canceled"
    delivered = wait_for(jobs_server, job["id"], lambda j: j["webhook"]["delivered"], timeout=30)
    assert delivered["webhook"]["attempts"] == 1
    [(_, headers, body, _)] = receiver.deliveries("/canceled")
    sent = Webhook(WEBHOOK_SECRET).verify(body, headers)
    assert sent["id"] == job["id"] and sent["status"] == "canceled" and sent["done"] < 150


def test_webhooks_give_up_after_the_last_try_and_survive_a_restart(weights_file, tmp_path, receiver):
    """A receiver that is down when the job ends, and a replica killed meanwhile: the next process sends it.
    A receiver that always fails: five tries, each wait at least four times the one before, then no more."""
    database = f"sqlite:///{tmp_path / 'jobs.sqlite3'}"
    settings = {"JOBS_DATABASE_URL": database, "WEBHOOK_ALLOWED_HOSTS": "127.0.0.1", "WEBHOOK_SECRET": WEBHOOK_SECRET,
                "WEBHOOK_FIRST_RETRY_S": "0.1"}
    receiver.down.set()
    first = start_server(tmp_path / "first", **settings)
    try:
        job = submit(first, variants(1), data={"webhook": f"{receiver.url}/down"}).json()
        wait_for(first, job["id"], lambda j: j["webhook"]["attempts"] >= 1, timeout=30)
    finally:
        first.process.send_signal(signal.SIGKILL)
        first.process.wait(10)
    receiver.down.clear()
    second = start_server(tmp_path / "second", **settings)
    try:
        delivered = wait_for(second, job["id"], lambda j: j["webhook"]["delivered"], timeout=30)
        assert delivered["webhook"]["last_status"] == 204 and delivered["webhook"]["attempts"] >= 2

        failing = submit(second, variants(1), data={"webhook": f"{receiver.url}/failing"}).json()
        gave_up = wait_for(second, failing["id"], lambda j: j["webhook"]["attempts"] == 5, timeout=60)
        assert gave_up["webhook"] == {"url": f"{receiver.url}/failing", "delivered": False, "attempts": 5, "last_status": 500}
        times = [when for _, _, _, when in receiver.deliveries("/failing")]
        waits = [later - earlier for earlier, later in zip(times, times[1:])]
        assert len(waits) == 4 and all(wait >= 0.1 * 4**i for i, wait in enumerate(waits)), waits
        with sqlite3.connect(tmp_path / "jobs.sqlite3") as db:  # nothing left to send: no sixth try, ever
            assert db.execute("select webhook_next_at from jobs where id = ?", (failing["id"],)).fetchone() == (None,)
    finally:
        second.stop()


def job_metrics(server: Server) -> dict[str, float]:
    text = httpx.get(f"{server.url}/metrics").text
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
            if line.startswith(("job", "http_requests_total{endpoint=\"/jobs\""))}


def metrics_when(server: Server, until, timeout: float = 30) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while not until(values := job_metrics(server)):
        assert time.monotonic() < deadline, f"metrics still {values}"
        time.sleep(0.05)
    return values


def test_job_metrics(weights_file, tmp_path):
    """Counters grow by exactly this job's numbers; the backlog gauges follow its images in and out."""
    server = start_server(tmp_path, MAX_BATCH_SIZE="1")
    try:
        before = job_metrics(server)
        job = submit(server, variants(40) + [("bad.jpg", b"nope")]).json()
        pending = metrics_when(server, lambda m: m["job_images_pending"] > 0)
        assert pending["job_pending_bytes"] > 0 and pending["job_oldest_pending_image_age_seconds"] >= 0
        wait_for(server, job["id"])
        after = metrics_when(server, lambda m: m["job_images_pending"] == 0)

        def grew(name: str) -> float:
            return after[name] - before.get(name, 0.0)

        assert grew("jobs_submitted_total") == 1 and grew('jobs_finished_total{status="succeeded"}') == 1
        assert grew('job_images_total{outcome="classified"}') == 40 and grew('job_images_total{outcome="error"}') == 1
        assert after["job_pending_bytes"] == 0 and after["job_oldest_pending_image_age_seconds"] == 0
        assert grew('http_requests_total{endpoint="/jobs",method="POST",status="202"}') == 1
        assert after["job_store_disk_full"] == 0
    finally:
        server.stop()


def test_every_jobs_route_needs_the_api_key(guarded):
    server, _ = guarded
    for method, path in (("GET", "/jobs"), ("POST", "/jobs"), ("GET", "/jobs/abc"), ("GET", "/jobs/abc/results"),
                         ("POST", "/jobs/abc/cancel"), ("DELETE", "/jobs/abc")):
        for wrong in ({}, {"X-API-Key": "wrong"}, {"Authorization": f"Bearer {API_KEY}x"}, {"Authorization": f"Basic {API_KEY}"}):
            response = httpx.request(method, f"{server.url}{path}", headers=wrong)
            assert response.status_code == 401 and "API key" in response.json()["detail"], (method, path, wrong)
    key = {"X-API-Key": API_KEY}
    job = submit(server, variants(1), headers={**key, "Prefer": "wait=30"}).json()
    assert job["status"] == "succeeded"
    assert httpx.get(f"{server.url}/jobs/{job['id']}/results", headers=key).status_code == 200


def test_webhooks_are_refused_where_no_host_is_allowed(server):
    response = submit(server, variants(1), data={"webhook": "http://127.0.0.1:9/hook"})
    assert response.status_code == 422 and "WEBHOOK_ALLOWED_HOSTS" in response.json()["detail"]


def test_stored_bytes_are_bounded(weights_file, tmp_path):
    server = start_server(tmp_path, JOBS_MAX_PENDING_BYTES=str(400_000), MAX_BATCH_SIZE="1")
    try:
        photos = variants(200)  # about 2 MB
        declared = submit(server, photos)
        assert declared.status_code == 503 and declared.headers["retry-after"]
        assert "JOBS_MAX_PENDING_BYTES" in declared.json()["detail"]

        # Chunked, with no Content-Length: refused when it is stored, not before it is read.
        body = httpx.Request("POST", server.url, files=multipart(photos))
        chunks = (body.read()[i : i + 65536] for i in range(0, len(body.read()), 65536))
        streamed = httpx.post(f"{server.url}/jobs", content=chunks, headers={"content-type": body.headers["content-type"]},
                              timeout=60)
        assert streamed.status_code == 503
        small = submit(server, photos[:20])
        assert small.status_code == 202
    finally:
        server.stop()


def test_results_expire_after_the_ttl_and_their_key_starts_a_new_job(weights_file, tmp_path):
    server = start_server(tmp_path, JOB_TTL_S="2")
    try:
        key = {"Idempotency-Key": "nightly-2026-12-02"}
        job = submit(server, variants(2), headers={**key, "Prefer": "wait=30"}).json()
        assert job["status"] == "succeeded"
        while (seen := httpx.get(f"{server.url}/jobs/{job['id']}")).status_code == 200:
            assert time.time() < datetime.fromisoformat(job["finished_at"]).timestamp() + 30
            time.sleep(0.05)
        assert seen.status_code == 404  # and not before the TTL:
        assert time.time() >= datetime.fromisoformat(job["finished_at"]).timestamp() + 2
        assert httpx.get(f"{server.url}/jobs/{job['id']}/results").status_code == 404
        again = submit(server, variants(1), headers=key)  # the expired job is gone for its client
        assert again.status_code == 202 and again.json()["id"] != job["id"], again.text
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with sqlite3.connect(tmp_path / "jobs.sqlite3") as db:
                if db.execute("select count(*) from jobs").fetchone() == (0,):
                    break
            time.sleep(0.2)
        with sqlite3.connect(tmp_path / "jobs.sqlite3") as db:  # swept, not just hidden
            assert db.execute("select (select count(*) from jobs) + (select count(*) from job_results)").fetchone() == (0,)
    finally:
        server.stop()


def send_part_of_a_job(url: str, files: list[tuple[str, bytes]]) -> socket.socket:
    """Starts a job submission and sends only half of its body; the socket is left open."""
    request = httpx.Request("POST", f"{url}/jobs", files=multipart(files))
    body = request.read()
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)))
    head = (f"POST /jobs HTTP/1.1\r\nHost: {host}\r\nContent-Type: {request.headers['content-type']}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    sock.sendall(head + body[: len(body) // 2])
    return sock


def test_a_job_survives_sigkill_with_exactly_one_result_per_image(weights_file, tmp_path, reference):
    """kill -9 while a job runs and while another uploads; after a restart on the same database the accepted
    job finishes with exactly one result per image, equal to the online answers. (That a job is stored whole
    or not at all is test_jobstore's test_a_job_that_cannot_be_stored_whole_leaves_nothing.)"""
    photos = variants(240)
    first = start_server(tmp_path / "first", JOBS_DATABASE_URL=f"sqlite:///{tmp_path / 'jobs.sqlite3'}")
    try:
        job = submit(first, photos).json()
        wait_for(first, job["id"], lambda j: j["done"] >= 40)
        uploading = send_part_of_a_job(first.url, variants(30))
        deadline = time.monotonic() + 30
        while "request_body_bytes_held 0.0" in httpx.get(f"{first.url}/metrics").text:  # the upload is being received
            assert time.monotonic() < deadline
            time.sleep(0.02)
    finally:
        first.process.send_signal(signal.SIGKILL)
        first.process.wait(10)
    uploading.close()
    with sqlite3.connect(tmp_path / "jobs.sqlite3") as db:
        done_before = db.execute("select done from jobs where id = ?", (job["id"],)).fetchone()[0]
        assert db.execute("select count(*) from jobs").fetchone() == (1,)
    assert 40 <= done_before < 240

    second = start_server(tmp_path / "second", JOBS_DATABASE_URL=f"sqlite:///{tmp_path / 'jobs.sqlite3'}")
    try:
        finished = wait_for(second, job["id"])
        assert (finished["status"], finished["done"], finished["failed"]) == ("succeeded", 240, 0)
        entries = results(second, job["id"])
        assert [entry["index"] for entry in entries] == list(range(240))
        assert_online_answers(second, entries, photos)
        assert_top_k(entries[7]["predictions"], reference(Image.open(io.BytesIO(photos[7][1]))), 5)
        with sqlite3.connect(tmp_path / "jobs.sqlite3") as db:
            assert db.execute("select count(*) from job_results").fetchone() == (240,)
            assert db.execute("select count(*) from job_images").fetchone() == (0,)
    finally:
        second.stop()


def noise_png(seed: int, side: int = 420) -> bytes:
    """A real, incompressible image of about half a megabyte."""
    import numpy as np

    return encode(Image.fromarray(np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)))


@pytest.mark.system
def test_a_full_disk_is_507_named_in_the_log_and_jobs_resume_when_it_grows(weights_file, tmp_path, small_disk):
    """The job store's disk fills up: submissions get 507 with Retry-After, the log names the disk, a gauge
    says so, online traffic is untouched; once the disk grows every accepted job finishes, no restart."""
    log = tmp_path / "server.log"
    database = small_disk.path / "jobs.sqlite3"
    server = start_server(tmp_path, log=log, LOG_LEVEL="info", JOBS_DATABASE_URL=f"sqlite:///{database}")
    try:
        accepted, refused = [], None
        for attempt in range(40):  # 3 x 0.5 MB a job: the 4 MB disk is full long before 40
            response = submit(server, [(f"noise-{attempt}-{i}.png", noise_png(attempt * 3 + i)) for i in range(3)])
            if response.status_code != 202:
                refused = response
                break
            accepted.append(response.json()["id"])
        assert refused is not None and accepted, "the disk never filled"
        assert refused.status_code == 507, refused.text
        assert refused.headers["retry-after"] and "disk space" in refused.json()["detail"]
        assert str(database) not in refused.text  # the path is the operator's business, not the client's
        full = job_metrics(server)
        assert full["job_store_disk_full"] == 1
        metrics = httpx.get(f"{server.url}/metrics").text
        assert 'rejected_requests_total{reason="store_full"} 1.0' in metrics
        assert 'rejected_requests_total{reason="database_unavailable"} 0.0' in metrics
        assert httpx.post(f"{server.url}/predict", files={"file": ("a.png", photo_bytes("coffee.png"))}).status_code == 200
        assert f"the job store's disk is full: {database}" in log.read_text()

        small_disk.resize(200)
        for job_id in accepted:
            finished = wait_for(server, job_id)
            assert (finished["status"], finished["done"], finished["failed"]) == ("succeeded", 3, 0)
        assert submit(server, variants(1)).status_code == 202
        assert job_metrics(server)["job_store_disk_full"] == 0
        assert "Traceback" not in log.read_text()
    finally:
        server.stop()


def histogram(text: str, name: str) -> dict[float, float]:
    """A Prometheus histogram's cumulative counts by upper bound."""
    return {float(bound): float(count) for bound, count in
            re.findall(rf'^{name}_bucket{{le="([^"]+)"}} (\S+)$', text, re.M) if bound != "+Inf"} | \
        {float("inf"): float(re.search(rf"^{name}_count (\S+)$", text, re.M).group(1))}


def test_an_online_request_waits_behind_at_most_one_short_job_pass(weights_file, tmp_path):
    """While a long job runs and online requests keep arriving, job forward passes are sized to JOB_BATCH_MAX_MS:
    no online image waits behind one for longer than the budget plus about one image's forward pass."""
    server = start_server(tmp_path, JOB_BATCH_MAX_MS="50", CACHE_ENTRIES="0")
    try:
        job = submit(server, variants(300)).json()
        wait_for(server, job["id"], lambda j: j["done"] > 0)
        pauses = iter([0.0, 0.05, 0.13, 0.02, 0.2, 0.08, 0.17, 0.01, 0.11, 0.06] * 3)
        for pause in pauses:  # online requests with short pauses: job passes run in the gaps
            assert httpx.post(f"{server.url}/predict", files={"file": ("a.png", photo_bytes("coffee.png"))}).status_code == 200
            time.sleep(pause)
        metrics = httpx.get(f"{server.url}/metrics").text
        behind = histogram(metrics, "online_wait_behind_job_seconds")
        assert behind[float("inf")] == 30
        assert behind[0.0] < 30, "no online image met a job pass: the test measured nothing"
        forward_s = (float(re.search(r"^inference_duration_seconds_sum (\S+)$", metrics, re.M).group(1))
                     / float(re.search(r"^inference_batch_size_sum (\S+)$", metrics, re.M).group(1)))
        bound = 0.05 + 2 * forward_s  # the budget, plus a margin of two images' forward passes
        within = min(b for b in behind if b >= bound)  # the first bucket that holds everything under the bound
        assert behind[within] == behind[float("inf")], (bound, behind)
        sizes = histogram(metrics, "job_batch_size")
        assert sizes[float("inf")] > 0
    finally:
        server.stop()
