"""Traces through a real OTLP/HTTP receiver: the service exports protobuf over HTTP to a small server here, which
decodes what a collector would. A caller's traceparent is continued over HTTP and gRPC; each request's trace
holds its stages (read, decode, queue, the linked forward pass, the response); a job's image spans link back to
its submission on another replica after a SIGKILL, and its webhook carries the trace; a collector that is slow
or down costs no request anything, and what it cannot take is counted."""

from __future__ import annotations

import json
import secrets
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.grpc as tritonclient
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from support import (REPO, Handler, free_port, http_server, metric, photo_bytes, start_server, submit, upload, variants,
                     wait_for, wait_until)

pytestmark = pytest.mark.server

WEBHOOK_SECRET = "whsec_MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3"


@dataclass
class Span:
    name: str
    trace_id: str
    span_id: str
    parent: str
    start: int
    end: int
    links: list[tuple[str, str]]
    attributes: dict
    resource: dict


@dataclass
class Collector:
    """An OTLP/HTTP receiver: POST /v1/traces with protobuf, every span kept. While `hang` is set it answers
    nothing until the test ends (a collector that is up but stuck)."""

    url: str = ""
    spans: list[Span] = field(default_factory=list)
    hang: threading.Event = field(default_factory=threading.Event)
    released: threading.Event = field(default_factory=threading.Event)

    def in_trace(self, trace_id: str) -> list[Span]:
        return [span for span in self.spans if span.trace_id == trace_id]

    def named(self, name: str) -> list[Span]:
        return [span for span in self.spans if span.name == name]


def value(any_value) -> object:
    kind = any_value.WhichOneof("value")
    return getattr(any_value, kind) if kind else None


@pytest.fixture(scope="module")
def collector() -> Iterator[Collector]:
    state = Collector()

    class Collect(Handler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["content-length"]))
            if state.hang.is_set():
                state.released.wait(120)
                return
            request = ExportTraceServiceRequest()
            request.ParseFromString(body)
            for resource_spans in request.resource_spans:
                resource = {a.key: value(a.value) for a in resource_spans.resource.attributes}
                for scope_spans in resource_spans.scope_spans:
                    for s in scope_spans.spans:
                        state.spans.append(Span(
                            s.name, s.trace_id.hex(), s.span_id.hex(), s.parent_span_id.hex(), s.start_time_unix_nano,
                            s.end_time_unix_nano, [(link.trace_id.hex(), link.span_id.hex()) for link in s.links],
                            {a.key: value(a.value) for a in s.attributes}, resource))
            self.answer(200, {"Content-Type": "application/x-protobuf"})

    with http_server(Collect) as state.url:
        yield state
        state.released.set()


def traced(collector: Collector, **env: str) -> dict[str, str]:
    return {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_ENDPOINT": collector.url,
            # Exported every 50 ms instead of the SDK's 5 s, so the tests wait for spans less.
            "OTEL_BSP_SCHEDULE_DELAY": "50", **env}


def caller() -> tuple[str, str, str]:
    """A trace id, a parent span id, and the traceparent a client would send with them."""
    trace_id, parent = secrets.token_hex(16), secrets.token_hex(8)
    return trace_id, parent, f"00-{trace_id}-{parent}-01"


def wait_for_spans(collector: Collector, trace_id: str, *names: str) -> dict[str, list[Span]]:
    def arrived() -> bool:
        present = {span.name for span in collector.in_trace(trace_id)}
        return all(any(name == p or p.startswith(name) for p in present) for name in names)

    wait_until(arrived, timeout_s=60)
    spans: dict[str, list[Span]] = {}
    for span in collector.in_trace(trace_id):
        spans.setdefault(span.name, []).append(span)
    return spans


@pytest.fixture(scope="module")
def traced_server(weights_file: Path, collector: Collector, tmp_path_factory: pytest.TempPathFactory):
    grpc_port = free_port()
    log = tmp_path_factory.mktemp("log") / "server.log"
    # The cache off: the tests send the same photo again, and each must go through decode and a forward pass.
    # Logs at INFO as JSON: the access lines carry the trace ids.
    server = start_server(tmp_path_factory.mktemp("traced"), log=log, CACHE_ENTRIES="0", LOG_LEVEL="info",
                          LOG_FORMAT="json", GRPC_PORT=str(grpc_port),
                          **traced(collector, OTEL_SERVICE_NAME="classifier-under-test"))
    yield server, f"127.0.0.1:{grpc_port}", log
    server.stop()


