"""ONNX Runtime, and the model files it serves: the sessions of BACKEND=onnxruntime, PRECISION=int8 and the
slim replica, and the self-describing file a slim replica (MODEL_ONNX) runs without torch. No torch here.

The model file (`python -m export --out FILE` writes it) is an ONNX model, images [N, 3, 224, 224] float32
-> logits [N, 1000], whose metadata_props record, under `classifier.`:

    format            "classifier-onnx/1"
    weights           the hash of the weights it was exported from (torch_runtime.fingerprint)
    weights_source    where they came from (torchvision:..., file:NAME)
    labels            the class names in output order, a JSON list
    preprocessing     resize, crop, interpolation, mean, std (JSON): preprocessing.Preprocessing's fields
    probe_images      a JSON list of base64 PNGs
    probe_scores      torch's softmax scores for them through torchvision's pipeline: base64, float32
                      little-endian [images, classes]
    exported_with     the torch and torchvision versions that made it

Any ONNX tool opens it; ONNX Runtime reads the metadata too, so serving it needs neither torch nor onnx.

    file --read--> session + what it records --probe (decode, preprocess, forward)--> within 1e-4, or refused
"""

from __future__ import annotations

import base64
import binascii
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from classifier.errors import ModelLoadError
from classifier.inference.preprocessing import Preprocessing

FORMAT = "classifier-onnx/1"
PROBE_TOLERANCE = 1e-4  # the largest score difference from torch's recorded answers a slim replica accepts

Forward = Callable[[np.ndarray], np.ndarray]  # images [N, 3, H, W] float32 -> logits [N, classes]


class ModelFileError(ModelLoadError):
    """A model file that cannot be served; the message says why and how to fix it."""


def import_onnxruntime():  # noqa: ANN201 (the module)
    """ONNX Runtime, imported only where it runs (not by a torch replica that never runs ONNX)."""
    # Unless told not to, ONNX Runtime's telemetry writes a session file (.ses) into TMPDIR at import.
    os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
    import onnxruntime

    return onnxruntime


def session(graph: bytes | str, threads: int):  # noqa: ANN201 (an onnxruntime.InferenceSession)
    """An ONNX Runtime session on the CPU, its forward pass on `threads` threads."""
    onnxruntime = import_onnxruntime()
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    # ONNX Runtime's threads otherwise spin on after each run, holding the cores the decoders (at the lowest
    # priority) use between passes: without spinning a job ran 0.76 -> 0.86x python -m classify's rate and
    # c=8 gained ~8 %, c=1 unchanged (2-core Xeon).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return onnxruntime.InferenceSession(graph, options, providers=["CPUExecutionProvider"])


def session_forward(running) -> Forward:  # noqa: ANN001 (an onnxruntime.InferenceSession)
    def forward(images: np.ndarray) -> np.ndarray:
        return running.run(None, {"images": images})[0]

    return forward


def recorded(running) -> dict[str, str]:  # noqa: ANN001
    """What a model file records of its making (its classifier.* metadata), without the prefix."""
    found = running.get_modelmeta().custom_metadata_map
    return {key.removeprefix("classifier."): value for key, value in found.items() if key.startswith("classifier.")}


def save(graph: Any, records: dict[str, str], path: Path) -> None:
    """Write an onnx.ModelProto with records as its classifier.* metadata; atomically, so a crash never leaves
    a half-written model under the name (python -m export and python -m quantize write this way)."""
    import onnx  # only the commands that write models need it

    for key, value in records.items():
        graph.metadata_props.append(onnx.StringStringEntryProto(key=f"classifier.{key}", value=value))
    partial = path.with_name(path.name + ".partial")
    onnx.save(graph, str(partial))
    os.replace(partial, path)


def softmax(logits: np.ndarray) -> np.ndarray:
    """Logits [N, classes] -> probabilities, float32, each row summing to 1."""
    exponentials = np.exp(logits - logits.max(axis=1, keepdims=True))
    return exponentials / exponentials.sum(axis=1, keepdims=True)


# --- The slim replica's model file -------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelFile:
    """An opened model file: what runs the forward pass, and what the file records."""

    path: Path
    forward: Forward
    labels: tuple[str, ...]
    preprocessing: Preprocessing
    weights: str
    weights_source: str
    exported_with: str
    probe_images: list[bytes]
    probe_scores: np.ndarray


