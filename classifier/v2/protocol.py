"""The Open Inference Protocol (KServe V2, Triton's HTTP/REST and gRPC APIs): what its two bindings share,
so /v2 over HTTP (http_routes.py) and over gRPC (grpc_server.py) answer the same way: the model's name and
version, its metadata, the inputs it takes and the outputs it gives, and the one pipeline behind them.

    input (encoded photos, or a batch [N, 3, 224, 224]) --elements (shape, datatype, MAX_BATCH_FILES)-->
          --classified (service.classify, through the batcher)--> probabilities --encode--> an output

Errors are errors.py's; each binding answers them in its own terms.
"""

from __future__ import annotations

import base64
import binascii
import math
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydantic import BaseModel, Field

from classifier import rules
from classifier.errors import BadRequest, NotFound, ServiceError
from classifier.inference.outcomes import failure, top_k
from classifier.inference.runtime import NUM_CLASSES, versions_of
from classifier.service import Service

MODEL_NAME = "resnet18"
EXTENSIONS = ["binary_tensor_data", "classification"]


class TensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int]


class ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]


class ProtocolError(BaseModel):
    error: str = Field(examples=["element 2 of input 'image': the file is not an image this service can read"])


def image_shape(service: Service) -> tuple[int, int, int]:
    """One preprocessed image, as input 'input' takes it: [3, 224, 224]."""
    crop = service.runtime.preprocessing.crop
    return 3, crop, crop


def server_metadata() -> ServerMetadata:
    return ServerMetadata(name="resnet18-classifier", version="1.0.0", extensions=EXTENSIONS)


def model_metadata(service: Service, name: str, version: str | None = None) -> ModelMetadata:
    known_model(service, name, version)
    # Triton's names for what runs the forward pass: ONNX Runtime for a slim replica, BACKEND=onnxruntime and int8.
    platform = "onnxruntime_onnx" if service.runtime.backend == "onnxruntime" else "pytorch"
    inputs = [TensorMetadata(name="image", datatype="BYTES", shape=[-1]),  # encoded photos, decoded and preprocessed here
              TensorMetadata(name="input", datatype="FP32", shape=[-1, *image_shape(service)])]  # preprocessed by the client
    outputs = [TensorMetadata(name="probabilities", datatype="FP32", shape=[-1, len(service.runtime.labels)])]
    return ModelMetadata(name=MODEL_NAME, versions=[service.runtime.version], platform=platform, inputs=inputs,
                         outputs=outputs)


def known_model(service: Service, name: str, version: str | None = None) -> None:
    """The one model served, in the one version it is served in (Runtime.version); anything else is 404."""
    served = service.runtime.version
    if name != MODEL_NAME or version not in (None, served):
        raise NotFound(f"unknown model {name!r}" + (f" version {version!r}" if version else "")
                       + f"; this server serves {MODEL_NAME!r} version {served}")


@dataclass
class Requested:
    """One output the client asked for: probabilities, or their top k as "score:index:label" strings."""

    classification: int | None
    binary: bool


def elements(service: Service, name: str, datatype: str, shape: list[int]) -> int:
    """How many images an input holds, once its name, datatype and shape are what this model takes (both
    bindings, HTTP and gRPC): 'image' BYTES [N] or 'input' FP32 [N, 3, 224, 224], 1 <= N <= MAX_BATCH_FILES."""
    count = shape[0] if shape else 0
    if name not in ("image", "input"):
        raise BadRequest(f"unknown input {name!r}: this model takes 'image' (BYTES) or 'input' (FP32)")
    rules.within(count, service.settings.max_batch_files, "MAX_BATCH_FILES")
    if count < 1:
        raise BadRequest(f"input {name!r}: {count} elements; send at least 1")
    want = ("BYTES", [count]) if name == "image" else ("FP32", [count, *image_shape(service)])
    if (datatype, list(shape)) != want:
        raise BadRequest(f"input {name!r} must be {want[0]} with shape {want[1]}; got {datatype} {list(shape)}")
    return count


