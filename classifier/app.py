"""The application, built from its settings: create_app(settings, runtime) assembles the routes, the gate,
the body limits and the error handlers; its lifespan loads the model (unless one is handed in), starts the
service and the gRPC server, and stops them. Importing this module loads no model and imports no torch.

    uvicorn app:app          the app the environment's settings describe (app.py at the top)
    python -m app            the same, HTTP on HOST:PORT and gRPC on HOST:GRPC_PORT (main)
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import socket
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi_offline import FastAPIOffline
from starlette.formparsers import MultiPartParser
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from classifier import observability, openapi
from classifier.errors import ModelLoadError
from classifier.http import jobs, ops, predictions
from classifier.http.base import add_error_handlers
from classifier.http.gate import BodyLimits, Gate
from classifier.inference import runtimes
from classifier.inference.runtime import Runtime
from classifier.memory import BodyBudget
from classifier.service import Service
from classifier.settings import Settings, get_settings
from classifier.tracing import Tracing
from classifier.v2 import http_routes

log = logging.getLogger("app")

# Starlette spools file parts above 1 MB to a temporary file on disk. Uploads must stay in memory: the body
# limits (gate.BodyLimits) bound them, so the spool never needs to roll over.
MultiPartParser.spool_max_size = sys.maxsize

# The routes of these routers need the API key (when API_KEY is set), and no others: the gate refuses them
# before their bodies are read, and the OpenAPI document marks exactly them.
KEYED = (predictions.router, jobs.router, http_routes.inference)
# Online predictions: classified while the client waits, refused at once when the queue is full.
ONLINE: set[Callable[..., Any]] = {predictions.predict, predictions.predict_topk, predictions.predict_batch,
                                   http_routes.infer}


class OneLineStartupFailure:
    """A start-up that stops for a reason it can say (weights that cannot be loaded, a port in use): the server
    (uvicorn app:app) logs that one line, not the traceback Starlette reports by default."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "lifespan":
            return await self.app(scope, receive, send)

        async def send_reason(message: Message) -> None:
            reason = getattr(scope["app"].state, "startup_failure", None)
            if message["type"] == "lifespan.startup.failed" and reason:
                message = {**message, "message": reason}
            await send(message)

        await self.app(scope, receive, send_reason)


