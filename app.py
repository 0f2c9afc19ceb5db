"""The HTTP layer: routes, request and response models, errors. The model lives in model.py."""

from __future__ import annotations

import asyncio
import hmac
import logging
import signal
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Literal

import torch
from fastapi import Depends, FastAPI, File, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.security import APIKeyHeader, HTTPBearer
from fastapi_offline import FastAPIOffline
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, Field
from sqlalchemy.exc import DBAPIError
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartParser
from starlette.types import ASGIApp, Receive, Scope, Send

import memory
import observability
from settings import settings

# Before the model loads (at its import), so the lines it logs meanwhile are kept.
observability.configure_logging(settings.log_level, settings.log_format)

import jobs  # noqa: E402
import model  # noqa: E402
import protocol  # noqa: E402
from batching import Batcher, Overloaded  # noqa: E402
from jobstore import JobStore  # noqa: E402
from jobworker import JobWorker  # noqa: E402
from labels import LABELS  # noqa: E402
from observability import REJECTED  # noqa: E402
from schemas import BatchItem, BatchResults, Prediction, TopK, TopKParameter, errors, image_error_status, item_error, top_k  # noqa: E402

log = logging.getLogger("app")

PAGE = (Path(__file__).parent / "static" / "index.html").read_text()

# Starlette spools file parts above 1 MB to a temporary file on disk. Uploads must stay in memory,
# and memory.BodyLimits caps them at max_upload_bytes, so the spool never needs to roll over.
MultiPartParser.spool_max_size = settings.max_upload_bytes


class Status(BaseModel):
    status: Literal["ok"] = "ok"


class Preprocessing(BaseModel):
    resize: int = Field(description="Shorter side is resized to this many pixels", examples=[256])
    interpolation: str = Field(examples=["bilinear, antialiased"])
    crop: int = Field(description="Then a centre crop of this size", examples=[224])
    mean: list[float]
    std: list[float]


class ModelInfo(BaseModel):
    architecture: Literal["resnet18"] = "resnet18"
    weights: str = Field(description="Where the weights came from", examples=["torchvision:ResNet18_Weights.IMAGENET1K_V1"])
    num_classes: int = Field(examples=[1000])
    preprocessing: Preprocessing
    threads: int = Field(description="Threads of the forward pass", examples=[2])
    backend: Literal["torch", "onnxruntime"]
    device: str = Field(description="Where the forward pass runs: cpu, or cuda (the GPU's name)", examples=["cpu"])
    precision: Literal["fp32", "bf16", "fp16"] = Field(description="Number type of the forward pass (PRECISION)")
    max_score_difference: float = Field(
        description="Largest softmax difference from fp32 torch on the CPU, measured at start-up on a probe batch",
        examples=[3.1e-7])
    max_batch_size: int = Field(description="Most images in one forward pass", examples=[8])


PREDICT_ERRORS = errors(400, 401, 413, 415, 422, 503)
UploadedImage = Annotated[UploadFile, File(description="The photo: JPEG, PNG, GIF, WebP, AVIF, BMP or TIFF")]


def authorized(headers: Headers) -> bool:
    """With API_KEY set: `Authorization: Bearer <key>` or `X-API-Key: <key>`, compared in constant time."""
    if settings.api_key is None:
        return True
    scheme, _, bearer = headers.get("authorization", "").partition(" ")
    offered = headers.get("x-api-key") or (bearer.strip() if scheme.lower() == "bearer" else "")
    return hmac.compare_digest(offered.encode(), settings.api_key.encode())


UNAUTHORIZED = "a valid API key is required: Authorization: Bearer <key> or X-API-Key: <key>"
CHALLENGE = {"WWW-Authenticate": 'Bearer realm="classifier"'}


def _refusal(status: int, reason: str, detail: str) -> JSONResponse:
    REJECTED.labels(reason).inc()
    headers = CHALLENGE if status == 401 else {"Retry-After": "1"}
    return JSONResponse({"detail": detail}, status, headers=headers)


def unauthorized() -> JSONResponse:
    return _refusal(401, "unauthorized", UNAUTHORIZED)


