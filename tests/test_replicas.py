"""Replicas sharing one job store on a real PostgreSQL server: the work is shared, a replica killed with
SIGKILL loses nothing, and a database restart costs no online request and no job."""

from __future__ import annotations

import re
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest
from sqlalchemy import create_engine, text

from support import (Postgres, Server, assert_online_answers, other_weights, photo_bytes, results, start_server, submit,
                     upload, variants)

pytestmark = pytest.mark.system


def replica(tmp: Path, database: str) -> Server:
    # Short leases, so a dead replica's images are claimed again within seconds.
    return start_server(tmp, JOBS_DATABASE_URL=database, JOB_LEASE_S="3")


def classified_by(server: Server) -> float:
    metrics = httpx.get(f"{server.url}/metrics").text
    return float(re.search(r'^job_images_total\{outcome="classified"\} (\S+)$', metrics, re.M).group(1))


def retried_by(server: Server) -> float:
    metrics = httpx.get(f"{server.url}/metrics").text
    return float(re.search(r'^job_images_retried_total (\S+)$', metrics, re.M).group(1))


def job_when(server: Server, job_id: str, until, timeout: float = 180) -> dict:
    """Polls the job (answers 503 while the database is away are waited out) until `until(job)`."""
    deadline = time.monotonic() + timeout
    while True:
        response = httpx.get(f"{server.url}/jobs/{job_id}", timeout=10)
        if response.status_code == 200 and until(job := response.json()):
            return job
        assert response.status_code in (200, 503), response.text
        assert time.monotonic() < deadline, f"the job is still {response.text}"
        time.sleep(0.1)


def ended(job: dict) -> bool:
    return job["status"] in ("succeeded", "canceled")


def stored(database: str, job_id: str) -> tuple[int, int, int]:
    """(results, distinct result indexes, images left) of the job, read from the database itself."""
    engine = create_engine(database)
    with engine.connect() as db:
        row = db.execute(text('select count(*), count(distinct "index") from job_results where job_id = :id'), {"id": job_id}).one()
        left = db.execute(text("select count(*) from job_images where job_id = :id"), {"id": job_id}).scalar_one()
    engine.dispose()
    return row[0], row[1], left


def test_two_replicas_share_a_job_and_one_killed_loses_nothing(tmp_path: Path, weights_file, postgres: Postgres):
    database = postgres.new_database()
    photos = variants(240)
    first, second = replica(tmp_path / "first", database), replica(tmp_path / "second", database)
    try:
        job = submit(first, photos).json()  # submitted to one replica; both take part
        deadline = time.monotonic() + 60
        while classified_by(first) < 8 or classified_by(second) < 8:
            assert time.monotonic() < deadline, "both replicas should have classified images of the job"
            time.sleep(0.05)
        second.process.send_signal(signal.SIGKILL)  # mid-job, with images leased to it
        second.process.wait(10)
        at_kill = httpx.get(f"{first.url}/jobs/{job['id']}").json()
        assert at_kill["done"] < 240
        assert retried_by(first) == 0  # nothing taken over yet

        finished = job_when(first, job["id"], ended)
        assert (finished["status"], finished["done"], finished["failed"]) == ("succeeded", 240, 0)
        entries = results(first, job["id"])
        assert [entry["index"] for entry in entries] == list(range(240))
        assert_online_answers(first, entries, photos)
        assert stored(database, job["id"]) == (240, 240, 0)
        assert retried_by(first) > 0  # the survivor claimed the images whose lease the dead replica held
    finally:
        first.stop()
        if second.process.poll() is None:
            second.process.kill()


def test_a_database_restart_fails_no_online_request_and_the_job_finishes(tmp_path: Path, weights_file,
                                                                          postgres: Postgres):
    database = postgres.new_database()
    photos = variants(120)
    server = replica(tmp_path / "server", database)
    online: list[int] = []
    stop = threading.Event()

    def predict_meanwhile() -> None:  # a paced online stream: the job gets the idle time between requests
        while not stop.is_set():
            online.append(httpx.post(f"{server.url}/predict", files=upload(photo_bytes("coffee.png")), timeout=30).status_code)
            time.sleep(0.15)

    try:
        job = submit(server, photos).json()
        stream = threading.Thread(target=predict_meanwhile)
        stream.start()
        job_when(server, job["id"], lambda j: j["done"] >= 16)
        postgres.stop()
        answered_before = len(online)
        try:
            away = httpx.get(f"{server.url}/jobs/{job['id']}")
            assert away.status_code == 503 and away.headers["retry-after"] and "database" in away.json()["detail"]
            refused = submit(server, photos[:2])
            assert refused.status_code == 503 and refused.headers["retry-after"]
            assert httpx.get(f"{server.url}/ready").status_code == 200  # still ready for online traffic
            deadline = time.monotonic() + 60  # online answers go on while the worker's claims and results fail
            while len(online) - answered_before < 5:
                assert time.monotonic() < deadline, f"online answers during the outage: {online[answered_before:]}"
                time.sleep(0.05)
            answered_while_away = len(online) - answered_before
        finally:
            postgres.start()
        finished = job_when(server, job["id"], ended)
        stop.set()
        stream.join()
        assert (finished["status"], finished["done"]) == ("succeeded", 120)
        assert stored(database, job["id"]) == (120, 120, 0)
        assert answered_while_away >= 5 and set(online) == {200}, f"online answers: {sorted(set(online))}"
        assert len(results(server, job["id"])) == 120
    finally:
        stop.set()
        server.stop()


