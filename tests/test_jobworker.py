"""The job worker with a real store and a real batcher: the poison-image rule and the lease it renews."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from support import photo_bytes

pytestmark = pytest.mark.app


LABELS = tuple(f"class {index}" for index in range(1000))


def numbers(data: bytes) -> np.ndarray:
    return np.full((2,), float(len(data)), np.float32)


async def started(store, predict):
    """A batcher whose forward pass is `predict`, and a job worker on `store`, both running."""
    from classifier.inference.batching import Batcher
    from classifier.jobs.worker import JobWorker

    batcher = Batcher(numbers, predict, max_batch_size=4, max_delay_s=0, max_queue=8, decode_workers=1)
    await batcher.start()
    worker = JobWorker(store, batcher, LABELS, webhook_secret=None, webhook_first_retry_s=1, max_object_bytes=1 << 20)
    await worker.start()
    return batcher, worker


async def until(condition, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not await asyncio.to_thread(condition):
        assert time.monotonic() < deadline, "the condition never held"
        await asyncio.sleep(0.02)


def test_an_image_that_stopped_three_workers_gets_an_error_not_a_fourth_try(weights_file, tmp_path: Path):
    from classifier.jobs.store import MAX_ATTEMPTS, JobStore, NewImage

    store = JobStore(f"sqlite:///{tmp_path / 'jobs.sqlite3'}", ttl_s=3600)
    store.open()
    job, _ = store.create(5, [NewImage("poison.jpg", b"kills the worker"), NewImage("fine.png", photo_bytes("coffee.png"))],
                          webhook_url=None, idempotency_key=None, max_pending_bytes=10**9)
    for _ in range(MAX_ATTEMPTS):  # three workers claimed the first image and died with it
        assert store.claim(1)[0].index == 0
        store.release_leases()
    forwarded = []

    def predict(batch: np.ndarray) -> np.ndarray:
        forwarded.append(len(batch))
        return np.full((len(batch), 1000), 1 / 1000, np.float32)

    async def scenario() -> None:
        batcher, worker = await started(store, predict)
        try:
            await until(lambda: store.get(job.id).status == "succeeded")
        finally:
            await worker.stop()
            await batcher.stop(timeout_s=1)

    asyncio.run(scenario())
    poison, fine = (json.loads(line) for line in store.results(job.id))
    assert poison["error"]["status"] == 500 and f"{MAX_ATTEMPTS} times" in poison["error"]["detail"]
    assert "predictions" in fine and forwarded == [1]  # only the fine image reached the forward pass
    assert (store.get(job.id).done, store.get(job.id).failed) == (2, 1)


def test_the_worker_renews_its_lease_while_the_forward_pass_runs(weights_file, tmp_path: Path):
    """A forward pass that outlasts the lease: the worker keeps renewing it, so another replica never takes
    the images meanwhile, and the one result is stored once the pass ends."""
    from classifier.jobs.store import JobStore, NewImage

    url = f"sqlite:///{tmp_path / 'jobs.sqlite3'}"
    store = JobStore(url, ttl_s=3600, lease_s=0.6)
    store.open()
    job, _ = store.create(5, [NewImage("slow.png", photo_bytes("coffee.png"))], webhook_url=None, idempotency_key=None,
                          max_pending_bytes=10**9)
    other_replica = JobStore(url, ttl_s=3600, lease_s=0.6)
    entered, release = threading.Event(), threading.Event()

    def slow_predict(batch: np.ndarray) -> np.ndarray:
        entered.set()
        assert release.wait(60)
        return np.full((len(batch), 1000), 1 / 1000, np.float32)

    def lease_end() -> float | None:
        with store.engine.connect() as connection:
            return connection.exec_driver_sql("select leased_until from job_images").scalar()

    async def scenario() -> None:
        batcher, worker = await started(store, slow_predict)
        try:
            await until(entered.is_set)
            first_lease = await asyncio.to_thread(lease_end)
            await until(lambda: time.time() > first_lease + 0.6)  # long past the first lease...
            assert await asyncio.to_thread(lease_end) > time.time()  # ...still held, renewed
            assert await asyncio.to_thread(other_replica.claim, 10) == []
            release.set()
            await until(lambda: store.get(job.id).status == "succeeded")
        finally:
            release.set()
            await worker.stop()
            await batcher.stop(timeout_s=1)

    asyncio.run(scenario())
    assert len(list(store.results(job.id))) == 1
