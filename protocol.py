"""The Open Inference Protocol (KServe V2, Triton's HTTP/REST API) beside our own routes, over the same
decoders, batcher and forward pass, limits, API key and error statuses.

    body --parse (JSON header + binary tensors)--> images or preprocessed inputs
         --classify (service.py's, through the batcher)--> probabilities --encode--> outputs (JSON or binary)

Supported extensions: binary tensor data (`Inference-Header-Content-Length`, `binary_data_size`,
`binary_data`, `binary_data_output`) and classification (`parameters: {"classification": k}` on the output).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import math
import struct
from dataclasses import dataclass
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, Path, Request, Response
from pydantic import BaseModel, Field, ValidationError
from starlette.datastructures import Headers, MutableHeaders
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

import model
from labels import LABELS
from outcomes import failure, top_k
from service import service, too_many
from settings import get_settings

MODEL_NAME = "resnet18"
MODEL_VERSION = "1"
EXTENSIONS = ["binary_tensor_data", "classification"]
HEADER_LENGTH = "inference-header-content-length"
IMAGE_SHAPE = (3, model.CROP_SIZE, model.CROP_SIZE)
# Triton's names for what runs the forward pass: ONNX Runtime for a slim replica, BACKEND=onnxruntime and int8.
PLATFORM = "onnxruntime_onnx" if model.served.backend == "onnxruntime" else "pytorch"

# A JSON body of numbers grows about eightfold once parsed (a Python float per "0.1,"): large bodies are
# parsed one at a time, off the event loop, so MAX_UPLOAD_BYTES x 8 is the most that parsing ever holds.
LARGE_BODY_BYTES = 1024 * 1024
_large_body_parsing = asyncio.Semaphore(1)

# Health and metadata are open, like /health and /ready; app.py includes `inference` behind the API key.
router = APIRouter(prefix="/v2", tags=["Open Inference Protocol"])
inference = APIRouter(prefix="/v2", tags=["Open Inference Protocol"])
ModelName = Annotated[str, Path(description=f"The model's name: {MODEL_NAME}")]


# --- The protocol's documents --------------------------------------------------------------------------


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


class RequestInput(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Any] = {}
    data: list[Any] | None = None


class RequestOutput(BaseModel):
    name: str
    parameters: dict[str, Any] = {}


class InferenceRequest(BaseModel):
    id: str | None = Field(None, max_length=256)
    parameters: dict[str, Any] = {}
    inputs: list[RequestInput] = Field(min_length=1)
    outputs: list[RequestOutput] | None = None


class ProtocolError(BaseModel):
    error: str = Field(examples=["element 2 of input 'image': the file is not an image this service can read"])


def inlined(schema: dict[str, Any]) -> dict[str, Any]:
    """A model's JSON schema with its $defs written in place: pydantic's "#/$defs/..." references mean
    nothing inside an OpenAPI operation (ReDoc fails on them), and these models have no cycles."""
    definitions = schema.pop("$defs", {})

    def resolve(node: Any) -> Any:
        if isinstance(node, dict):
            if "$ref" in node:
                return resolve(definitions[node["$ref"].rsplit("/", 1)[-1]])
            return {key: resolve(value) for key, value in node.items()}
        return [resolve(item) for item in node] if isinstance(node, list) else node

    return resolve(schema)


def protocol_errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return {status: {"model": ProtocolError} for status in statuses}


INPUTS = [
    TensorMetadata(name="image", datatype="BYTES", shape=[-1]),  # encoded photos, decoded and preprocessed here
    TensorMetadata(name="input", datatype="FP32", shape=[-1, *IMAGE_SHAPE]),  # preprocessed by the client
]
OUTPUTS = [TensorMetadata(name="probabilities", datatype="FP32", shape=[-1, len(LABELS)])]


def bad_request(message: str) -> HTTPException:
    return HTTPException(400, message)


def known_model(name: str, version: str | None = None) -> None:
    if name != MODEL_NAME or version not in (None, MODEL_VERSION):
        raise HTTPException(404, f"unknown model {name!r}" + (f" version {version!r}" if version else "")
                            + f"; this server serves {MODEL_NAME!r} version {MODEL_VERSION}")


# --- Health and metadata -------------------------------------------------------------------------------


@router.get("", response_model=ServerMetadata, summary="Server metadata")
async def server_metadata() -> ServerMetadata:
    return ServerMetadata(name="resnet18-classifier", version="1.0.0", extensions=EXTENSIONS)


@router.get("/health/live", response_class=Response, summary="Liveness: the process answers")
async def live() -> Response:
    return Response(status_code=200)


@router.get("/health/ready", response_class=Response, responses=protocol_errors(503), summary="Readiness: what /ready means")
async def ready() -> Response:
    if not service.ready:
        raise HTTPException(503, "the model is not ready")
    return Response(status_code=200)


@router.get("/models/{name}", response_model=ModelMetadata, responses=protocol_errors(404), summary="Model metadata")
@router.get("/models/{name}/versions/{version}", response_model=ModelMetadata, responses=protocol_errors(404),
            include_in_schema=False)
async def model_metadata(name: ModelName, version: str | None = None) -> ModelMetadata:
    known_model(name, version)
    return ModelMetadata(name=MODEL_NAME, versions=[MODEL_VERSION], platform=PLATFORM, inputs=INPUTS, outputs=OUTPUTS)


@router.get("/models/{name}/ready", response_class=Response, responses=protocol_errors(404, 503), summary="Model readiness")
@router.get("/models/{name}/versions/{version}/ready", response_class=Response, responses=protocol_errors(404, 503), include_in_schema=False)
async def model_ready(name: ModelName, version: str | None = None) -> Response:
    known_model(name, version)
    return await ready()


# --- Inference -----------------------------------------------------------------------------------------


@dataclass
class Requested:
    """One output the client asked for: probabilities, or their top k as "score:index:label" strings."""

    classification: int | None
    binary: bool


def parse(body: bytes, headers: Headers) -> tuple[InferenceRequest, list[bytes] | np.ndarray]:
    """The request body -> the inference request and its one input: encoded images, or a batch [N, 3, 224, 224]."""
    header_length = headers.get(HEADER_LENGTH)
    if header_length is not None:
        if not header_length.isdigit() or int(header_length) > len(body):
            raise bad_request(f"Inference-Header-Content-Length {header_length!r} does not fit a body of {len(body)} bytes")
        header, binary = body[: int(header_length)], body[int(header_length):]
    else:
        header, binary = body, b""
    try:
        request = InferenceRequest.model_validate_json(header)
    except ValidationError as error:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in error.errors()[:5])
        raise bad_request(f"not a valid inference request: {problems}") from None
    if len(request.inputs) != 1:
        raise bad_request("send exactly one input: 'image' (BYTES, encoded photos) or 'input' (FP32, [N, 3, 224, 224])")
    tensor = request.inputs[0]
    size = tensor.parameters.get("binary_data_size")
    if size is not None:
        if not isinstance(size, int) or size < 0 or size != len(binary):
            raise bad_request(f"input {tensor.name!r}: binary_data_size {size!r} does not match the {len(binary)} "
                              "bytes after the JSON header")
        if tensor.data is not None:
            raise bad_request(f"input {tensor.name!r} has both binary data and a 'data' field")
    elif binary:
        raise bad_request("binary data follows the JSON header, but the input has no binary_data_size")
    elif tensor.data is None:
        raise bad_request(f"input {tensor.name!r} has no data: send 'data', or binary data with binary_data_size")

    count = elements(tensor.name, tensor.datatype, tensor.shape)
    if tensor.name == "image":
        return request, (split_bytes(binary, count) if size is not None else base64_elements(tensor.data, count))
    if size is not None:
        values = np.frombuffer(binary, dtype="<f4") if len(binary) % 4 == 0 else np.zeros(0, np.float32)
    else:
        try:
            values = np.asarray(tensor.data, dtype=np.float32).reshape(-1)
        except (TypeError, ValueError):
            raise bad_request("input 'input': 'data' must hold numbers only") from None
        tensor.data = None  # the parsed numbers: eight times the batch's size, no longer needed
    return request, fp32_images(values, count)


def elements(name: str, datatype: str, shape: list[int]) -> int:
    """How many images an input holds, once its name, datatype and shape are what this model takes (both
    bindings, HTTP and gRPC): 'image' BYTES [N] or 'input' FP32 [N, 3, 224, 224], 1 <= N <= MAX_BATCH_FILES."""
    count = shape[0] if shape else 0
    if name not in ("image", "input"):
        raise bad_request(f"unknown input {name!r}: this model takes 'image' (BYTES) or 'input' (FP32)")
    if count > get_settings().max_batch_files:
        raise too_many(count, get_settings().max_batch_files, "MAX_BATCH_FILES")
    if count < 1:
        raise bad_request(f"input {name!r}: {count} elements; send at least 1")
    want = ("BYTES", [count]) if name == "image" else ("FP32", [count, *IMAGE_SHAPE])
    if (datatype, list(shape)) != want:
        raise bad_request(f"input {name!r} must be {want[0]} with shape {want[1]}; got {datatype} {list(shape)}")
    return count


def split_bytes(binary: bytes, count: int) -> list[bytes]:
    """BYTES in binary form: each element a 4-byte little-endian length, then that many bytes."""
    elements, offset = [], 0
    for index in range(count):
        if offset + 4 > len(binary):
            raise bad_request(f"input 'image': the binary data ends before element {index}")
        (length,) = struct.unpack_from("<I", binary, offset)
        elements.append(binary[offset + 4 : offset + 4 + length])
        offset += 4 + length
        if offset > len(binary):
            raise bad_request(f"input 'image': element {index} is cut off")
    if offset != len(binary):
        raise bad_request(f"input 'image': {len(binary) - offset} bytes follow its {count} elements")
    return elements


def base64_elements(data: list[Any], count: int) -> list[bytes]:
    """BYTES in JSON: each element a string, the photo's bytes in base64 (JSON strings cannot carry raw bytes)."""
    if len(data) != count or not all(isinstance(element, str) for element in data):
        raise bad_request(f"input 'image': 'data' must be {count} strings, each a photo in base64")
    try:
        return [base64.b64decode(element, validate=True) for element in data]
    except binascii.Error:
        raise bad_request("input 'image': an element of 'data' is not base64") from None


