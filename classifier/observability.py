"""What an operator sees: Prometheus metrics, request ids, and one access log line per request."""

from __future__ import annotations

import contextvars
import json
import logging
import re
import time
import uuid
from collections.abc import Iterator

from opentelemetry import trace
from opentelemetry.trace import Span, Tracer
from prometheus_client import Counter, Gauge, Histogram
from starlette.datastructures import Headers, MutableHeaders
from starlette.responses import JSONResponse
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from classifier import tracing
from classifier.errors import ServiceError

REQUESTS = Counter("http_requests_total", "HTTP requests answered, by route and status", ["method", "endpoint", "status"])
LATENCY = Histogram("http_request_duration_seconds", "Time from request start to the end of the response", ["endpoint"])
QUEUE_WAIT = Histogram("inference_queue_wait_seconds", "Time an image waited in the queue before its forward pass",
                       buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
BATCH_SIZE = Histogram("inference_batch_size", "Images per forward pass", buckets=(1, 2, 4, 8, 16, 32, 64))
INFERENCE = Histogram("inference_duration_seconds", "Time of one forward pass (one batch)",
                      buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5))
JOB_BATCH_SIZE = Histogram("job_batch_size", "Job images per background forward pass (sized to JOB_BATCH_MAX_MS)",
                           buckets=(1, 2, 3, 4, 6, 8, 16, 32))
BEHIND_JOB = Histogram("online_wait_behind_job_seconds",
                       "Time each online image waited behind a job's forward pass already running (0 for most)",
                       buckets=(0.0, 0.005, 0.01, 0.025, 0.05, 0.1, 0.15, 0.25, 0.5, 1, 2.5))
IN_FLIGHT = Gauge("images_in_flight", "Images admitted and not yet answered: decoding, queued or in a forward pass")
GRPC_REQUESTS = Counter("grpc_requests_total", "Open Inference Protocol calls over gRPC answered, by method and code",
                        ["method", "code"])
GRPC_LATENCY = Histogram("grpc_request_duration_seconds", "Time of a gRPC call, from its message received to its answer",
                         ["method"])
BODY_BYTES_HELD = Gauge("request_body_bytes_held", "Bytes of request bodies being received or held (MAX_BODY_BUFFER_BYTES bounds them)")
JOBS_SUBMITTED = Counter("jobs_submitted_total", "Asynchronous jobs accepted")
JOBS_FINISHED = Counter("jobs_finished_total", "Asynchronous jobs that ended, by status", ["status"])
JOB_IMAGES = Counter("job_images_total", "Job images answered, by outcome", ["outcome"])
JOB_IMAGES_RETRIED = Counter("job_images_retried_total", "Job images claimed again because an earlier claim ended without "
                             "a result (its worker died, or its lease ran out)")
JOB_RESULTS_WRITTEN = Counter("job_results_written_total", "Finished jobs' results written to their results_to object, "
                              "by outcome (failed: retried as a webhook is)", ["outcome"])
JOB_IMAGES_PENDING = Gauge("job_images_pending", "Job images stored and not yet classified (the backlog)")
JOB_IMAGES_OTHER_VERSION = Gauge("job_images_waiting_for_other_version",
                                 "Job images stored for another model version than this replica serves: they wait for a "
                                 "replica serving it (or POST /jobs/{id}/adopt)")
JOB_PENDING_BYTES = Gauge("job_pending_bytes", "Bytes of stored, unclassified job images (JOBS_MAX_PENDING_BYTES bounds them)")
JOB_OLDEST_PENDING_AGE = Gauge("job_oldest_pending_image_age_seconds",
                               "Age of the oldest unclassified job image; 0 when there is none (a signal to scale on)")
JOB_STORE_DISK_FULL = Gauge("job_store_disk_full",
                            "1 while the job store's disk is full (its last write failed for lack of space), else 0")
for outcome in ("classified", "error"):
    JOB_IMAGES.labels(outcome)
for outcome in ("written", "failed"):
    JOB_RESULTS_WRITTEN.labels(outcome)
DEADLINE_EXCEEDED = Counter("deadline_exceeded_images_total", "Images dropped because their caller's deadline passed, "
                            "by where: received (already past, or the images ahead would outlast it), decode (before decoding), forward (before the forward "
                            "pass: none starts one late), answer (during its forward pass)", ["stage"])
for stage in ("received", "decode", "forward", "answer"):
    DEADLINE_EXCEEDED.labels(stage)
MODEL_VERSION = Gauge("model_version_info", "The model version this replica serves: 1 for it, labelled by it",
                      ["version"])
MODEL_LOADED_AT = Gauge("model_loaded_timestamp_seconds", "When the model served was loaded (Unix time): start-up or "
                        "the last reload that changed it")
MODEL_RELOADS = Counter("model_reloads_total", "Reloads asked for (SIGHUP), by outcome: loaded (a new version serves), "
                        "unchanged (the files hold the version served), refused (the old version keeps serving; the log "
                        "and GET /model say why)", ["outcome"])
for outcome in ("loaded", "unchanged", "refused"):
    MODEL_RELOADS.labels(outcome)
REJECTED = Counter("rejected_requests_total", "Requests or images refused, by reason", ["reason"])
for reason in ("overloaded", "memory", "jobs_full", "database_unavailable", "store_full", "timeout", "too_large", "bad_image",
               "unauthorized", "shutting_down", "deadline_exceeded", "forbidden", "storage_unavailable"):
    REJECTED.labels(reason)  # export every reason from the start, at 0