def overloaded() -> JSONResponse:
    detail = f"the service is overloaded (more than MAX_QUEUE={settings.max_queue} images in flight); retry shortly"
    return _refusal(503, "overloaded", detail)


class PredictGate:
    """Refuses requests that will not be served before their bodies are even read: a missing or wrong
    API key (401) on /predict, /jobs and /v2/.../infer; a new prediction or job while shutting down, or a prediction
    while overloaded (503). Parsing uploads only to refuse them would hand the CPU to clients that are
    not served."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        predict = path.startswith("/predict") or (path.startswith("/v2/models/") and path.endswith("/infer"))
        jobs_route = path == "/jobs" or path.startswith("/jobs/")
        if scope["type"] == "http" and (predict or jobs_route):
            if not authorized(Headers(scope=scope)):
                return await unauthorized()(scope, receive, send)
            if not scope["app"].state.ready and (predict or (path == "/jobs" and scope["method"] == "POST")):
                return await _refusal(503, "shutting_down", "the service is shutting down; retry on another replica")(
                    scope, receive, send)
            if predict and batcher.full():
                return await overloaded()(scope, receive, send)
        await self.app(scope, receive, send)


# For /docs: its Authorize button, and the schemes in the OpenAPI document. PredictGate enforces them.
_bearer = HTTPBearer(auto_error=False, description="The service's API_KEY, when it has one")
_api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="The same key, in a header of its own")


async def api_key(
    request: Request,
    bearer: Annotated[object, Depends(_bearer)],  # declared for the OpenAPI document; authorized() reads the headers
    key: Annotated[object, Depends(_api_key_header)],
) -> None:
    if not authorized(request.headers):
        raise HTTPException(401, UNAUTHORIZED, headers=CHALLENGE)


# Decoding runs in a small thread pool; one inference thread owns the forward pass, so requests
# never run it side by side on the same cores.
batcher = Batcher(
    model.prepare,
    model.predict,
    max_batch_size=settings.max_batch_size or model.DEFAULT_BATCH_SIZE,
    max_delay_s=settings.max_batch_delay_s,
    max_queue=settings.max_queue,
    decode_workers=settings.decode_workers,
    # Job images run only after 10 ms without online images: a steady online stream keeps the cores.
    idle_s=0.01,
    init_inference_thread=model.init_inference_thread,
    init_decode_thread=model.init_decode_thread,
    on_batch=observability.observe_batch,
)
observability.IN_FLIGHT.set_function(lambda: batcher.in_flight)
try:
    job_worker = JobWorker(JobStore(settings.jobs_database_url, settings.job_ttl_s, settings.job_lease_s), batcher,
                           webhook_secret=settings.webhook_secret, webhook_first_retry_s=settings.webhook_first_retry_s)
except Exception as error:  # an unknown driver, a malformed URL
    raise SystemExit(f"Cannot open the job store JOBS_DATABASE_URL: {error}") from None


def drain_on_sigterm(app: FastAPI) -> None:
    """On SIGTERM: /ready and new predict requests answer 503, the accepted ones finish (for at most
    SHUTDOWN_TIMEOUT_S), then uvicorn's own shutdown runs; a request hanging past that is cut off."""
    if threading.current_thread() is not threading.main_thread():
        return  # signals reach the main thread only (not a test client's)
    uvicorn_handler = signal.getsignal(signal.SIGTERM)
    if not callable(uvicorn_handler):
        return
    loop = asyncio.get_running_loop()

    async def drain(frame: object) -> None:
        deadline = time.monotonic() + settings.shutdown_timeout_s
        log.info("SIGTERM: draining %d images in flight, for at most %g s", batcher.in_flight, settings.shutdown_timeout_s)
        await batcher.drain(settings.shutdown_timeout_s)
        uvicorn_handler(signal.SIGTERM, frame)  # stop listening, finish open responses, run the lifespan's end
        # uvicorn forces its exit on a second SIGINT: the bound for whatever still hangs.
        loop.call_later(max(0.0, deadline - time.monotonic()) + 1, uvicorn_handler, signal.SIGINT, frame)

    def on_sigterm(signum: int, frame: object) -> None:
        if app.state.ready:
            app.state.ready = False
            loop.call_soon_threadsafe(lambda: loop.create_task(drain(frame)))

    signal.signal(signal.SIGTERM, on_sigterm)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    await batcher.start()
    await job_worker.start()
    drain_on_sigterm(app)
    app.state.ready = True
    yield
    app.state.ready = False
    await job_worker.stop()
    await batcher.stop(timeout_s=settings.shutdown_timeout_s)


