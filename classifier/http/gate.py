"""What is refused before a request's body is read, by rules.py's rules: a missing or wrong API key (401) on a
keyed route; new work (an online prediction, a job) while shutting down, or an online prediction while
overloaded (503) or with a malformed X-Request-Timeout-Ms (400), or whose deadline the images in flight would
outlast (504, at its deadline); a body over its size limit (413) or over the
budget all bodies share (503). An online prediction's arrival and deadline are noted here, before its body is
read: reading it counts against the deadline. Parsing uploads
only to refuse them would hand the CPU and the memory to clients that are not served."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from fastapi.routing import APIRoute, APIRouter
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from classifier import rules
from classifier.errors import ServiceError
from classifier.http.base import as_http_exception, error_response
from classifier.memory import BodyBudget


class Gate:
    """keyed: the routers whose routes need the API key (when API_KEY is set), and no others; online: the
    endpoints of online predictions, refused at once when the queue is full; submit: the job submission."""

    def __init__(self, app: ASGIApp, api_key: str | None, keyed: tuple[APIRouter, ...],
                 online: set[Callable[..., Any]], submit: Callable[..., Any]) -> None:
        self.app = app
        self.api_key = api_key
        self.keyed = keyed
        self.online = online
        self.submit = submit

    def keyed_route(self, path: str) -> APIRoute | None:
        """The keyed route a path leads to, if any (found before routing, as the gate must)."""
        return next((route for router in self.keyed for route in router.routes if route.path_regex.match(path)), None)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        route = self.keyed_route(scope["path"]) if scope["type"] == "http" else None
        if route is None:
            return await self.app(scope, receive, send)
        arrived = time.monotonic()
        try:
            headers = Headers(scope=scope)
            rules.authorize(self.api_key, headers)
            online = route.endpoint in self.online
            if (online or route.endpoint is self.submit) and scope["method"] == "POST":
                service = scope["app"].state.service
                rules.accepting(service.ready)
                if online:
                    rules.admitting(service.batcher)
                    requested_s = rules.timeout_header_s(headers.get(rules.TIMEOUT_HEADER))
                    deadline = rules.deadline(arrived, requested_s, service.settings.request_timeout_s, rules.TIMEOUT_HEADER)
                    scope.setdefault("state", {}).update(arrived=arrived, deadline=deadline)  # request.state's
                    await service.in_time(deadline, 1)  # a hopeless request's body is never read
        except ServiceError as error:
            return await error_response(error)(scope, receive, send)
        await self.app(scope, receive, send)


class BodyLimits:
    """Two bounds on HTTP request bodies, each decided from Content-Length before the body is read, and for a
    chunked body (or one longer than it declared) as it arrives:

    - one body: at most max_body bytes (MAX_UPLOAD_BYTES), else 413; paths in `larger` have limits of their
      own (path -> (bytes, setting name)), e.g. job submissions (MAX_JOB_BYTES);
    - all bodies at once: what `budget` allows, else 503 with Retry-After. A request gives its bytes back
      when it is answered.

    A body too large for any budget gets its 413 before the shared budget is consulted.
    """

    def __init__(self, app: ASGIApp, max_body: int, budget: BodyBudget, larger: dict[str, tuple[int, str]]) -> None:
        self.app = app
        self.max_body = max_body
        self.larger = larger
        self.budget = budget

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        budget = self.budget
        max_body, setting = self.larger.get(scope["path"], (self.max_body, "MAX_UPLOAD_BYTES"))
        declared = Headers(scope=scope).get("content-length", "")
        reserved = int(declared) if declared.isdigit() else 0
        try:
            rules.body_within(reserved, max_body, setting)
            budget.take(reserved)
        except ServiceError as error:
            return await error_response(error)(scope, receive, send)
        received = 0

        async def counted_receive() -> Message:
            nonlocal received, reserved
            message = await receive()
            received += len(message.get("body", b""))
            try:
                rules.body_within(received, max_body, setting)
                if received > reserved:  # chunked, or more than declared: count the rest as it comes
                    budget.take(received - reserved)
                    reserved = received
            except ServiceError as error:
                raise as_http_exception(error) from None  # answered by the app's handler
            return message

        try:
            await self.app(scope, counted_receive, send)
        finally:
            budget.give_back(reserved)
