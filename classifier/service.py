"""What runs beside the routes, built from the settings and a loaded runtime when the application starts: the
batcher that owns the forward pass, the result cache, the job store and its worker, the budget all request
bodies share; whether the service is ready; and classify(), the one path every online door (/predict*, /v2
over HTTP and gRPC) sends its images through. No transport here: they are handed this object.

    uploads --admit (MAX_QUEUE)--> bytes --batcher.submit--> probabilities [1000], or the exception, per image
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from starlette.datastructures import UploadFile

from classifier import rules
from classifier.errors import DeadlineExceeded, ModelLoadError, Unavailable
from classifier.inference import metrics, runtimes
from classifier.inference.batching import Batcher
from classifier.inference.cache import ResultCache
from classifier.inference.runtime import Runtime
from classifier.jobs.store import JobStore
from classifier.jobs.worker import JobWorker
from classifier.memory import BodyBudget, release_freed_memory
from classifier.observability import MODEL_LOADED_AT, MODEL_RELOADS, MODEL_VERSION
from classifier.settings import Settings
from classifier.tracing import Tracing

log = logging.getLogger("app")


@dataclass(frozen=True)
class Reload:
    """What the last reload did (GET /model shows it)."""

    at: float  # Unix time
    outcome: str  # loaded, unchanged, refused
    detail: str


def span_attributes(runtime: Runtime) -> dict[str, str]:
    return {"model.backend": runtime.backend, "model.precision": runtime.precision, "model.device": runtime.device_name,
            "model.version": runtime.version}


class Service:
    def __init__(self, settings: Settings, runtime: Runtime, bodies: BodyBudget, tracing: Tracing | None = None) -> None:
        self.settings = settings
        self.runtime = runtime
        self.bodies = bodies  # HTTP bodies (gate.BodyLimits) and gRPC messages (grpc_server) together
        self.tracing = tracing or Tracing("none")
        context = runtime.answer_context(settings)
        self.cache = ResultCache(settings.cache_entries, context) if settings.cache_entries else None
        # Decoding runs in a small thread pool; one inference thread owns the forward pass, so requests
        # never run it side by side on the same cores.
        self.batcher = Batcher(
            self.prepare,
            runtime.predict,
            max_batch_size=settings.max_batch_size or runtime.default_batch_size,
            max_delay_s=settings.max_batch_delay_ms / 1000,
            max_queue=settings.max_queue,
            decode_workers=settings.decode_workers,
            # Job images run only after 10 ms without online images: a steady online stream keeps the cores.
            idle_s=0.01,
            job_batch_max_s=settings.job_batch_max_ms / 1000,
            job_full_batch_after_s=settings.job_full_batch_after_s,
            cache=self.cache,
            forward_thread=runtime.forward_thread,
            init_decode_thread=runtime.init_decode_thread,
            on_batch=metrics.observe_batch,
            on_deadline=metrics.deadline_passed,
            tracer=self.tracing.tracer,
            span_attributes=span_attributes(runtime),
            model_version=runtime.version,
        )
        try:
            store = JobStore(settings.jobs_database_url, settings.job_ttl_s, settings.job_lease_s)
        except Exception as error:  # an unknown driver, a malformed URL
            raise SystemExit(f"Cannot open the job store JOBS_DATABASE_URL: {error}") from None
        self.jobs = JobWorker(store, self.batcher, runtime.labels, webhook_secret=settings.webhook_secret,
                              webhook_first_retry_s=settings.webhook_first_retry_s,
                              max_object_bytes=settings.max_upload_bytes, tracing=self.tracing)
        self.ready = False  # rules.ready and rules.accepting read this
        self.loaded_at = time.time()
        self.last_reload: Reload | None = None
        self._reloading: asyncio.Task[Reload] | None = None

    def prepare(self, data: bytes) -> np.ndarray:
        """Uploaded bytes -> the model's input, decoded as the settings say (MAX_IMAGE_PIXELS, JPEG_DRAFT)."""
        return self.runtime.prepare(data, self.settings.max_image_pixels, self.settings.jpeg_draft)

    async def start(self) -> None:
        self._unwatch = metrics.watch(self.cache, lambda: self.batcher.in_flight)
        await self.batcher.start()
        await self.jobs.start()
        self._drain_on_sigterm()
        self._reload_on_sighup()
        self._served(self.runtime, None)
        self.ready = True

    async def stop(self) -> None:
        self.ready = False
        await self.jobs.stop()
        await self.batcher.stop(timeout_s=self.settings.shutdown_timeout_s)
        self._unwatch()
        with contextlib.suppress(KeyError):  # the process may serve another service after (tests)
            MODEL_VERSION.remove(self.runtime.version)

    def _drain_on_sigterm(self) -> None:
        """On SIGTERM: not ready (new predictions and jobs answer 503), the accepted images finish (for at most
        SHUTDOWN_TIMEOUT_S), then uvicorn's own shutdown runs; a request hanging past that is cut off."""
        if threading.current_thread() is not threading.main_thread():
            return  # signals reach the main thread only (not a test client's)
        uvicorn_handler = signal.getsignal(signal.SIGTERM)
        if not callable(uvicorn_handler):
            return
        loop = asyncio.get_running_loop()

        async def drain(frame: object) -> None:
            timeout_s = self.settings.shutdown_timeout_s
            deadline = time.monotonic() + timeout_s
            log.info("SIGTERM: draining %d images in flight, for at most %g s", self.batcher.in_flight, timeout_s)
            await self.batcher.drain(timeout_s)
            uvicorn_handler(signal.SIGTERM, frame)  # stop listening, finish open responses, run the lifespan's end
            # uvicorn forces its exit on a second SIGINT: the bound for whatever still hangs.
            loop.call_later(max(0.0, deadline - time.monotonic()) + 1, uvicorn_handler, signal.SIGINT, frame)

        def on_sigterm(signum: int, frame: object) -> None:
            if self.ready:
                self.ready = False
                loop.call_soon_threadsafe(lambda: loop.create_task(drain(frame)))

        signal.signal(signal.SIGTERM, on_sigterm)

    def _reload_on_sighup(self) -> None:
        """SIGHUP: load the files the settings name again (nginx's and gunicorn's convention; a Kubernetes volume
        update can send it). A reload already running takes no second one."""
        if threading.current_thread() is not threading.main_thread():
            return  # signals reach the main thread only (not a test client's)
        loop = asyncio.get_running_loop()

        def on_sighup() -> None:
            if self._reloading is None or self._reloading.done():
                self._reloading = loop.create_task(self.reload())
            else:
                log.info("SIGHUP: a reload is already running")

        loop.add_signal_handler(signal.SIGHUP, on_sighup)

    async def reload(self) -> Reload:
        """New weights without a failed request: the model the settings name is loaded beside the one serving,
        checked and warmed up exactly as at start-up (runtimes.load), then swapped in between two forward passes:
        the pass running finishes on the old model, every later one runs the new, and each answer says the version
        that made it (Scores). Meanwhile both models are in memory. One that cannot be loaded leaves the old one
        serving; why is logged, counted and shown by GET /model."""
        old = self.runtime
        log.info("reloading the model (serving version %s)", old.version)
        try:
            new = await asyncio.to_thread(runtimes.load, self.settings)
        except (Exception, SystemExit) as error:  # whatever it is, the old model keeps serving
            detail = str(error) if isinstance(error, (ModelLoadError, SystemExit)) else f"{type(error).__name__}: {error}"
            log.warning("reload refused, still serving version %s: %s", old.version, detail)
            return self._reloaded("refused", detail)
        if new.version == old.version:
            new.forward_thread.shutdown(wait=False)
            return self._reloaded("unchanged", f"the files hold version {old.version}, which serves")
        self.runtime = new
        self.batcher.use(new.predict, new.forward_thread, new.version, span_attributes(new))
        if self.cache is not None:
            self.cache.reset(new.answer_context(self.settings))
        self._served(new, old)
        log.info("model version %s serves (was %s)", new.version, old.version)
        reloaded = self._reloaded("loaded", f"version {new.version} replaced {old.version}")
        retired, old = old.forward_thread, None  # the last reference to the old model, but its thread's
        if retired is not None:  # once the pass running on it ends, the old model's memory goes back to the system
            await asyncio.to_thread(_retire, retired)
        return reloaded

    def _served(self, runtime: Runtime, before: Runtime | None) -> None:
        if before is not None:
            MODEL_VERSION.remove(before.version)
        MODEL_VERSION.labels(runtime.version).set(1)
        self.loaded_at = time.time()
        MODEL_LOADED_AT.set(self.loaded_at)

    def _reloaded(self, outcome: str, detail: str) -> Reload:
        MODEL_RELOADS.labels(outcome).inc()
        self.last_reload = Reload(time.time(), outcome, detail)
        return self.last_reload

    async def in_time(self, deadline: float | None, images: int) -> None:
        """Raises DeadlineExceeded, at the deadline, for images whose deadline has passed or that the images in
        flight would make late (rules.in_time); they are never decoded. At the deadline, as any late request is
        answered, not at once: a caller told at once sends again at once, and a storm of hopeless requests would
        take the cores from those that can still be answered in time."""
        try:
            rules.in_time(self.batcher, deadline, time.monotonic(), images)
        except DeadlineExceeded:
            metrics.deadline_passed("received", images)
            await asyncio.sleep(max(0.0, (deadline or 0) - time.monotonic()))
            raise

    async def classify(self, images: Sequence[UploadFile | bytes | np.ndarray],
                       until_gone: Callable[[], Awaitable[None]] | None = None,
                       deadline: float | None = None) -> list[np.ndarray | Exception]:
        """Uploaded files (or images already read, or already preprocessed to [3, 224, 224]) -> softmax
        probabilities [1000] each, or the exception that stopped that image.

        More than MAX_BATCH_FILES images: TooLarge. The images go through the decoders and the batching worker
        together (sharing batches with other requests). A request that times out or whose client leaves
        (until_gone returns: an HTTP disconnect; a gRPC call is cancelled instead) gives up all its images.
        Uploads are read only once admitted: a refused request never copies its files.

        deadline: when the caller stops waiting (time.monotonic(), rules.deadline). Past it, its images are
        dropped wherever they are (before decoding, before their forward pass) and the request fails with
        DeadlineExceeded; REQUEST_TIMEOUT_S, the service's own bound, fails it with Unavailable.
        """
        rules.within(len(images), self.settings.max_batch_files, "MAX_BATCH_FILES")
        timeout_s = self.settings.request_timeout_s
        own_limit = time.monotonic() + timeout_s
        callers_first = deadline is not None and deadline < own_limit
        await self.in_time(deadline, len(images))
        try:
            with self.batcher.admit(len(images)):
                with self.tracing.tracer.start_as_current_span("read", attributes={"images": len(images)}):
                    read = [image if isinstance(image, (bytes, np.ndarray)) else await _read(image) for image in images]
                # Relative: uvloop's loop.time() counts whole milliseconds from its own origin.
                async with asyncio.timeout(max(0.0, (deadline if callers_first else own_limit) - time.monotonic())):
                    work = asyncio.gather(*(self.batcher.submit(data, deadline=deadline) for data in read),
                                          return_exceptions=True)
                    watcher = asyncio.ensure_future(until_gone() if until_gone else asyncio.Event().wait())
                    try:
                        await asyncio.wait((work, watcher), return_when=asyncio.FIRST_COMPLETED)
                    finally:
                        watcher.cancel()
                        if not work.done():
                            work.cancel()  # the client left or time ran out: its images are not computed
                            # A cancelled gather ends holding a CancelledError; collect it, or asyncio logs it as an
                            # ERROR with a traceback ("exception was never retrieved") for what is normal traffic.
                            work.add_done_callback(lambda gathered: gathered.cancelled() or gathered.exception())
                    if not work.done() or work.cancelled():
                        raise Unavailable("the client disconnected")
                    answers = work.result()
        except TimeoutError:
            if callers_first:
                raise DeadlineExceeded() from None
            raise Unavailable(f"no answer within {timeout_s:g} s (REQUEST_TIMEOUT_S); retry shortly", "timeout") from None
        if any(isinstance(answer, DeadlineExceeded) for answer in answers):
            raise DeadlineExceeded()  # the whole request: its caller is no longer waiting for the rest
        return answers


def _retire(thread: ThreadPoolExecutor) -> None:
    thread.shutdown(wait=True)
    release_freed_memory()


async def _read(upload: UploadFile) -> bytes:
    data = await upload.read()
    await upload.close()  # its in-memory spool: one copy of the bytes is enough
    return data


