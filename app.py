"""The HTTP layer: routes, request and response models, errors, who may call what. What runs behind the
routes (batcher, job worker, readiness) is built in service.py; the model lives in model.py."""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import APIRouter, FastAPI, File, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.routing import APIRoute
from fastapi_offline import FastAPIOffline
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, Field
from sqlalchemy.exc import DBAPIError
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartParser
from starlette.routing import Match
from starlette.types import ASGIApp, Receive, Scope, Send

import memory
import observability
from settings import get_settings

# Before the model loads (at service's import), so the lines it logs meanwhile are kept.
observability.configure_logging(get_settings().log_level, get_settings().log_format)

import jobs  # noqa: E402
import model  # noqa: E402
import onnx_model  # noqa: E402
import protocol  # noqa: E402
from batching import Overloaded  # noqa: E402
from cache import ENTRY_BYTES  # noqa: E402
from images import ImageError  # noqa: E402
from labels import LABELS  # noqa: E402
from observability import REJECTED, every_route  # noqa: E402
from outcomes import Prediction, failure, outcome, top_k  # noqa: E402
from schemas import FILE_PART, BatchItem, BatchResults, Error, TopK, TopKParameter, errors  # noqa: E402
from service import UNAUTHORIZED, authorized, service  # noqa: E402

log = logging.getLogger("app")

PAGE = (Path(__file__).parent / "static" / "index.html").read_text()

# Starlette spools file parts above 1 MB to a temporary file on disk. Uploads must stay in memory,
# and memory.BodyLimits caps them at max_upload_bytes, so the spool never needs to roll over.
MultiPartParser.spool_max_size = get_settings().max_upload_bytes


class Status(BaseModel):
    status: Literal["ok"] = "ok"


class Preprocessing(BaseModel):
    resize: int = Field(description="Shorter side is resized to this many pixels", examples=[256])
    interpolation: str = Field(examples=["bilinear, antialiased"])
    crop: int = Field(description="Then a centre crop of this size", examples=[224])
    mean: list[float]
    std: list[float]


class CacheInfo(BaseModel):
    entries: int = Field(description="Answers kept now", examples=[1342])
    capacity: int = Field(description="Most answers kept (CACHE_ENTRIES); 0: the cache is off", examples=[10000])
    bytes_at_most: int = Field(description="The memory the cache takes when full, about", examples=[43000000])


class Int8Info(BaseModel):
    weights: str = Field(description="Hash of the weights it was quantized from (the service checks they are the ones "
                         "loaded)", examples=["9f0c2e5b8a7d41c3b6e2f1a0d4c5b6a7"])
    calibration_images: int = Field(description="How many photos calibrated its activation ranges", examples=[300])
    calibration_hash: str = Field(description="A hash of those photos' bytes", examples=["947c4f51f56efef57810da63ac20ba95"])
    calibration_method: str = Field(description="How it was quantized (python -m quantize)",
                                    examples=["nncf performance preset, fast bias correction"])
    speedup_vs_fp32: float = Field(description="fp32's time over int8's for a batch of 8, measured at start-up",
                                   examples=[3.6])


class SlimInfo(BaseModel):
    model_file: str = Field(description="The file served (MODEL_ONNX), by name", examples=["resnet18.onnx"])
    format: str = Field(description="Its format version", examples=["classifier-onnx/1"])
    exported_with: str = Field(description="What python -m export made it with", examples=["torch 2.14.1, torchvision 0.29.1"])