# /docs (Swagger UI) and /redoc load their JavaScript and CSS from this service (the fastapi-offline
# package ships them), not from a CDN: inference boxes are often offline.
app = FastAPIOffline(
    title="ResNet18 image classifier",
    version="1.0.0",
    summary="Upload a photo, get ImageNet labels with softmax scores.",
    lifespan=lifespan,
)
app.state.ready = False
app.state.job_worker = job_worker
# Outermost last: Observe sees every response, CORS headers go on errors too, the gate runs before the body limits.
app.add_middleware(memory.BodyLimits, max_body=settings.max_upload_bytes, budget=settings.max_body_buffer_bytes,
                   held=observability.BODY_BYTES_HELD, rejected=REJECTED,
                   larger={"/jobs": (settings.max_job_bytes, "MAX_JOB_BYTES")})
app.add_middleware(PredictGate)
app.add_middleware(
    CORSMiddleware,
    allow_origins=settings.cors_origins,
    allow_methods=["GET", "POST", "DELETE"],
    allow_headers=["Authorization", "X-API-Key", "X-Request-ID", "Content-Type", "Idempotency-Key", "Prefer"],
    expose_headers=["X-Request-ID", "Retry-After", "Location", "Preference-Applied"],
)
app.add_middleware(protocol.ProtocolErrors)  # /v2 errors as {"error"}, whichever layer above refused
app.add_middleware(observability.Observe)


@app.exception_handler(HTTPException)
async def http_error(request: Request, error: HTTPException) -> JSONResponse:
    return JSONResponse({"detail": str(error.detail)}, error.status_code, headers=error.headers)


@app.exception_handler(RequestValidationError)
async def validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
    problems = []
    for problem in error.errors():
        where = ".".join(str(part) for part in problem["loc"])
        problems.append(f"{where}: {problem['msg']}")
    hint = " (send the image as multipart/form-data field 'file')" if "body" in str(error.errors()) else ""
    return JSONResponse({"detail": "; ".join(problems) + hint}, 422)


@app.exception_handler(model.ImageError)
async def image_error(request: Request, error: model.ImageError) -> JSONResponse:
    return JSONResponse({"detail": str(error)}, image_error_status(error))


@app.exception_handler(Overloaded)
async def overloaded_error(request: Request, error: Overloaded) -> JSONResponse:
    return overloaded()


def _busy(detail: str) -> HTTPException:
    return HTTPException(503, detail, headers={"Retry-After": "1"})


async def _until_disconnected(request: Request) -> None:
    # The body has been read, so the next message is the client leaving (or the response being done).
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def read(upload: UploadFile) -> bytes:
    data = await upload.read()
    await upload.close()  # its in-memory spool: one copy of the bytes is enough
    return data


async def classify(
    request: Request, images: list[UploadFile] | list[bytes | torch.Tensor]
) -> list[torch.Tensor | Exception]:
    """Uploaded files (or images already read, or already preprocessed to [3, 224, 224]) -> softmax
    probabilities [1000] each, or the exception that stopped that image.

    The images go through the decoders and the batching worker together (sharing batches with other
    requests). A request that times out or whose client disconnects gives up all its images. Uploads are
    read only once admitted: a refused request never copies its files.
    """
    try:
        with batcher.admit(len(images)):
            images = [image if isinstance(image, (bytes, torch.Tensor)) else await read(image) for image in images]
            async with asyncio.timeout(settings.request_timeout_s):
                work = asyncio.gather(*(batcher.submit(data) for data in images), return_exceptions=True)
                watcher = asyncio.ensure_future(_until_disconnected(request))
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
                    raise _busy("the client disconnected")
                return work.result()
    except TimeoutError:
        REJECTED.labels("timeout").inc()
        raise _busy(f"no answer within {settings.request_timeout_s:g} s (REQUEST_TIMEOUT_S); retry shortly") from None


