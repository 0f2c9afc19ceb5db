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

from support import (Postgres, Server, assert_online_answers, photo_bytes, results, start_server, submit, upload,
                     variants)

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
