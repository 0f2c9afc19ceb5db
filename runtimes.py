"""Loading the runtime the settings choose: torch (torch_model.py) by default, or the slim replica's model file
(MODEL_ONNX: onnx_model.py's, served by ONNX Runtime without torch). Each is checked before it serves: torch
against fp32 torch on the CPU, the slim file's probe images against the scores torch recorded for them.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np

import onnx_model
from errors import ModelLoadError
from model import NUM_CLASSES, Runtime
from settings import Settings

log = logging.getLogger("model")


def slim(settings: Settings) -> Runtime:
    """MODEL_ONNX: the exported file, with no torch; its probe images checked through prepare, as every upload."""
    assert settings.model_onnx is not None
    file = onnx_model.read(settings.model_onnx, settings.threads)
    if len(file.labels) != NUM_CLASSES:
        raise ModelLoadError(f"MODEL_ONNX={settings.model_onnx} records {len(file.labels)} labels, not {NUM_CLASSES}: "
                             "write it again with python -m export")

    def predict(batch: np.ndarray) -> np.ndarray:
        return onnx_model.softmax(file.forward(batch))

    runtime = Runtime(file.labels, file.preprocessing, file.preprocessing, predict, lambda threads: None, settings.threads,
                      file.weights_source, file.weights, "onnxruntime", "cpu", "cpu", "fp32", float("nan"), model_file=file)
    difference = onnx_model.check_probe(file, lambda data: runtime.prepare(data, settings.max_image_pixels))
    return dataclasses.replace(runtime, max_score_difference=difference)


def load(settings: Settings) -> Runtime:
    """The runtime the settings choose, loaded, checked and warmed up. Raises ModelLoadError with one sentence
    that says how to fix it."""
    if settings.model_onnx is not None:
        runtime = slim(settings)
    else:
        import torch_model  # torch and torchvision: only a runtime with torch imports them

        runtime = torch_model.load(settings)
    runtime.predict(np.zeros((1, 3, runtime.preprocessing.crop, runtime.preprocessing.crop), np.float32))
    log.info("ResNet18 loaded from %s (weights %s), backend %s on %s (%s) in %s, scores within %.1e of fp32 torch on "
             "the CPU, %d threads%s", runtime.weights_source, runtime.weights_hash, runtime.backend, runtime.device_type,
             runtime.device_name, runtime.precision, runtime.max_score_difference, runtime.threads,
             f", slim: {runtime.model_file.path.name}, no torch" if runtime.model_file else "")
    return runtime
