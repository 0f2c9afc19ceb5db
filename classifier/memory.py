"""Memory stays bounded: the budget all request bodies share, and freed memory goes back to the OS.

Bodies are received (and multipart-parsed) before an image can be admitted to the queue, so MAX_QUEUE
does not bound them: a burst of large uploads would otherwise hold one body each, with no ceiling. HTTP
(gate.BodyLimits) and gRPC (grpc_server) reserve their bodies here.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

from prometheus_client import Gauge

from classifier.errors import Unavailable

log = logging.getLogger(__name__)


class BodyBudget:
    """All request bodies being received or held at once, HTTP and gRPC alike: at most `budget` bytes
    (MAX_BODY_BUFFER_BYTES). held: a gauge of the bytes held."""

    TRIM_AFTER_BYTES = 64 * 1024 * 1024  # give freed memory back once this much has been released

    def __init__(self, budget: int, held: Gauge) -> None:
        self.budget = budget
        self.gauge = held
        self.held = 0
        self.peak_since_trim = 0

    def take(self, size: int) -> None:
        """Hold size more bytes, or refuse them (503, retry shortly) when they do not fit."""
        if self.held + size > self.budget:
            raise Unavailable(f"the service is holding {self.held:,} bytes of uploads, too near its limit of "
                              f"{self.budget:,} (MAX_BODY_BUFFER_BYTES) for this one; retry shortly", "memory")
        self.held += size
        self.gauge.set(self.held)
        self.peak_since_trim = max(self.peak_since_trim, self.held)

    def give_back(self, size: int) -> None:
        self.held -= size
        self.gauge.set(self.held)
        if self.peak_since_trim - self.held >= self.TRIM_AFTER_BYTES:
            release_freed_memory()
            self.peak_since_trim = self.held


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
