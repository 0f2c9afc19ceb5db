"""What an operator relies on: API key, request ids, access logs, metrics, security headers, SIGTERM."""

from __future__ import annotations

import json
import re
import select
import signal
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from bench import harness
from support import ALLOWED_ORIGIN
from support import API_KEY as KEY
from support import Server, encode, every_route, metric, photo, photo_bytes, start_server, upload

pytestmark = pytest.mark.app


def predict(server: Server, headers: dict | None = None, data: bytes | None = None, path: str = "/predict") -> httpx.Response:
    return httpx.post(f"{server.url}{path}", files=upload(data or photo_bytes("coffee.png")), headers=headers or {}, timeout=60)


@pytest.mark.server
@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}, {"X-API-Key": "wrong"}, {"Authorization": f"Basic {KEY}"}],
    ids=["missing", "wrong bearer", "no scheme", "wrong header", "basic scheme"],
)
@pytest.mark.parametrize("path", ["/predict", "/predict/topk", "/predict/batch"])
def test_predict_without_the_right_key_is_401(guarded, headers, path):
    server, _ = guarded
    response = httpx.post(f"{server.url}{path}", files={"files" if "batch" in path else "file": ("a.png", photo_bytes("coffee.png"))},
                          headers=headers, timeout=60)
    assert response.status_code == 401
    assert response.headers["www-authenticate"].startswith("Bearer")
    assert "API key" in response.json()["detail"]


@pytest.mark.server
@pytest.mark.parametrize("headers", [{"Authorization": f"Bearer {KEY}"}, {"authorization": f"bearer {KEY}"}, {"X-API-Key": KEY}])
def test_predict_with_the_key_is_served(guarded, headers):
    server, _ = guarded
    assert predict(server, headers).status_code == 200


@pytest.mark.server
def test_the_key_is_checked_before_the_upload_is_read(guarded):
    server, _ = guarded
    # A 30 MB body without a key is refused as unauthorized, not parsed and refused as too large.
    response = httpx.post(f"{server.url}/predict", content=b"x" * (30 * 1024 * 1024),
                          headers={"content-type": "multipart/form-data; boundary=x"}, timeout=60)
    assert response.status_code == 401


@pytest.mark.server
@pytest.mark.parametrize("path", ["/health", "/ready", "/metrics", "/model", "/", "/docs", "/openapi.json"])
def test_health_readiness_metrics_and_docs_stay_open(guarded, path):
    server, _ = guarded
    assert httpx.get(f"{server.url}{path}").status_code == 200


def needs_the_key(path: str) -> bool:
    """What the README promises: predictions, jobs and /v2 inference need the key; nothing else does."""
    return path.startswith(("/predict", "/jobs")) or path.endswith("/infer")


@pytest.mark.server
def test_every_route_that_needs_the_key_refuses_without_it_and_no_other_does(guarded, client):
    server, _ = guarded
    routes = every_route(client.app)
    assert ("POST", "/v2/models/{name}/versions/{version}/infer") in routes and ("GET", "/") in routes
    for method, template in routes:
        path = template.replace("{job_id}", "0" * 32).replace("{name}", "resnet18").replace("{version}", "1")
        path = path.replace("{path:path}", "swagger-ui.css").replace("{filename}", "swagger-ui.css")
        for headers in ({}, {"X-API-Key": "wrong"}):
            response = httpx.request(method, f"{server.url}{path}", headers=headers, timeout=30)
            if needs_the_key(template):
                assert response.status_code == 401, (method, template, headers)
            else:
                assert response.status_code != 401, (method, template, headers)


@pytest.mark.server
def test_openapi_declares_the_key_exactly_where_it_is_needed(guarded, server):
    keyed_server, _ = guarded
    spec = httpx.get(f"{keyed_server.url}/openapi.json").json()
    schemes = spec["components"]["securitySchemes"]
    assert {s["type"] for s in schemes.values()} == {"http", "apiKey"}
    for path, operations in spec["paths"].items():
        for method, operation in operations.items():
            assert bool(operation.get("security")) == needs_the_key(path), (method, path)
            assert ("401" in operation["responses"]) == needs_the_key(path), (method, path)
    # Without API_KEY the service asks for no key, and its document says so.
    open_spec = httpx.get(f"{server.url}/openapi.json").json()
    assert "securitySchemes" not in open_spec.get("components", {})
    assert not any(operation.get("security") or "401" in operation["responses"]
                   for operations in open_spec["paths"].values() for operation in operations.values())


