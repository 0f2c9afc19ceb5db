"""The served ResNet18: loaded once, when this module is first imported, and warmed up. No HTTP here.

    bytes --decode (images.py)--> upright RGB picture --preprocess--> input [3, 224, 224]
          --predict, a batch at a time--> softmax probabilities [N, 1000]          (numpy arrays, float32)

Two runtimes give the same answers:
- torch (the default): torchvision's weights and transforms (torch_model.py);
- slim (MODEL_ONNX=FILE): the model file python -m export wrote, preprocessed in Pillow and numpy
  (preprocessing.py) and run by ONNX Runtime (onnx_model.py); torch and torchvision are never imported.
  At start-up the file's probe images go through decode, preprocess and predict, and their scores must be
  within 1e-4 of those torch recorded, or the replica does not start.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

import images
import onnx_model
from preprocessing import Preprocessing
from settings import get_settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Served:
    """What is being served, whichever runtime serves it (GET /model shows it)."""

    preprocessing: Preprocessing
    preprocess: Callable[[Image.Image], np.ndarray]  # picture -> input [3, 224, 224]
    predict: Callable[[np.ndarray], np.ndarray]  # inputs [N, 3, 224, 224] -> probabilities [N, 1000]
    set_threads: Callable[[int], None]  # threads of this thread's forward passes and array operations
    weights_source: str
    weights_hash: str  # of the weights' values: which model answered
    backend: str
    device_type: str
    device_name: str
    precision: str
    max_score_difference: float  # from fp32 torch on the CPU, measured at start-up
    int8_made: dict[str, str] = field(default_factory=dict)  # PRECISION=int8: how the model was made, its speed-up
    model_file: onnx_model.ModelFile | None = None  # slim: the file served


def with_torch() -> Served:
    import torch_model  # loads the weights

    return Served(torch_model.preprocessing, torch_model.preprocess, torch_model.predict, torch_model.set_threads,
                  torch_model.weights_source, torch_model.weights_hash, torch_model.backend,
                  torch_model.device.type, torch_model.device_name, torch_model.precision,
                  torch_model.backend_difference, torch_model.int8_made)


def slim(path: Path) -> Served:
    """MODEL_ONNX: the exported file, with no torch (its probe is checked once prepare exists, below)."""
    file = onnx_model.read(path, get_settings().threads)

    def predict(batch: np.ndarray) -> np.ndarray:
        return onnx_model.softmax(file.forward(batch))

    return Served(file.preprocessing, file.preprocessing, predict, lambda threads: None, file.weights_source,
                  file.weights, "onnxruntime", "cpu", "cpu", "fp32", float("nan"), model_file=file)


def decode(data: bytes, draft: bool | None = None) -> Image.Image:
    """Uploaded bytes -> the upright RGB picture this model's preprocessing takes (images.decode)."""
    return images.decode(data, served.preprocessing.resize, draft)


def prepare(data: bytes, draft: bool | None = None) -> np.ndarray:
    """Uploaded bytes -> the model's input for one image, float32 [3, 224, 224]. draft: JPEG_DRAFT if None."""
    return served.preprocess(decode(data, draft))


def answer_context() -> str:
    """Everything besides an image's bytes that decides its answer (the cache's keys hold it): the weights,
    backend, device, precision, the decoding settings and the preprocessing."""
    settings = get_settings()
    return (f"{served.weights_hash} {served.backend} {served.device_type} {served.precision} "
            f"jpeg_draft={settings.jpeg_draft} max_image_pixels={settings.max_image_pixels} {served.preprocessing!r}")


def init_inference_thread() -> None:
    """Run once in the thread that owns the forward pass, before any decode thread starts: it takes THREADS
    first, then decoders take 1."""
    served.set_threads(get_settings().threads)
    predict(np.zeros((1, 3, CROP_SIZE, CROP_SIZE), np.float32))


def init_decode_thread() -> None:
    """Decoders preprocess one image at a time on one thread each, leaving the cores to the forward pass.

    They also run at the lowest CPU priority (nice 19, this thread only). The forward pass splits each layer
    across THREADS threads and waits for the slowest: a decoder taking a core from one of them stalls them
    all: with two decoders busy on two cores, 18 -> 35 ms per image at batch 8. At nice 19 the decoders run
    in the forward pass's gaps and between batches: 23 ms per image, still 148 decodes/s (bench/contention.py).
    """
    served.set_threads(1)
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
    except OSError:  # not permitted here (some sandboxes): decoding still works, at normal priority
        log.warning("could not lower the decode threads' CPU priority; the forward pass may be slowed by decoding")


try:
    served = slim(get_settings().model_onnx) if get_settings().model_onnx is not None else with_torch()
    if served.model_file is not None:  # the probe goes through prepare, as every upload does
        served = dataclasses.replace(served, max_score_difference=onnx_model.check_probe(served.model_file, prepare))
except onnx_model.ModelFileError as error:
    raise SystemExit(f"Cannot load the model: {error}") from None
RESIZE_SIZE, CROP_SIZE = served.preprocessing.resize, served.preprocessing.crop
predict = served.predict
# A GPU's forward pass costs little more for 32 images than for 8; a CPU's grows with every image.
DEFAULT_BATCH_SIZE = 32 if served.device_type == "cuda" else 8
predict(np.zeros((1, 3, CROP_SIZE, CROP_SIZE), np.float32))
log.info("ResNet18 loaded from %s (weights %s), backend %s on %s (%s) in %s, scores within %.1e of fp32 torch on the "
         "CPU, %d threads%s", served.weights_source, served.weights_hash, served.backend, served.device_type,
         served.device_name, served.precision, served.max_score_difference, get_settings().threads,
         f", slim: {served.model_file.path.name}, no torch" if served.model_file else "")
