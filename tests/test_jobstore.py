"""The job store on real databases, SQLite and PostgreSQL, each test on both: atomic jobs, exactly one
result per image, leases, expiry, limits."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from sqlalchemy import text


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Path):
    from jobstore import JobStore

    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'data' / 'jobs.sqlite3'}"
    else:
        url = request.getfixturevalue("postgres").new_database()
    store = JobStore(url, ttl_s=3600, lease_s=60)
    store.open()
    yield store
    store.engine.dispose()


def count(store, table: str) -> int:
    with store.engine.connect() as connection:
        return connection.execute(text(f"select count(*) from {table}")).scalar_one()


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


def test_the_schema_is_created_and_versioned(store):
    with store.engine.connect() as connection:
        assert connection.execute(text("select version_num from alembic_version")).all() == [("0002",)]
        if store.embedded:
            assert connection.execute(text("pragma journal_mode")).one() == ("wal",)
    store.upgrade()  # a second start changes nothing


def another_process(store):
    """A second store on the same database, as another replica (or process) would have: its own engine."""
    from jobstore import JobStore

    return JobStore(store.url.render_as_string(hide_password=False), ttl_s=store.ttl_s, lease_s=store.lease_s)


def test_stores_starting_together_migrate_once(tmp_path, postgres):
    from jobstore import JobStore

    for url in (f"sqlite:///{tmp_path / 'jobs.sqlite3'}", postgres.new_database()):
        replicas = [JobStore(url, ttl_s=3600) for _ in range(4)]
        errors = []

        def start(replica) -> None:
            try:
                replica.upgrade()
            except Exception as error:  # noqa: BLE001 (any failure fails the test below)
                errors.append(error)

        threads = [threading.Thread(target=start, args=(replica,)) for replica in replicas]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert errors == [], url


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
    store.release_leases()  # as at the start-up of a SQLite store: the claims above are void
    again = store.claim(10)
    assert [i.index for i in again] == [0, 1, 2, 3, 4] and {i.attempts for i in again} == {2}


def test_a_lease_runs_out_unless_renewed(store):
    create(store, 4)
    store.lease_s = 0.3
    kept, lapsed = store.claim(2), store.claim(2)
    time.sleep(0.2)
    store.renew([(image.job_id, image.index) for image in kept])
    time.sleep(0.2)  # past the first lease: only the renewed images are still held
    assert [image.index for image in store.claim(10)] == [image.index for image in lapsed]


def test_concurrent_workers_claim_each_image_once(store):
    """Eight threads claiming and recording at once (on PostgreSQL, FOR UPDATE SKIP LOCKED; on SQLite,
    one writer at a time): every image is claimed by exactly one of them and gets exactly one result."""
    jobs = [create(store, 40) for _ in range(3)]
    claimed: list[tuple[str, int]] = []
    lock = threading.Lock()

    def work(worker) -> None:
        while batch := worker.claim(4):
            with lock:
                claimed.extend((image.job_id, image.index) for image in batch)
            worker.record(outcomes_for(batch))

    threads = [threading.Thread(target=work, args=(another_process(store),)) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(claimed) == sorted((job.id, index) for job in jobs for index in range(40))
    for job in jobs:
        finished = store.get(job.id)
        assert (finished.status, finished.done) == ("succeeded", 40)
        assert len(list(store.results(job.id))) == 40


def test_the_pending_bytes_bound_holds_for_concurrent_submissions(store):
    from jobstore import PendingFull

    accepted, refused = [], []

    def submit(replica) -> None:
        try:
            accepted.append(create(replica, 3, max_pending_bytes=100))
        except PendingFull:
            refused.append(True)

    threads = [threading.Thread(target=submit, args=(another_process(store),)) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(accepted) == 3 and len(refused) == 5  # 30 bytes each: three fit under 100
    assert store.backlog().bytes == 90


def test_results_come_in_upload_order_a_page_at_a_time(store):
    job = create(store, 7)
    claimed = store.claim(10)
    store.record(outcomes_for(reversed(claimed)))
    assert list(store.results(job.id, page=2)) == [f'{{"index": {i}}}' for i in range(7)]


def test_a_job_that_cannot_be_stored_whole_leaves_nothing(store):
    from jobstore import NewImage

    broken = images(3) + [NewImage("bad.jpg", None, None)]  # a result entry may not be null: the insert fails
    with pytest.raises(Exception):
        store.create(5, broken, webhook_url=None, idempotency_key=None, max_pending_bytes=10**9)
    assert count(store, "jobs") == count(store, "job_images") == 0


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
