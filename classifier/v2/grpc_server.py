"""The Open Inference Protocol over gRPC (inference.GRPCInferenceService, protos/inference.proto), beside /v2
over HTTP and answering the same way: the same model name and version, inputs and outputs, limits, API key,
pipeline and answers (protocol.py holds what both bindings share, rules.py who may call and when).

    ModelInferRequest --parse--> photos or an FP32 batch --protocol.classified--> probabilities
                      --protocol.encode--> ModelInferResponse (raw_output_contents)

The server is started by the application's lifespan, handed the service it serves. Our errors (errors.py)
are answered as gRPC status codes, mapped once (CODES). Requests count against the same queue bound
(MAX_QUEUE) and body budget (MAX_BODY_BUFFER_BYTES) as HTTP ones.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc
import numpy as np

from classifier import rules
from classifier.errors import (BadRequest, DeadlineExceeded, InsufficientStorage, NotFound, ServiceError, TooLarge,
                               Unauthorized, Unavailable, Unprocessable)
from classifier.observability import GRPC_LATENCY, GRPC_REQUESTS, refused
from classifier.service import Service
from classifier.v2 import protocol
from classifier.v2.protos import inference_pb2 as pb
from classifier.v2.protos import inference_pb2_grpc as pb_grpc

log = logging.getLogger("app")

# Our errors as gRPC codes (an image's own error, e.g. 415, by its status: the codes are fewer).
CODES = {
    BadRequest: grpc.StatusCode.INVALID_ARGUMENT,
    Unauthorized: grpc.StatusCode.UNAUTHENTICATED,
    NotFound: grpc.StatusCode.NOT_FOUND,
    TooLarge: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Unprocessable: grpc.StatusCode.INVALID_ARGUMENT,
    Unavailable: grpc.StatusCode.UNAVAILABLE,
    InsufficientStorage: grpc.StatusCode.RESOURCE_EXHAUSTED,
    DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
}
BY_STATUS = {400: grpc.StatusCode.INVALID_ARGUMENT, 413: grpc.StatusCode.RESOURCE_EXHAUSTED,
             415: grpc.StatusCode.INVALID_ARGUMENT}


def code(error: ServiceError) -> grpc.StatusCode:
    found = next((code for kind, code in CODES.items() if isinstance(error, kind)), None)
    return found or BY_STATUS.get(error.status, grpc.StatusCode.INTERNAL)

Request = TypeVar("Request")
Response = TypeVar("Response")


def answered(method: Callable[[Any, Request, grpc.aio.ServicerContext], Awaitable[Response]]
             ) -> Callable[[Any, Request, grpc.aio.ServicerContext], Awaitable[Response]]:
    """One place for what every call does: its errors as status codes (never a traceback), and its metrics."""

    @functools.wraps(method)
    async def handler(self: Any, request: Request, context: grpc.aio.ServicerContext) -> Response:
        started, status = time.perf_counter(), grpc.StatusCode.OK
        try:
            return await method(self, request, context)
        except ServiceError as error:
            refused(error)
            status = code(error)
            await context.abort(status, error.detail)
        except grpc.aio.AbortError:
            raise
        except Exception:
            log.exception("unexpected error in gRPC %s", method.__name__)
            status = grpc.StatusCode.INTERNAL
            await context.abort(status, "internal error; it has been logged")
        finally:
            GRPC_REQUESTS.labels(method.__name__, status.name).inc()
            GRPC_LATENCY.labels(method.__name__).observe(time.perf_counter() - started)

    return handler


def parse(service: Service, request: pb.ModelInferRequest) -> tuple[str, list[bytes] | np.ndarray]:
    """The request's one input: its name, and its photos (BYTES) or its batch [N, 3, 224, 224] (FP32)."""
    if len(request.inputs) != 1:
        raise BadRequest("send exactly one input: 'image' (BYTES, encoded photos) or 'input' (FP32, [N, 3, 224, 224])")
    tensor = request.inputs[0]
    count = protocol.elements(service, tensor.name, tensor.datatype, list(tensor.shape))
    raw = request.raw_input_contents[0] if request.raw_input_contents else None
    if tensor.name == "image":
        if raw is not None:
            return tensor.name, protocol.split_bytes(raw, count)
        photos = list(tensor.contents.bytes_contents)
        if len(photos) != count:
            raise BadRequest(f"input 'image': {len(photos)} elements in bytes_contents; the shape says {count}")
        return tensor.name, photos
    values = np.frombuffer(raw, dtype="<f4") if raw is not None and len(raw) % 4 == 0 else \
        np.asarray(tensor.contents.fp32_contents, dtype=np.float32) if raw is None else np.zeros(0, np.float32)
    return tensor.name, protocol.fp32_images(values, count, protocol.image_shape(service))