def fp32_images(values: np.ndarray, count: int) -> np.ndarray:
    """The flat numbers of input 'input' -> its images [N, 3, 224, 224], checked for size and finiteness."""
    expected = count * math.prod(IMAGE_SHAPE)
    if values.size != expected:
        raise bad_request(f"input 'input': {values.size} numbers; [{count}, 3, 224, 224] FP32 is {expected} "
                          f"({expected * 4} bytes in binary)")
    if not np.isfinite(values).all():
        raise bad_request("input 'input': the values must be finite numbers (no NaN or infinity)")
    return values.astype(np.float32, copy=True).reshape(count, *IMAGE_SHAPE)  # writable, its own


def requested_outputs(request: InferenceRequest) -> list[Requested]:
    binary_default = request.parameters.get("binary_data_output") is True
    if request.outputs is None:
        return [Requested(None, binary_default)]
    requested = []
    for output in request.outputs:
        binary = output.parameters.get("binary_data")
        requested.append(wanted(output.name, output.parameters.get("classification"),
                                binary_default if binary is None else binary is True))
    return requested


def wanted(name: str, k: object, binary: bool) -> Requested:
    """An output asked for (both bindings): 'probabilities', or with classification=k their top k."""
    if name != "probabilities":
        raise bad_request(f"unknown output {name!r}: this model has 'probabilities'")
    if k is not None and (not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= len(LABELS)):
        raise bad_request(f"classification must be a whole number from 1 to {len(LABELS)}; got {k!r}")
    return Requested(k, binary)