def refused(error: ServiceError) -> None:
    """Count a refusal under its reason (each transport calls this where it answers one of our errors)."""
    if error.reason is not None:
        REJECTED.labels(error.reason).inc()

# Every page this service serves (the web page, /docs, /redoc) needs nothing from another origin; the
# browser enforces it. (ReDoc's bundle would otherwise fetch its vendor's logo from a CDN.)
CONTENT_SECURITY_POLICY = ("default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; "
                           "img-src 'self' data: blob:; worker-src 'self' blob:; frame-ancestors 'self'")

REQUEST_ID: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")
_VALID_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
access_log = logging.getLogger("access")


class RequestIdFilter(logging.Filter):
    """Puts the current request's id on every log record made while handling it, and its trace and span ids
    when it is traced."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = REQUEST_ID.get()
        traced = tracing.ids()
        record.trace_id, record.span_id = traced or (None, None)
        record.trace = f" trace={traced[0]} span={traced[1]}" if traced else ""
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line, for log shippers. Access lines carry their fields as keys."""

    FIELDS = ("trace_id", "span_id", "method", "path", "status", "duration_ms", "body_bytes", "client")

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "request_id": getattr(record, "request_id", "-"),
            "message": record.getMessage(),
        }
        entry.update({field: getattr(record, field) for field in self.FIELDS if getattr(record, field, None) is not None})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def configure_logging(level: str, format: str) -> None:
    handler = logging.StreamHandler()
    handler.addFilter(RequestIdFilter())
    if format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s [%(request_id)s%(trace)s] %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Uvicorn's access line would repeat ours without the request id; its error log keeps working.
    logging.getLogger("uvicorn.access").disabled = True
    for name in ("uvicorn", "uvicorn.error"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True


def _endpoint(scope: Scope) -> str:
    """The route's path template (bounded label values), also for requests refused before routing."""
    route = scope.get("route")
    if route is None and "app" in scope:
        route = next((r for r in every_route(scope["app"].router.routes) if r.matches(scope)[0] != Match.NONE), None)
    return getattr(route, "path", "unmatched")


def every_route(routes: list[BaseRoute]) -> Iterator[BaseRoute]:
    """The routes of an app, those of its included routers one by one."""
    for route in routes:
        included = getattr(route, "original_router", None)  # FastAPI keeps an included router whole
        yield from (every_route(included.routes) if included is not None else (route,))


class Observe:
    """Per request: an id (the client's X-Request-ID if sane, else a new one), security headers (and a
    Content-Security-Policy on HTML pages), metrics by route and status, one access log line, and when traced
    X-Trace-Id and a `respond` span for the response going out. Neither bodies nor headers are logged."""

    def __init__(self, app: ASGIApp, demo: bool, tracer: Tracer = tracing.NO_TRACER) -> None:
        self.app = app
        self.demo = demo  # DEMO: every response says the answers mean nothing
        self.tracer = tracer

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        offered = Headers(scope=scope).get("x-request-id", "")
        request_id = offered if _VALID_REQUEST_ID.fullmatch(offered) else uuid.uuid4().hex
        token = REQUEST_ID.set(request_id)
        started = time.perf_counter()
        status, body_bytes = 500, 0  # 500 until a response starts
        request_span = trace.get_current_span()  # the server span, when traced
        responding: Span | None = None

        async def counting_receive() -> Message:
            nonlocal body_bytes
            message = await receive()
            body_bytes += len(message.get("body", b""))
            return message

        async def send_with_headers(message: Message) -> None:
            nonlocal status, responding
            if message["type"] == "http.response.start":
                responding = self.tracer.start_span("respond", trace.set_span_in_context(request_span))
                status = message["status"]
                headers = MutableHeaders(scope=message)
                headers["X-Request-ID"] = request_id
                headers["X-Content-Type-Options"] = "nosniff"
                traced = tracing.ids()
                if traced:  # the id to quote when asking about this request (the trace's, continued or new)
                    headers["X-Trace-Id"] = traced[0]
                if self.demo:
                    headers["X-Demo"] = "stand-in weights, not trained: the answers mean nothing"
                if headers.get("content-type", "").startswith("text/html"):
                    headers["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
            if responding is not None and message["type"] == "http.response.body" and not message.get("more_body"):
                responding.end()  # as the last of the body is handed over: the request's span ends within that send
            await send(message)

        try:
            await self.app(scope, counting_receive, send_with_headers)
        except Exception:
            # A bug: the client gets a plain JSON 500 with its request id; the traceback goes to the log only.
            logging.getLogger("app").exception("unexpected error on %s %s", scope["method"], scope["path"])
            if status == 500:
                response = JSONResponse({"detail": "internal error; it has been logged"}, 500)
                await response(scope, counting_receive, send_with_headers)
        finally:
            elapsed = time.perf_counter() - started
            endpoint = _endpoint(scope)
            REQUESTS.labels(scope["method"], endpoint, str(status)).inc()
            LATENCY.labels(endpoint).observe(elapsed)
            access_log.info(
                "%s %s %d %.1fms %dB", scope["method"], scope["path"], status, elapsed * 1000, body_bytes,
                extra={"method": scope["method"], "path": scope["path"], "status": status,
                       "duration_ms": round(elapsed * 1000, 1), "body_bytes": body_bytes,
                       "client": (scope.get("client") or ("-",))[0]},
            )
            REQUEST_ID.reset(token)
