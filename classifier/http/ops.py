"""The open routes: the page, health, readiness, metrics, and what is being served (GET /model)."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Literal

from fastapi import APIRouter
from fastapi.responses import HTMLResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, Field

from classifier import rules
from classifier.http.base import Served
from classifier.inference.cache import ENTRY_BYTES
from classifier.inference.runtimes import onnx_runtime
from classifier.schemas import errors, utc

PAGE = (Path(__file__).parent / "static" / "index.html").read_text()

router = APIRouter()


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
    model_hash: str = Field(description="A hash of the int8 file's bytes (BLAKE2b): part of the model version",
                            examples=["5d1c0b6f2e8a4b7c9d0e1f2a3b4c5d6e"])
    calibration_images: int = Field(description="How many photos calibrated its activation ranges", examples=[300])
    calibration_hash: str = Field(description="A hash of those photos' bytes", examples=["947c4f51f56efef57810da63ac20ba95"])
    calibration_method: str = Field(description="How it was quantized (python -m quantize)",
                                    examples=["nncf performance preset, fast bias correction"])
    speedup_vs_fp32: float = Field(description="fp32's time over int8's for a batch of 8, measured at start-up",
                                   examples=[3.6])


class BackendChoice(BaseModel):
    timings_ms: dict[str, dict[str, float]] = Field(
        description="Each candidate's fastest forward pass in ms, by batch size (one image; a full batch)",
        examples=[{"torch": {"1": 19.2, "8": 104.9}, "onnxruntime": {"1": 13.1, "8": 95.0}}])
    remembered: bool = Field(description="Read from RUNTIME_CACHE_DIR: measured by an earlier start with these weights "
                             "on this machine (false: measured by this start)")
    pin: str = Field("BACKEND=torch or BACKEND=onnxruntime", description="How to serve with one runtime regardless")


class SlimInfo(BaseModel):
    model_file: str = Field(description="The file served (MODEL_ONNX), by name", examples=["resnet18.onnx"])
    format: str = Field(description="Its format version", examples=["classifier-onnx/1"])
    exported_with: str = Field(description="What python -m export made it with", examples=["torch 2.14.1, torchvision 0.29.1"])


class ReloadInfo(BaseModel):
    at: datetime
    outcome: Literal["loaded", "unchanged", "refused"] = Field(
        description="loaded: a new version serves; unchanged: the files hold the version served; refused: the old "
                    "version keeps serving")
    detail: str = Field(description="What happened, or why the files were refused",
                        examples=["version 3f9a2c7e41b0 replaced 8d1e0b6a5c24"])


class ModelInfo(BaseModel):
    architecture: Literal["resnet18"] = "resnet18"
    version: str = Field(description="The model version: a hash of what decides the answers (the weights' values, the "
                         "precision, int8's file). Every prediction says it (X-Model-Version), as do /v2, job results "
                         "and python -m classify; replicas of the same weights and precision share it",
                         examples=["3f9a2c7e41b0"])
    loaded_at: datetime = Field(description="When the version served was loaded: start-up, or the reload that brought it")
    last_reload: ReloadInfo | None = Field(None, description="The last reload (SIGHUP) and what came of it; null: none yet")
    weights: str = Field(description="Where the weights came from", examples=["torchvision:ResNet18_Weights.IMAGENET1K_V1"])
    weights_hash: str = Field(description="A hash of the weights' values (BLAKE2b): which model answers; an exported "
                              "file records that of the weights it came from", examples=["9f0c2e5b8a7d41c3b6e2f1a0d4c5b6a7"])
    runtime: Literal["torch", "slim"] = Field(description="torch, or slim: an exported file (MODEL_ONNX) served by ONNX "
                                              "Runtime, without torch")
    num_classes: int = Field(examples=[1000])
    preprocessing: Preprocessing
    threads: int = Field(description="Threads of the forward pass", examples=[2])
    backend: Literal["torch", "onnxruntime"]
    backend_choice: BackendChoice | None = Field(None, description="With BACKEND=auto (the default on a CPU in fp32): "
                                                 "the runtimes start-up measured; the fastest serves")
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


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
async def page() -> HTMLResponse:
    """A page for people: drop a photo, see the five best guesses (static/index.html)."""
    return HTMLResponse(PAGE)


@router.get("/health", response_model=Status, summary="Liveness: the process answers")
async def health() -> Status:
    return Status()


@router.get("/ready", response_model=Status, responses=errors(503),
         summary="Readiness: the model is loaded and warm, and the service is not shutting down")
async def ready(service: Served) -> Status:
    rules.ready(service.ready)
    return Status()


@router.get("/metrics", response_class=Response, summary="Prometheus metrics (open, like /health and /ready)",
         responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}})
async def metrics() -> Response:
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)


@router.get("/model", response_model=ModelInfo, summary="What is being served")
async def model_info(service: Served) -> ModelInfo:
    served, file, settings = service.runtime, service.runtime.model_file, service.settings
    return ModelInfo(
        version=served.version,
        loaded_at=utc(service.loaded_at),
        last_reload=ReloadInfo(at=utc(service.last_reload.at), outcome=service.last_reload.outcome,
                               detail=service.last_reload.detail) if service.last_reload else None,
        weights=served.weights_source,
        weights_hash=served.weights_hash,
        runtime="slim" if file else "torch",
        num_classes=len(served.labels),
        preprocessing=Preprocessing(
            resize=served.preprocessing.resize,
            interpolation=f"{served.preprocessing.interpolation}, antialiased",
            crop=served.preprocessing.crop,
            mean=list(served.preprocessing.mean),
            std=list(served.preprocessing.std),
        ),
        threads=served.threads,
        backend=served.backend,
        backend_choice=BackendChoice(timings_ms=served.choice.timings_ms, remembered=served.choice.remembered)
        if served.choice else None,
        device=served.device_name if served.device_type == "cpu" else f"cuda ({served.device_name})",
        precision=served.precision,
        max_score_difference=served.max_score_difference,
        int8=Int8Info(**served.int8_made) if served.int8_made else None,
        slim=SlimInfo(model_file=file.path.name, format=onnx_runtime.FORMAT, exported_with=file.exported_with) if file else None,
        max_batch_size=service.batcher.max_batch_size,
        cache=CacheInfo(entries=len(service.cache or ()), capacity=settings.cache_entries,
                        bytes_at_most=settings.cache_entries * ENTRY_BYTES),
    )