async def classify_one(request: Request, upload: UploadFile) -> torch.Tensor:
    [probabilities] = await classify(request, [upload])
    if isinstance(probabilities, Exception):
        raise probabilities
    return probabilities


@app.post("/predict", response_model=Prediction, responses=PREDICT_ERRORS, dependencies=[Depends(api_key)],
          summary="The most likely label")
async def predict(request: Request, file: UploadedImage) -> Prediction:
    return top_k(await classify_one(request, file), 1)[0]


@app.post("/predict/topk", response_model=TopK, responses=PREDICT_ERRORS, dependencies=[Depends(api_key)],
          summary="The k most likely labels")
async def predict_topk(request: Request, file: UploadedImage, k: TopKParameter = 5) -> TopK:
    return TopK(predictions=top_k(await classify_one(request, file), k))


@app.post(
    "/predict/batch",
    response_model=BatchResults,
    response_model_exclude_none=True,
    responses=errors(401, 413, 422, 503),
    dependencies=[Depends(api_key)],
    summary="The k most likely labels of each of several files",
)
async def predict_batch(
    request: Request,
    files: Annotated[list[UploadFile], File(description=f"Up to {settings.max_batch_files} photos, field repeated")],
    k: TopKParameter = 5,
) -> BatchResults:
    """A bad file gets an `error` entry of its own; the others are still classified."""
    if len(files) > settings.max_batch_files:
        REJECTED.labels("too_large").inc()
        raise HTTPException(413, f"{len(files)} files in one request; at most {settings.max_batch_files} (MAX_BATCH_FILES)")
    results = []
    for upload, outcome in zip(files, await classify(request, files)):
        if isinstance(outcome, Exception):
            results.append(BatchItem(filename=upload.filename, error=item_error(outcome)))
        else:
            results.append(BatchItem(filename=upload.filename, predictions=top_k(outcome, k)))
    return BatchResults(results=results)


app.include_router(jobs.router, dependencies=[Depends(api_key)])
app.add_exception_handler(DBAPIError, jobs.database_error)
app.state.classify = classify  # the Open Inference Protocol's routes classify through the same path
app.include_router(protocol.router)
app.include_router(protocol.inference, dependencies=[Depends(api_key)])


@app.get("/", response_class=HTMLResponse, include_in_schema=False)
async def page() -> HTMLResponse:
    """A page for people: drop a photo, see the five best guesses (static/index.html)."""
    return HTMLResponse(PAGE)


@app.get("/health", response_model=Status, summary="Liveness: the process answers")
async def health() -> Status:
    return Status()


@app.get("/ready", response_model=Status, responses=errors(503), summary="Readiness: the model is loaded and warm, and the service is not shutting down")
async def ready(request: Request) -> Status:
    if not request.app.state.ready:
        raise HTTPException(503, "the model is not ready")
    return Status()


@app.get("/metrics", response_class=Response, summary="Prometheus metrics (open, like /health and /ready)",
         responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}})
async def metrics() -> Response:
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)


@app.get("/model", response_model=ModelInfo, summary="What is being served")
async def model_info() -> ModelInfo:
    return ModelInfo(
        weights=model.weights_source,
        num_classes=len(LABELS),
        preprocessing=Preprocessing(
            resize=model.RESIZE_SIZE,
            interpolation=f"{model.preprocess.interpolation.value}, antialiased",
            crop=model.CROP_SIZE,
            mean=model.preprocess.mean,
            std=model.preprocess.std,
        ),
        threads=settings.threads,
        backend=settings.backend,
        device=model.device_name if model.device.type == "cpu" else f"cuda ({model.device_name})",
        precision=model.precision,
        max_score_difference=model.backend_difference,
        max_batch_size=batcher.max_batch_size,
    )