def encode(probabilities: np.ndarray, requested: Requested) -> tuple[dict[str, Any], bytes | None]:
    """One output: its JSON description, and its binary data when asked for as binary."""
    count = probabilities.shape[0]
    if requested.classification is None:
        output = {"name": "probabilities", "datatype": "FP32", "shape": [count, len(LABELS)]}
        if requested.binary:
            return output, probabilities.astype("<f4").tobytes()
        return {**output, "data": probabilities.reshape(-1).tolist()}, None
    k = requested.classification
    # Triton's classification format, "score:index:label"; the score as /predict/topk gives it.
    strings = [f"{best.score!r}:{best.index}:{best.label}" for row in probabilities for best in top_k(row, k)]
    output = {"name": "probabilities", "datatype": "BYTES", "shape": [count, k]}
    if requested.binary:
        return output, b"".join(struct.pack("<I", len(data)) + data for data in (s.encode() for s in strings))
    return {**output, "data": strings}, None


@inference.post(
    "/models/{name}/infer",
    responses={200: {"content": {"application/octet-stream": {}}}, **protocol_errors(400, 404, 413, 415, 503)},
    summary="Inference: encoded photos (BYTES) or preprocessed images (FP32) -> probabilities",
    openapi_extra={"requestBody": {"required": True, "content": {
        "application/json": {"schema": inlined(InferenceRequest.model_json_schema())},
        "application/octet-stream": {"schema": {"type": "string", "format": "binary"},
                                     "description": "The JSON header, then binary tensors (Inference-Header-Content-Length)"},
    }}},
)
@inference.post("/models/{name}/versions/{version}/infer", include_in_schema=False)
async def infer(request: Request, name: ModelName, version: str | None = None) -> Response:
    """The first bad photo of a request fails the request, naming the element; other requests in the same
    dynamic batch are not affected."""
    known_model(name, version)
    body = await request.body()
    if len(body) < LARGE_BODY_BYTES:
        inference, images = parse(body, request.headers)
    else:
        async with _large_body_parsing:
            inference, images = await asyncio.to_thread(parse, body, request.headers)
    requested = requested_outputs(inference)
    probabilities = await classified(images, inference.inputs[0].name, request)

    outputs, binary = [], []
    for output_wanted in requested:
        output, data = encode(probabilities, output_wanted)
        if data is not None:
            output["parameters"] = {"binary_data_size": len(data)}
            binary.append(data)
        outputs.append(output)
    document = {"model_name": MODEL_NAME, "model_version": MODEL_VERSION, "outputs": outputs}
    if inference.id is not None:
        document["id"] = inference.id
    header = json.dumps(document).encode()
    if not binary:
        return Response(header, media_type="application/json")
    return Response(header + b"".join(binary), media_type="application/octet-stream",
                    headers={"Inference-Header-Content-Length": str(len(header))})


