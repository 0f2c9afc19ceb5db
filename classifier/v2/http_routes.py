"""The Open Inference Protocol over HTTP (/v2), beside our own routes: protocol.py's shared rules, bound to
HTTP: JSON bodies with binary tensors after them, and errors as {"error": "..."}.

    body --parse (JSON header + binary tensors)--> images or preprocessed inputs
         --protocol.classified--> probabilities --protocol.encode--> outputs (JSON or binary)

Supported extensions: binary tensor data (`Inference-Header-Content-Length`, `binary_data_size`,
`binary_data`, `binary_data_output`) and classification (`parameters: {"classification": k}` on the output).
"""

from __future__ import annotations

import asyncio
import json
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, Path, Request, Response
from pydantic import BaseModel, Field, ValidationError
from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from classifier import rules
from classifier.errors import BadRequest
from classifier.http.base import MODEL_VERSION_HEADER, Served, arrived, deadline, until_disconnected
from classifier.service import Service
from classifier.v2 import protocol
from classifier.v2.protocol import MODEL_NAME, ModelMetadata, ProtocolError, Requested, ServerMetadata

HEADER_LENGTH = "inference-header-content-length"

# A JSON body of numbers grows about eightfold once parsed (a Python float per "0.1,"): large bodies are
# parsed one at a time, off the event loop, so MAX_UPLOAD_BYTES x 8 is the most that parsing ever holds.
LARGE_BODY_BYTES = 1024 * 1024
_large_body_parsing = asyncio.Semaphore(1)

# Health and metadata are open, like /health and /ready; the app includes `inference` behind the API key.
router = APIRouter(prefix="/v2", tags=["Open Inference Protocol"])
inference = APIRouter(prefix="/v2", tags=["Open Inference Protocol"])
ModelName = Annotated[str, Path(description=f"The model's name: {MODEL_NAME}")]


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


# --- Health and metadata -------------------------------------------------------------------------------


@router.get("", response_model=ServerMetadata, summary="Server metadata")
async def server_metadata() -> ServerMetadata:
    return protocol.server_metadata()


@router.get("/health/live", response_class=Response, summary="Liveness: the process answers")
async def live() -> Response:
    return Response(status_code=200)


@router.get("/health/ready", response_class=Response, responses=protocol_errors(503), summary="Readiness: what /ready means")
async def ready(service: Served) -> Response:
    rules.ready(service.ready)
    return Response(status_code=200)


@router.get("/models/{name}", response_model=ModelMetadata, responses=protocol_errors(404), summary="Model metadata")
@router.get("/models/{name}/versions/{version}", response_model=ModelMetadata, responses=protocol_errors(404),
            include_in_schema=False)
async def model_metadata(service: Served, name: ModelName, version: str | None = None) -> ModelMetadata:
    return protocol.model_metadata(service, name, version)


@router.get("/models/{name}/ready", response_class=Response, responses=protocol_errors(404, 503), summary="Model readiness")
@router.get("/models/{name}/versions/{version}/ready", response_class=Response, responses=protocol_errors(404, 503), include_in_schema=False)
async def model_ready(service: Served, name: ModelName, version: str | None = None) -> Response:
    protocol.known_model(service, name, version)
    return await ready(service)


# --- Inference -----------------------------------------------------------------------------------------


