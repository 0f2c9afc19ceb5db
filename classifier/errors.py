"""The service's errors: what went wrong, said once, whichever door it happened at. No HTTP here.

Each error names the HTTP status it is answered with, the reason it is counted under in
rejected_requests_total, and for a refusal worth retrying, when to retry (Retry-After, seconds). Each
transport maps them once: HTTP (http/base.py: status, {"detail"} body, Retry-After), /v2 ({"error"}), gRPC
(v2/grpc_server.py: a status code), a batch, job or python -m classify entry (inference/outcomes.py: {"status", "detail"}).
"""

from __future__ import annotations

# How long a client should wait before trying again, by the reason it was refused.
RETRY_AFTER_S = {"overloaded": 1, "memory": 1, "timeout": 1, "shutting_down": 1, "not_ready": 1, "disconnected": 1,
                 "database_unavailable": 5, "storage_unavailable": 5, "jobs_full": 30, "store_full": 60}


class ServiceError(Exception):
    """A request (or one image of it) the service will not serve. The message is safe to show to the client."""

    status = 500
    reason: str | None = None  # rejected_requests_total's label; None: not counted as a refusal

    def __init__(self, detail: str, reason: str | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        if reason is not None:
            self.reason = reason

    @property
    def retry_after_s(self) -> int | None:
        return RETRY_AFTER_S.get(self.reason or "")


class BadRequest(ServiceError):
    status = 400


class Unauthorized(ServiceError):
    status, reason = 401, "unauthorized"


class Forbidden(ServiceError):
    """Not allowed whoever asks: an object outside the buckets an operator allows, or one its store refuses."""

    status, reason = 403, "forbidden"


class NotFound(ServiceError):
    status = 404


class Conflict(ServiceError):
    """The resource's state does not allow it (a job whose results already come from another model version)."""

    status = 409


class TooLarge(ServiceError):
    """More images, bytes or pixels than a limit allows."""

    status, reason = 413, "too_large"


class Unprocessable(ServiceError):
    """A request whose form is not what the route takes."""

    status = 422


class Unavailable(ServiceError):
    """Refused for now (overloaded, shutting down, a dependency down): retry after RETRY_AFTER_S[reason]."""

    status = 503


class DeadlineExceeded(ServiceError):
    """The deadline the caller set passed before its answer was ready: its images were dropped unfinished."""

    status, reason = 504, "deadline_exceeded"

    def __init__(self, detail: str = "the deadline this request set (X-Request-Timeout-Ms, Triton's timeout parameter "
                 "or the gRPC deadline) passed before its answer was ready") -> None:
        super().__init__(detail)


class InsufficientStorage(ServiceError):
    """The job store's disk is full: an operator must free or grow it."""

    status, reason = 507, "store_full"


class ModelLoadError(RuntimeError):
    """The model could not be loaded; the message says how to fix it. Start-up stops with it."""