class ModelInfo(BaseModel):
    architecture: Literal["resnet18"] = "resnet18"
    weights: str = Field(description="Where the weights came from", examples=["torchvision:ResNet18_Weights.IMAGENET1K_V1"])
    weights_hash: str = Field(description="A hash of the weights' values (BLAKE2b): which model answers; an exported "
                              "file records that of the weights it came from", examples=["9f0c2e5b8a7d41c3b6e2f1a0d4c5b6a7"])
    runtime: Literal["torch", "slim"] = Field(description="torch, or slim: an exported file (MODEL_ONNX) served by ONNX "
                                              "Runtime, without torch")
    num_classes: int = Field(examples=[1000])
    preprocessing: Preprocessing
    threads: int = Field(description="Threads of the forward pass", examples=[2])
    backend: Literal["torch", "onnxruntime"]
    device: str = Field(description="Where the forward pass runs: cpu, or cuda (the GPU's name)", examples=["cpu"])
    precision: Literal["fp32", "bf16", "fp16", "int8"] = Field(description="Number type of the forward pass (PRECISION)")
    int8: Int8Info | None = Field(None, description="With PRECISION=int8: how the model was made, and its speed here")
    max_score_difference: float = Field(
        description="Largest softmax difference from fp32 torch on the CPU, measured at start-up on a probe batch "
                    "(slim: on the file's probe images, against the scores torch recorded for them)",
        examples=[3.1e-7])
    slim: SlimInfo | None = Field(None, description="With MODEL_ONNX: the exported file served")
    max_batch_size: int = Field(description="Most images in one forward pass", examples=[8])
    cache: CacheInfo = Field(description="Answers kept for repeated images (CACHE_ENTRIES)")


# --- Who may call what ---------------------------------------------------------------------------------


CHALLENGE = {"WWW-Authenticate": 'Bearer realm="classifier"'}


def refusal(status: int, reason: str, detail: str) -> JSONResponse:
    REJECTED.labels(reason).inc()
    headers = CHALLENGE if status == 401 else {"Retry-After": "1"}
    return JSONResponse({"detail": detail}, status, headers=headers)


def overloaded() -> JSONResponse:
    detail = f"the service is overloaded (more than MAX_QUEUE={get_settings().max_queue} images in flight); retry shortly"
    return refusal(503, "overloaded", detail)


# The routes of these routers need the API key (when API_KEY is set), and no other: the gate refuses them
# before their bodies are read, and the OpenAPI document marks exactly them (see openapi below).
predictions = APIRouter()
KEYED: tuple[APIRouter, ...] = (predictions, jobs.router, protocol.inference)


def keyed_route(path: str) -> APIRoute | None:
    """The keyed route a path leads to, if any (found before routing, as the gate must)."""
    return next((route for router in KEYED for route in router.routes if route.path_regex.match(path)), None)


