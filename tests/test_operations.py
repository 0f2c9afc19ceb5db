"""What an operator relies on: API key, request ids, access logs, metrics, security headers, SIGTERM."""

from __future__ import annotations

import json
import re
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from conftest import API_KEY as KEY
from conftest import Server, encode, photo, photo_bytes, start_server, upload



def predict(server: Server, headers: dict | None = None, data: bytes | None = None, path: str = "/predict") -> httpx.Response:
    return httpx.post(f"{server.url}{path}", files=upload(data or photo_bytes("coffee.png")), headers=headers or {}, timeout=60)


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


@pytest.mark.parametrize("headers", [{"Authorization": f"Bearer {KEY}"}, {"authorization": f"bearer {KEY}"}, {"X-API-Key": KEY}])
def test_predict_with_the_key_is_served(guarded, headers):
    server, _ = guarded
    assert predict(server, headers).status_code == 200


def test_the_key_is_checked_before_the_upload_is_read(guarded):
    server, _ = guarded
    # A 30 MB body without a key is refused as unauthorized, not parsed and refused as too large.
    response = httpx.post(f"{server.url}/predict", content=b"x" * (30 * 1024 * 1024),
                          headers={"content-type": "multipart/form-data; boundary=x"}, timeout=60)
    assert response.status_code == 401


@pytest.mark.parametrize("path", ["/health", "/ready", "/metrics", "/model", "/", "/docs", "/openapi.json"])
def test_health_readiness_metrics_and_docs_stay_open(guarded, path):
    server, _ = guarded
    assert httpx.get(f"{server.url}{path}").status_code == 200


def test_openapi_declares_the_security_schemes(guarded):
    server, _ = guarded
    spec = httpx.get(f"{server.url}/openapi.json").json()
    schemes = spec["components"]["securitySchemes"]
    assert {s["type"] for s in schemes.values()} == {"http", "apiKey"}
    assert spec["paths"]["/predict"]["post"]["security"]
    assert "security" not in spec["paths"]["/health"]["get"]


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

    time.sleep(0.2)
    lines = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    access = {line["request_id"]: line for line in lines if line["logger"] == "access"}
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


def test_security_headers_on_every_response(guarded):
    server, _ = guarded
    for response in (httpx.get(f"{server.url}/health"), httpx.get(f"{server.url}/nowhere"), predict(server)):
        assert response.headers["x-content-type-options"] == "nosniff"


def metric(text: str, name: str, **labels: str) -> float:
    wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith(f"{name}{{{wanted}}} ") or (not labels and line.startswith(f"{name} ")):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_metrics_count_requests_batches_and_rejections(client):
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


def test_sigterm_drains_accepted_requests_and_refuses_new_ones(weights_file, tmp_path):
    server = start_server(tmp_path, JPEG_DRAFT="false", SHUTDOWN_TIMEOUT_S="15", MAX_BATCH_SIZE="2")
    big = encode(photo("astronaut.png").convert("RGB").resize((3000, 2250)), "JPEG", quality=95)
    with ThreadPoolExecutor(12) as pool:
        accepted = [pool.submit(predict, server, None, big) for _ in range(12)]
        time.sleep(0.5)  # all twelve are in: uploaded, decoding or queued
        assert not all(f.done() for f in accepted), "the work finished before SIGTERM; make it bigger"
        signalled = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        time.sleep(0.1)
        assert httpx.get(f"{server.url}/ready").status_code == 503
        late = predict(server)
        assert late.status_code == 503 and "shutting down" in late.json()["detail"]
        statuses = [f.result(60).status_code for f in accepted]
    assert statuses == [200] * 12
    returncode = server.process.wait(20)
    assert returncode in (0, -signal.SIGTERM)
    assert time.monotonic() - signalled < 15 + 2