def test_a_replica_started_while_the_database_is_down_serves_online_and_takes_jobs_once_it_is_back(
        tmp_path: Path, weights_file, postgres: Postgres):
    database = postgres.new_database()
    postgres.stop()
    down, server = True, None
    try:
        server = replica(tmp_path / "server", database)  # ready although its job store cannot be opened
        assert httpx.post(f"{server.url}/predict", files=upload(photo_bytes("coffee.png")), timeout=30).status_code == 200
        away = httpx.get(f"{server.url}/jobs")
        assert away.status_code == 503 and "database" in away.json()["detail"]
        postgres.start()
        down = False
        deadline = time.monotonic() + 60
        while (response := submit(server, variants(3))).status_code != 202:  # the worker opens the store within 5 s
            assert response.status_code == 503 and response.headers["retry-after"], response.text
            assert time.monotonic() < deadline, "the job store was never opened"
            time.sleep(0.2)
        finished = job_when(server, response.json()["id"], ended)
        assert (finished["status"], finished["done"]) == ("succeeded", 3)
    finally:
        if down:
            postgres.start()
        if server is not None:
            server.stop()


def test_replicas_of_two_model_versions_never_mix_a_jobs_results(tmp_path: Path, weights_file, postgres: Postgres):
    """A rolling update: replicas of the old and the new weights on one job store. Each job is worked on only by
    replicas of the version it was submitted to. When the old version is gone, a job it never started waits,
    visibly, until it is moved to the new one; one it had started cannot be moved (its results would mix two
    models), only canceled."""
    database = postgres.new_database()
    # The old replica classifies one image per forward pass (not 8): killed, it leaves most of a long job undone.
    old = start_server(tmp_path / "old", JOBS_DATABASE_URL=database, MAX_BATCH_SIZE="1")
    new = start_server(tmp_path / "new", JOBS_DATABASE_URL=database, MODEL_WEIGHTS=str(other_weights(tmp_path)))
    try:
        old_version, new_version = (httpx.get(f"{s.url}/model").json()["version"] for s in (old, new))
        assert old_version != new_version
        jobs = {old_version: submit(old, variants(40)).json(), new_version: submit(new, variants(40)).json()}
        for version, job in jobs.items():
            assert job["model_version"] == version
            done = job_when(old, job["id"], ended)
            assert (done["status"], done["done"], done["failed"]) == ("succeeded", 40, 0)
            response = httpx.get(f"{new.url}/jobs/{job['id']}/results")
            assert response.headers["X-Model-Version"] == version
            assert {entry["model_version"] for entry in response.json()["results"]} == {version}  # all 40 from one
        for server, version in ((old, old_version), (new, new_version)):  # online, each its own version
            answer = httpx.post(f"{server.url}/predict", files=upload(photo_bytes("coffee.png")), timeout=60)
            assert answer.headers["X-Model-Version"] == version

        # The old version goes while a long job of it runs; a job submitted after it is queued behind it, untouched.
        started = submit(old, variants(200)).json()
        job_when(old, started["id"], lambda j: j["done"] >= 1)
        untouched = submit(old, variants(8)).json()
        old.process.send_signal(signal.SIGKILL)
        old.process.wait(10)
        deadline = time.monotonic() + 30
        while not re.search(r"^job_images_waiting_for_other_version [1-9]", httpx.get(f"{new.url}/metrics").text, re.M):
            assert time.monotonic() < deadline, "the new replica should say that images wait for another version"
            time.sleep(0.1)
        assert httpx.get(f"{new.url}/jobs/{untouched['id']}").json()["done"] == 0  # the new weights took none of it

        moved = httpx.post(f"{new.url}/jobs/{untouched['id']}/adopt")
        assert moved.status_code == 200 and moved.json()["model_version"] == new_version
        assert job_when(new, untouched["id"], ended)["done"] == 8
        assert {entry["model_version"] for entry in results(new, untouched["id"])} == {new_version}

        refused = httpx.post(f"{new.url}/jobs/{started['id']}/adopt")
        assert refused.status_code == 409 and "cancel it and submit it again" in refused.json()["detail"]
        assert httpx.post(f"{new.url}/jobs/{started['id']}/cancel").json()["status"] == "canceled"
        assert {entry["model_version"] for entry in results(new, started["id"])} == {old_version}
    finally:
        for server in (old, new):
            if server.process.poll() is None:
                server.stop()
