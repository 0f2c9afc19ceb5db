"""Memory stays bounded: one budget for the request bodies held at once, and freed memory goes back to the OS.

Bodies are received (and multipart-parsed) before an image can be admitted to the queue, so MAX_QUEUE
does not bound them: a burst of large uploads would otherwise hold one body each, with no ceiling.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
from collections.abc import Callable
from pathlib import Path

from prometheus_client import Gauge

from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger(__name__)

DEFAULT_BUDGET = 512 * 1024 * 1024
_UNLIMITED = 1 << 62  # cgroup v1 writes "no limit" as a number near 2**63


def cgroup_memory_limit() -> int | None:
    """The memory limit of this process's container (cgroup v2, then v1), or None when there is none."""
    for path in (Path("/sys/fs/cgroup/memory.max"), Path("/sys/fs/cgroup/memory/memory.limit_in_bytes")):
        try:
            text = path.read_text().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < _UNLIMITED:
            return int(text)
        return None
    return None


def default_budget() -> int:
    """A quarter of the container's memory limit; 512 MiB where there is no limit."""
    limit = cgroup_memory_limit()
    return DEFAULT_BUDGET if limit is None else max(16 * 1024 * 1024, limit // 4)


class BodyBudget:
    """Request bodies share max_bytes. A body whose declared Content-Length does not fit in what is left is
    refused with 503 before it is read; a chunked body is counted as it arrives and refused when it overflows.
    The bytes go back when the request is done. Requests without a body (GET, HEAD) pass untouched.

    held: a gauge that shows the bytes held; on_refusal: called for each refusal (a metric).
    """

    TRIM_AFTER_BYTES = 64 * 1024 * 1024  # give freed memory back once this much has been released

    def __init__(self, app: ASGIApp, max_bytes: int, held: Gauge, on_refusal: Callable[[], None]) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.held = 0
        self.gauge = held
        self.on_refusal = on_refusal
        self.peak_since_trim = 0

    def refusal(self) -> tuple[str, dict[str, str]]:
        self.on_refusal()
        detail = (f"the service is holding {self.held:,} bytes of uploads, too near its limit of {self.max_bytes:,} "
                  "(MAX_BODY_BUFFER_BYTES) for this one; retry shortly")
        return detail, {"Retry-After": "1"}

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

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
        declared = Headers(scope=scope).get("content-length", "")
        reserved = int(declared) if declared.isdigit() else 0
        if self.held + reserved > self.max_bytes:
            detail, headers = self.refusal()
            return await JSONResponse({"detail": detail}, 503, headers=headers)(scope, receive, send)
        self.take(reserved)
        received = 0

        async def counted_receive() -> Message:
            nonlocal received, reserved
            message = await receive()
            received += len(message.get("body", b""))
            if received > reserved:  # chunked, or more than declared: count the rest as it comes
                if self.held + received - reserved > self.max_bytes:
                    # FastAPI re-raises an HTTPException met while reading the body; the app's handler answers it.
                    raise HTTPException(503, *self.refusal())
                self.take(received - reserved)
                reserved = received
            return message

        try:
            await self.app(scope, counted_receive, send)
        finally:
            self.give_back(reserved)


# glibc keeps freed memory in its heaps for reuse; for a server that sees bursts of large uploads that
# means the burst's peak stays resident. Two levers, both measured in bench/soak.py --burst:
#  - a fixed mmap threshold: blocks over 1 MiB (every upload buffer, decoded photo and tensor) are mmapped
#    and so unmapped the moment they are freed. By default glibc raises the threshold after each such free,
#    and later large blocks land in the heaps instead.
#  - malloc_trim(0) once 64 MiB of bodies have been let go: returns what the heaps hold free after a burst.
_M_MMAP_THRESHOLD = -3
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6") if ctypes.util.find_library("c") else None


def configure_allocator(mmap_threshold: int = 1024 * 1024) -> None:
    if _libc is not None and hasattr(_libc, "mallopt"):
        if not _libc.mallopt(_M_MMAP_THRESHOLD, mmap_threshold):
            log.warning("mallopt(M_MMAP_THRESHOLD) was refused; freed memory may stay resident after bursts")


def release_freed_memory() -> None:
    if _libc is not None and hasattr(_libc, "malloc_trim"):
        _libc.malloc_trim(0)
