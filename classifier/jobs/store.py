"""Where asynchronous jobs live: their images until classified, their results until they expire. SQL only, no HTTP.

    submit --create--> job + images --claim--> the worker --record--> results (the image deleted)

Every statement is SQLAlchemy Core, dialect-neutral, so the same store runs on the embedded SQLite
(the default, WAL) and on PostgreSQL. The schema is versioned by Alembic (migrations/), upgraded at
start-up. Guarantees, each from one transaction:
- a job appears with all its images or not at all (create);
- an image's result is written in the same transaction that deletes the image, and (job, index) is
  the results' primary key, so every image gets exactly one result whatever crashes in between.
Times are seconds since the epoch (UTC), which every database stores and compares the same way.

On PostgreSQL any number of processes (replicas) share the store: an image is claimed by one of them at a
time (FOR UPDATE SKIP LOCKED) under a lease its worker renews; a dead worker's leases run out and another
claims the images again. Steps that must not run twice at once (the schema upgrade, the pending-bytes check
and the insert) take a PostgreSQL advisory lock; on SQLite, BEGIN IMMEDIATE serializes every writer anyway.
"""

from __future__ import annotations

import logging
import secrets
import sqlite3
import threading
import time
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import (Boolean, Column, Double, ForeignKey, Index, Integer, LargeBinary, MetaData, Row, String, Table,
                        Text, and_, case, create_engine, delete, event, func, insert, make_url, or_, select, true, tuple_,
                        update)
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError, IntegrityError

log = logging.getLogger(__name__)

TERMINAL = ("succeeded", "canceled")
MAX_ATTEMPTS = 3  # an image claimed this often without a result keeps killing its worker: it gets an error instead

metadata = MetaData()
jobs = Table(
    "jobs", metadata,
    Column("id", String(32), primary_key=True),
    Column("status", String(16), nullable=False),  # queued, running, succeeded, canceled
    Column("k", Integer, nullable=False),
    Column("total", Integer, nullable=False),
    Column("done", Integer, nullable=False, default=0),
    Column("failed", Integer, nullable=False, default=0),
    Column("created_at", Double, nullable=False),
    Column("started_at", Double),
    Column("finished_at", Double),
    Column("expires_at", Double),  # set when the job finishes: finished_at + JOB_TTL_S
    Column("idempotency_key", String(255), unique=True),
    Column("webhook_url", Text),
    Column("webhook_delivered", Boolean, nullable=False, default=False),
    Column("webhook_attempts", Integer, nullable=False, default=0),
    Column("webhook_last_status", Integer),
    Column("webhook_next_at", Double),  # when to try (again); null: nothing to send
    Column("traceparent", Text),  # the submission's trace context (W3C), when it was traced
    Column("model_version", String(32)),  # the version it was submitted to: only replicas serving it work on it
    Column("results_to", Text),  # s3://bucket/key its results are written to when it finishes (with its webhook)
    Index("jobs_newest_first", "created_at", "id"),
    Index("jobs_webhook_due", "webhook_next_at"),
    Index("jobs_expiry", "expires_at"),
)
job_images = Table(
    "job_images", metadata,
    Column("job_id", String(32), ForeignKey("jobs.id"), primary_key=True),
    Column("index", Integer, primary_key=True),
    Column("filename", Text),
    Column("data", LargeBinary, nullable=False),  # empty for an object named by source
    Column("size", Integer, nullable=False),
    Column("queued_at", Double, nullable=False),
    Column("leased_until", Double),  # claimed by a worker until then
    Column("attempts", Integer, nullable=False, default=0),
    Column("source", Text),  # s3://bucket/key: read by the worker that claims it
    Index("job_images_queue", "queued_at", "job_id", "index"),
)
job_results = Table(
    "job_results", metadata,
    Column("job_id", String(32), ForeignKey("jobs.id"), primary_key=True),
    Column("index", Integer, primary_key=True),
    Column("failed", Boolean, nullable=False),
    Column("entry", Text, nullable=False),  # the JSON line the API returns, index included
)


