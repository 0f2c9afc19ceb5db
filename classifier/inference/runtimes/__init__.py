"""What runs the forward pass, loaded as the settings choose: torch (torch_runtime.py: torchvision's model, in
torch, ONNX Runtime or int8) by default, or the slim replica's model file (slim.py, MODEL_ONNX: ONNX Runtime
without torch; onnx_runtime.py holds the sessions and the file format). Each is checked before it serves:
torch against fp32 torch on the CPU, the slim file's probe images against the scores torch recorded for them.
Every runtime is a classifier.inference.runtime.Runtime.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from classifier.inference.runtime import Runtime
from classifier.settings import Settings

log = logging.getLogger("model")


def load(settings: Settings) -> Runtime:
    """The runtime the settings choose, loaded, checked and warmed up on a thread of its own, which then runs
    every forward pass (Runtime.forward_thread). Raises ModelLoadError with one sentence that says how to fix it.

    Why one thread for both: torch's CPU kernels run on GNU OpenMP, which gives each thread that starts parallel
    work a team of worker threads of its own. A model loaded on one thread and served from another left two teams
    on the cores, and libgomp, seeing more threads than CPUs, stops spinning between layers and sleeps instead:
    a batch of one took 24 ms instead of 19 (docs/latency.md).
    """
    thread = ThreadPoolExecutor(1, "forward")
    try:
        runtime = thread.submit(_load, settings).result()
    except BaseException:
        thread.shutdown()
        raise
    return dataclasses.replace(runtime, predict=on_thread(thread, runtime.predict), forward_thread=thread)


def on_thread(thread: ThreadPoolExecutor, predict: Callable[[np.ndarray], np.ndarray]) -> Callable[[np.ndarray], np.ndarray]:
    """predict, run on `thread` whichever thread calls it (on that thread itself, at once)."""
    owner = thread.submit(threading.get_ident).result()

    def predict_on_its_thread(batch: np.ndarray) -> np.ndarray:
        if threading.get_ident() == owner:
            return predict(batch)
        return thread.submit(predict, batch).result()

    return predict_on_its_thread


def _load(settings: Settings) -> Runtime:
    # Imported here, each only where it serves: a slim replica never imports torch.
    if settings.model_onnx is not None:
        from classifier.inference.runtimes.slim import load_slim

        runtime = load_slim(settings)
    else:
        from classifier.inference.runtimes import torch_runtime

        runtime = torch_runtime.load(settings)
    runtime.predict(np.zeros((1, 3, runtime.preprocessing.crop, runtime.preprocessing.crop), np.float32))
    log.info("ResNet18 loaded from %s (weights %s), backend %s on %s (%s) in %s, scores within %.1e of fp32 torch on "
             "the CPU, %d threads%s", runtime.weights_source, runtime.weights_hash, runtime.backend, runtime.device_type,
             runtime.device_name, runtime.precision, runtime.max_score_difference, runtime.threads,
             f", slim: {runtime.model_file.path.name}, no torch" if runtime.model_file else "")
    return runtime
