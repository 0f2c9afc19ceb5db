"""Who may call, and when: the rules every door (/predict*, /jobs, /v2 over HTTP and gRPC) applies, each decided
here once. Each raises one of errors.py's errors; the transports answer it in their own terms.

    API key --authorize--> shutting down? --accepting--> overloaded? --admitting--> within the limits
            --deadline (the caller's, if it set one)--> work
"""

from __future__ import annotations

import hmac
import math
from collections.abc import Mapping

from classifier import storage
from classifier.errors import BadRequest, DeadlineExceeded, Forbidden, TooLarge, Unauthorized, Unavailable, Unprocessable
from classifier.inference.batching import Batcher

UNAUTHORIZED = "a valid API key is required: Authorization: Bearer <key> or X-API-Key: <key>"


def authorize(api_key: str | None, headers: Mapping[str, str]) -> None:
    """With API_KEY set: `Authorization: Bearer <key>` or `X-API-Key: <key>` (HTTP headers or gRPC metadata,
    lower-case names; either one right will do), each compared in constant time."""
    if api_key is None:
        return
    scheme, _, bearer = headers.get("authorization", "").partition(" ")
    offered = [headers.get("x-api-key", ""), bearer.strip() if scheme.lower() == "bearer" else ""]
    if not any([hmac.compare_digest(key.encode(), api_key.encode()) for key in offered]):  # both compared, always
        raise Unauthorized(UNAUTHORIZED)


def ready(serving: bool) -> None:
    """Readiness (/ready, /v2/health/ready; gRPC's ServerReady answers service.ready itself): the model is loaded
    and warm, and the service is not shutting down."""
    if not serving:
        raise Unavailable("the model is not ready")


def accepting(serving: bool) -> None:
    """New work (an online prediction, a job) is taken only while ready: on SIGTERM the replica drains."""
    if not serving:
        raise Unavailable("the service is shutting down; retry on another replica", "shutting_down")


def admitting(batcher: Batcher, images: int = 1) -> None:
    """An online prediction is refused at once, before its body is read, while MAX_QUEUE images are in flight
    (Batcher.admit counts them once admitted)."""
    if batcher.full(images):
        raise batcher.overloaded()


def within(count: int | None, limit: int, setting: str) -> None:
    """At most `limit` images in one request (MAX_BATCH_FILES, MAX_JOB_FILES); count None: the parser stopped
    at the limit."""
    if count is None or count > limit:
        raise TooLarge(f"{count if count is not None else 'more than ' + str(limit)} images in one request; "
                       f"at most {limit} ({setting})")


def body_within(size: int, limit: int, setting: str) -> None:
    """A request body (or one uploaded file) of at most `limit` bytes (MAX_UPLOAD_BYTES, MAX_JOB_BYTES)."""
    if size > limit:
        raise TooLarge(f"the request body is larger than {limit:,} bytes ({setting})")


TIMEOUT_HEADER = "X-Request-Timeout-Ms"  # HTTP: how long the caller waits for its answer, in milliseconds


def allowed_object(text: str, allowed_buckets: list[str]) -> storage.ObjectURL:
    """An object (or prefix) a job names: s3://bucket/key in a bucket of JOBS_ALLOWED_BUCKETS, decided from the name
    alone, before anything is fetched (the service never reads, lists or writes where its operator did not say)."""
    try:
        url = storage.ObjectURL.parse(text.strip())
    except ValueError:
        raise Unprocessable(f"{text[:200]!r} is not s3://bucket/key") from None
    if url.bucket not in allowed_buckets:
        raise Forbidden(f"bucket {url.bucket[:64]!r} is not one jobs may use (JOBS_ALLOWED_BUCKETS)")
    return url


def deadline(arrived: float, requested_s: float | None, request_timeout_s: float, given_as: str) -> float | None:
    """When the caller stops waiting (time.monotonic()), counted from its request's arrival: the timeout it sent
    (X-Request-Timeout-Ms over HTTP, Triton's `timeout` parameter on /v2, the gRPC deadline; given_as names it
    for the error), at most REQUEST_TIMEOUT_S. None: it set none (REQUEST_TIMEOUT_S alone bounds the wait, 503).
    An image past its deadline is dropped before it is decoded or before its forward pass, and the request
    answered 504 (gRPC DEADLINE_EXCEEDED)."""
    if requested_s is None:
        return None
    if not (math.isfinite(requested_s) and requested_s > 0):
        raise BadRequest(f"{given_as} must be a positive number; got {requested_s!r}")
    return arrived + min(requested_s, request_timeout_s)


def in_time(batcher: Batcher, deadline: float | None, now: float, images: int) -> None:
    """Raises DeadlineExceeded for a request whose deadline has passed, or would pass before the images in
    flight ahead of it and its own are through (Batcher.expected_s): it is not decoded, and the cores go to
    requests that can still be answered in time (Service.classify answers it at its deadline)."""
    if deadline is None:
        return
    expected_s = batcher.expected_s(images)
    if now >= deadline:
        raise DeadlineExceeded()
    if now + expected_s > deadline:
        raise DeadlineExceeded(f"the deadline this request set could not be met: the images in flight ahead of it and "
                               f"its own took about {expected_s * 1000:.0f} ms, {(deadline - now) * 1000:.0f} ms remained")


def earliest(*deadlines: float | None) -> float | None:
    """The first of the deadlines set (a request may carry more than one: a header and a parameter)."""
    return min((deadline for deadline in deadlines if deadline is not None), default=None)


def timeout_header_s(value: str | None) -> float | None:
    """X-Request-Timeout-Ms's value in seconds, or None when absent. Raises BadRequest when it is not a number."""
    if value is None:
        return None
    try:
        return float(value) / 1000
    except ValueError:
        raise BadRequest(f"{TIMEOUT_HEADER} must be a number of milliseconds; got {value!r}") from None