def disk_full(error: DBAPIError) -> bool:
    """Whether the database refused a write for lack of space: SQLite's SQLITE_FULL, PostgreSQL's disk_full (53100).
    Any other database error means it cannot be reached (a restart, a failover) or is failing."""
    cause = error.orig
    return getattr(cause, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL or getattr(cause, "sqlstate", None) == "53100"


class PendingFull(Exception):
    """Accepting this job would store more unclassified bytes than JOBS_MAX_PENDING_BYTES."""


@dataclass(frozen=True)
class NewImage:
    filename: str | None
    data: bytes | None  # None: answered at submission (result_entry), never stored
    result_entry: str | None = None
    source: str | None = None  # an object's URL, read when the image is claimed (data is then b"")


@dataclass(frozen=True)
class ClaimedImage:
    job_id: str
    index: int
    filename: str | None
    data: bytes
    k: int
    attempts: int  # including this claim
    traceparent: str | None = None  # its job's submission, when traced
    model_version: str | None = None  # its job's: only an answer of this version may be its result
    source: str | None = None  # s3://bucket/key, when the image is an object to read (data is then empty)


@dataclass(frozen=True)
class Outcome:
    job_id: str
    index: int
    entry: str
    failed: bool


@dataclass(frozen=True)
class Backlog:
    images: int
    bytes: int
    oldest_queued_at: float | None
    other_versions: int = 0  # images of jobs pinned to another model version than the one asked about


def _sqlite_pragmas(engine: Engine) -> None:
    """WAL (readers never wait for the writer), durable commits, and transactions under our control: every
    write transaction takes the write lock at BEGIN, so two writers queue (busy_timeout) instead of failing."""

    @event.listens_for(engine, "connect")
    def connect(dbapi_connection, record) -> None:  # noqa: ANN001 (the DB-API's types)
        dbapi_connection.isolation_level = None  # pysqlite's own BEGIN handling off; "begin" below does it
        for pragma in ("journal_mode=WAL", "synchronous=FULL", "busy_timeout=30000", "foreign_keys=ON"):
            dbapi_connection.execute(f"PRAGMA {pragma}")

    @event.listens_for(engine, "begin")
    def begin(connection: Connection) -> None:
        connection.exec_driver_sql("BEGIN" if connection.get_execution_options().get("read_only") else "BEGIN IMMEDIATE")


class JobStore:
    def __init__(self, url: str, ttl_s: float, lease_s: float = 60) -> None:
        self.url = make_url(url)
        self.ttl_s = ttl_s
        self.lease_s = lease_s
        self.embedded = self.url.get_backend_name() == "sqlite"  # one process's file, not a shared server
        if self.embedded and self.url.database not in (None, "", ":memory:"):
            Path(self.url.database).parent.mkdir(parents=True, exist_ok=True)
        # Where its bytes live, for an operator told that disk is full: the file, or the server (no password).
        self.location = (str(Path(self.url.database or ":memory:").absolute()) if self.embedded
                         else f"the PostgreSQL server {self.url.host}:{self.url.port or 5432}, database {self.url.database}")
        # pool_pre_ping: a connection the server dropped (a restart) is replaced, not handed out.
        self.engine = create_engine(self.url, pool_pre_ping=True,
                                    connect_args={} if self.embedded else {"connect_timeout": 5})
        if self.embedded:
            _sqlite_pragmas(self.engine)
        self.reader = self.engine.execution_options(read_only=True)
        self._admission = threading.Lock()  # the pending-bytes check and the insert, as one step

    def open(self) -> None:
        """At start-up: the schema at its newest version; on SQLite, whose file is this process's alone,
        the claims of a process that died are void."""
        self.upgrade()
        if self.embedded:
            self.release_leases()

    def upgrade(self) -> None:
        """Create or migrate the schema to the newest version (migrations/versions)."""
        config = Config()
        config.set_main_option("script_location", str(Path(__file__).parent / "migrations"))
        with self.engine.begin() as connection:
            self._one_at_a_time(connection, "upgrade")  # replicas starting together: one migrates, the rest wait
            config.attributes["connection"] = connection
            command.upgrade(config, "head")

    def release_leases(self) -> None:
        """Void every claim (start-up of a store only this process uses)."""
        with self.engine.begin() as connection:
            connection.execute(update(job_images).values(leased_until=None))

    # Submitting and reading jobs

    def create(self, k: int, images: list[NewImage], *, webhook_url: str | None, idempotency_key: str | None,
               max_pending_bytes: int, traceparent: str | None = None, model_version: str | None = None,
               results_to: str | None = None) -> tuple[Row, bool]:
        """A new job with all its images, in one transaction: (the job, True). With an idempotency key
        already used by a live job: (that job, False). Raises PendingFull past max_pending_bytes."""
        now = time.time()
        job_id = secrets.token_hex(16)  # 128 random bits
        size = sum(len(image.data) for image in images if image.data is not None)
        answered = [(index, image) for index, image in enumerate(images) if image.data is None]
        with self._admission:
            try:
                with self.engine.begin() as connection:
                    self._one_at_a_time(connection, "admission")  # other replicas' submissions
                    pending = connection.execute(select(func.coalesce(func.sum(job_images.c.size), 0))).scalar_one()
                    if size and pending + size > max_pending_bytes:
                        raise PendingFull(pending)
                    if idempotency_key:  # an expired job is gone for its client: its key starts a new job
                        expired = connection.execute(select(jobs.c.id).where(
                            jobs.c.idempotency_key == idempotency_key, ~self._alive())).scalars().all()
                        if expired:
                            self._delete(connection, expired)
                    connection.execute(insert(jobs).values(
                        id=job_id, status="queued", k=k, total=len(images), done=len(answered),
                        failed=len(answered), created_at=now, idempotency_key=idempotency_key, webhook_url=webhook_url,
                        traceparent=traceparent, model_version=model_version, results_to=results_to))
                    stored = [{"job_id": job_id, "index": index, "filename": image.filename, "data": image.data,
                               "size": len(image.data), "queued_at": now, "source": image.source}
                              for index, image in enumerate(images) if image.data is not None]
                    if stored:
                        connection.execute(insert(job_images), stored)
                    if answered:
                        connection.execute(insert(job_results), [
                            {"job_id": job_id, "index": index, "failed": True, "entry": image.result_entry}
                            for index, image in answered])
                    if not stored:  # nothing to classify: every image was answered at submission
                        self._finish(connection, job_id, "succeeded", now)
            except IntegrityError:
                existing = self.by_idempotency_key(idempotency_key) if idempotency_key else None
                if existing is None:
                    raise
                return existing, False
        return self.get(job_id), True

    def get(self, job_id: str) -> Row | None:
        """The job, or None when unknown or expired."""
        with self.reader.connect() as connection:
            return connection.execute(select(jobs).where(jobs.c.id == job_id, self._alive())).first()

    def by_idempotency_key(self, key: str) -> Row | None:
        with self.reader.connect() as connection:
            return connection.execute(select(jobs).where(jobs.c.idempotency_key == key, self._alive())).first()

    def newest(self, limit: int, before: str | None = None) -> list[Row] | None:
        """Jobs newest first; `before`: only those created before that job (None if that job is unknown)."""
        query = select(jobs).where(self._alive()).order_by(jobs.c.created_at.desc(), jobs.c.id.desc()).limit(limit)
        with self.reader.connect() as connection:
            if before is not None:
                created_at = connection.execute(select(jobs.c.created_at).where(jobs.c.id == before)).scalar()
                if created_at is None:
                    return None
                query = query.where(or_(jobs.c.created_at < created_at,
                                        and_(jobs.c.created_at == created_at, jobs.c.id < before)))
            return list(connection.execute(query))

    def results(self, job_id: str, page: int = 1000) -> Iterator[str]:
        """The job's result lines in upload order, read a page at a time so none is held whole."""
        after = -1
        while True:
            with self.reader.connect() as connection:
                rows = connection.execute(
                    select(job_results.c.index, job_results.c.entry)
                    .where(job_results.c.job_id == job_id, job_results.c.index > after)
                    .order_by(job_results.c.index).limit(page)).all()
            for row in rows:
                yield row.entry
            if len(rows) < page:
                return
            after = rows[-1].index

    def cancel(self, job_id: str) -> tuple[Row | None, bool]:
        """Drop the images not yet classified: (the job, whether it was canceled now). A finished job is unchanged."""
        with self.engine.begin() as connection:
            job = connection.execute(select(jobs).where(jobs.c.id == job_id, self._alive())).first()
            if job is None or job.status in TERMINAL:
                return job, False
            connection.execute(delete(job_images).where(job_images.c.job_id == job_id))
            self._finish(connection, job_id, "canceled", time.time())
        return self.get(job_id), True

    def adopt(self, job_id: str, model_version: str) -> tuple[Row | None, str | None]:
        """Move a job waiting for another model version to model_version: (the job, None), or (the job, why not)
        when some of its images were already answered by its own version (its results would mix two models)."""
        with self.engine.begin() as connection:
            job = connection.execute(select(jobs).where(jobs.c.id == job_id, self._alive())).first()
            if job is None or job.model_version in (None, model_version):
                return job, None
            if job.done > job.failed or job.status in TERMINAL:
                return job, (f"{job.done} of its images were answered by model version {job.model_version}: its results "
                             f"cannot continue on {model_version}; cancel it and submit it again")
            connection.execute(update(jobs).where(jobs.c.id == job_id).values(model_version=model_version))
        return self.get(job_id), None

    def delete(self, job_id: str) -> bool:
        """Remove the job, its images and its results. False when there was no such job."""
        with self.engine.begin() as connection:
            return self._delete(connection, [job_id]) > 0

    def sweep(self) -> int:
        """Delete the jobs whose results have expired; how many."""
        with self.engine.begin() as connection:
            expired = connection.execute(select(jobs.c.id).where(jobs.c.expires_at <= time.time()).limit(500)
                                         .with_for_update(skip_locked=True)).scalars().all()  # another replica's sweep
            return self._delete(connection, expired) if expired else 0

    def backlog(self, model_version: str | None = None) -> Backlog:
        """The stored, unclassified images; other_versions: those of jobs a replica serving model_version leaves."""
        other = func.coalesce(func.sum(case((self._for(model_version), 0), else_=1)), 0)
        with self.reader.connect() as connection:
            count, size, oldest, others = connection.execute(
                select(func.count(), func.coalesce(func.sum(job_images.c.size), 0), func.min(job_images.c.queued_at), other)
                .select_from(job_images.join(jobs, jobs.c.id == job_images.c.job_id))).one()
        return Backlog(count, size, oldest, others)

    # The worker's side

    def claim(self, limit: int, model_version: str | None = None) -> list[ClaimedImage]:
        """Up to `limit` images no one is working on, of jobs submitted to model_version (or to none), oldest job
        first, in upload order, leased for lease_s. (On PostgreSQL, SKIP LOCKED lets several replicas claim at once;
        SQLite has one writer at a time.)"""
        now = time.time()
        with self.engine.begin() as connection:
            keys = connection.execute(
                select(job_images.c.job_id, job_images.c.index)
                .join(jobs, jobs.c.id == job_images.c.job_id)
                .where(or_(job_images.c.leased_until.is_(None), job_images.c.leased_until < now), self._for(model_version))
                .order_by(job_images.c.queued_at, job_images.c.job_id, job_images.c.index)
                .limit(limit).with_for_update(skip_locked=True, of=job_images)).all()
            if not keys:
                return []
            chosen = tuple_(job_images.c.job_id, job_images.c.index).in_([tuple(key) for key in keys])
            connection.execute(update(job_images).where(chosen).values(
                leased_until=now + self.lease_s, attempts=job_images.c.attempts + 1))
            connection.execute(update(jobs).where(jobs.c.id.in_({key.job_id for key in keys}), jobs.c.status == "queued")
                               .values(status="running", started_at=now))
            rows = connection.execute(
                select(job_images.c.job_id, job_images.c.index, job_images.c.filename, job_images.c.data, jobs.c.k,
                       job_images.c.attempts, jobs.c.traceparent, jobs.c.model_version, job_images.c.source)
                .join(jobs, jobs.c.id == job_images.c.job_id).where(chosen)
                .order_by(job_images.c.queued_at, job_images.c.job_id, job_images.c.index)).all()
        return [ClaimedImage(*row) for row in rows]

    def renew(self, keys: list[tuple[str, int]]) -> None:
        """Extend the lease on images this worker still works on, so no one else claims them meanwhile."""
        with self.engine.begin() as connection:
            connection.execute(update(job_images).where(tuple_(job_images.c.job_id, job_images.c.index).in_(keys))
                               .values(leased_until=time.time() + self.lease_s))

    def record(self, outcomes: list[Outcome]) -> list[str]:
        """Each outcome's result, and its image deleted, in one transaction. An image already gone (its job
        canceled or deleted, or another worker was first) gets no result. The ids of the jobs that finished."""
        now = time.time()
        answered: Counter[str] = Counter()
        failed: Counter[str] = Counter()
        with self.engine.begin() as connection:
            for outcome in outcomes:
                gone = connection.execute(delete(job_images).where(
                    job_images.c.job_id == outcome.job_id, job_images.c.index == outcome.index)).rowcount
                if gone:
                    connection.execute(insert(job_results).values(
                        job_id=outcome.job_id, index=outcome.index, failed=outcome.failed, entry=outcome.entry))
                    answered[outcome.job_id] += 1
                    failed[outcome.job_id] += outcome.failed
            finished = []
            for job_id, count in sorted(answered.items()):  # rows locked in one order: no deadlock between replicas
                connection.execute(update(jobs).where(jobs.c.id == job_id).values(
                    done=jobs.c.done + count, failed=jobs.c.failed + failed[job_id]))
                left = connection.execute(select(func.count()).where(job_images.c.job_id == job_id)).scalar_one()
                if left == 0 and self._finish(connection, job_id, "succeeded", now):
                    finished.append(job_id)
        return finished

    # Webhooks: at most one delivery attempt at a time per job, whichever process makes it.

    def webhooks_due(self, limit: int = 10) -> list[Row]:
        """Jobs whose webhook is due, each leased to the caller for lease_s (so no one else sends it meanwhile)."""
        now = time.time()
        with self.engine.begin() as connection:
            due = connection.execute(select(jobs).where(jobs.c.webhook_next_at <= now, jobs.c.webhook_delivered.is_(False))
                                     .order_by(jobs.c.webhook_next_at).limit(limit).with_for_update(skip_locked=True)).all()
            if due:
                connection.execute(update(jobs).where(jobs.c.id.in_([job.id for job in due]))
                                   .values(webhook_next_at=now + self.lease_s))
        return due

    def webhook_attempted(self, job_id: str, status: int | None, delivered: bool, retry_at: float | None) -> None:
        with self.engine.begin() as connection:
            connection.execute(update(jobs).where(jobs.c.id == job_id).values(
                webhook_attempts=jobs.c.webhook_attempts + 1, webhook_last_status=status,
                webhook_delivered=delivered, webhook_next_at=None if delivered else retry_at))

    # Helpers, inside a caller's transaction

    def _one_at_a_time(self, connection: Connection, step: str) -> None:
        """On PostgreSQL, wait until no other process is in `step`, until this transaction ends."""
        if not self.embedded:
            connection.execute(select(func.pg_advisory_xact_lock(zlib.crc32(f"jobstore.{step}".encode()))))

    @staticmethod
    def _for(model_version: str | None):  # noqa: ANN205 (a SQL expression)
        """Jobs a replica serving model_version may work on: those submitted to it, or to no version (older jobs)."""
        if model_version is None:
            return true()
        return or_(jobs.c.model_version.is_(None), jobs.c.model_version == model_version)

    def _alive(self):  # noqa: ANN202 (a SQL expression)
        return or_(jobs.c.expires_at.is_(None), jobs.c.expires_at > time.time())

    def _finish(self, connection: Connection, job_id: str, status: str, now: float) -> bool:
        """End a job that has not ended yet; its delivery (its results written to results_to, then its webhook), if
        it has one, becomes due now."""
        return connection.execute(
            update(jobs).where(jobs.c.id == job_id, jobs.c.status.not_in(TERMINAL)).values(
                status=status, finished_at=now, expires_at=now + self.ttl_s,
                webhook_next_at=case((or_(jobs.c.webhook_url.is_not(None), jobs.c.results_to.is_not(None)), now),
                                     else_=None))).rowcount == 1

    @staticmethod
    def _delete(connection: Connection, job_ids: list[str]) -> int:
        connection.execute(delete(job_images).where(job_images.c.job_id.in_(job_ids)))
        connection.execute(delete(job_results).where(job_results.c.job_id.in_(job_ids)))
        return connection.execute(delete(jobs).where(jobs.c.id.in_(job_ids))).rowcount