class Gate:
    """Refuses requests that will not be served before their bodies are even read: a missing or wrong API
    key (401) on a keyed route; new work (an online prediction, a job) while shutting down, or an online
    prediction while overloaded (503). Parsing uploads only to refuse them would hand the CPU to clients that
    are not served."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        route = keyed_route(scope["path"]) if scope["type"] == "http" else None
        if route is None:
            return await self.app(scope, receive, send)
        if not authorized(Headers(scope=scope)):
            return await refusal(401, "unauthorized", UNAUTHORIZED)(scope, receive, send)
        endpoint = route.endpoint
        online = endpoint in ONLINE
        if (online or endpoint is jobs.submit) and scope["method"] == "POST" and not service.ready:
            return await refusal(503, "shutting_down", "the service is shutting down; retry on another replica")(
                scope, receive, send)
        if online and service.batcher.full():
            return await overloaded()(scope, receive, send)
        await self.app(scope, receive, send)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    await service.start()
    yield
    await service.stop()


# /docs (Swagger UI) and /redoc load their JavaScript and CSS from this service (the fastapi-offline
# package ships them), not from a CDN: inference boxes are often offline.
app = FastAPIOffline(
    title="ResNet18 image classifier",
    version="1.0.0",
    summary="Upload a photo, get ImageNet labels with softmax scores.",
    lifespan=lifespan,
)
# Outermost last: Observe sees every response, CORS headers go on errors too, the gate runs before the body limits.
app.add_middleware(memory.BodyLimits, max_body=get_settings().max_upload_bytes, budget=service.bodies,
                   larger={"/jobs": (get_settings().max_job_bytes, "MAX_JOB_BYTES")})
app.add_middleware(Gate)
app.add_middleware(
    CORSMiddleware,
    allow_origins=get_settings().cors_origins,
    allow_methods=["GET", "POST", "DELETE"],
    allow_headers=["Authorization", "X-API-Key", "X-Request-ID", "Content-Type", "Idempotency-Key", "Prefer"],
    expose_headers=["X-Request-ID", "Retry-After", "Location", "Preference-Applied"],
)
app.add_middleware(protocol.ProtocolErrors)  # /v2 errors as {"error"}, whichever layer above refused
app.add_middleware(observability.Observe)


@app.exception_handler(HTTPException)
async def http_error(request: Request, error: HTTPException) -> JSONResponse:
    headers = dict(error.headers or {})
    if error.status_code == 405:  # every method the path has, not only its first route's
        allowed = {method for route in every_route(app.router.routes) if route.matches(request.scope)[0] != Match.NONE
                   for method in getattr(route, "methods", None) or ()}
        headers["Allow"] = ", ".join(sorted(allowed))
    return JSONResponse({"detail": str(error.detail)}, error.status_code, headers=headers)


@app.exception_handler(RequestValidationError)
async def validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
    problems = []
    for problem in error.errors():
        where = ".".join(str(part) for part in problem["loc"])
        problems.append(f"{where}: {problem['msg']}")
    hint = " (send the image as multipart/form-data field 'file')" if "body" in str(error.errors()) else ""
    return JSONResponse({"detail": "; ".join(problems) + hint}, 422)


@app.exception_handler(ImageError)
async def image_error(request: Request, error: ImageError) -> JSONResponse:
    refused = failure(error)
    return JSONResponse({"detail": refused.detail}, refused.status)


@app.exception_handler(Overloaded)
async def overloaded_error(request: Request, error: Overloaded) -> JSONResponse:
    return overloaded()


# --- Online predictions ------------------------------------------------------------------------------------

PREDICT_ERRORS = errors(400, 413, 415, 422, 503)
UploadedImage = Annotated[UploadFile, File(description="The photo: JPEG, PNG, GIF, WebP, AVIF, BMP or TIFF",
                                           json_schema_extra={"minLength": 1})]


async def classify_one(request: Request, upload: UploadFile):  # noqa: ANN201 (probabilities [1000])
    [probabilities] = await service.classify([upload], request)
    if isinstance(probabilities, Exception):
        raise probabilities
    return probabilities


@predictions.post("/predict", response_model=Prediction, responses=PREDICT_ERRORS, summary="The most likely label")
async def predict(request: Request, file: UploadedImage) -> Prediction:
    return top_k(await classify_one(request, file), 1)[0]


@predictions.post("/predict/topk", response_model=TopK, responses=PREDICT_ERRORS, summary="The k most likely labels")
async def predict_topk(request: Request, file: UploadedImage, k: TopKParameter = 5) -> TopK:
    return TopK(predictions=top_k(await classify_one(request, file), k))


@predictions.post(
    "/predict/batch",
    response_model=BatchResults,
    response_model_exclude_none=True,
    responses=errors(400, 413, 422, 503),
    summary="The k most likely labels of each of several files",
)
async def predict_batch(
    request: Request,
    files: Annotated[list[UploadFile], File(min_length=1, json_schema_extra={"maxItems": get_settings().max_batch_files},
                                            description=f"1 to {get_settings().max_batch_files} photos (MAX_BATCH_FILES), "
                                                        "field repeated; more: 413")],
    k: TopKParameter = 5,
) -> BatchResults:
    """A bad file gets an `error` entry of its own; the others are still classified."""
    results = await service.classify(files, request)
    return BatchResults(results=[BatchItem(filename=upload.filename, **outcome(result, k))
                                 for upload, result in zip(files, results)])


# Online predictions: classified while the client waits, refused at once when the queue is full.
ONLINE: set[Callable[..., Any]] = {predict, predict_topk, predict_batch, protocol.infer}

app.include_router(predictions)
app.include_router(jobs.router)
app.add_exception_handler(DBAPIError, jobs.database_error)
app.include_router(protocol.router)
app.include_router(protocol.inference)


# --- Open routes: the page, health, metrics, what is served --------------------------------------------------


@app.get("/", response_class=HTMLResponse, include_in_schema=False)
async def page() -> HTMLResponse:
    """A page for people: drop a photo, see the five best guesses (static/index.html)."""
    return HTMLResponse(PAGE)


@app.get("/health", response_model=Status, summary="Liveness: the process answers")
async def health() -> Status:
    return Status()


@app.get("/ready", response_model=Status, responses=errors(503),
         summary="Readiness: the model is loaded and warm, and the service is not shutting down")
async def ready() -> Status:
    if not service.ready:
        raise HTTPException(503, "the model is not ready")
    return Status()


@app.get("/metrics", response_class=Response, summary="Prometheus metrics (open, like /health and /ready)",
         responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}})
async def metrics() -> Response:
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)


@app.get("/model", response_model=ModelInfo, summary="What is being served")
async def model_info() -> ModelInfo:
    served, file = model.served, model.served.model_file
    return ModelInfo(
        weights=served.weights_source,
        weights_hash=served.weights_hash,
        runtime="slim" if file else "torch",
        num_classes=len(LABELS),
        preprocessing=Preprocessing(
            resize=served.preprocessing.resize,
            interpolation=f"{served.preprocessing.interpolation}, antialiased",
            crop=served.preprocessing.crop,
            mean=list(served.preprocessing.mean),
            std=list(served.preprocessing.std),
        ),
        threads=get_settings().threads,
        backend=served.backend,
        device=served.device_name if served.device_type == "cpu" else f"cuda ({served.device_name})",
        precision=served.precision,
        max_score_difference=served.max_score_difference,
        int8=Int8Info(**served.int8_made) if served.int8_made else None,
        slim=SlimInfo(model_file=file.path.name, format=onnx_model.FORMAT, exported_with=file.exported_with) if file else None,
        max_batch_size=service.batcher.max_batch_size,
        cache=CacheInfo(entries=len(service.cache or ()), capacity=get_settings().cache_entries,
                        bytes_at_most=get_settings().cache_entries * ENTRY_BYTES),
    )


# --- The OpenAPI document: what the running service does, for /docs and for generated clients --------------

SECURITY_SCHEMES = {
    "HTTPBearer": {"type": "http", "scheme": "bearer", "description": "The service's API_KEY"},
    "APIKeyHeader": {"type": "apiKey", "in": "header", "name": "X-API-Key", "description": "The same key, in a header of its own"},
}
_generate_openapi = app.openapi


def openapi() -> dict[str, Any]:
    """FastAPI's document, corrected to what this service answers: its errors' own shapes ({"detail": "..."},
    {"error": "..."} under /v2), 422 included; and, when API_KEY is set, the two ways to send the key, required
    on every keyed operation, with its 401 (without a key nothing asks for one, as the service does not)."""
    if app.openapi_schema is not None:
        return app.openapi_schema
    document = _generate_openapi()
    schemas = document.setdefault("components", {}).setdefault("schemas", {})
    for shape in (Error, protocol.ProtocolError):
        schemas.setdefault(shape.__name__, shape.model_json_schema())
    keyed = {(route.path_format, method.lower()) for router in KEYED for route in router.routes for method in route.methods}
    for path, operations in document["paths"].items():
        error = {"$ref": f"#/components/schemas/{'ProtocolError' if path.startswith('/v2') else 'Error'}"}
        for method, operation in operations.items():
            if "422" in operation["responses"]:  # FastAPI's list of problems; this service sends one sentence
                operation["responses"]["422"] = {"description": "The request's parameters or body are not valid",
                                                 "content": {"application/json": {"schema": error}}}
            if get_settings().api_key is not None and (path, method) in keyed:
                operation["security"] = [{name: []} for name in SECURITY_SCHEMES]
                operation["responses"]["401"] = {"description": "No valid API key",
                                                 "content": {"application/json": {"schema": error}}}
    batch = document["paths"]["/predict/batch"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    schemas[batch["$ref"].rsplit("/", 1)[1]]["properties"]["files"]["items"] = FILE_PART  # bytes, whatever they spell
    for unused in ("HTTPValidationError", "ValidationError"):
        schemas.pop(unused, None)
    if get_settings().api_key is not None:
        document["components"]["securitySchemes"] = SECURITY_SCHEMES
    app.openapi_schema = document
    return document


app.openapi = openapi  # type: ignore[method-assign]


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
    import uvicorn

    settings = get_settings()
    http = listening_socket(settings.host, settings.port, "HTTP", "PORT")  # uvicorn serves this socket
    if settings.grpc_port:  # gRPC binds its own in the lifespan: its port is tried now, for the same one line
        listening_socket(settings.host, settings.grpc_port, "gRPC", "GRPC_PORT").close()
    log.info("HTTP on %s:%d", settings.host, settings.port)
    # log_config=None: logging is observability's (configured at import); uvicorn's would log every request again.
    uvicorn.Server(uvicorn.Config(app, log_config=None)).run(sockets=[http])


if __name__ == "__main__":
    main()
