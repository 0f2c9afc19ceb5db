"""The served ResNet18: a Runtime, what every runtime provides, loaded by runtimes.load(settings) and handed
to whoever serves it. No HTTP here, and nothing loaded at import.

    bytes --decode (images.py)--> upright RGB picture --preprocess--> input [3, 224, 224]
          --predict, a batch at a time--> softmax probabilities [N, 1000]          (numpy arrays, float32)

Two runtimes give the same answers:
- torch (the default): torchvision's weights and transforms (runtimes/torch_runtime.py);
- slim (MODEL_ONNX=FILE): the model file python -m export wrote, preprocessed in Pillow and numpy
  (preprocessing.py) and run by ONNX Runtime (runtimes/slim.py, runtimes/onnx_runtime.py); torch and torchvision are never imported.
  At start-up the file's probe images go through decode, preprocess and predict, and their scores must be
  within 1e-4 of those torch recorded, or the replica does not start.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from classifier.inference import images
from classifier.inference.preprocessing import Preprocessing
from classifier.settings import Settings

if TYPE_CHECKING:
    from classifier.inference.runtimes.fastest import Choice
    from classifier.inference.runtimes.onnx_runtime import ModelFile

log = logging.getLogger(__name__)

NUM_CLASSES = 1000  # ImageNet's classes, the model's outputs


class Scores(np.ndarray):
    """One image's probabilities [1000], and the version of the model that computed them (Runtime.version): a
    replica that loads new weights while serving answers each request with the version that really made it."""

    model_version: str | None = None

    def __array_finalize__(self, obj: object) -> None:  # copies and views keep it
        self.model_version = getattr(obj, "model_version", None)


def scored(row: np.ndarray, model_version: str) -> Scores:
    scores = row.view(Scores)
    scores.model_version = model_version
    return scores


def versions_of(answers: Sequence[object]) -> str:
    """The model version that made these answers' scores; two, comma-separated, for a request whose images were
    split by a reload (rare: only one that spans the swap)."""
    return ", ".join(sorted({answer.model_version for answer in answers if isinstance(answer, Scores) and answer.model_version}))


def default_batch_size(device_type: str) -> int:
    """MAX_BATCH_SIZE unset: a GPU's forward pass costs little more for 32 images than for 8; a CPU's grows with
    every image."""
    return 32 if device_type == "cuda" else 8


@dataclass(frozen=True)
class Runtime:
    """A loaded model, whichever runtime serves it (GET /model shows it): numpy arrays in and out."""

    labels: tuple[str, ...]  # the class names, in the order of the model's outputs
    preprocessing: Preprocessing
    preprocess: Callable[[Image.Image], np.ndarray]  # picture -> input [3, 224, 224]
    predict: Callable[[np.ndarray], np.ndarray]  # inputs [N, 3, 224, 224] -> probabilities [N, 1000]
    set_threads: Callable[[int], None]  # threads of this thread's forward passes and array operations
    threads: int  # of the forward pass (THREADS)
    weights_source: str
    weights_hash: str  # of the weights' values: which model answered
    backend: str
    device_type: str
    device_name: str
    precision: str
    max_score_difference: float  # from fp32 torch on the CPU, measured at start-up
    int8_made: dict[str, str] = field(default_factory=dict)  # PRECISION=int8: how the model was made, its speed-up
    model_file: ModelFile | None = None  # slim: the file served
    choice: Choice | None = None  # BACKEND=auto: the timings that chose the backend
    # The thread that loaded the model and runs every forward pass (runtimes.load): predict, called from any
    # thread, runs there. None: predict runs on its caller's thread.
    forward_thread: ThreadPoolExecutor | None = None

    @cached_property  # read for every answer of python -m classify, every job, every /v2 call
    def version(self) -> str:
        """The model version: what decides the answers, as 12 hex digits. The weights' values and the precision (and
        int8's file); not the backend or the device, whose answers agree within 1e-5: a slim replica and a torch
        one of the same weights serve the same version."""
        decides = f"{self.weights_hash} {self.precision} {self.int8_made.get('model_hash', '')}"
        return hashlib.blake2b(decides.encode(), digest_size=6).hexdigest()

    @property
    def default_batch_size(self) -> int:
        return default_batch_size(self.device_type)

    def decode(self, data: bytes, max_pixels: int, draft: bool = False) -> Image.Image:
        """Uploaded bytes -> the upright RGB picture this model's preprocessing takes (images.decode)."""
        return images.decode(data, self.preprocessing.resize, max_pixels, draft)

    def prepare(self, data: bytes, max_pixels: int, draft: bool = False) -> np.ndarray:
        """Uploaded bytes -> the model's input for one image, float32 [3, 224, 224]."""
        return self.preprocess(self.decode(data, max_pixels, draft))

    def answer_context(self, settings: Settings) -> str:
        """Everything besides an image's bytes that decides its answer (the cache's keys hold it): the weights,
        backend, device, precision, the decoding settings and the preprocessing."""
        return (f"{self.weights_hash} {self.backend} {self.device_type} {self.precision} "
                f"jpeg_draft={settings.jpeg_draft} max_image_pixels={settings.max_image_pixels} {self.preprocessing!r}")

    def init_decode_thread(self) -> None:
        """Decoders preprocess one image at a time on one thread each, leaving the cores to the forward pass.

        They also run at the lowest CPU priority (nice 19, this thread only). The forward pass splits each layer
        across THREADS threads and waits for the slowest: a decoder taking a core from one of them stalls them
        all: with two decoders busy on two cores, 18 -> 35 ms per image at batch 8. At nice 19 the decoders run
        in the forward pass's gaps and between batches: 23 ms per image, still 148 decodes/s (bench/contention.py).
        """
        self.set_threads(1)
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
        except OSError:  # not permitted here (some sandboxes): decoding still works, at normal priority
            log.warning("could not lower the decode threads' CPU priority; the forward pass may be slowed by decoding")

