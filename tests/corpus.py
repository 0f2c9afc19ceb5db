"""The corpus of uploads every door is tested with: real photos in every mode and container the service reads,
and the broken, hostile and unsupported files it must refuse, each with the answer it must get.

    CORPUS[case] = (filename, content type, bytes, expected status, the picture torchvision must see (or None))
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageOps

from support import corrupt_png, decompression_bomb, encode, photo, photo_bytes, png

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


def palette_with_transparency() -> tuple[bytes, Image.Image]:
    """A palette PNG whose colour 0 is transparent, and what it shows: those pixels white."""
    palette = BASE.convert("P")
    shown = np.asarray(palette.convert("RGB")).copy()
    shown[np.asarray(palette) == 0] = 255
    return encode(palette, transparency=0), Image.fromarray(shown)


def phone_mpo() -> bytes:
    """A phone's multi-picture JPEG: the photo, then a second picture (a depth map, a preview), EXIF-rotated."""
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(BASE.transpose(Image.Transpose.ROTATE_90), "MPO", save_all=True, append_images=[BASE.convert("L").convert("RGB")],
                  exif=exif, quality=90)


def animated_webp() -> bytes:
    return encode(BASE, "WEBP", save_all=True, append_images=[BASE.rotate(90), BASE.rotate(180)], duration=50, lossless=True)


def decoded(data: bytes) -> Image.Image:
    """What a lossy file holds once decoded: the reference pipeline sees these pixels."""
    return Image.open(io.BytesIO(data))


def upright(data: bytes) -> Image.Image:
    return ImageOps.exif_transpose(Image.open(io.BytesIO(data)))


GOOD = photo_bytes("coffee.png")
COFFEE = photo("coffee.png")
PALETTE_PNG, PALETTE_SHOWN = palette_with_transparency()
CMYK_JPEG, YCBCR_JPEG, EXIF_JPEG, GIF, WEBP, AVIF, MPO, ANIMATED_WEBP = (
    in_mode("CMYK", "JPEG"), in_mode("YCbCr", "JPEG"), exif_rotated(), animated_gif(), encode(BASE, "WEBP"),
    encode(BASE, "AVIF"), phone_mpo(), animated_webp())

# name: (field, filename, body bytes, expected status, and for a 200 the picture the reference pipeline sees)
CORPUS: dict[str, tuple[str, str, bytes, int, Image.Image | None]] = {
    "empty file": ("file", "empty.jpg", b"", 400, None),
    "plain text": ("file", "notes.txt", b"hello, this is not a photo\n" * 20, 400, None),
    "random bytes": ("file", "noise.bin", np.random.default_rng(7).bytes(30_000), 400, None),
    "truncated JPEG": ("file", "half.jpg", photo_bytes("rocket.jpg")[:5000], 400, None),
    "corrupt PNG": ("file", "corrupt.png", corrupt_png(), 400, None),
    "JPEG header only": ("file", "header.jpg", b"\xff\xd8\xff\xe0\x00\x10JFIF\x00", 400, None),
    "PNG decompression bomb": ("file", "bomb.png", decompression_bomb(), 413, None),
    "PNG claiming 100000x100000": ("file", "huge.png", png(100_000, 100_000, b""), 413, None),
    "SVG": ("file", "drawing.svg", b'<svg xmlns="http://www.w3.org/2000/svg"><script>alert(1)</script></svg>', 415, None),
    "PDF": ("file", "doc.pdf", b"%PDF-1.4\n1 0 obj <<>> endobj\n", 415, None),
    "HEIC": ("file", "phone.heic", b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic", 415, None),
    "HEIF": ("file", "photo.heif", b"\x00\x00\x00\x18ftypmif1\x00\x00\x00\x00mif1heic", 415, None),
    "Photoshop PSD": ("file", "layers.psd", b"8BPS\x00\x01" + bytes(6) + b"\x00\x03" + bytes(8) + b"\x00\x08\x00\x03", 415, None),
    "JPEG 2000": ("file", "photo.jp2", encode(BASE, "JPEG2000"), 415, None),
    "EPS (would run Ghostscript)": ("file", "art.eps", b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n", 415, None),
    "path traversal filename": ("file", "../../../../etc/passwd", GOOD, 200, COFFEE),
    # python-multipart refuses part headers over 4 KB: a clear 400, long before any decoding.
    "10,000-character filename": ("file", "a" * 10_000 + ".png", GOOD, 400, None),
    "250-character filename": ("file", "a" * 250 + ".png", GOOD, 200, COFFEE),
    "filename with NUL and newline": ("file", "evil\x00name\n.png", GOOD, 200, COFFEE),
    "wrong field name": ("image", "photo.png", GOOD, 422, None),
    "mode 1 (bilevel)": ("file", "1.png", in_mode("1"), 200, BASE.convert("1")),
    "mode L": ("file", "l.png", in_mode("L"), 200, BASE.convert("L")),
    "mode LA": ("file", "la.png", in_mode("LA"), 200, BASE.convert("L")),  # opaque: its grey
    "mode P": ("file", "p.png", in_mode("P"), 200, BASE.convert("P")),
    "palette with transparency": ("file", "ptrns.png", PALETTE_PNG, 200, PALETTE_SHOWN),
    "mode RGBA": ("file", "rgba.png", in_mode("RGBA"), 200, BASE),
    "mode CMYK JPEG": ("file", "cmyk.jpg", CMYK_JPEG, 200, decoded(CMYK_JPEG)),
    "mode YCbCr JPEG": ("file", "ycbcr.jpg", YCBCR_JPEG, 200, decoded(YCBCR_JPEG)),
    "mode I;16 PNG": ("file", "16bit.png", sixteen_bit(), 200, BASE.convert("L")),  # its top eight bits
    "mode F TIFF": ("file", "float.tif", float_tiff(), 200, BASE.convert("L")),
    "EXIF rotation": ("file", "rotated.jpg", EXIF_JPEG, 200, upright(EXIF_JPEG)),
    "animated GIF": ("file", "anim.gif", GIF, 200, decoded(GIF)),  # its first frame
    "multi-page TIFF": ("file", "pages.tif", multipage_tiff(), 200, BASE),  # its first page
    "phone MPO JPEG": ("file", "phone.jpg", MPO, 200, upright(MPO)),  # the first picture, upright
    "animated WebP": ("file", "anim.webp", ANIMATED_WEBP, 200, BASE),  # its first frame (lossless)
    "WebP": ("file", "photo.webp", WEBP, 200, decoded(WEBP)),
    "AVIF": ("file", "photo.avif", AVIF, 200, decoded(AVIF)),
    "BMP": ("file", "photo.bmp", encode(BASE, "BMP"), 200, BASE),
    "1x1 image": ("file", "dot.png", encode(Image.new("RGB", (1, 1), "red")), 200, Image.new("RGB", (1, 1), "red")),
    "1x20000 image": ("file", "strip.png", encode(Image.new("RGB", (1, 20000))), 400, None),
}