def test_a_request_continues_the_callers_trace_through_every_stage(traced_server, collector):
    server, _, log = traced_server
    trace_id, parent, traceparent = caller()
    response = httpx.post(f"{server.url}/predict", files=upload(photo_bytes("coffee.png")),
                          headers={"traceparent": traceparent}, timeout=60)
    assert response.status_code == 200
    assert response.headers["X-Trace-Id"] == trace_id  # the id to quote: the caller's own trace

    spans = wait_for_spans(collector, trace_id, "POST /predict", "read", "decode", "queue", "forward", "respond")
    (request,) = [s for s in spans["POST /predict"] if s.parent == parent]
    assert request.resource["service.name"] == "classifier-under-test"
    (read,), (decode,), (queue,), (forward,) = spans["read"], spans["decode"], spans["queue"], spans["forward"]
    assert read.parent == decode.parent == queue.parent == request.span_id
    # The batch's pass: in this trace (its first image's), linked to every image it served, this one among them.
    assert (trace_id, request.span_id) in forward.links and forward.attributes["batch.size"] == 1
    assert forward.attributes["model.backend"] in ("torch", "onnxruntime")
    assert (trace_id, forward.span_id) in queue.links
    # Timings that add up: one after the other, inside the request.
    assert request.start <= read.start <= read.end <= decode.start <= decode.end <= queue.start
    assert queue.end == forward.start <= forward.end <= request.end
    (respond,) = spans["respond"]
    assert forward.end <= respond.start <= respond.end <= request.end and respond.parent == request.span_id

    def logged() -> list[dict]:
        return [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]

    wait_until(lambda: any(entry.get("trace_id") == trace_id for entry in logged()))
    (access,) = [entry for entry in logged() if entry.get("trace_id") == trace_id and entry["logger"] == "access"]
    assert access["path"] == "/predict" and access["span_id"] == request.span_id


def test_a_request_without_traceparent_starts_a_trace_and_says_its_id(traced_server, collector):
    server, _, _ = traced_server
    assert "X-Trace-Id" not in httpx.get(f"{server.url}/health").headers  # probes are not traced
    response = httpx.post(f"{server.url}/predict/topk?k=3", files=upload(photo_bytes("astronaut.png")), timeout=60)
    trace_id = response.headers["X-Trace-Id"]
    assert len(trace_id) == 32 and int(trace_id, 16)
    spans = wait_for_spans(collector, trace_id, "POST /predict/topk", "decode", "forward")
    assert spans["POST /predict/topk"][0].parent == ""  # a root: nobody's trace continued


def test_a_grpc_call_continues_the_trace_in_its_metadata(traced_server, collector):
    _, address, _ = traced_server
    trace_id, parent, traceparent = caller()
    client = tritonclient.InferenceServerClient(address)
    image = tritonclient.InferInput("image", [1], "BYTES")
    image.set_data_from_numpy(np.array([photo_bytes("coffee.png")], dtype=np.object_))
    client.infer("resnet18", [image], headers={"traceparent": traceparent})
    spans = wait_for_spans(collector, trace_id, "/inference.GRPCInferenceService/ModelInfer", "decode", "queue", "forward")
    (call,) = spans["/inference.GRPCInferenceService/ModelInfer"]
    assert call.parent == parent
    assert spans["decode"][0].parent == call.span_id and (trace_id, call.span_id) in spans["forward"][0].links


@pytest.fixture
def webhooks() -> Iterator[tuple[str, list[dict]]]:
    """A webhook receiver: its URL, and the headers of every delivery."""
    received: list[dict] = []

    class Receive(Handler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers["content-length"]))
            received.append(dict(self.headers))
            self.answer(204)

    with http_server(Receive) as url:
        yield url, received


