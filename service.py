"""What runs beside the routes, built once at start-up: the batcher that owns the forward pass, the job store
and its worker, the budget all request bodies share, the gRPC server; whether the service is ready; who may
call (the API key); and classify(), the one path every online door (/predict*, /v2 over HTTP and gRPC) sends
its images through.

    uploads --admit (MAX_QUEUE)--> bytes --batcher.submit--> probabilities [1000], or the exception, per image
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import signal
import threading
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np
from fastapi import Request, UploadFile
from prometheus_client import REGISTRY
from starlette.exceptions import HTTPException

import model
import observability
from batching import Batcher
from cache import ResultCache
from jobstore import JobStore
from jobworker import JobWorker
from memory import BodyBudget
from observability import REJECTED
from settings import get_settings

if TYPE_CHECKING:
    import grpc

log = logging.getLogger("app")


class Service:
    def __init__(self) -> None:
        settings = get_settings()
        self.cache = ResultCache(settings.cache_entries, model.answer_context) if settings.cache_entries else None
        REGISTRY.register(observability.CacheMetrics(self.cache))
        # Decoding runs in a small thread pool; one inference thread owns the forward pass, so requests
        # never run it side by side on the same cores.
        self.batcher = Batcher(
            model.prepare,
            model.predict,
            max_batch_size=settings.max_batch_size or model.DEFAULT_BATCH_SIZE,
            max_delay_s=settings.max_batch_delay_ms / 1000,
            max_queue=settings.max_queue,
            decode_workers=settings.decode_workers,
            # Job images run only after 10 ms without online images: a steady online stream keeps the cores.
            idle_s=0.01,
            job_batch_max_s=settings.job_batch_max_ms / 1000,
            job_full_batch_after_s=settings.job_full_batch_after_s,
            cache=self.cache,
            init_inference_thread=model.init_inference_thread,
            init_decode_thread=model.init_decode_thread,
            on_batch=observability.observe_batch,
        )
        observability.IN_FLIGHT.set_function(lambda: self.batcher.in_flight)
        try:
            store = JobStore(settings.jobs_database_url, settings.job_ttl_s, settings.job_lease_s)
        except Exception as error:  # an unknown driver, a malformed URL
            raise SystemExit(f"Cannot open the job store JOBS_DATABASE_URL: {error}") from None
        self.jobs = JobWorker(store, self.batcher, webhook_secret=settings.webhook_secret,
                              webhook_first_retry_s=settings.webhook_first_retry_s)
        # HTTP bodies (memory.BodyLimits) and gRPC messages (grpc_server) together.
        self.bodies = BodyBudget(settings.max_body_buffer_bytes, observability.BODY_BYTES_HELD, REJECTED)
        self.grpc: grpc.aio.Server | None = None
        self.ready = False  # /ready, /v2/health/ready, ServerReady and the refusal of new work read this

    async def start(self) -> None:
        await self.batcher.start()
        await self.jobs.start()
        if get_settings().grpc_port:
            import grpc_server  # the gRPC binding of /v2, on its own port

            self.grpc = await grpc_server.serve(get_settings().host, get_settings().grpc_port)
        self._drain_on_sigterm()
        self.ready = True

    async def stop(self) -> None:
        self.ready = False
        if self.grpc is not None:  # calls in flight finish within the drain; new ones are refused meanwhile
            await self.grpc.stop(get_settings().shutdown_timeout_s)
        await self.jobs.stop()
        await self.batcher.stop(timeout_s=get_settings().shutdown_timeout_s)

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
            timeout_s = get_settings().shutdown_timeout_s
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

    async def classify(self, images: list[UploadFile] | list[bytes | np.ndarray], request: Request | None = None
                       ) -> list[np.ndarray | Exception]:
        """Uploaded files (or images already read, or already preprocessed to [3, 224, 224]) -> softmax
        probabilities [1000] each, or the exception that stopped that image.

        More than MAX_BATCH_FILES images: 413. The images go through the decoders and the batching worker
        together (sharing batches with other requests). A request that times out or whose client disconnects
        gives up all its images (request: the HTTP request to watch; a gRPC call is cancelled instead). Uploads
        are read only once admitted: a refused request never copies its files.
        """
        settings = get_settings()
        if len(images) > settings.max_batch_files:
            raise too_many(len(images), settings.max_batch_files, "MAX_BATCH_FILES")
        timeout_s = settings.request_timeout_s
        try:
            with self.batcher.admit(len(images)):
                images = [image if isinstance(image, (bytes, np.ndarray)) else await read(image) for image in images]
                async with asyncio.timeout(timeout_s):
                    work = asyncio.gather(*(self.batcher.submit(data) for data in images), return_exceptions=True)
                    watcher = asyncio.ensure_future(_until_disconnected(request) if request else asyncio.Event().wait())
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
                        raise unavailable("the client disconnected")
                    return work.result()
        except TimeoutError:
            REJECTED.labels("timeout").inc()
            raise unavailable(f"no answer within {timeout_s:g} s (REQUEST_TIMEOUT_S); retry shortly") from None


UNAUTHORIZED = "a valid API key is required: Authorization: Bearer <key> or X-API-Key: <key>"


def authorized(headers: Mapping[str, str]) -> bool:
    """With API_KEY set: `Authorization: Bearer <key>` or `X-API-Key: <key>` (HTTP headers or gRPC metadata,
    lower-case names; either one right will do), each compared in constant time."""
    api_key = get_settings().api_key
    if api_key is None:
        return True
    scheme, _, bearer = headers.get("authorization", "").partition(" ")
    offered = [headers.get("x-api-key", ""), bearer.strip() if scheme.lower() == "bearer" else ""]
    return any([hmac.compare_digest(key.encode(), api_key.encode()) for key in offered])  # both compared, always


def too_many(count: int | None, limit: int, setting: str) -> HTTPException:
    """More images in one request than a limit allows (count None: the parser stopped at the limit): 413."""
    REJECTED.labels("too_large").inc()
    return HTTPException(413, f"{count if count is not None else 'more than ' + str(limit)} images in one request; "
                              f"at most {limit} ({setting})")


def unavailable(detail: str) -> HTTPException:
    return HTTPException(503, detail, headers={"Retry-After": "1"})


async def read(upload: UploadFile) -> bytes:
    data = await upload.read()
    await upload.close()  # its in-memory spool: one copy of the bytes is enough
    return data


async def _until_disconnected(request: Request) -> None:
    # The body has been read, so the next message is the client leaving (or the response being done).
    while (await request.receive())["type"] != "http.disconnect":
        pass


service = Service()