@pytest.mark.server
def test_request_id_is_echoed_or_made_and_logged_as_json(guarded):
    server, log = guarded
    key = {"Authorization": f"Bearer {KEY}"}
    mine = predict(server, {**key, "X-Request-ID": "client-id-42"})
    assert mine.headers["x-request-id"] == "client-id-42"
    made = predict(server, key)
    assert re.fullmatch(r"[0-9a-f]{32}", made.headers["x-request-id"])
    for hostile in ("x" * 129, "bad id with spaces", "inject\\nline"):
        replaced = predict(server, {**key, "X-Request-ID": hostile})
        assert re.fullmatch(r"[0-9a-f]{32}", replaced.headers["x-request-id"])
    error = predict(server, {**key, "X-Request-ID": "on-an-error"}, data=b"not an image")
    assert error.status_code == 400 and error.headers["x-request-id"] == "on-an-error"
    refused = predict(server, {"X-Request-ID": "on-a-401"})
    assert refused.status_code == 401 and refused.headers["x-request-id"] == "on-a-401"

    deadline = time.monotonic() + 30
    while True:  # the access line is written once the response has gone
        lines = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
        access = {line["request_id"]: line for line in lines if line["logger"] == "access"}
        if {"client-id-42", "on-an-error", "on-a-401", made.headers["x-request-id"]} <= set(access):
            break
        assert time.monotonic() < deadline, "access lines missing"
        time.sleep(0.02)
    assert access["client-id-42"] | {"duration_ms": 0, "time": 0} == {
        "time": 0, "level": "info", "logger": "access", "request_id": "client-id-42", "duration_ms": 0,
        "message": access["client-id-42"]["message"], "method": "POST", "path": "/predict", "status": 200,
        "body_bytes": access["client-id-42"]["body_bytes"], "client": "127.0.0.1",
    }
    assert access["client-id-42"]["body_bytes"] > len(photo_bytes("coffee.png"))
    assert access["on-an-error"]["status"] == 400 and access["on-a-401"]["status"] == 401
    assert access[made.headers["x-request-id"]]["status"] == 200
    assert any(line["message"].startswith("ResNet18 loaded from file:") for line in lines)  # logged at start-up
    text = log.read_text()
    assert KEY not in text and "not an image" not in text.replace("not an image this service", "")


@pytest.mark.server
def test_security_headers_on_every_response(guarded):
    from classifier.observability import CONTENT_SECURITY_POLICY

    server, _ = guarded
    for response in (httpx.get(f"{server.url}/health"), httpx.get(f"{server.url}/nowhere"), predict(server)):
        assert response.headers["x-content-type-options"] == "nosniff"
        assert "content-security-policy" not in response.headers  # JSON needs none
    for page in ("/", "/docs", "/redoc"):
        policy = httpx.get(f"{server.url}{page}").headers["content-security-policy"]
        assert policy == CONTENT_SECURITY_POLICY
        directives = dict(part.strip().split(" ", 1) for part in policy.split(";"))
        assert directives["default-src"] == "'self'" and directives["frame-ancestors"] == "'self'"
        assert not any("http" in sources for sources in directives.values())  # no other origin, no CDN


