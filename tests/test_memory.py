"""Memory stays bounded: the shared budget for request bodies, and memory going back after a burst."""

from __future__ import annotations

import re
import socket
import threading
import time
from collections.abc import Iterator

import httpx
import pytest

from bench.burst import BOUNDARY, burst, multipart, phone_photo_19mb
from support import Server, photo_bytes, start_server

pytestmark = pytest.mark.app

MIB = 1024 * 1024


@pytest.fixture(scope="module")
def small_budget(weights_file, tmp_path_factory) -> Iterator[Server]:
    server = start_server(tmp_path_factory.mktemp("budget"), MAX_BODY_BUFFER_BYTES=str(MIB), MAX_UPLOAD_BYTES=str(MIB))
    yield server
    server.stop()


def held_bytes(server: Server) -> int:
    return int(float(re.search(r"^request_body_bytes_held (\S+)$", httpx.get(f"{server.url}/metrics").text, re.M).group(1)))


def refusals(server: Server) -> int:
    metrics = httpx.get(f"{server.url}/metrics").text
    return int(float(re.search(r'^rejected_requests_total\{reason="memory"\} (\S+)$', metrics, re.M).group(1)))


def open_upload(server: Server, declared: int, sent: bytes) -> socket.socket:
    """A request that declares a body of `declared` bytes and sends only `sent` of it (so far)."""
    host, port = server.url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)))
    head = (f"POST /predict HTTP/1.1\r\nHost: {host}\r\nContent-Length: {declared}\r\n"
            f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\n\r\n")
    sock.sendall(head.encode() + sent)
    return sock


def response_of(sock: socket.socket) -> str:
    sock.settimeout(30)
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(re.search(rb"content-length: (\d+)", head, re.I).group(1))
    while len(body) < length:
        body += sock.recv(65536)
    return (head + b"\r\n\r\n" + body).decode("latin-1")


@pytest.mark.server
def test_a_declared_body_that_does_not_fit_is_refused_before_it_is_read(small_budget):
    before = refusals(small_budget)
    holder = open_upload(small_budget, 700_000, b"--" + BOUNDARY.encode())  # holds 700 KB of the 1 MiB
    try:
        deadline = time.monotonic() + 10
        while held_bytes(small_budget) < 700_000 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert held_bytes(small_budget) == 700_000
        # Its body is never sent: the answer can only come from the headers.
        refused = open_upload(small_budget, 700_000, b"")
        answer = response_of(refused)
        refused.close()
        assert answer.startswith("HTTP/1.1 503")
        assert "retry-after: 1" in answer.lower()
        assert "MAX_BODY_BUFFER_BYTES" in answer
        # A small upload still fits beside the held one.
        fits = httpx.post(f"{small_budget.url}/predict", files={"file": ("c.png", photo_bytes("chelsea.png"))})
        assert fits.status_code == 200
    finally:
        holder.close()
    deadline = time.monotonic() + 10
    while held_bytes(small_budget) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert held_bytes(small_budget) == 0  # the abandoned upload gave its bytes back
    assert refusals(small_budget) == before + 1
    big = multipart(b"x" * 700_000)
    assert httpx.post(f"{small_budget.url}/predict", content=big,
                      headers={"content-type": f"multipart/form-data; boundary={BOUNDARY}"}).status_code == 400


@pytest.mark.server
def test_a_chunked_body_is_counted_as_it_arrives(small_budget):
    release = threading.Event()
    first_status: list[int] = []
    body = multipart(b"y" * 600_000)

    def slow_chunks() -> Iterator[bytes]:
        yield body[:600_000]
        release.wait(30)
        yield body[600_000:]

    def slow_upload() -> None:
        headers = {"content-type": f"multipart/form-data; boundary={BOUNDARY}"}
        first_status.append(httpx.post(f"{small_budget.url}/predict", content=slow_chunks(), headers=headers, timeout=60).status_code)

    thread = threading.Thread(target=slow_upload)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while held_bytes(small_budget) < 600_000 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert held_bytes(small_budget) >= 600_000
        second = httpx.post(f"{small_budget.url}/predict", content=iter([body]),  # chunked: no Content-Length
                            headers={"content-type": f"multipart/form-data; boundary={BOUNDARY}"}, timeout=30)
        assert second.status_code == 503
        assert second.headers["retry-after"] == "1"
        assert "MAX_BODY_BUFFER_BYTES" in second.json()["detail"]
    finally:
        release.set()
        thread.join(60)
    assert first_status == [400]  # it was let in, and answered: its bytes are no image
    assert held_bytes(small_budget) == 0


def test_an_upload_limit_above_the_budget_is_refused_at_start_up():
    from classifier.settings import Settings, SettingsError

    with pytest.raises(SettingsError, match="must not exceed MAX_BODY_BUFFER_BYTES"):
        Settings.from_env({"MAX_UPLOAD_BYTES": "2000", "MAX_BODY_BUFFER_BYTES": "1000"})


def test_the_default_budget_is_a_quarter_of_the_container_limit(monkeypatch):
    from classifier import settings

    monkeypatch.setattr(settings, "cgroup_memory_limit", lambda: 2 * 1024 * MIB)
    assert settings.default_body_budget() == 512 * MIB
    monkeypatch.setattr(settings, "cgroup_memory_limit", lambda: None)
    assert settings.default_body_budget() == 512 * MIB
    monkeypatch.setattr(settings, "cgroup_memory_limit", lambda: 8 * 1024 * MIB)
    assert settings.default_body_budget() == 2048 * MIB


@pytest.mark.server
def test_a_burst_of_large_uploads_stays_within_the_budget_and_memory_goes_back(weights_file, tmp_path):
    budget_mib = 512
    server = start_server(tmp_path, MAX_BODY_BUFFER_BYTES=str(budget_mib * MIB))
    try:
        small = multipart(photo_bytes("rocket.jpg"))
        headers = {"content-type": f"multipart/form-data; boundary={BOUNDARY}"}
        for _ in range(10):  # warm-up, so the baseline is the service's working size
            assert httpx.post(f"{server.url}/predict", content=small, headers=headers, timeout=30).status_code == 200
        photo = phone_photo_19mb()
        assert 17e6 < len(photo) < 20 * MIB
        result = burst(server.url, server.process.pid, 100, multipart(photo), small)
        assert server.process.poll() is None
        # Every upload got an answer: classified or refused for the budget; no reset connection, no 500.
        assert set(result["statuses"]) <= {"200", "400", "503"}, result
        assert result["statuses"].get("200", 0) >= 10 and result["statuses"].get("503", 0) >= 10, result
        assert result["during"].get(200, 0) >= 1, result  # normal traffic was answered during the burst
        # The README's sizing rule: bodies (the budget) + DECODE_WORKERS (2) x the largest decoded photo (150 MB at
        # MAX_IMAGE_PIXELS), plus 100 MiB of allocator heaps. Without the budget, these 100 bodies alone are 1.9 GB.
        assert result["peak_mib"] < result["baseline_mib"] + budget_mib + 2 * 150 + 100, result
        assert result["settled_mib"] < result["baseline_mib"] + 150, result
        assert httpx.post(f"{server.url}/predict", content=small, headers=headers, timeout=30).status_code == 200
    finally:
        server.stop()