def parse(service: Service, body: bytes, headers: Headers) -> tuple[InferenceRequest, list[bytes] | np.ndarray]:
    """The request body -> the inference request and its one input: encoded images, or a batch [N, 3, 224, 224]."""
    header_length = headers.get(HEADER_LENGTH)
    if header_length is not None:
        if not header_length.isdigit() or int(header_length) > len(body):
            raise BadRequest(f"Inference-Header-Content-Length {header_length!r} does not fit a body of {len(body)} bytes")
        header, binary = body[: int(header_length)], body[int(header_length):]
    else:
        header, binary = body, b""
    try:
        request = InferenceRequest.model_validate_json(header)
    except ValidationError as error:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in error.errors()[:5])
        raise BadRequest(f"not a valid inference request: {problems}") from None
    if len(request.inputs) != 1:
        raise BadRequest("send exactly one input: 'image' (BYTES, encoded photos) or 'input' (FP32, [N, 3, 224, 224])")
    tensor = request.inputs[0]
    size = tensor.parameters.get("binary_data_size")
    if size is not None:
        if not isinstance(size, int) or size < 0 or size != len(binary):
            raise BadRequest(f"input {tensor.name!r}: binary_data_size {size!r} does not match the {len(binary)} "
                              "bytes after the JSON header")
        if tensor.data is not None:
            raise BadRequest(f"input {tensor.name!r} has both binary data and a 'data' field")
    elif binary:
        raise BadRequest("binary data follows the JSON header, but the input has no binary_data_size")
    elif tensor.data is None:
        raise BadRequest(f"input {tensor.name!r} has no data: send 'data', or binary data with binary_data_size")

    count = protocol.elements(service, tensor.name, tensor.datatype, tensor.shape)
    if tensor.name == "image":
        return request, (protocol.split_bytes(binary, count) if size is not None
                         else protocol.base64_elements(tensor.data, count))
    if size is not None:
        values = np.frombuffer(binary, dtype="<f4") if len(binary) % 4 == 0 else np.zeros(0, np.float32)
    else:
        try:
            values = np.asarray(tensor.data, dtype=np.float32).reshape(-1)
        except (TypeError, ValueError):
            raise BadRequest("input 'input': 'data' must hold numbers only") from None
        tensor.data = None  # the parsed numbers: eight times the batch's size, no longer needed
    return request, protocol.fp32_images(values, count, protocol.image_shape(service))


def requested_outputs(request: InferenceRequest) -> list[Requested]:
    binary_default = request.parameters.get("binary_data_output") is True
    if request.outputs is None:
        return [Requested(None, binary_default)]
    requested = []
    for output in request.outputs:
        binary = output.parameters.get("binary_data")
        requested.append(protocol.wanted(output.name, output.parameters.get("classification"),
                                binary_default if binary is None else binary is True))
    return requested


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
async def infer(service: Served, request: Request, name: ModelName, version: str | None = None) -> Response:
    """The first bad photo of a request fails the request, naming the element; other requests in the same
    dynamic batch are not affected."""
    protocol.known_model(service, name, version)
    body = await request.body()
    if len(body) < LARGE_BODY_BYTES:
        inference, images = parse(service, body, request.headers)
    else:
        async with _large_body_parsing:
            inference, images = await asyncio.to_thread(parse, service, body, request.headers)
    requested = requested_outputs(inference)
    timeout = rules.deadline(arrived(request), protocol.timeout_s(inference.parameters.get("timeout")),
                             service.settings.request_timeout_s, "parameter 'timeout'")
    probabilities, version = await protocol.classified(service, images, inference.inputs[0].name,
                                             lambda: until_disconnected(request), rules.earliest(deadline(request), timeout))

    outputs, binary = [], []
    for output_wanted in requested:
        output, data = protocol.encode(probabilities, output_wanted, service.runtime.labels)
        if data is not None:
            output["parameters"] = {"binary_data_size": len(data)}
            binary.append(data)
        outputs.append(output)
    document = {"model_name": MODEL_NAME, "model_version": version, "outputs": outputs}
    if inference.id is not None:
        document["id"] = inference.id
    header = json.dumps(document).encode()
    if not binary:
        return Response(header, media_type="application/json", headers={MODEL_VERSION_HEADER: version})
    return Response(header + b"".join(binary), media_type="application/octet-stream",
                    headers={"Inference-Header-Content-Length": str(len(header)), MODEL_VERSION_HEADER: version})


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
        return str(json.loads(body)["detail"])  # http/base.py's handlers write every error, validation too, as a string
    except (ValueError, TypeError, KeyError):
        return body.decode(errors="replace") or "error"