@pytest.mark.server
def test_a_web_page_elsewhere_may_call_with_its_key(guarded):
    """CORS: the allowed origin's preflight for a request carrying Authorization is answered yes; others no."""
    server, _ = guarded
    preflight = {"Origin": ALLOWED_ORIGIN, "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization, x-request-id"}
    allowed = httpx.options(f"{server.url}/predict", headers=preflight)
    assert allowed.status_code == 200 and allowed.headers["access-control-allow-origin"] == ALLOWED_ORIGIN
    assert {"authorization", "x-request-id"} <= {h.strip().lower() for h in allowed.headers["access-control-allow-headers"].split(",")}
    elsewhere = httpx.options(f"{server.url}/predict", headers={**preflight, "Origin": "https://evil.example"})
    assert elsewhere.status_code == 400 and "access-control-allow-origin" not in elsewhere.headers
    answered = predict(server, {"Origin": ALLOWED_ORIGIN, "Authorization": f"Bearer {KEY}"})
    assert answered.status_code == 200 and answered.headers["access-control-allow-origin"] == ALLOWED_ORIGIN
    assert "x-request-id" in answered.headers["access-control-expose-headers"].lower()


def test_metrics_count_requests_batches_and_rejections(client, uncached):
    before = client.get("/metrics").text
    for _ in range(3):
        assert client.post("/predict", files=upload(photo_bytes("chelsea.png"))).status_code == 200
    assert client.post("/predict", files=upload(b"junk")).status_code == 400
    assert client.post("/predict", files=upload(b"\0" * (21 * 1024 * 1024))).status_code == 413
    response = client.get("/metrics")
    after = response.text
    assert response.headers["content-type"].startswith("text/plain")

    def grew(name: str, **labels: str) -> float:
        return metric(after, name, **labels) - metric(before, name, **labels)

    assert grew("http_requests_total", method="POST", endpoint="/predict", status="200") == 3
    assert grew("http_requests_total", method="POST", endpoint="/predict", status="400") == 1
    assert grew("http_request_duration_seconds_count", endpoint="/predict") == 5
    assert grew("rejected_requests_total", reason="bad_image") == 1
    assert grew("rejected_requests_total", reason="too_large") == 1
    assert grew("inference_batch_size_sum") == 3
    assert grew("inference_queue_wait_seconds_count") == 3
    assert grew("inference_duration_seconds_count") >= 1
    assert metric(after, "images_in_flight") == 0
    for reason in ("overloaded", "timeout", "unauthorized", "shutting_down"):
        assert f'rejected_requests_total{{reason="{reason}"}}' in after
    assert "process_resident_memory_bytes" in after


def in_flight(server: Server) -> float:
    return metric(httpx.get(f"{server.url}/metrics").text, "images_in_flight")


@pytest.mark.server
@pytest.mark.parametrize("runtime", ["torch", "slim"])
def test_sigterm_drains_accepted_requests_and_refuses_new_ones(weights_file, tmp_path, request, runtime):
    slim = {} if runtime == "torch" else {"MODEL_ONNX": str(request.getfixturevalue("model_file")), "MODEL_WEIGHTS": ""}
    server = start_server(tmp_path, SHUTDOWN_TIMEOUT_S="60", REQUEST_TIMEOUT_S="120", MAX_BATCH_SIZE="2", CACHE_ENTRIES="0",
                          **slim)
    big = encode(photo("astronaut.png").convert("RGB").resize((3000, 2250)), "JPEG", quality=95)
    with ThreadPoolExecutor(12) as pool:
        accepted = [pool.submit(predict, server, None, big) for _ in range(12)]
        deadline = time.monotonic() + 120
        # All twelve admitted: each is in flight (decoding, queued, in a forward pass) or already answered.
        while in_flight(server) + sum(f.done() for f in accepted) < 12:
            assert time.monotonic() < deadline, "the twelve uploads were never all admitted"
            time.sleep(0.02)
        assert not all(f.done() for f in accepted), "the work finished before SIGTERM; make it bigger"
        signalled = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        while httpx.get(f"{server.url}/ready").status_code != 503:
            assert time.monotonic() < signalled + 10, "/ready never turned 503"
            time.sleep(0.01)
        late = predict(server)
        assert late.status_code == 503 and "shutting down" in late.json()["detail"]
        job = httpx.post(f"{server.url}/jobs", files={"files": ("a.png", photo_bytes("coffee.png"))})
        assert job.status_code == 503 and "shutting down" in job.json()["detail"]
        statuses = [f.result(120).status_code for f in accepted]
        answered = time.monotonic()
    assert statuses == [200] * 12
    assert server.process.wait(60) in (0, -signal.SIGTERM)
    assert time.monotonic() - signalled < 60  # it left once the last was answered, not at SHUTDOWN_TIMEOUT_S
    assert answered >= signalled


