"""The OpenAPI document: what the running service does, for /docs and for generated clients.

FastAPI's document, corrected to this service's answers and settings: its errors' own shapes ({"detail": "..."},
{"error": "..."} under /v2), 422 included; the limits a client must keep to (MAX_BATCH_FILES, MAX_JOB_FILES);
a job's webhook only where one may be given; the deadline an online prediction may carry (X-Request-Timeout-Ms)
and its 504; and, when API_KEY is set, the two ways to send the key, required
on every keyed operation, with its 401 (without a key nothing asks for one, as the service does not).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, FastAPI

from classifier import rules
from classifier.http.base import MODEL_VERSION_HEADER
from classifier.observability import every_route
from classifier.schemas import FILE_PART, Error
from classifier.settings import Settings
from classifier.v2.protocol import ProtocolError

SECURITY_SCHEMES = {
    "HTTPBearer": {"type": "http", "scheme": "bearer", "description": "The service's API_KEY"},
    "APIKeyHeader": {"type": "apiKey", "in": "header", "name": "X-API-Key", "description": "The same key, in a header of its own"},
}


def job_submission(settings: Settings) -> dict[str, Any]:
    """The multipart body of POST /jobs, as this service takes it: files, objects and results_to only where buckets
    are allowed (JOBS_ALLOWED_BUCKETS), and a webhook only where one may be given (WEBHOOK_ALLOWED_HOSTS), to one
    of those hosts."""
    fields: dict[str, Any] = {"files": {"type": "array", "items": FILE_PART,
                                        "minItems": 1, "maxItems": settings.max_job_files,
                                        "description": f"1 to {settings.max_job_files} photos (MAX_JOB_FILES), "
                                                       "field repeated; more: 413"}}
    if settings.webhook_allowed_hosts:
        hosts = "|".join(re.escape(host) for host in settings.webhook_allowed_hosts)
        fields["webhook"] = {"type": "string", "format": "uri", "pattern": f"^https?://({hosts})([:/?#]|$)",
                             "description": "Called with the job when it ends, signed (Standard Webhooks); "
                                            "its host must be one of WEBHOOK_ALLOWED_HOSTS"}
    required = ["files"]
    if settings.jobs_allowed_buckets:
        buckets = "|".join(re.escape(bucket) for bucket in settings.jobs_allowed_buckets)
        fields["files"]["minItems"] = 0
        fields["objects"] = {"type": "array", "maxItems": settings.max_job_files, "items": {
            "type": "string", "pattern": f"^s3://({buckets})/"},
            "description": "Photos in object storage instead of (or beside) files, field repeated: s3://bucket/key, or "
                           "s3://bucket/prefix/ for every image below it; each read when its image is classified. "
                           "Buckets: JOBS_ALLOWED_BUCKETS; any other is 403"}
        fields["results_to"] = {"type": "string", "pattern": f"^s3://({buckets})/.",
                                "description": "s3://bucket/key: the results, as JSON lines, written there when the job "
                                               "finishes (before its webhook)"}
        required = []
    return {"required": True, "content": {"multipart/form-data": {"schema": {
        "type": "object", "required": required, "properties": fields, "additionalProperties": False}}}}


def timeout_header(settings: Settings) -> dict[str, Any]:
    return {"name": rules.TIMEOUT_HEADER, "in": "header", "required": False,
            "schema": {"type": "number", "exclusiveMinimum": 0},
            "description": "How long you will wait for the answer, in milliseconds, from the request's arrival (more than "
                           f"REQUEST_TIMEOUT_S, {settings.request_timeout_s:g} s, counts as that): past it, images still "
                           "waiting are dropped before decoding or before their forward pass, and the answer is 504"}


def document_for(app: FastAPI, settings: Settings, keyed: tuple[APIRouter, ...],
                 online: set[Callable[..., Any]]) -> Callable[[], dict[str, Any]]:
    """app.openapi for this app: FastAPI's document, corrected once, then kept. online: the endpoints of online
    predictions (they take a deadline)."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        document = generate()
        schemas = document.setdefault("components", {}).setdefault("schemas", {})
        for shape in (Error, ProtocolError):
            schemas.setdefault(shape.__name__, shape.model_json_schema())
        keyed_operations = {(route.path_format, method.lower()) for router in keyed for route in router.routes
                            for method in route.methods}
        online_operations = {(route.path_format, method.lower()) for route in every_route(app.router.routes)
                             if getattr(route, "endpoint", None) in online for method in route.methods}
        for path, operations in document["paths"].items():
            error = {"$ref": f"#/components/schemas/{'ProtocolError' if path.startswith('/v2') else 'Error'}"}
            for method, operation in operations.items():
                if "422" in operation["responses"]:  # FastAPI's list of problems; this service sends one sentence
                    operation["responses"]["422"] = {"description": "The request's parameters or body are not valid",
                                                     "content": {"application/json": {"schema": error}}}
                if (path, method) in online_operations:
                    operation.setdefault("parameters", []).append(timeout_header(settings))
                    operation["responses"]["200"].setdefault("headers", {})[MODEL_VERSION_HEADER] = {
                        "description": "The version of the model that made the answer (GET /model's version)",
                        "schema": {"type": "string"}}
                    operation["responses"]["504"] = {"description": "The request's deadline passed before its answer was "
                                                     "ready", "content": {"application/json": {"schema": error}}}
                if settings.api_key is not None and (path, method) in keyed_operations:
                    operation["security"] = [{name: []} for name in SECURITY_SCHEMES]
                    operation["responses"]["401"] = {"description": "No valid API key",
                                                     "content": {"application/json": {"schema": error}}}
        batch = document["paths"]["/predict/batch"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
        files = schemas[batch["$ref"].rsplit("/", 1)[1]]["properties"]["files"]
        files["items"] = FILE_PART  # bytes, whatever they spell
        files["maxItems"] = settings.max_batch_files
        files["description"] = (f"1 to {settings.max_batch_files} photos (MAX_BATCH_FILES), field repeated; more: 413")
        document["paths"]["/jobs"]["post"]["requestBody"] = job_submission(settings)
        for unused in ("HTTPValidationError", "ValidationError"):
            schemas.pop(unused, None)
        if settings.api_key is not None:
            document["components"]["securitySchemes"] = SECURITY_SCHEMES
        app.openapi_schema = document
        return document

    return openapi