def split_bytes(binary: bytes, count: int) -> list[bytes]:
    """BYTES in binary form: each element a 4-byte little-endian length, then that many bytes."""
    elements, offset = [], 0
    for index in range(count):
        if offset + 4 > len(binary):
            raise BadRequest(f"input 'image': the binary data ends before element {index}")
        (length,) = struct.unpack_from("<I", binary, offset)
        elements.append(binary[offset + 4 : offset + 4 + length])
        offset += 4 + length
        if offset > len(binary):
            raise BadRequest(f"input 'image': element {index} is cut off")
    if offset != len(binary):
        raise BadRequest(f"input 'image': {len(binary) - offset} bytes follow its {count} elements")
    return elements


def base64_elements(data: list[Any], count: int) -> list[bytes]:
    """BYTES in JSON: each element a string, the photo's bytes in base64 (JSON strings cannot carry raw bytes)."""
    if len(data) != count or not all(isinstance(element, str) for element in data):
        raise BadRequest(f"input 'image': 'data' must be {count} strings, each a photo in base64")
    try:
        return [base64.b64decode(element, validate=True) for element in data]
    except binascii.Error:
        raise BadRequest("input 'image': an element of 'data' is not base64") from None


def fp32_images(values: np.ndarray, count: int, shape: tuple[int, int, int]) -> np.ndarray:
    """The flat numbers of input 'input' -> its images [N, 3, 224, 224], checked for size and finiteness."""
    expected = count * math.prod(shape)
    if values.size != expected:
        raise BadRequest(f"input 'input': {values.size} numbers; {[count, *shape]} FP32 is {expected} "
                         f"({expected * 4} bytes in binary)")
    if not np.isfinite(values).all():
        raise BadRequest("input 'input': the values must be finite numbers (no NaN or infinity)")
    return values.astype(np.float32, copy=True).reshape(count, *shape)  # writable, its own


def wanted(name: str, k: object, binary: bool) -> Requested:
    """An output asked for (both bindings): 'probabilities', or with classification=k their top k."""
    if name != "probabilities":
        raise BadRequest(f"unknown output {name!r}: this model has 'probabilities'")
    if k is not None and (not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= NUM_CLASSES):
        raise BadRequest(f"classification must be a whole number from 1 to {NUM_CLASSES}; got {k!r}")
    return Requested(k, binary)


def encode(probabilities: np.ndarray, requested: Requested, labels: tuple[str, ...]) -> tuple[dict[str, Any], bytes | None]:
    """One output: its JSON description, and its binary data when asked for as binary."""
    count = probabilities.shape[0]
    if requested.classification is None:
        output = {"name": "probabilities", "datatype": "FP32", "shape": [count, len(labels)]}
        if requested.binary:
            return output, probabilities.astype("<f4").tobytes()
        return {**output, "data": probabilities.reshape(-1).tolist()}, None
    k = requested.classification
    # Triton's classification format, "score:index:label"; the score as /predict/topk gives it.
    strings = [f"{best.score!r}:{best.index}:{best.label}" for row in probabilities for best in top_k(row, k, labels)]
    output = {"name": "probabilities", "datatype": "BYTES", "shape": [count, k]}
    if requested.binary:
        return output, b"".join(struct.pack("<I", len(data)) + data for data in (s.encode() for s in strings))
    return {**output, "data": strings}, None


def timeout_s(value: object) -> float | None:
    """Triton's `timeout` request parameter (its schedule-policy extension), in seconds: it is sent in
    microseconds, 0 or absent meaning none (both bindings; rules.deadline caps it at REQUEST_TIMEOUT_S)."""
    if value is None or value == 0:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise BadRequest(f"parameter 'timeout' must be a whole number of microseconds; got {value!r}")
    return value / 1_000_000


async def classified(service: Service, images: list[bytes] | np.ndarray, input_name: str,
                     until_gone: Callable[[], Awaitable[None]] | None = None, deadline: float | None = None
                     ) -> tuple[np.ndarray, str]:
    """An input's images -> their probabilities [N, 1000] and the model version that made them (an answer's
    model_version), through the service's one pipeline (both bindings).
    The first bad image fails the request, naming the element, counted as on /predict; other requests in the
    same dynamic batch are not affected."""
    answers = await service.classify(list(images), until_gone, deadline)
    for index, answer in enumerate(answers):
        if isinstance(answer, Exception):
            refused = failure(answer)
            error = ServiceError(f"element {index} of input {input_name!r}: {refused.detail}")  # counted by failure
            error.status = refused.status
            raise error
    return np.stack(answers), versions_of(answers)
