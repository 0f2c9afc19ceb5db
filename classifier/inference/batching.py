"""The inference pipeline: decode in a small thread pool, batch, one forward pass per batch.

    bytes --prepare (decode threads)--> image --queue--> batch --predict (inference thread)--> row

One thread owns the model. It takes whatever is queued, up to `max_batch_size`, waits at most
`max_delay_s` for images still being decoded (never for nobody), runs one forward pass and hands each
caller its own row. Decoding the next images overlaps the forward pass of the current batch.
`admit` bounds how many images are in flight at all, so overload is refused instead of queued.

With a cache (cache.py), bytes answered before are answered from it without decoding or a forward pass,
and identical bytes in flight at once are computed once.

Background images (asynchronous jobs) have threads and a queue of their own and take only idle
capacity: a batch of them runs only when no online image is decoding or queued and none has arrived for
`idle_s`, and never together with online images. So an online image waits behind at most one forward pass,
and while online traffic is about, a background forward pass is sized to last at most `job_batch_max_s`: as
many images as fit at the time per image measured on this machine, kept up to date as batches run (at least
one). After `job_full_batch_after_s` without any online image, background batches grow back to
`max_batch_size`, the job's fastest: only a request after such a silence can meet one.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
from opentelemetry import trace
from opentelemetry.trace import Link, Span, SpanContext, Tracer

from classifier import tracing
from classifier.errors import DeadlineExceeded, Unavailable
from classifier.inference.cache import ResultCache
from classifier.inference.runtime import scored

log = logging.getLogger(__name__)


class Overloaded(Unavailable):
    """More images are in flight than `max_queue` allows: refuse now rather than queue forever."""

    reason = "overloaded"


@dataclass
class _Job:
    image: np.ndarray
    result: asyncio.Future[np.ndarray]
    queued_at: float
    deadline: float | None = None  # monotonic: when its caller stops waiting
    trace: SpanContext = trace.INVALID_SPAN_CONTEXT  # the span that submitted it (a request's, a job image's)
    queued_ns: int = 0  # time.time_ns() when queued, for its queue span


@dataclass
class _Shared:
    """One computation that identical submissions wait for together."""

    task: asyncio.Task[np.ndarray]
    waiters: int = 0


@dataclass(frozen=True)
class BatchStats:
    """What one forward pass did, for whoever observes the pipeline (metrics, logs)."""

    size: int
    queue_wait_s: list[float]
    inference_s: float
    background: bool = False
    behind_job_s: list[float] = field(default_factory=list)  # online: each image's wait behind a background pass


class Batcher:
    def __init__(
        self,
        prepare: Callable[[bytes], np.ndarray],
        predict: Callable[[np.ndarray], np.ndarray],
        *,
        max_batch_size: int,
        max_delay_s: float,
        max_queue: int,
        decode_workers: int,
        idle_s: float = 0.01,
        job_batch_max_s: float | None = None,
        job_full_batch_after_s: float = 2.0,
        cache: ResultCache | None = None,
        forward_thread: Executor | None = None,
        init_decode_thread: Callable[[], None] | None = None,
        on_batch: Callable[[BatchStats], None] | None = None,
        on_deadline: Callable[[str, int], None] | None = None,
        tracer: Tracer = tracing.NO_TRACER,
        span_attributes: dict[str, str] | None = None,
        model_version: str | None = None,
    ) -> None:
        self.prepare = prepare
        self.predict = predict
        self.model_version = model_version  # each row answered says it (Scores), when given
        self.max_batch_size = max_batch_size
        self.max_delay_s = max_delay_s
        self.max_queue = max_queue
        self.on_batch = on_batch
        self.on_deadline = on_deadline or (lambda stage, images: None)  # images dropped late, by stage
        self.tracer = tracer  # spans: decode, queue (per image), forward (per batch, linked to its images)
        self.span_attributes = span_attributes or {}  # on every forward span: the runtime, its precision
        self.idle_s = idle_s
        self.job_batch_max_s = job_batch_max_s  # None: background batches of up to max_batch_size
        self.job_full_batch_after_s = job_full_batch_after_s
        self.cache = cache
        self._computing: dict[bool, dict[bytes, _Shared]] = {False: {}, True: {}}  # by background
        self.in_flight = 0  # online images admitted and not yet answered
        self._image_s: float | None = None  # forward-pass time per image, a moving average of the batches so far
        self._decode_workers = decode_workers
        self._forward_thread = forward_thread  # the model's own (Runtime.forward_thread); default: one of ours
        self._init_decode_thread = init_decode_thread
        self._decoding = 0  # online images in the decode threads right now: the only ones worth waiting for
        self._queue: asyncio.Queue[_Job] = asyncio.Queue()
        self._held: _Job | None = None  # held back from a batch it would have made late: first in line for the next
        self._background: asyncio.Queue[_Job] = asyncio.Queue()
        self._arrived = asyncio.Event()  # something was queued
        self._online_seen = 0.0  # when an online image last arrived or was answered (monotonic)
        self._last_background = (0.0, 0.0)  # when the last background forward pass started and finished
        self._inference: Executor | None = None
        self._decoders: ThreadPoolExecutor | None = None
        self._background_decoders: ThreadPoolExecutor | None = None
        self._worker: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._inference = self._forward_thread or ThreadPoolExecutor(1, "inference")
        self._decoders = ThreadPoolExecutor(self._decode_workers, "decode", initializer=self._init_decode_thread)
        # Their own threads, so an online upload never waits for a decoder behind job images.
        self._background_decoders = ThreadPoolExecutor(self._decode_workers, "decode-background",
                                                       initializer=self._init_decode_thread)
        self._worker = asyncio.create_task(self._run(), name="inference worker")

    def use(self, predict: Callable[[np.ndarray], np.ndarray], forward_thread: Executor, model_version: str,
            span_attributes: dict[str, str]) -> None:
        """Another model from the next forward pass on; the pass running finishes on the one it started with."""
        if self._inference is not None and self._inference is not self._forward_thread:
            self._inference.shutdown(wait=False)  # our own thread, not the old model's: not needed any more
        self.predict, self.model_version, self.span_attributes = predict, model_version, span_attributes
        self._forward_thread = self._inference = forward_thread

    async def drain(self, timeout_s: float) -> None:
        """Wait until no image is in flight, for at most timeout_s."""
        deadline = time.monotonic() + timeout_s
        while self.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.01)

    async def stop(self, timeout_s: float) -> None:
        """Let the images in flight finish, for at most timeout_s, then stop."""
        await self.drain(timeout_s)
        if self._worker:
            self._worker.cancel()
        for pool in (self._decoders, self._background_decoders, self._inference):
            if pool and pool is not self._forward_thread:  # the model's thread outlives this batcher
                pool.shutdown(wait=True, cancel_futures=True)

    async def until_idle(self) -> None:
        """Return once no online image is in flight and none has arrived for idle_s: the moment to take
        background work (a job worker claims images only then, leaving a busy replica's share to idle ones)."""
        while True:
            quiet_for = time.monotonic() - self._online_seen
            if not self.in_flight and quiet_for >= self.idle_s:
                return
            await asyncio.sleep(max(self.idle_s - quiet_for, self.idle_s))

    def job_batch_size(self) -> int:
        """Background images per forward pass: as many as fit job_batch_max_s at the measured time per image
        (at least 1, at most max_batch_size; 1 until a forward pass has been timed), or max_batch_size once no
        online image has been seen for job_full_batch_after_s."""
        quiet_for = time.monotonic() - self._online_seen
        if self.job_batch_max_s is None or quiet_for >= self.job_full_batch_after_s:
            return self.max_batch_size
        if self._image_s is None:
            return 1
        return max(1, min(self.max_batch_size, int(self.job_batch_max_s / self._image_s)))

    def expected_s(self, images: int = 1) -> float:
        """About how long images admitted now would take to be answered: the forward passes of those in flight ahead
        of them and their own, at the time per image measured so far (0 until a pass has been timed), and one more
        for decoding, which runs in the gaps the forward pass leaves. On a CPU a batch costs about its size times
        one image, so batching does not shorten the sum much. Measured only by forward passes, so it never sticks
        at a busy moment's figure."""
        return (self.in_flight + images + 1) * (self._image_s or 0.0)

    def full(self, images: int = 1) -> bool:
        return self.in_flight + images > self.max_queue

    def overloaded(self) -> Overloaded:
        return Overloaded(f"the service is overloaded (more than MAX_QUEUE={self.max_queue} images in flight); "
                          "retry shortly")

    @contextmanager
    def admit(self, images: int = 1) -> Iterator[None]:
        """Count images in flight (decoding, queued or in a forward pass), refusing past max_queue."""
        if self.full(images):
            raise self.overloaded()
        self.in_flight += images
        try:
            yield
        finally:
            self.in_flight -= images

    async def submit(self, data: bytes | np.ndarray, background: bool = False, deadline: float | None = None) -> np.ndarray:
        """Uploaded bytes (or an image already prepared) -> its row of the model's output. Cancel the call
        to withdraw the image.

        background: a job's image, classified only with capacity online images leave idle.
        deadline: when its caller stops waiting (time.monotonic()); past it, the image is dropped before it is
        decoded or before its forward pass, whichever comes first (DeadlineExceeded).
        With a cache, bytes answered before are answered from it (a refused image raises its error again),
        and identical bytes submitted while the first are being computed wait for that one computation."""
        if self.cache is None or isinstance(data, np.ndarray):
            return await self._compute(data, background, deadline)
        key = self.cache.key(data) if len(data) < 256 * 1024 else await asyncio.to_thread(self.cache.key, data)
        answer = self.cache.get(key)
        computing = self._computing[background]  # an online image never waits for a job's computation
        shared = computing.get(key)
        if answer is not None or shared is not None:
            self.cache.hits += 1
        else:
            self.cache.misses += 1
        if isinstance(answer, Exception):
            raise answer
        if answer is not None:
            return answer
        if shared is None:
            shared = computing[key] = _Shared(asyncio.ensure_future(self._compute(data, background, deadline)))
            shared.task.add_done_callback(lambda task: self._computed(key, task, computing))
        shared.waiters += 1
        try:
            return await asyncio.shield(shared.task)
        except DeadlineExceeded:
            if deadline is not None and time.monotonic() >= deadline:
                raise
            # The first caller's deadline passed, not this one's: computed again for this one.
            return await self._compute(data, background, deadline)
        except asyncio.CancelledError:
            if shared.waiters == 1:  # the last one waiting withdrew: so is the image
                shared.task.cancel()
            raise
        finally:
            shared.waiters -= 1

    def _computed(self, key: bytes, task: asyncio.Task[np.ndarray], computing: dict[bytes, _Shared]) -> None:
        computing.pop(key, None)
        if not task.cancelled() and not isinstance(task.exception(), DeadlineExceeded):  # the bytes are not at fault
            assert self.cache is not None
            self.cache.put(key, task.exception() or task.result())

    async def _compute(self, data: bytes | np.ndarray, background: bool, deadline: float | None = None) -> np.ndarray:
        loop = asyncio.get_running_loop()
        if not background:
            self._online_seen = time.monotonic()
        if deadline is not None and time.monotonic() >= deadline:
            self.on_deadline("decode", 1)
            raise DeadlineExceeded()
        if isinstance(data, np.ndarray):
            image = data
        elif background:
            with self.tracer.start_as_current_span("decode", attributes={"image.bytes": len(data)}):
                image = await loop.run_in_executor(self._background_decoders, self.prepare, data)
        else:
            self._decoding += 1
            try:
                with self.tracer.start_as_current_span("decode", attributes={"image.bytes": len(data)}):
                    image = await loop.run_in_executor(self._decoders, self.prepare, data)
            except asyncio.CancelledError:
                if deadline is not None and time.monotonic() >= deadline:  # its caller's deadline withdrew it
                    self.on_deadline("decode", 1)
                raise
            finally:
                self._decoding -= 1
        job = _Job(image, loop.create_future(), time.monotonic(), deadline, tracing.current(), time.time_ns())
        (self._background if background else self._queue).put_nowait(job)
        self._arrived.set()
        return await job.result

    async def _next_batch(self) -> tuple[list[_Job], bool]:
        """The next batch, and whether it is of background images."""
        while True:
            if self._held is not None or not self._queue.empty():
                return await self._online_batch(), False
            wait = None
            if not self._background.empty():
                quiet_for = time.monotonic() - self._online_seen
                if not self._decoding and quiet_for >= self.idle_s:
                    batch, size = [], self.job_batch_size()
                    while len(batch) < size and not self._background.empty():
                        batch.append(self._background.get_nowait())
                    return [job for job in batch if not job.result.done()], True
                wait = max(self.idle_s - quiet_for, 0.001)
            self._arrived.clear()
            try:
                async with asyncio.timeout(wait):
                    await self._arrived.wait()
            except TimeoutError:
                pass

    async def _online_batch(self) -> list[_Job]:
        """Online images in arrival order, up to max_batch_size, waiting at most max_delay_s for images still being
        decoded (never for nobody). With deadlines, a batch holds no more images than its forward pass can finish
        before the earliest of them: the image that would make it late is first in line for the next pass."""
        batch: list[_Job] = []
        delay_ends = time.monotonic() + self.max_delay_s
        while len(batch) < self.max_batch_size:
            job = self._take()
            if job is None:
                remaining = min(delay_ends, self._latest_start(batch)) - time.monotonic()
                if not batch or not self._decoding or remaining <= 0:
                    break
                try:
                    async with asyncio.timeout(remaining):
                        job = await self._queue.get()
                except TimeoutError:
                    break
            if job.result.done():  # its caller gave up (timed out, its deadline passed, disconnected): skipped
                if job.deadline is not None and job.deadline <= time.monotonic():
                    self.on_deadline("forward", 1)
                continue
            if batch and time.monotonic() > self._latest_start([*batch, job]):
                self._held = job
                break
            batch.append(job)
        return batch

    def _take(self) -> _Job | None:
        """The next online image: the one held back from the last batch first, then the queue's."""
        job, self._held = self._held, None
        if job is None and not self._queue.empty():
            job = self._queue.get_nowait()
        return job

    def _latest_start(self, batch: list[_Job]) -> float:
        """The latest moment a forward pass of batch may start and still end by the earliest deadline in it, at the
        time per image measured so far (no bound without deadlines, or before a pass has been timed)."""
        deadlines = [job.deadline for job in batch if job.deadline is not None]
        if not deadlines or self._image_s is None:
            return math.inf
        return min(deadlines) - len(batch) * self._image_s

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch, background = await self._next_batch()
            if not batch:
                continue
            # The model of this pass: a new one (use) may be swapped in while it runs.
            predict, inference, version = self.predict, self._inference, self.model_version
            started, started_ns = time.monotonic(), time.time_ns()
            # One span per batch, linked to the span of every image it serves (fan-in); in the trace of the first
            # of them that is sampled, so a sampled request's trace holds its forward pass whenever it can.
            traces = [job.trace for job in batch]
            first = next((span for span in traces if span.trace_flags.sampled), traces[0])
            forward = self.tracer.start_span("forward", tracing.under(first),
                                             start_time=started_ns, links=tracing.links(traces),
                                             attributes={"batch.size": len(batch), "batch.background": background,
                                                         **self.span_attributes})
            rows = await loop.run_in_executor(inference, self._forward, batch, predict)
            forward.end()
            finished = time.monotonic()
            for job, row in zip(batch, rows):
                if job.result.done():
                    if job.deadline is not None and job.deadline <= finished and not isinstance(row, DeadlineExceeded):
                        self.on_deadline("answer", 1)  # computed, but its caller had stopped waiting
                    continue
                if isinstance(row, BaseException):
                    job.result.set_exception(row)
                else:
                    job.result.set_result(scored(row, version) if version else row)
            late = sum(isinstance(row, DeadlineExceeded) for row in rows)
            if late:
                self.on_deadline("forward", late)
            batch = [job for job, row in zip(batch, rows) if not isinstance(row, DeadlineExceeded)]
            if batch:
                self._observe(batch, background, started, finished, (forward, started_ns))

    def _observe(self, batch: list[_Job], background: bool, started: float, finished: float,
                 forward: tuple[Span, int]) -> None:
        """What a forward pass measured: the time per image (job batches are sized by it), and BatchStats."""
        per_image = (finished - started) / len(batch)
        self._image_s = per_image if self._image_s is None else 0.8 * self._image_s + 0.2 * per_image
        behind_job = []
        if background:
            self._last_background = (started, finished)
        else:
            self._online_seen = finished
            # The part of each image's wait spent behind the last background forward pass: what jobs cost it.
            job_started, job_finished = self._last_background
            behind_job = [max(0.0, min(job_finished, started) - max(job.queued_at, job_started)) for job in batch]
        self._trace_queue(batch, *forward, behind_job)
        if self.on_batch:
            stats = BatchStats(len(batch), [started - job.queued_at for job in batch], finished - started,
                               background, behind_job)
            try:
                self.on_batch(stats)
            except Exception:  # an observer's bug must not stop the worker
                log.exception("on_batch failed")

    def _trace_queue(self, batch: list[_Job], forward: Span, started_ns: int, behind_job: list[float]) -> None:
        """Each traced image's wait in the queue, in its own trace, linked to the forward pass that ended it."""
        for job, behind in zip(batch, behind_job or [0.0] * len(batch)):
            if job.trace.is_valid:
                self.tracer.start_span("queue", tracing.under(job.trace), start_time=job.queued_ns,
                                       links=[Link(forward.get_span_context())],
                                       attributes={"queue.behind_job_s": behind}).end(end_time=started_ns)

    def _forward(self, batch: list[_Job], predict: Callable[[np.ndarray], np.ndarray]) -> list[np.ndarray | Exception]:
        """On the forward thread, just before the pass: an image whose deadline has passed is dropped here, so
        none starts a forward pass late; one pass for the others."""
        now = time.monotonic()
        late = [job.deadline is not None and job.deadline <= now for job in batch]
        rows = iter(predict_each(predict, [job.image for job, dropped in zip(batch, late) if not dropped])
                    if not all(late) else [])
        return [DeadlineExceeded() if dropped else next(rows) for dropped in late]


def predict_each(predict: Callable[[np.ndarray], np.ndarray],
                 images: list[np.ndarray]) -> list[np.ndarray | Exception]:
    """One forward pass for all; if that fails, one per image, so a bad input fails only its own answer."""
    try:
        return list(predict(np.stack(images)))
    except Exception as error:
        if len(images) == 1:
            return [error]
        log.warning("a batch of %d failed (%s); retrying its images one by one", len(images), error)
    results: list[np.ndarray | Exception] = []
    for image in images:
        try:
            results.append(predict(image[None])[0])
        except Exception as error:
            results.append(error)
    return results
