"""Memory stays bounded: limits on request bodies, one each and all at once, and freed memory goes back to the OS.

Bodies are received (and multipart-parsed) before an image can be admitted to the queue, so MAX_QUEUE
does not bound them: a burst of large uploads would otherwise hold one body each, with no ceiling.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

from prometheus_client import Counter, Gauge
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger(__name__)


class BodyBudget:
    """All request bodies being received or held at once, HTTP and gRPC alike: at most `budget` bytes
    (MAX_BODY_BUFFER_BYTES). held: a gauge of the bytes held; rejected: the counter of refusals by reason."""

    TRIM_AFTER_BYTES = 64 * 1024 * 1024  # give freed memory back once this much has been released

    def __init__(self, budget: int, held: Gauge, rejected: Counter) -> None:
        self.budget = budget
        self.gauge = held
        self.rejected = rejected
        self.held = 0
        self.peak_since_trim = 0

    def fits(self, size: int) -> bool:
        return self.held + size <= self.budget

    def refusal(self) -> str:
        """Why a body that does not fit is refused (counted); the status is 503 with Retry-After: 1."""
        self.rejected.labels("memory").inc()
        return (f"the service is holding {self.held:,} bytes of uploads, too near its limit of {self.budget:,} "
                "(MAX_BODY_BUFFER_BYTES) for this one; retry shortly")

    def take(self, size: int) -> None:
        self.held += size
        self.gauge.set(self.held)
        self.peak_since_trim = max(self.peak_since_trim, self.held)

    def give_back(self, size: int) -> None:
        self.held -= size
        self.gauge.set(self.held)
        if self.peak_since_trim - self.held >= self.TRIM_AFTER_BYTES:
            release_freed_memory()
            self.peak_since_trim = self.held


class BodyLimits:
    """Two bounds on HTTP request bodies, each decided from Content-Length before the body is read, and for a
    chunked body (or one longer than it declared) as it arrives:

    - one body: at most max_body bytes (MAX_UPLOAD_BYTES), else 413; paths in `larger` have limits of their
      own (path -> (bytes, setting name)), e.g. job submissions (MAX_JOB_BYTES);
    - all bodies at once: what `budget` allows, else 503 with Retry-After. A request gives its bytes back
      when it is answered.

    A body too large for any budget gets its 413 before the shared budget is consulted.
    """

    def __init__(self, app: ASGIApp, max_body: int, budget: BodyBudget,
                 larger: dict[str, tuple[int, str]] | None = None) -> None:
        self.app = app
        self.max_body = max_body
        self.larger = larger or {}
        self.budget = budget

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        budget = self.budget
        max_body, setting = self.larger.get(scope["path"], (self.max_body, "MAX_UPLOAD_BYTES"))
        too_large = f"the request body is larger than {max_body:,} bytes ({setting})"
        declared = Headers(scope=scope).get("content-length", "")
        reserved = int(declared) if declared.isdigit() else 0
        if reserved > max_body:
            budget.rejected.labels("too_large").inc()
            return await JSONResponse({"detail": too_large}, 413)(scope, receive, send)
        if not budget.fits(reserved):
            return await JSONResponse({"detail": budget.refusal()}, 503, headers={"Retry-After": "1"})(scope, receive, send)
        budget.take(reserved)
        received = 0

        # FastAPI re-raises an HTTPException met while reading the body; the app's handler answers it.
        async def counted_receive() -> Message:
            nonlocal received, reserved
            message = await receive()
            received += len(message.get("body", b""))
            if received > max_body:
                budget.rejected.labels("too_large").inc()
                raise HTTPException(413, too_large)
            if received > reserved:  # chunked, or more than declared: count the rest as it comes
                if not budget.fits(received - reserved):
                    raise HTTPException(503, budget.refusal(), headers={"Retry-After": "1"})
                budget.take(received - reserved)
                reserved = received
            return message

        try:
            await self.app(scope, counted_receive, send)
        finally:
            budget.give_back(reserved)


# glibc keeps freed memory in its heaps for reuse; for a server that sees bursts of large uploads that
# means the burst's peak stays resident. malloc_trim(0) once 64 MiB of bodies have been let go returns what
# the heaps hold free (bench/burst.py measures it). glibc's mmap threshold is left to adapt as it does by
# default: fixing it low (every block over 1 MiB mmapped, so returned at once) made each forward pass fault
# in fresh pages for its activations, and cost 20 % of throughput (35 vs 44 req/s at c=8, bench/benchmark.py).
_libc_path = ctypes.util.find_library("c")
_libc = ctypes.CDLL(_libc_path) if _libc_path else None


def release_freed_memory() -> None:
    if _libc is not None and hasattr(_libc, "malloc_trim"):
        _libc.malloc_trim(0)
