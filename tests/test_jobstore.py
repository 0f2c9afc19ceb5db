"""The job store on real databases, SQLite and PostgreSQL, each test on both: atomic jobs, exactly one
result per image, leases, expiry, limits."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest
from sqlalchemy import text

pytestmark = pytest.mark.unit


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.system)])
def store(request: pytest.FixtureRequest, tmp_path: Path):
    from classifier.jobs.store import JobStore

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
    from classifier.jobs.store import NewImage

    return [NewImage(f"{i}.jpg", bytes([i % 256]) * size) for i in range(count)]


def outcomes_for(claimed):
    from classifier.jobs.store import Outcome

    return [Outcome(image.job_id, image.index, f'{{"index": {image.index}}}', False) for image in claimed]


def create(store, count=3, **options):
    options = {"webhook_url": None, "idempotency_key": None, "max_pending_bytes": 10**9, **options}
    job, created = store.create(5, images(count), **options)
    assert created
    return job


def schema(store) -> dict:
    """Every table's columns and indexes, as the database describes them."""
    from sqlalchemy import inspect

    inspector = inspect(store.engine)
    return {table: ([column["name"] for column in inspector.get_columns(table)],
                    sorted(index["name"] for index in inspector.get_indexes(table)),
                    inspector.get_pk_constraint(table)["constrained_columns"])
            for table in inspector.get_table_names()}


def test_the_schema_is_created_and_versioned(store):
    with store.engine.connect() as connection:
        assert connection.execute(text("select version_num from alembic_version")).all() == [("0005",)]
        if store.embedded:
            assert connection.execute(text("pragma journal_mode")).one() == ("wal",)
    job = create(store, 2)
    before = schema(store)
    assert set(before) == {"alembic_version", "jobs", "job_images", "job_results"}
    store.open()  # a second start: the same schema and version, and the data kept
    assert schema(store) == before and store.get(job.id).total == 2 and store.backlog().images == 2


@pytest.mark.parametrize("table", ["job_images", "job_results"])
def test_job_and_index_are_the_primary_key(store, table):
    """The database itself refuses a second row for one image: the exactly-one-result guarantee rests on it."""
    from sqlalchemy import insert
    from sqlalchemy.exc import IntegrityError

    from classifier.jobs import store as jobstore

    job = create(store, 1)
    row = {"job_images": {"job_id": job.id, "index": 7, "filename": None, "data": b"x", "size": 1, "queued_at": 0.0},
           "job_results": {"job_id": job.id, "index": 7, "failed": False, "entry": "{}"}}[table]
    with store.engine.begin() as connection:
        connection.execute(insert(jobstore.metadata.tables[table]), row)
    with pytest.raises(IntegrityError):
        with store.engine.begin() as connection:
            connection.execute(insert(jobstore.metadata.tables[table]), row)


def another_process(store):
    """A second store on the same database, as another replica (or process) would have: its own engine."""
    from classifier.jobs.store import JobStore

    return JobStore(store.url.render_as_string(hide_password=False), ttl_s=store.ttl_s, lease_s=store.lease_s)


@pytest.mark.system
def test_stores_starting_together_migrate_once(tmp_path, postgres):
    from classifier.jobs.store import JobStore

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


def claim_when_free(store, limit: int = 10, timeout: float = 30):
    """The first non-empty claim: images are free once their lease has run out."""
    deadline = time.monotonic() + timeout
    while not (claimed := store.claim(limit)):
        assert time.monotonic() < deadline, "no lease ran out"
        time.sleep(0.02)
    return claimed


def test_claims_do_not_overlap_and_an_expired_lease_is_claimed_again(store):
    create(store, 5)
    store.lease_s = 0.5
    first, second = store.claim(3), store.claim(3)
    assert [i.index for i in first] == [0, 1, 2] and [i.index for i in second] == [3, 4]
    assert store.claim(3) == []  # within the lease: no one else gets them
    again = claim_when_free(store)
    if len(again) < 5:  # the second claim's lease ends a moment after the first's
        again += claim_when_free(store)
    assert [i.index for i in again] == [0, 1, 2, 3, 4] and {i.attempts for i in again} == {2}


def test_a_start_of_a_sqlite_store_voids_its_dead_claims(store):
    create(store, 3)
    assert len(store.claim(10)) == 3 and store.claim(10) == []
    store.release_leases()  # what open() does on SQLite, whose file only this process uses
    assert [i.attempts for i in store.claim(10)] == [2, 2, 2]


def test_a_lease_runs_out_unless_renewed(store):
    create(store, 4)
    store.lease_s = 0.5
    kept, lapsed = store.claim(2), store.claim(2)
    store.lease_s = 600  # the renewal holds the kept ones far beyond the first lease
    store.renew([(image.job_id, image.index) for image in kept])
    assert [image.index for image in claim_when_free(store)] == [image.index for image in lapsed]
    assert store.claim(10) == []