def wanted_outputs(request: pb.ModelInferRequest) -> list[protocol.Requested]:
    if not request.outputs:
        return [protocol.Requested(None, True)]
    outputs = []
    for output in request.outputs:
        k = output.parameters["classification"].int64_param if "classification" in output.parameters else None
        outputs.append(protocol.wanted(output.name, k, True))
    return outputs


def deadline(service: Service, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext,
             arrived: float) -> float | None:
    """The call's gRPC deadline (what tritonclient's client_timeout sends) or Triton's `timeout` parameter,
    whichever comes first."""
    settings, remaining = service.settings, context.time_remaining()
    parameter = request.parameters["timeout"].int64_param if "timeout" in request.parameters else None
    return rules.earliest(
        # A deadline already past counts as a moment left: refused as late (DEADLINE_EXCEEDED), not as malformed.
        rules.deadline(arrived, max(remaining, 1e-6), settings.request_timeout_s, "the gRPC deadline")
        if remaining is not None else None,
        rules.deadline(arrived, protocol.timeout_s(parameter), settings.request_timeout_s, "parameter 'timeout'"))


class Inference(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, service: Service) -> None:
        self.service = service

    @answered
    async def ServerLive(self, request: pb.ServerLiveRequest, context: grpc.aio.ServicerContext) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    @answered
    async def ServerReady(self, request: pb.ServerReadyRequest, context: grpc.aio.ServicerContext) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.service.ready)

    @answered
    async def ModelReady(self, request: pb.ModelReadyRequest, context: grpc.aio.ServicerContext) -> pb.ModelReadyResponse:
        try:
            protocol.known_model(self.service, request.name, request.version or None)
        except NotFound:  # as Triton answers: not ready, rather than an error
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=self.service.ready)

    @answered
    async def ServerMetadata(self, request: pb.ServerMetadataRequest,
                             context: grpc.aio.ServicerContext) -> pb.ServerMetadataResponse:
        metadata = protocol.server_metadata()
        return pb.ServerMetadataResponse(name=metadata.name, version=metadata.version, extensions=metadata.extensions)

    @answered
    async def ModelMetadata(self, request: pb.ModelMetadataRequest,
                            context: grpc.aio.ServicerContext) -> pb.ModelMetadataResponse:
        metadata = protocol.model_metadata(self.service, request.name, request.version or None)

        def tensors(described: list[protocol.TensorMetadata]) -> list[pb.ModelMetadataResponse.TensorMetadata]:
            return [pb.ModelMetadataResponse.TensorMetadata(name=t.name, datatype=t.datatype, shape=t.shape) for t in described]

        return pb.ModelMetadataResponse(name=metadata.name, versions=metadata.versions, platform=metadata.platform,
                                        inputs=tensors(metadata.inputs), outputs=tensors(metadata.outputs))

    @answered
    async def ModelInfer(self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext) -> pb.ModelInferResponse:
        service, arrived = self.service, time.monotonic()
        rules.authorize(service.settings.api_key, {key.lower(): value for key, value in context.invocation_metadata() or ()
                                                   if isinstance(value, str)})
        rules.accepting(service.ready)
        protocol.known_model(self.service, request.model_name, request.model_version or None)
        size = request.ByteSize()
        service.bodies.take(size)
        try:
            input_name, images = parse(service, request)
            outputs = wanted_outputs(request)
            probabilities, version = await protocol.classified(service, images, input_name,
                                                               deadline=deadline(service, request, context, arrived))
        finally:
            service.bodies.give_back(size)
        response = pb.ModelInferResponse(model_name=protocol.MODEL_NAME, model_version=version, id=request.id)
        for output in outputs:
            described, data = protocol.encode(probabilities, output, service.runtime.labels)
            response.outputs.append(pb.ModelInferResponse.InferOutputTensor(
                name=described["name"], datatype=described["datatype"], shape=described["shape"]))
            response.raw_output_contents.append(data)
        return response


async def serve(service: Service) -> grpc.aio.Server:
    """The gRPC server of this service, listening on HOST:GRPC_PORT (where HTTP listens too). A message over
    MAX_UPLOAD_BYTES is refused by gRPC itself with RESOURCE_EXHAUSTED before it is read whole."""
    settings = service.settings
    host, port = settings.host, settings.grpc_port
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", settings.max_upload_bytes),
                                      ("grpc.max_send_message_length", 64 * 1024 * 1024),
                                      ("grpc.so_reuseport", 0)],  # a port in use is an error, not shared
                             interceptors=service.tracing.grpc_interceptors())
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(Inference(service), server)
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        bound = server.add_insecure_port(address)
    except RuntimeError:  # grpcio raises where older versions returned 0
        bound = 0
    if bound == 0:
        raise SystemExit(f"Cannot listen for gRPC on {address} (HOST, GRPC_PORT): the port is in use, or the "
                         "address is not this machine's")
    await server.start()
    log.info("Open Inference Protocol over gRPC on %s", address)
    return server