@pytest.mark.server
def test_clients_that_leave_leave_no_error_in_the_log(weights_file, tmp_path):
    """Clients giving up mid-request are normal traffic: their work is dropped quietly (the access line and
    rejected_requests_total say what happened), never an ERROR with a traceback."""
    log = tmp_path / "server.log"
    server = start_server(tmp_path, log=log, LOG_LEVEL="info", CACHE_ENTRIES="0")
    twelve_megapixels = encode(photo("astronaut.png").convert("RGB").resize((4000, 3000)), "JPEG", quality=95)
    body = harness.multipart(twelve_megapixels)
    host, port = server.url.removeprefix("http://").split(":")
    request = (f"POST /predict HTTP/1.1\r\nHost: {host}\r\nContent-Type: multipart/form-data; boundary="
               f"{harness.BOUNDARY}\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body
    clients = [socket.create_connection((host, int(port)), timeout=30) for _ in range(12)]
    for client in clients:
        client.sendall(request)
    deadline = time.monotonic() + 60
    while in_flight(server) < 3:  # the clients leave while their images are being worked on, whatever the speed
        assert time.monotonic() < deadline
        time.sleep(0.005)
    outcomes = []
    for client in clients:
        outcomes.append("answered" if select.select([client], [], [], 0)[0] else "left")
        client.close()
    assert "left" in outcomes
    while in_flight(server) > 0:  # every abandoned image withdrawn or finished
        assert time.monotonic() < deadline
        time.sleep(0.05)
    for _ in range(5):  # later traffic is served (and gives the collector its turns)
        assert predict(server).status_code == 200
    assert server.stop() in (0, -signal.SIGTERM)
    text = log.read_text()
    assert "Traceback" not in text and "never retrieved" not in text and " ERROR " not in text, text[-3000:]


@pytest.mark.server
def test_a_full_queue_refuses_an_upload_before_reading_it(weights_file, tmp_path):
    """With MAX_QUEUE images in flight, a new /predict is answered 503 while its body is still unsent: the
    service spends nothing on uploads it will not serve."""
    server = start_server(tmp_path, MAX_QUEUE="2", MAX_BATCH_FILES="2", MAX_BATCH_SIZE="1", CACHE_ENTRIES="0")
    big = encode(photo("astronaut.png").convert("RGB").resize((4000, 3000)), "JPEG", quality=95)
    host, port = server.url.removeprefix("http://").split(":")
    try:
        for _ in range(10):  # each try needs the queue still full when the request arrives
            with ThreadPoolExecutor(1) as pool:
                filling = pool.submit(httpx.post, f"{server.url}/predict/batch",
                                      files=[("files", ("a.jpg", big)), ("files", ("b.jpg", big))], timeout=120)
                while in_flight(server) < 2 and not filling.done():
                    time.sleep(0.005)
                with socket.create_connection((host, int(port)), timeout=5) as sock:
                    sock.sendall(f"POST /predict HTTP/1.1\r\nHost: {host}\r\nContent-Length: {20 * 1024 * 1024}\r\n"
                                 "Content-Type: multipart/form-data; boundary=x\r\n\r\n".encode() + b"--x\r\n")
                    answer = ""  # 19.99 MB of the body are never sent
                    try:
                        while "MAX_QUEUE" not in answer and (received := sock.recv(65536)):
                            answer += received.decode(errors="replace")
                    except TimeoutError:
                        answer = ""  # the queue had room again: the server waits for the body
                assert filling.result(120).status_code == 200
            if answer:
                break
        assert answer.startswith("HTTP/1.1 503") and "MAX_QUEUE" in answer, answer
    finally:
        server.stop()
