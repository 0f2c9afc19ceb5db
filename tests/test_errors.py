"""Bad input gets a clear JSON answer with the right status, never a 500, and nothing touches the disk."""

from __future__ import annotations

import tempfile

import httpx
import numpy as np
import pytest
from PIL import Image

from support import corrupt_png, decompression_bomb, encode, photo, photo_bytes, png, upload

pytestmark = pytest.mark.app

LIMIT = 20 * 1024 * 1024  # the default MAX_UPLOAD_BYTES


IMAGE_CASES = {
    "empty file": (b"", 400, "empty"),
    "text": (b"hello, I am not a photo\n", 400, "not an image"),
    "random bytes": (np.random.default_rng(0).bytes(5000), 400, "not an image"),
    "truncated JPEG": (photo_bytes("rocket.jpg")[:9000], 400, "truncated"),
    "corrupt PNG": (corrupt_png(), 400, "corrupt"),
    "SVG": (b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>', 415, "SVG"),
    "PDF": (b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj\n", 415, "PDF"),
    "huge header": (png(100_000, 100_000, b""), 413, "pixels"),
    "decompression bomb": (decompression_bomb(), 413, "pixels"),
    "1x20000 strip": (encode(Image.new("RGB", (1, 20000))), 400, "elongated"),
}


def assert_error(response: httpx.Response, status: int, fragment: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert set(body) == {"detail"} and isinstance(body["detail"], str)
    assert fragment.lower() in body["detail"].lower()
    assert "Traceback" not in response.text and "site-packages" not in response.text


@pytest.mark.parametrize("case", IMAGE_CASES)
@pytest.mark.parametrize("path", ["/predict", "/predict/topk"])
def test_bad_image(client, case, path):
    data, status, fragment = IMAGE_CASES[case]
    assert_error(client.post(path, files=upload(data)), status, fragment)


@pytest.mark.parametrize(
    ("request_options", "fragment"),
    [
        ({}, "file"),
        ({"files": upload(photo_bytes("coffee.png"), field="image")}, "file"),
        ({"json": {"file": "chelsea.png"}}, "file"),
        ({"content": photo_bytes("coffee.png"), "headers": {"content-type": "image/png"}}, "file"),
        ({"data": {"file": "not a file part"}}, "file"),
    ],
    ids=["no body", "wrong field name", "json body", "raw image body", "text field"],
)
def test_missing_or_misnamed_field_is_422(client, request_options, fragment):
    assert_error(client.post("/predict", **request_options), 422, fragment)


@pytest.mark.parametrize("k", ["0", "1001", "-3", "five", "2.5"])
def test_bad_k_is_422(client, k):
    assert_error(client.post(f"/predict/topk?k={k}", files=upload(photo_bytes("coffee.png"))), 422, "k")


def test_upload_over_the_limit_is_413(client):
    assert_error(client.post("/predict", files=upload(b"\0" * (LIMIT + 1))), 413, "MAX_UPLOAD_BYTES")


@pytest.mark.server
def test_chunked_upload_over_the_limit_is_413_over_http(server):
    """No Content-Length: the server counts the bytes as they arrive and stops at the limit."""
    boundary = "limit-test"

    def body():
        yield f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="big.png"\r\n\r\n'.encode()
        for _ in range(60):  # 60 MB
            yield b"\0" * (1024 * 1024)
        yield f"\r\n--{boundary}--\r\n".encode()

    headers = {"content-type": f"multipart/form-data; boundary={boundary}"}
    try:
        response = httpx.post(f"{server.url}/predict", content=body(), headers=headers, timeout=60)
    except httpx.WriteError:
        pytest.fail("the server closed the connection without answering 413")
    assert_error(response, 413, "MAX_UPLOAD_BYTES")
    assert httpx.get(f"{server.url}/health").status_code == 200


def test_service_answers_normally_after_bad_input(client):
    for data, _, _ in IMAGE_CASES.values():
        client.post("/predict", files=upload(data))
    client.post("/predict", files=upload(b"\0" * (LIMIT + 1)))
    response = client.post("/predict/topk?k=3", files=upload(photo_bytes("chelsea.png")))
    assert response.status_code == 200
    assert len(response.json()["predictions"]) == 3


def test_large_uploads_stay_in_memory(client, monkeypatch):
    """Starlette would spool file parts over 1 MB to a temp file; the service keeps them in memory."""
    rolled_over = []
    monkeypatch.setattr(tempfile.SpooledTemporaryFile, "rollover", lambda self: rolled_over.append(self))
    noise = Image.fromarray(np.random.default_rng(1).integers(0, 256, (1200, 1600, 3), dtype=np.uint8))
    data = encode(noise)
    assert len(data) > 5 * 1024 * 1024
    assert client.post("/predict", files=upload(data)).status_code == 200
    assert rolled_over == []


@pytest.mark.server
def test_nothing_is_written_to_disk_by_the_server(server):
    noise = Image.fromarray(np.random.default_rng(2).integers(0, 256, (1200, 1600, 3), dtype=np.uint8))
    uploads = [
        ("../../../etc/passwd", encode(noise), 200),
        ("x" * 10_000 + ".png", photo_bytes("coffee.png"), 400),  # part headers over python-multipart's limit
        ("/tmp/evil.png", b"not an image", 400),
        ("bomb.png", decompression_bomb(), 413),
    ]
    for name, data, status in uploads:
        response = httpx.post(f"{server.url}/predict", files=upload(data, name), timeout=60)
        assert response.status_code == status, (name[:20], response.text)
    assert list(server.workdir.iterdir()) == []
    assert list(server.tmpdir.iterdir()) == []


def test_unexpected_failure_is_a_json_500_without_details(client, service, monkeypatch, uncached):
    def broken(data: bytes):
        raise RuntimeError("secret internal path /srv/model")

    monkeypatch.setattr(service.batcher, "prepare", broken)
    response = client.post("/predict", files=upload(photo_bytes("coffee.png")))
    assert response.status_code == 500
    assert response.json() == {"detail": "internal error; it has been logged"}


def test_photo_still_classified_by_its_content_not_its_name(client):
    """The client's filename and content type are data, never trusted."""
    data = encode(photo("coffee.png"), "JPEG")
    a = client.post("/predict", files={"file": ("a.gif", data, "text/plain")})
    b = client.post("/predict", files={"file": ("b.jpg", data, "image/jpeg")})
    assert a.status_code == b.status_code == 200
    assert a.json() == b.json()