def describe(labels: tuple[str, ...], preprocessing: Preprocessing, weights: str, weights_source: str,
             probe_images: list[bytes], probe_scores: np.ndarray, exported_with: str) -> dict[str, str]:
    """What python -m export records in the file (the inverse of what read() parses)."""
    return {
        "format": FORMAT,
        "weights": weights,
        "weights_source": weights_source,
        "labels": json.dumps(list(labels)),
        "preprocessing": json.dumps({"resize": preprocessing.resize, "crop": preprocessing.crop,
                                     "interpolation": preprocessing.interpolation,
                                     "mean": list(preprocessing.mean), "std": list(preprocessing.std)}),
        "probe_images": json.dumps([base64.b64encode(image).decode() for image in probe_images]),
        "probe_scores": base64.b64encode(probe_scores.astype("<f4").tobytes()).decode(),
        "exported_with": exported_with,
    }


def read(path: Path, threads: int) -> ModelFile:
    """Open a model file python -m export wrote. Raises ModelFileError when it is missing, not ONNX, or not
    such a file (another format version, fields missing or malformed)."""
    if not path.is_file():
        raise ModelFileError(f"MODEL_ONNX={path} does not exist or is not a file: write it with python -m export --out FILE")
    try:
        running = session(str(path), threads)
    except Exception as error:
        raise ModelFileError(f"MODEL_ONNX={path} is not an ONNX model ({type(error).__name__}): "
                             "write it again with python -m export") from None
    fields = recorded(running)
    if fields.get("format") != FORMAT:
        raise ModelFileError(f"MODEL_ONNX={path} is not a model file python -m export wrote (format "
                             f"{fields.get('format', 'missing')}, expected {FORMAT}): write it with python -m export")
    try:
        labels = tuple(json.loads(fields["labels"]))
        constants = json.loads(fields["preprocessing"])
        preprocessing = Preprocessing(resize=constants["resize"], crop=constants["crop"],
                                      mean=tuple(constants["mean"]), std=tuple(constants["std"]),
                                      interpolation=constants["interpolation"])
        probe_images = [base64.b64decode(image, validate=True) for image in json.loads(fields["probe_images"])]
        probe_scores = np.frombuffer(base64.b64decode(fields["probe_scores"], validate=True), "<f4")
        probe_scores = probe_scores.reshape(len(probe_images), len(labels)).astype(np.float32)
        weights, weights_source, exported_with = fields["weights"], fields["weights_source"], fields["exported_with"]
    except (KeyError, TypeError, ValueError, binascii.Error) as error:
        raise ModelFileError(f"MODEL_ONNX={path} has malformed metadata ({type(error).__name__}: {error}): "
                             "write it again with python -m export") from None
    if not probe_images:
        raise ModelFileError(f"MODEL_ONNX={path} records no probe images: write it again with python -m export")
    return ModelFile(path, session_forward(running), labels, preprocessing, weights, weights_source, exported_with,
                     probe_images, probe_scores)


def probe_difference(forward: Forward, prepare: Callable[[bytes], np.ndarray], probe_images: list[bytes],
                     expected: np.ndarray) -> float:
    """The largest difference between the scores of forward for the probe images, each decoded and prepared as
    any upload is, and the scores torch recorded for them."""
    batch = np.stack([prepare(image) for image in probe_images])
    return float(np.abs(softmax(forward(batch)) - expected).max())


def check_probe(file: ModelFile, prepare: Callable[[bytes], np.ndarray]) -> float:
    """The file's probe difference, refused past PROBE_TOLERANCE: this runtime, this CPU and this decoding give
    torch's answers, or the replica does not start."""
    difference = probe_difference(file.forward, prepare, file.probe_images, file.probe_scores)
    if not difference <= PROBE_TOLERANCE:  # a NaN fails too
        raise ModelFileError(f"MODEL_ONNX={file.path}: on its probe images ONNX Runtime's scores differ from those "
                             f"torch recorded by {difference:.2e} > {PROBE_TOLERANCE:.0e}; the file or this runtime "
                             "does not give the exported model's answers")
    return difference