async def classified(images: list[bytes] | np.ndarray, input_name: str, request: Request | None = None) -> np.ndarray:
    """An input's images -> their probabilities [N, 1000], through the service's one pipeline (both bindings).
    The first bad image fails the request, naming the element, counted as on /predict; other requests in the
    same dynamic batch are not affected."""
    answers = await service.classify(list(images), request)
    for index, answer in enumerate(answers):
        if isinstance(answer, Exception):
            refused = failure(answer)
            raise HTTPException(refused.status, f"element {index} of input {input_name!r}: {refused.detail}")
    return np.stack(answers)


# --- Errors in the protocol's shape --------------------------------------------------------------------


class ProtocolErrors:
    """Under /v2, error bodies in the protocol's shape, {"error": "<message>"}, whoever produced them (the
    API-key gate, the body limits, a route, validation): the statuses and messages stay our API's."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/v2"):
            return await self.app(scope, receive, send)
        start: Message | None = None
        body = b""

        async def send_reshaped(message: Message) -> None:
            nonlocal start, body
            if message["type"] == "http.response.start" and message["status"] >= 400:
                start = message  # held until its body is known
                return
            if start is None or message["type"] != "http.response.body":
                return await send(message)
            body += message.get("body", b"")
            if message.get("more_body"):
                return
            reshaped = json.dumps({"error": error_message(body)}).encode()
            headers = MutableHeaders(raw=list(start["headers"]))
            headers["content-type"] = "application/json"
            headers["content-length"] = str(len(reshaped))
            await send({**start, "headers": headers.raw})
            await send({"type": "http.response.body", "body": reshaped})

        await self.app(scope, receive, send_reshaped)


def error_message(body: bytes) -> str:
    try:
        return str(json.loads(body)["detail"])  # app.py's handlers write every error, validation too, as a string
    except (ValueError, TypeError, KeyError):
        return body.decode(errors="replace") or "error"

