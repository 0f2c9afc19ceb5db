"""The job store on a real database file: atomic jobs, exactly one result per image, leases, expiry, limits."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import pytest


@pytest.fixture
def store(tmp_path: Path):
    from jobstore import JobStore

    store = JobStore(f"sqlite:///{tmp_path / 'data' / 'jobs.sqlite3'}", ttl_s=3600, lease_s=60)
    store.upgrade()
    return store


def images(count: int, size: int = 10):
    from jobstore import NewImage

    return [NewImage(f"{i}.jpg", bytes([i % 256]) * size) for i in range(count)]


def outcomes_for(claimed):
    from jobstore import Outcome

    return [Outcome(image.job_id, image.index, f'{{"index": {image.index}}}', False) for image in claimed]


def create(store, count=3, **options):
    options = {"webhook_url": None, "idempotency_key": None, "max_pending_bytes": 10**9, **options}
    job, created = store.create(5, images(count), **options)
    assert created
    return job


def test_the_schema_is_created_in_a_new_folder_and_versioned(store, tmp_path):
    with sqlite3.connect(tmp_path / "data" / "jobs.sqlite3") as db:
        assert db.execute("select version_num from alembic_version").fetchall() == [("0001",)]
        assert db.execute("pragma journal_mode").fetchone() == ("wal",)
    store.upgrade()  # a second start changes nothing


def test_every_image_gets_exactly_one_result_however_often_it_is_recorded(store):
    job = create(store, 3)
    claimed = store.claim(10)
    assert [image.index for image in claimed] == [0, 1, 2]
    assert store.record(outcomes_for(claimed)) == [job.id]
    assert store.record(outcomes_for(claimed)) == []  # a second worker with the same images: nothing changes
    finished = store.get(job.id)
    assert (finished.status, finished.done, finished.failed) == ("succeeded", 3, 0)
    assert list(store.results(job.id)) == ['{"index": 0}', '{"index": 1}', '{"index": 2}']
    assert store.backlog().images == 0  # images are deleted as they get their result


def test_claims_do_not_overlap_and_an_expired_lease_is_claimed_again(store):
    create(store, 5)
    first, second = store.claim(3), store.claim(3)
    assert [i.index for i in first] == [0, 1, 2] and [i.index for i in second] == [3, 4]
    assert store.claim(3) == []
    store.lease_s = -1  # as if the claims above had expired
    store.release_leases()
    again = store.claim(10)
    assert [i.index for i in again] == [0, 1, 2, 3, 4] and {i.attempts for i in again} == {2}


def test_results_come_in_upload_order_a_page_at_a_time(store):
    job = create(store, 7)
    claimed = store.claim(10)
    store.record(outcomes_for(reversed(claimed)))
    assert list(store.results(job.id, page=2)) == [f'{{"index": {i}}}' for i in range(7)]


def test_a_job_that_cannot_be_stored_whole_leaves_nothing(store, tmp_path):
    from jobstore import NewImage

    broken = images(3) + [NewImage("bad.jpg", None, None)]  # a result entry may not be null: the insert fails
    with pytest.raises(Exception):
        store.create(5, broken, webhook_url=None, idempotency_key=None, max_pending_bytes=10**9)
    with sqlite3.connect(tmp_path / "data" / "jobs.sqlite3") as db:
        assert db.execute("select count(*) from jobs").fetchone() == (0,)
        assert db.execute("select count(*) from job_images").fetchone() == (0,)


def test_pending_bytes_are_bounded(store):
    from jobstore import PendingFull

    create(store, 3, max_pending_bytes=30)
    with pytest.raises(PendingFull):
        create(store, 1, max_pending_bytes=30)
    store.record(outcomes_for(store.claim(10)))
    create(store, 1, max_pending_bytes=30)  # room again once classified


def test_an_idempotency_key_returns_the_first_job(store):
    job = create(store, 2, idempotency_key="order-17")
    again, created = store.create(5, images(9), webhook_url=None, idempotency_key="order-17", max_pending_bytes=10**9)
    assert not created and again.id == job.id and again.total == 2


def test_cancel_drops_pending_images_and_late_results(store):
    job = create(store, 4)
    claimed = store.claim(2)
    canceled, now = store.cancel(job.id)
    assert now and canceled.status == "canceled" and canceled.finished_at is not None
    assert store.backlog().images == 0
    store.record(outcomes_for(claimed))  # the batch that was in flight
    assert list(store.results(job.id)) == [] and store.get(job.id).done == 0
    assert store.cancel(job.id)[1] is False  # a finished job is returned unchanged


def test_expired_jobs_answer_nothing_and_are_swept(store):
    store.ttl_s = 0.05
    job = create(store, 1)
    store.record(outcomes_for(store.claim(10)))
    time.sleep(0.1)
    assert store.get(job.id) is None
    assert store.sweep() == 1
    assert list(store.results(job.id)) == []


def test_newest_first_with_a_cursor(store):
    made = [create(store, 1).id for _ in range(5)]
    first = [job.id for job in store.newest(2)]
    assert first == made[::-1][:2]
    assert [job.id for job in store.newest(10, before=first[-1])] == made[::-1][2:]
    assert store.newest(10, before="0" * 32) is None


def test_a_due_webhook_is_leased_to_one_sender(store):
    job = create(store, 1, webhook_url="http://127.0.0.1:9/hook")
    store.record(outcomes_for(store.claim(10)))
    assert [due.id for due in store.webhooks_due()] == [job.id]
    assert store.webhooks_due() == []  # leased: no second sender
    store.webhook_attempted(job.id, 500, False, time.time() - 1)
    again = store.webhooks_due()
    assert [due.id for due in again] == [job.id] and again[0].webhook_attempts == 1
    store.webhook_attempted(job.id, 204, True, None)
    assert store.webhooks_due() == [] and store.get(job.id).webhook_delivered
