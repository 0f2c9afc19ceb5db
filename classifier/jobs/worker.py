"""The job worker: stored job images through the batcher, in the background, and their results back.

    store.claim --(an object: read from S3)--> batcher.submit(background=True) --> store.record
                --> delivery: the results written to the job's results_to object, then its webhook

Two batches of job images are out at a time: one in (or waiting for) the forward pass, the next being
decoded, so the model never waits for a job's decoding. Images are claimed only when the batcher is idle
(no online image for a moment), and their lease is renewed until their results are stored, so with several
replicas on one database the backlog goes to the idle ones. Beside that, once a second: backlog metrics,
deliveries that are due, and (less often) expired jobs swept. An object the store cannot serve for now (503) is
left unrecorded: once its lease runs out it is read again, and after MAX_ATTEMPTS it gets an error.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Coroutine, Sequence

import httpx
from sqlalchemy import Row
from sqlalchemy.exc import DBAPIError
from standardwebhooks.webhooks import Webhook

from classifier import storage, tracing
from classifier.errors import InsufficientStorage, ServiceError, Unavailable
from classifier.inference.batching import Batcher
from classifier.inference.images import ImageError
from classifier.jobs import webhooks
from classifier.jobs.store import MAX_ATTEMPTS, TERMINAL, ClaimedImage, JobStore, Outcome, disk_full
from classifier.observability import (JOB_IMAGES, JOB_IMAGES_OTHER_VERSION, JOB_IMAGES_PENDING, JOB_IMAGES_RETRIED,
                                      JOB_OLDEST_PENDING_AGE, JOB_PENDING_BYTES, JOB_RESULTS_WRITTEN, JOB_STORE_DISK_FULL,
                                      JOBS_FINISHED)
from classifier.schemas import Job, result_line
from classifier.tracing import Tracing

log = logging.getLogger(__name__)
for status in TERMINAL:  # jobs_finished_total exports every end from the start, at 0
    JOBS_FINISHED.labels(status)

LANES = 2  # job batches out at once
SWEEP_EVERY_S = 30  # or JOB_TTL_S, when shorter


class GaveUp(ImageError):
    """An image that stopped the service every time it was tried: it gets this answer, not another try."""

    status = 500


class JobWorker:
    def __init__(self, store: JobStore, batcher: Batcher, labels: Sequence[str], *, webhook_secret: str | None,
                 webhook_first_retry_s: float, max_object_bytes: int, tracing: Tracing | None = None) -> None:
        self.store = store
        self.max_object_bytes = max_object_bytes  # MAX_UPLOAD_BYTES: an object is read no larger than an upload
        self.batcher = batcher
        self.labels = labels
        self.signer = Webhook(webhook_secret) if webhook_secret else None
        self.webhook_first_retry_s = webhook_first_retry_s
        self.tracing = tracing or Tracing("none")
        self._submitted = asyncio.Event()  # a job was stored: look for work now, not at the next poll
        self._ended = asyncio.Event()  # replaced each time a job ends, so waiters wake
        self._tasks: set[asyncio.Task[None]] = set()  # the loops, the batches out, the webhooks being sent
        self._client: httpx.AsyncClient | None = None
        self._opened = False

    async def start(self) -> None:
        """Open the store (see JobStore.open), then work in the background. An embedded store that cannot be
        opened stops the start-up; an unreachable database server is retried while online traffic is served."""
        try:
            await asyncio.to_thread(self.store.open)
        except DBAPIError as error:
            if self.store.embedded:
                raise
            log.warning("the job database is unreachable (%s); job routes answer 503 until it is back",
                        type(error).__name__)
        else:
            self._opened = True
        self._client = httpx.AsyncClient()
        self.tracing.instrument_client(self._client)  # a webhook sends traceparent: its job's trace
        self._spawn(self._work())

    async def _work(self) -> None:
        while not self._opened:
            await asyncio.sleep(5.0)
            try:
                await asyncio.to_thread(self.store.open)
                self._opened = True
                log.info("the job database is reachable again")
            except DBAPIError:
                pass
        self._spawn(self._classify_forever())
        self._spawn(self._housekeeping_forever())

    async def stop(self) -> None:
        """Stop taking work. Images claimed but not recorded keep their state and are classified after a restart."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._client:
            await self._client.aclose()

    def _spawn(self, work: Coroutine[object, object, None]) -> asyncio.Task[None]:
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def submitted(self) -> None:
        self._submitted.set()
        self.store_written()

    def store_failed(self, error: DBAPIError, doing: str) -> ServiceError:
        """A failed store operation: logged with its cause, and what it means for a client: the store's disk is
        full (507: an operator must free or grow it; the job_store_disk_full gauge stays up until a write
        succeeds again), or the database cannot be reached (503: a restart, a failover)."""
        if disk_full(error):
            JOB_STORE_DISK_FULL.set(1)
            log.warning("%s: the job store's disk is full: %s", doing, self.store.location)
            return InsufficientStorage("the job store is out of disk space; retry later")
        log.warning("%s: the job database is unavailable (%s: %s)", doing, type(error).__name__,
                    str(error.orig).splitlines()[0])
        return Unavailable("the job database is unavailable; retry shortly", "database_unavailable")

    def store_written(self) -> None:
        JOB_STORE_DISK_FULL.set(0)

    def ended(self) -> None:
        """A job reached a terminal status in this process: wake whoever waits (Prefer: wait)."""
        ended, self._ended = self._ended, asyncio.Event()
        ended.set()

    async def wait_until_ended(self, job_id: str, timeout_s: float) -> Row | None:
        """The job once it has ended, or as it is after timeout_s (None if it is gone)."""
        deadline = time.monotonic() + timeout_s
        while True:
            ended = self._ended
            job = await asyncio.to_thread(self.store.get, job_id)
            remaining = deadline - time.monotonic()
            if job is None or job.status in TERMINAL or remaining <= 0:
                return job
            try:  # a job can also end in another process (a replica): look again at least every second
                await asyncio.wait_for(ended.wait(), min(remaining, 1.0))
            except TimeoutError:
                pass

    # Classifying

    async def _classify_forever(self) -> None:
        lanes = asyncio.Semaphore(LANES)
        while True:
            await lanes.acquire()
            await self.batcher.until_idle()
            try:
                # Only jobs submitted to the version this replica serves (the batcher's: a reload changes it).
                images = await asyncio.to_thread(self.store.claim, self.batcher.max_batch_size, self.batcher.model_version)
            except DBAPIError as error:
                lanes.release()
                await self._pause("claiming job images", error)
                continue
            if not images:
                lanes.release()
                self._submitted.clear()
                try:
                    await asyncio.wait_for(self._submitted.wait(), 1.0)
                except TimeoutError:
                    pass
                continue
            JOB_IMAGES_RETRIED.inc(sum(image.attempts > 1 for image in images))
            self._spawn(self._classify(images)).add_done_callback(lambda _: lanes.release())

    async def _classify(self, images: list[ClaimedImage]) -> None:
        renewing = self._spawn(self._renew_leases([(image.job_id, image.index) for image in images]))
        try:
            await self._classify_and_record(images)
        finally:
            renewing.cancel()

    async def _renew_leases(self, keys: list[tuple[str, int]]) -> None:
        while True:
            await asyncio.sleep(self.store.lease_s / 3)
            try:
                await asyncio.to_thread(self.store.renew, keys)
            except DBAPIError as error:  # if the lease runs out meanwhile, another worker may take the images too;
                # only the first result is stored
                log.warning("renewing job image leases: the database is unavailable (%s)", type(error).__name__)

    async def _classify_and_record(self, images: list[ClaimedImage]) -> None:
        # A span for the images claimed together, in a trace of its own (a job outlives its request, and may be
        # worked on by another replica, after a restart), linked to the submission of each job among them.
        submissions = tracing.links(list({image.traceparent: tracing.stored(image.traceparent) for image in images}.values()))
        with self.tracing.tracer.start_as_current_span("job images", links=submissions,
                                                        attributes={"images": len(images)}):
            await self._classify_and_record_traced(images)

    async def _classify_image(self, image: ClaimedImage) -> object:
        with self.tracing.tracer.start_as_current_span(
                "job image", links=tracing.links([tracing.stored(image.traceparent)]),
                attributes={"job.id": image.job_id, "job.image.index": image.index, "job.image.attempt": image.attempts}):
            data = image.data
            if image.source is not None:
                data = await asyncio.to_thread(storage.read, storage.ObjectURL.parse(image.source), self.max_object_bytes)
            return await self.batcher.submit(data, background=True)

    async def _classify_and_record_traced(self, images: list[ClaimedImage]) -> None:
        tried = [image for image in images if image.attempts <= MAX_ATTEMPTS]
        answers = await asyncio.gather(*(self._classify_image(image) for image in tried), return_exceptions=True)
        outcome_of = dict(zip(((image.job_id, image.index) for image in tried), answers))
        outcomes = []
        for image in images:
            answer = outcome_of.get((image.job_id, image.index),
                                    GaveUp(f"this image stopped the service {MAX_ATTEMPTS} times; it was not classified"))
            if isinstance(answer, BaseException) and not isinstance(answer, Exception):
                raise answer  # cancellation: leave the images to be claimed again
            if isinstance(answer, Unavailable) and answer.reason == "storage_unavailable":
                log.warning("job %s image %d: %s; read again when its lease runs out", image.job_id, image.index, answer)
                continue
            made_by = getattr(answer, "model_version", None)
            if image.model_version and made_by and made_by != image.model_version:
                # New weights were loaded while it was in flight: not its job's version. Not recorded; once its lease
                # runs out a replica serving its job's version classifies it.
                log.info("job %s image %d: answered by model version %s, its job's is %s; left for that version",
                         image.job_id, image.index, made_by, image.model_version)
                continue
            failed = isinstance(answer, Exception)
            outcomes.append(Outcome(image.job_id, image.index,
                                    result_line(image.index, image.filename, answer, image.k, self.labels), failed))
        with self.tracing.tracer.start_as_current_span("store results", attributes={"images": len(outcomes)}):
            while True:
                try:
                    ended = await asyncio.to_thread(self.store.record, outcomes)
                    break
                except DBAPIError as error:  # the answers are kept and stored when the database is back
                    await self._pause("storing job results", error)
        self.store_written()
        failed = sum(outcome.failed for outcome in outcomes)
        JOB_IMAGES.labels("error").inc(failed)
        JOB_IMAGES.labels("classified").inc(len(outcomes) - failed)
        if ended:
            JOBS_FINISHED.labels("succeeded").inc(len(ended))
            self.ended()

    # Housekeeping

    async def _housekeeping_forever(self) -> None:
        last_sweep = 0.0
        while True:
            try:
                backlog = await asyncio.to_thread(self.store.backlog, self.batcher.model_version)
                JOB_IMAGES_PENDING.set(backlog.images)
                JOB_IMAGES_OTHER_VERSION.set(backlog.other_versions)
                JOB_PENDING_BYTES.set(backlog.bytes)
                JOB_OLDEST_PENDING_AGE.set(0 if backlog.oldest_queued_at is None else time.time() - backlog.oldest_queued_at)
                for job in await asyncio.to_thread(self.store.webhooks_due):
                    self._spawn(self._deliver(job))
                if time.monotonic() - last_sweep > min(SWEEP_EVERY_S, self.store.ttl_s):
                    last_sweep = time.monotonic()
                    swept = await asyncio.to_thread(self.store.sweep)
                    if swept:
                        log.info("swept %d expired jobs", swept)
            except DBAPIError as error:
                self.store_failed(error, "job housekeeping")
            await asyncio.sleep(1.0)

    async def _deliver(self, job: Row) -> None:
        """A finished job's delivery: its results written to results_to (one PUT, again on a retry), then its
        webhook, so a webhook received means the results object is there. Retried as a webhook is."""
        status: int | None = 200
        if job.results_to:
            status = await self._write_results(job)
        if status == 200 and job.webhook_url and self.signer is not None:
            assert self._client is not None
            with self.tracing.tracer.start_as_current_span("webhook", tracing.under(tracing.stored(job.traceparent)),
                                                            attributes={"job.id": job.id}):
                status = await webhooks.deliver(self._client, self.signer, job.webhook_url, f"msg_{job.id}",
                                                Job.from_row(job).model_dump_json())
        delivered = status is not None and 200 <= status < 300
        attempts = job.webhook_attempts + 1
        retry_at = None if delivered else webhooks.retry_at(attempts, self.webhook_first_retry_s, time.time())
        if not delivered:
            log.warning("webhook of job %s: attempt %d got %s; %s", job.id, attempts, status or "no answer",
                        "giving up" if retry_at is None else f"retrying in {retry_at - time.time():.0f} s")
        try:
            await asyncio.to_thread(self.store.webhook_attempted, job.id, status, delivered, retry_at)
        except DBAPIError as error:  # the lease runs out and the delivery is tried again
            log.warning("webhook of job %s: could not record the attempt (%s)", job.id, type(error).__name__)

    async def _write_results(self, job: Row) -> int:
        """The job's results as JSON lines, to its results_to object: 200, or the store's error's status."""
        def write() -> None:
            lines = "".join(line + "\n" for line in self.store.results(job.id)).encode()
            storage.write(storage.ObjectURL.parse(job.results_to), lines, "application/x-ndjson")

        with self.tracing.tracer.start_as_current_span("write results", tracing.under(tracing.stored(job.traceparent)),
                                                        attributes={"job.id": job.id}):
            try:
                await asyncio.to_thread(write)
            except ServiceError as error:
                JOB_RESULTS_WRITTEN.labels("failed").inc()
                log.warning("results of job %s: %s", job.id, error)
                return error.status
        JOB_RESULTS_WRITTEN.labels("written").inc()
        return 200

    async def _pause(self, doing: str, error: DBAPIError) -> None:
        self.store_failed(error, f"{doing} (retrying in 1 s)")
        await asyncio.sleep(1.0)
