"""The slim replica's runtime (MODEL_ONNX): the model file python -m export wrote (onnx_runtime.py reads it),
served by ONNX Runtime with the Pillow and numpy preprocessing, without torch. Its probe images go through
decode, preprocess and predict, and must give the scores torch recorded for them, or it does not start.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from classifier.errors import ModelLoadError
from classifier.inference.runtime import NUM_CLASSES, Runtime
from classifier.inference.runtimes import onnx_runtime
from classifier.settings import Settings


def load_slim(settings: Settings) -> Runtime:
    """MODEL_ONNX: the exported file, with no torch; its probe images checked through prepare, as every upload."""
    assert settings.model_onnx is not None
    file = onnx_runtime.read(settings.model_onnx, settings.threads)
    if len(file.labels) != NUM_CLASSES:
        raise ModelLoadError(f"MODEL_ONNX={settings.model_onnx} records {len(file.labels)} labels, not {NUM_CLASSES}: "
                             "write it again with python -m export")

    def predict(batch: np.ndarray) -> np.ndarray:
        return onnx_runtime.softmax(file.forward(batch))

    runtime = Runtime(file.labels, file.preprocessing, file.preprocessing, predict, lambda threads: None, settings.threads,
                      file.weights_source, file.weights, "onnxruntime", "cpu", "cpu", "fp32", float("nan"), model_file=file)
    difference = onnx_runtime.check_probe(file, lambda data: runtime.prepare(data, settings.max_image_pixels))
    return dataclasses.replace(runtime, max_score_difference=difference)
