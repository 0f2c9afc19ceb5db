"""What every HTTP route shares: the service it is handed, and how our errors (errors.py) are answered over
HTTP: their status, {"detail": "..."}, Retry-After, the API key's challenge, each counted. FastAPI's own errors
(routing, validation) and the job store's failures are answered in the same shape; under /v2 the body is
reshaped to {"error": "..."} (v2/http_routes.ProtocolErrors)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DBAPIError
from starlette.exceptions import HTTPException
from starlette.routing import Match

from classifier.errors import ServiceError
from classifier.inference.runtime import versions_of
from classifier.observability import every_route, refused
from classifier.service import Service

CHALLENGE = {"WWW-Authenticate": 'Bearer realm="classifier"'}


def service_of(request: Request) -> Service:
    """The service the application started with (its lifespan puts it on app.state)."""
    return request.app.state.service


Served = Annotated[Service, Depends(service_of)]

MODEL_VERSION_HEADER = "X-Model-Version"


def answered_by(answers: Sequence[object]) -> dict[str, str]:
    """The header every prediction's answer carries: the version of the model that made its scores (Scores)."""
    versions = versions_of(answers)
    return {MODEL_VERSION_HEADER: versions} if versions else {}


def deadline(request: Request) -> float | None:
    """When the caller stops waiting (the gate read X-Request-Timeout-Ms), or None."""
    return request.scope.get("state", {}).get("deadline")


def arrived(request: Request) -> float:
    """When the gate saw the request (time.monotonic())."""
    return request.scope["state"]["arrived"]


async def until_disconnected(request: Request) -> None:
    # The body has been read, so the next message is the client leaving (or the response being done).
    while (await request.receive())["type"] != "http.disconnect":
        pass


def headers(error: ServiceError) -> dict[str, str]:
    if error.status == 401:
        return CHALLENGE
    return {"Retry-After": str(error.retry_after_s)} if error.retry_after_s is not None else {}


def error_response(error: ServiceError) -> JSONResponse:
    """One of our errors as an HTTP answer (counted): the one place its status, body and headers are made."""
    refused(error)
    return JSONResponse({"detail": error.detail}, error.status, headers=headers(error))


def as_http_exception(error: ServiceError) -> HTTPException:
    """One of our errors, for code that runs while FastAPI reads a request body: it lets only an HTTPException
    through (anything else becomes its 400 "There was an error parsing the body")."""
    refused(error)
    return HTTPException(error.status, error.detail, headers=headers(error))


def add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServiceError)
    async def service_error(request: Request, error: ServiceError) -> JSONResponse:
        return error_response(error)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException) -> JSONResponse:
        headers = dict(error.headers or {})
        if error.status_code == 405:  # every method the path has, not only its first route's
            allowed = {method for route in every_route(app.router.routes) if route.matches(request.scope)[0] != Match.NONE
                       for method in getattr(route, "methods", None) or ()}
            headers["Allow"] = ", ".join(sorted(allowed))
        return JSONResponse({"detail": str(error.detail)}, error.status_code, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        problems = [f"{'.'.join(str(part) for part in problem['loc'])}: {problem['msg']}" for problem in error.errors()]
        hint = " (send the image as multipart/form-data field 'file')" if "body" in str(error.errors()) else ""
        return JSONResponse({"detail": "; ".join(problems) + hint}, 422)

    @app.exception_handler(DBAPIError)
    async def database_error(request: Request, error: DBAPIError) -> JSONResponse:
        """The job store failed (only /jobs uses it: online routes keep answering): its disk is full (507), or
        it cannot be reached (503)."""
        return error_response(service_of(request).jobs.store_failed(error, f"{request.method} {request.url.path}"))
