"""A corpus of hostile and unusual uploads, sent over real HTTP to a running server.

Each has its expected status; after all of them the server answers normally and has written nothing.
"""

from __future__ import annotations

import io

import httpx
import numpy as np
import pytest
from PIL import Image

from conftest import corrupt_png, decompression_bomb, encode, photo, photo_bytes, png

BASE = photo("astronaut.png").convert("RGB").resize((320, 240))


def in_mode(mode: str, format: str = "PNG") -> bytes:
    return encode(BASE.convert(mode), format)


def sixteen_bit() -> bytes:
    return encode(Image.fromarray(np.asarray(BASE.convert("L")).astype(np.uint16) * 257))


def float_tiff() -> bytes:
    return encode(Image.fromarray(np.asarray(BASE.convert("L")).astype(np.float32)), "TIFF")


def exif_rotated() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 8
    return encode(BASE, "JPEG", exif=exif)


def animated_gif() -> bytes:
    frames = [BASE, BASE.rotate(90), BASE.rotate(180)]
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)


def multipage_tiff() -> bytes:
    return encode(BASE, "TIFF", save_all=True, append_images=[BASE.convert("L"), BASE.rotate(45)])


GOOD = photo_bytes("coffee.png")

# name: (field, filename, body bytes or a whole-request override, expected status)
CORPUS: dict[str, tuple[str, str, bytes, int]] = {
    "empty file": ("file", "empty.jpg", b"", 400),
    "plain text": ("file", "notes.txt", b"hello, this is not a photo\n" * 20, 400),
    "random bytes": ("file", "noise.bin", np.random.default_rng(7).bytes(30_000), 400),
    "truncated JPEG": ("file", "half.jpg", photo_bytes("rocket.jpg")[:5000], 400),
    "corrupt PNG": ("file", "corrupt.png", corrupt_png(), 400),
    "JPEG header only": ("file", "header.jpg", b"\xff\xd8\xff\xe0\x00\x10JFIF\x00", 400),
    "PNG decompression bomb": ("file", "bomb.png", decompression_bomb(), 413),
    "PNG claiming 100000x100000": ("file", "huge.png", png(100_000, 100_000, b""), 413),
    "SVG": ("file", "drawing.svg", b'<svg xmlns="http://www.w3.org/2000/svg"><script>alert(1)</script></svg>', 415),
    "PDF": ("file", "doc.pdf", b"%PDF-1.4\n1 0 obj <<>> endobj\n", 415),
    "HEIC": ("file", "phone.heic", b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic", 415),
    "EPS (would run Ghostscript)": ("file", "art.eps", b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n", 415),
    "path traversal filename": ("file", "../../../../etc/passwd", GOOD, 200),
    # python-multipart refuses part headers over 4 KB: a clear 400, long before any decoding.
    "10,000-character filename": ("file", "a" * 10_000 + ".png", GOOD, 400),
    "250-character filename": ("file", "a" * 250 + ".png", GOOD, 200),
    "filename with NUL and newline": ("file", "evil\x00name\n.png", GOOD, 200),
    "wrong field name": ("image", "photo.png", GOOD, 422),
    "mode 1 (bilevel)": ("file", "1.png", in_mode("1"), 200),
    "mode L": ("file", "l.png", in_mode("L"), 200),
    "mode LA": ("file", "la.png", in_mode("LA"), 200),
    "mode P": ("file", "p.png", in_mode("P"), 200),
    "palette with transparency": ("file", "ptrns.png", encode(BASE.convert("P"), transparency=0), 200),
    "mode RGBA": ("file", "rgba.png", in_mode("RGBA"), 200),
    "mode CMYK JPEG": ("file", "cmyk.jpg", in_mode("CMYK", "JPEG"), 200),
    "mode YCbCr JPEG": ("file", "ycbcr.jpg", in_mode("YCbCr", "JPEG"), 200),
    "mode I;16 PNG": ("file", "16bit.png", sixteen_bit(), 200),
    "mode F TIFF": ("file", "float.tif", float_tiff(), 200),
    "EXIF rotation": ("file", "rotated.jpg", exif_rotated(), 200),
    "animated GIF": ("file", "anim.gif", animated_gif(), 200),
    "multi-page TIFF": ("file", "pages.tif", multipage_tiff(), 200),
    "WebP": ("file", "photo.webp", encode(BASE, "WEBP"), 200),
    "AVIF": ("file", "photo.avif", encode(BASE, "AVIF"), 200),
    "BMP": ("file", "photo.bmp", encode(BASE, "BMP"), 200),
    "1x1 image": ("file", "dot.png", encode(Image.new("RGB", (1, 1), "red")), 200),
    "1x20000 image": ("file", "strip.png", encode(Image.new("RGB", (1, 20000))), 400),
}


def test_the_corpus_has_at_least_25_cases():
    assert len(CORPUS) >= 25


@pytest.mark.parametrize("case", CORPUS)
def test_corpus_upload(server, case):
    field, filename, data, status = CORPUS[case]
    response = httpx.post(f"{server.url}/predict", files={field: (filename, data, "application/octet-stream")}, timeout=60)
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    if status != 200:
        assert isinstance(response.json()["detail"], str)


@pytest.mark.parametrize(
    ("request_options", "status"),
    [
        ({"json": {"file": "chelsea.png"}}, 422),
        ({"content": b"x" * (60 * 1024 * 1024), "headers": {"content-type": "multipart/form-data; boundary=x"}}, 413),
        ({"content": GOOD, "headers": {"content-type": "image/png"}}, 422),
        ({"content": b"--x\r\ngarbage", "headers": {"content-type": "multipart/form-data; boundary=x"}}, 422),
        ({"content": b"--\r\n", "headers": {"content-type": "multipart/form-data"}}, 400),
    ],
    ids=["JSON body", "60 MB body", "raw image body", "multipart with no part", "multipart without boundary"],
)
def test_corpus_request(server, request_options, status):
    response = httpx.post(f"{server.url}/predict", timeout=60, **request_options)
    assert response.status_code == status, response.text
    assert isinstance(response.json()["detail"], str)


def test_after_the_corpus_the_server_answers_normally_and_wrote_nothing(server):
    for case in CORPUS.values():
        field, filename, data, _ = case
        httpx.post(f"{server.url}/predict", files={field: (filename, data)}, timeout=60)
    response = httpx.post(f"{server.url}/predict/topk?k=3", files={"file": ("coffee.png", io.BytesIO(GOOD))}, timeout=60)
    assert response.status_code == 200
    assert len(response.json()["predictions"]) == 3
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}
    assert server.process.poll() is None
    assert list(server.workdir.iterdir()) == []
    assert list(server.tmpdir.iterdir()) == []