def test_a_jobs_images_link_to_its_submission_across_a_sigkill_and_its_webhook_carries_the_trace(
        weights_file, collector, webhooks, tmp_path):
    hooks_url, received = webhooks
    # Batches of one image (not the default 8): the first replica must be killed with images still to do.
    shared = {"JOBS_DATABASE_URL": f"sqlite:///{tmp_path / 'jobs.sqlite3'}", "CACHE_ENTRIES": "0", "MAX_BATCH_SIZE": "1",
              "WEBHOOK_ALLOWED_HOSTS": "127.0.0.1", "WEBHOOK_SECRET": WEBHOOK_SECRET}
    first = start_server(tmp_path / "first", **traced(collector, OTEL_RESOURCE_ATTRIBUTES="service.instance.id=first"),
                         **shared)
    trace_id, parent, traceparent = caller()
    try:
        job = submit(first, variants(40), headers={"traceparent": traceparent},
                     data={"webhook": f"{hooks_url}/hook"}).json()
        wait_for(first, job["id"], lambda j: j["done"] >= 1)
    finally:
        first.process.send_signal(signal.SIGKILL)
        first.process.wait(10)
    second = start_server(tmp_path / "second", **traced(collector, OTEL_RESOURCE_ATTRIBUTES="service.instance.id=second"),
                          **shared)
    try:
        done = wait_for(second, job["id"])
        assert done["status"] == "succeeded" and done["done"] == 40
        wait_until(lambda: received)
    finally:
        second.stop()

    (submission,) = [s for s in collector.in_trace(trace_id) if s.name == "POST /jobs" and s.parent == parent]
    by_second = [s for s in collector.named("job image")
                 if s.attributes["job.id"] == job["id"] and s.resource["service.instance.id"] == "second"]
    assert by_second, "the second replica classified none of the job's images"
    assert all((trace_id, submission.span_id) in s.links for s in by_second)
    assert {s.trace_id for s in by_second}.isdisjoint({trace_id})  # a trace of their own, linked, not nested
    # The webhook's request is in the submission's trace.
    assert received[0]["traceparent"].split("-")[1] == trace_id
    wait_until(lambda: any(s.name == "webhook" for s in collector.in_trace(trace_id)))


def test_a_stuck_collector_costs_no_request_and_its_dropped_spans_are_counted(weights_file, collector, tmp_path):
    collector.hang.set()
    try:
        # A queue of 16 spans (the SDK's default is 2048), so a few requests fill it; exports time out after 1 s
        # (default 10 s), so the process's exit is not held up by it for long.
        server = start_server(tmp_path, **traced(collector, OTEL_BSP_MAX_QUEUE_SIZE="16",
                                                 OTEL_BSP_MAX_EXPORT_BATCH_SIZE="8", OTEL_EXPORTER_OTLP_TIMEOUT="1"))
        try:
            statuses = [httpx.post(f"{server.url}/predict", files=upload(photo_bytes("coffee.png")), timeout=60).status_code
                        for _ in range(20)]
            assert statuses == [200] * 20
            dropped = metric(httpx.get(f"{server.url}/metrics").text, "tracing_spans_dropped_total", reason="queue_full")
            assert dropped > 0
        finally:
            # SIGTERM: drained and exited (uvicorn re-raises the signal), the stuck export given up, never killed
            assert server.stop() in (0, -signal.SIGTERM)
    finally:
        collector.hang.clear()


def test_a_collector_that_is_down_costs_no_request(weights_file, tmp_path):
    port = free_port()  # nothing listens there
    server = start_server(tmp_path, OTEL_TRACES_EXPORTER="otlp", OTEL_EXPORTER_OTLP_ENDPOINT=f"http://127.0.0.1:{port}")
    try:
        for _ in range(5):
            response = httpx.post(f"{server.url}/predict", files=upload(photo_bytes("coffee.png")), timeout=60)
            assert response.status_code == 200 and len(response.headers["X-Trace-Id"]) == 32
    finally:
        assert server.stop() in (0, -signal.SIGTERM)


def test_classify_traces_its_batches_with_the_same_variables(weights_file, collector, tmp_path):
    for name in ("coffee.png", "astronaut.png", "chelsea.png"):
        (tmp_path / name).write_bytes(photo_bytes(name))
    run_id = secrets.token_hex(4)
    env = {**os.environ, **traced(collector, OTEL_SERVICE_NAME=f"classify-{run_id}")}
    result = subprocess.run([sys.executable, "-m", "classify", str(tmp_path), "--out", str(tmp_path / "out.jsonl"),
                             "--batch-size", "2"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr

    def batches() -> list[Span]:
        return [s for s in collector.named("classify batch") if s.resource["service.name"] == f"classify-{run_id}"]

    wait_until(lambda: sum(s.attributes["images"] for s in batches()) == 3)  # exported before the process ended
    assert sorted(s.attributes["images"] for s in batches()) == [1, 2]


def test_tracing_is_off_by_default(server):
    response = httpx.post(f"{server.url}/predict", files=upload(photo_bytes("coffee.png")),
                          headers={"traceparent": caller()[2]}, timeout=60)
    assert response.status_code == 200 and "X-Trace-Id" not in response.headers