def create_app(settings: Settings | None = None, runtime: Runtime | None = None) -> FastAPI:
    """The service as an ASGI app. settings: the environment's by default. runtime: a model already loaded
    (served as it is); by default the lifespan loads the one the settings choose."""
    settings = settings or get_settings()
    observability.configure_logging(settings.log_level, settings.log_format)
    bodies = BodyBudget(settings.max_body_buffer_bytes, observability.BODY_BYTES_HELD)
    tracing = Tracing(settings.otel_traces_exporter)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loaded = runtime
        try:
            if loaded is None:
                try:
                    loaded = await asyncio.to_thread(runtimes.load, settings)
                except ModelLoadError as error:
                    raise SystemExit(f"Cannot load the model: {error}") from None
            service = app.state.service = Service(settings, loaded, bodies, tracing)
            await service.start()
            grpc = None
            if settings.grpc_port:
                from classifier.v2 import grpc_server  # the gRPC binding of /v2, on its own port

                grpc = await grpc_server.serve(service)
        except SystemExit as refusal:  # one line, not a traceback: OneLineStartupFailure tells the server
            app.state.startup_failure = str(refusal)
            raise
        # The ~400,000 objects start-up made (torch, the model, the libraries) live as long as the process: moved
        # out of the collector's sight, so a full collection takes microseconds instead of stopping every
        # request for ~150 ms (docs/latency.md).
        gc.freeze()
        yield
        service.ready = False
        if grpc is not None:  # calls in flight finish within the drain; new ones are refused meanwhile
            await grpc.stop(settings.shutdown_timeout_s)
        await service.stop()
        await asyncio.to_thread(tracing.shutdown)

    # /docs (Swagger UI) and /redoc load their JavaScript and CSS from this service (the fastapi-offline
    # package ships them), not from a CDN: inference boxes are often offline.
    app = FastAPIOffline(title="ResNet18 image classifier", version="1.0.0",
                         summary="Upload a photo, get ImageNet labels with softmax scores.", lifespan=lifespan)
    # Outermost last: Observe sees every response, CORS headers go on errors too, the gate runs before the body limits.
    app.add_middleware(BodyLimits, max_body=settings.max_upload_bytes, budget=bodies,
                       larger={"/jobs": (settings.max_job_bytes, "MAX_JOB_BYTES")})
    app.add_middleware(Gate, api_key=settings.api_key, keyed=KEYED, online=ONLINE, submit=jobs.submit)
    app.add_middleware(
        CORSMiddleware,
        allow_origins=settings.cors_origins,
        allow_methods=["GET", "POST", "DELETE"],
        allow_headers=["Authorization", "X-API-Key", "X-Request-ID", "Content-Type", "Idempotency-Key", "Prefer",
                       "traceparent", "tracestate", "X-Request-Timeout-Ms"],
        expose_headers=["X-Request-ID", "X-Trace-Id", "X-Model-Version", "Retry-After", "Location", "Preference-Applied"],
    )
    app.add_middleware(http_routes.ProtocolErrors)  # /v2 errors as {"error"}, whichever layer above refused
    app.add_middleware(observability.Observe, demo=settings.demo, tracer=tracing.tracer)
    app.add_middleware(OneLineStartupFailure)
    add_error_handlers(app)
    app.include_router(predictions.router)
    app.include_router(jobs.router)
    app.include_router(http_routes.router)
    app.include_router(http_routes.inference)
    app.include_router(ops.router)
    app.openapi = openapi.document_for(app, settings, KEYED, ONLINE)  # type: ignore[method-assign]
    tracing.instrument(app)  # outermost: the server span is current in everything above
    return app


# --- python -m app: HTTP on HOST:PORT, gRPC beside it on HOST:GRPC_PORT -------------------------------------


def listening_socket(host: str, port: int, what: str, setting: str) -> socket.socket:
    """A socket bound to host:port, or the one line that names the settings to change (the port is taken, the
    address is not this machine's)."""
    # Made as asyncio makes its own: IPPROTO_TCP explicitly, since asyncio turns Nagle's algorithm off only on
    # sockets that say so (socket.create_server's proto 0 cost 48 ms per request at c=1: a delayed ACK).
    listener = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((host, port))
        listener.listen(2048)  # uvicorn's backlog
        return listener
    except OSError as error:
        listener.close()
        raise SystemExit(f"Cannot listen for {what} on {host}:{port} (HOST, {setting}): "
                         f"{os.strerror(error.errno) if error.errno else error}") from None


def main() -> None:
    """python -m app: the ports are taken and the model loaded before anything is served, so a port in use or
    weights that cannot be loaded stop the process at once, with one line."""
    import uvicorn

    settings = get_settings()
    http = listening_socket(settings.host, settings.port, "HTTP", "PORT")  # uvicorn serves this socket
    if settings.grpc_port:  # gRPC binds its own in the lifespan: its port is tried now, for the same one line
        listening_socket(settings.host, settings.grpc_port, "gRPC", "GRPC_PORT").close()
    observability.configure_logging(settings.log_level, settings.log_format)  # the model's lines are kept
    try:
        runtime = runtimes.load(settings)
    except ModelLoadError as error:
        raise SystemExit(f"Cannot load the model: {error}") from None
    served = create_app(settings, runtime)
    log.info("HTTP on %s:%d", settings.host, settings.port)
    # log_config=None: logging is observability's (create_app configures it); uvicorn's would log every request again.
    uvicorn.Server(uvicorn.Config(served, log_config=None)).run(sockets=[http])