def test_an_expired_jobs_idempotency_key_starts_a_new_job(store):
    store.ttl_s = 0.2
    job = create(store, 1, idempotency_key="order-18")
    store.record(outcomes_for(store.claim(10)))
    deadline = time.monotonic() + 30
    while store.get(job.id) is not None:  # expired, not yet swept
        assert time.monotonic() < deadline
        time.sleep(0.02)
    fresh, created = store.create(5, images(2), webhook_url=None, idempotency_key="order-18", max_pending_bytes=10**9)
    assert created and fresh.id != job.id and fresh.total == 2
    assert store.by_idempotency_key("order-18").id == fresh.id
    assert count(store, "jobs") == 1  # the expired job went with it


def test_the_same_idempotency_key_at_the_same_moment_makes_one_job(store):
    """Eight replicas submitting one key at once: one job is made, and all eight answer with it."""
    answers, barrier = [], threading.Barrier(8)

    def submit(replica) -> None:
        barrier.wait()
        answers.append(replica.create(5, images(2), webhook_url=None, idempotency_key="same", max_pending_bytes=10**9))

    threads = [threading.Thread(target=submit, args=(another_process(store),)) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(answers) == 8 and sum(created for _, created in answers) == 1
    assert len({job.id for job, _ in answers}) == 1 and count(store, "jobs") == 1


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
    from classifier.jobs.store import PendingFull

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
    from sqlalchemy.exc import IntegrityError

    from classifier.jobs.store import NewImage

    broken = images(3) + [NewImage("bad.jpg", None, None)]  # a result entry may not be null: the insert fails
    with pytest.raises(IntegrityError):  # after the job and its three images were inserted
        store.create(5, broken, webhook_url=None, idempotency_key=None, max_pending_bytes=10**9)
    assert count(store, "jobs") == count(store, "job_images") == count(store, "job_results") == 0


def test_delete_removes_the_job_its_images_and_its_results(store):
    job, other = create(store, 4), create(store, 2)
    store.record(outcomes_for(store.claim(2)))  # two of job's images answered, two still stored
    assert store.delete(job.id) is True
    assert store.get(job.id) is None and list(store.results(job.id)) == []
    with store.engine.connect() as connection:
        for table in ("jobs", "job_images", "job_results"):
            column = "id" if table == "jobs" else "job_id"
            assert connection.execute(text(f"select count(*) from {table} where {column} = :id"), {"id": job.id}).scalar() == 0
    assert store.get(other.id).total == 2 and store.backlog().images == 2  # the other job untouched
    assert store.delete(job.id) is False


def test_pending_bytes_are_bounded(store):
    from classifier.jobs.store import PendingFull

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
    finished = store.get(job.id)
    assert finished.expires_at == pytest.approx(finished.finished_at + 0.05)
    while time.time() <= finished.expires_at:
        time.sleep(0.01)
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


@pytest.mark.system
@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
def test_a_full_disk_is_told_apart_and_writes_resume_once_it_grows(database, small_disk, request):
    """The store's disk fills up: the error says so (not "unavailable"), and once there is room again the
    same store writes again, without a restart."""
    from sqlalchemy.exc import DBAPIError

    from classifier.jobs.store import JobStore, NewImage, disk_full

    postgres = request.getfixturevalue("postgres") if database == "postgresql" else None
    if postgres is None:
        url = f"sqlite:///{small_disk.path / 'jobs.sqlite3'}"
    else:
        small_disk.resize(24)  # a new database's own catalogs take about 8 MB
        url = postgres.new_database(small_disk.path / "space")
    store = JobStore(url, ttl_s=3600)
    try:
        store.open()
        with pytest.raises(DBAPIError) as full:
            for _ in range(100):  # 100 MB, incompressible: far more than the disk holds
                store.create(5, [NewImage("a.jpg", os.urandom(1_000_000))], webhook_url=None, idempotency_key=None,
                             max_pending_bytes=10**10)
        assert disk_full(full.value)
        stored = store.backlog().images
        assert stored >= 1  # reads still work
        small_disk.resize(200)
        create(store, 1)
        store.record(outcomes_for(store.claim(100)))
        assert store.backlog().images == 0 and count(store, "job_results") == stored + 1
    finally:
        store.engine.dispose()
        if postgres is not None:  # before the disk goes: the shared server must not keep a tablespace on it
            postgres.drop_database(url)


@pytest.mark.system
def test_an_unreachable_database_is_not_a_full_disk(postgres):
    from sqlalchemy.exc import DBAPIError

    from classifier.jobs.store import JobStore, disk_full
    from support import free_port

    store = JobStore(f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/nowhere", ttl_s=3600)
    with pytest.raises(DBAPIError) as unreachable:
        store.backlog()
    assert not disk_full(unreachable.value)


def test_the_migrations_build_exactly_the_tables_the_code_declares(store):
    """Alembic's autogenerate comparison of the upgraded database with jobstore's tables finds nothing to do:
    a column, index or constraint declared in one place and not the other fails here, on either database."""
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from classifier.jobs import store as jobstore

    with store.engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True, "compare_server_default": True})
        assert compare_metadata(context, jobstore.metadata) == []
