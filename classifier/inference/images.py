"""Uploaded bytes -> an upright RGB picture, or the reason it cannot be one. No model, no HTTP.

    bytes --sniff (allowed formats only)--> header --size limits--> decode (EXIF orientation, first frame)
          --> RGB (transparency over white, 16-bit to 8-bit)

The errors are errors.py's: the status every door answers them with (and `/predict/batch`, jobs and
`python -m classify` write beside their message), and the reason they are counted under.
"""

from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from classifier.errors import BadRequest

# Pillow may only parse these. Everything else (EPS, which runs Ghostscript, and dozens of exotic
# plugins) is refused before any of its code sees the bytes.
# (Multi-picture JPEGs from phones open through the JPEG plugin.)
ALLOWED_FORMATS = ("JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF", "AVIF")
READABLE = "JPEG, PNG, GIF, WebP, AVIF, BMP or TIFF"
Image.init()
# The file names python -m classify takes for images: the extensions Pillow registers for those formats.
SUFFIXES = frozenset(suffix for suffix, format in Image.registered_extensions().items() if format in ALLOWED_FORMATS)

# Recognisable files we deliberately do not decode, so the client hears "unsupported", not "garbage".
_UNSUPPORTED_SIGNATURES = (
    (b"%PDF", "PDF"),
    (b"%!PS", "PostScript/EPS"),
    (b"8BPS", "Photoshop (PSD)"),
    (b"\x00\x00\x00\x0cjP  ", "JPEG 2000"),
    (b"\xff\x4f\xff\x51", "JPEG 2000"),
)
_ISO_MEDIA_BRANDS = {b"heic": "HEIC", b"heix": "HEIC", b"mif1": "HEIF"}

_WHITE = (255, 255, 255, 255)

# Pillow's own decompression-bomb check is off: decode() refuses such images itself, from the header, at
# MAX_IMAGE_PIXELS (the settings', not a process-wide value), with a clear 413.
Image.MAX_IMAGE_PIXELS = None


class ImageError(BadRequest):
    """An upload that cannot be classified. The message is safe to show to the client."""

    reason = "bad_image"


class NotAnImage(ImageError):
    """Empty, corrupt or truncated data, or bytes that are no image at all."""


class UnsupportedImage(ImageError):
    """A recognisable image format that this service does not decode (SVG, PDF, HEIC...)."""

    status = 415


class ImageTooLarge(ImageError):
    """More bytes than MAX_UPLOAD_BYTES, or more pixels than MAX_IMAGE_PIXELS (decided from the header)."""

    status = 413
    reason = "too_large"


def decode(data: bytes, shorter_side: int, max_pixels: int, draft: bool = False) -> Image.Image:
    """Uploaded bytes -> an upright RGB image: EXIF orientation applied, first frame of animations.

    shorter_side: what the preprocessing resizes the shorter side to (the runtime's preprocessing.resize);
    max_pixels: MAX_IMAGE_PIXELS; images larger, or that would outgrow it once resized, are refused.
    draft: let big JPEGs decode at a reduced scale (see _draft; JPEG_DRAFT). Off by default: the image is
    decoded in full, exactly as torchvision's reference pipeline sees it.
    """
    if not data:
        raise NotAnImage("the file is empty")
    try:
        image = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
    except UnidentifiedImageError:
        unsupported = _sniff_unsupported(data)
        if unsupported:
            raise UnsupportedImage(f"{unsupported} files are not supported; send {READABLE}") from None
        raise NotAnImage(f"the file is not an image this service can read ({READABLE})") from None
    except Exception as error:  # Pillow's plugins raise many types on malformed headers
        raise NotAnImage(f"the image data is corrupt or truncated ({type(error).__name__})") from None
    _check_size(*image.size, shorter_side, max_pixels)
    if draft and image.format in ("JPEG", "MPO"):
        _draft(image, 2 * shorter_side)
    try:
        # In place and without needless copies: a decoded 24 MP photo is 72 MB, and every copy counts.
        ImageOps.exif_transpose(image, in_place=True)
        return to_rgb(image)
    except Exception as error:
        raise NotAnImage(f"the image data is corrupt or truncated ({type(error).__name__})") from None


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode -> RGB. Transparent pixels are composited over white, as a viewer shows them."""
    if image.mode in ("I", "I;16", "I;16L", "I;16B", "I;16N"):
        # 16-bit greyscale: keep the top 8 bits. convert("RGB") would clip everything above 255 to white.
        eight_bit = (np.clip(np.asarray(image, dtype=np.int64), 0, 65535) >> 8).astype(np.uint8)
        image = Image.fromarray(eight_bit)
    if image.has_transparency_data:
        image = Image.alpha_composite(Image.new("RGBA", image.size, _WHITE), image.convert("RGBA"))
    return image if image.mode == "RGB" else image.convert("RGB")


def _sniff_unsupported(data: bytes) -> str | None:
    head = data[:512]
    for signature, name in _UNSUPPORTED_SIGNATURES:
        if head.startswith(signature):
            return name
    if head[4:8] == b"ftyp" and head[8:12] in _ISO_MEDIA_BRANDS:
        return _ISO_MEDIA_BRANDS[head[8:12]]
    text = head.lstrip().lower()
    if text.startswith(b"<svg") or (text.startswith(b"<?xml") and b"<svg" in data[:4096].lower()):
        return "SVG"
    return None


def _check_size(width: int, height: int, shorter_side: int, max_pixels: int) -> None:
    if width * height > max_pixels:
        raise ImageTooLarge(
            f"the image is {width}x{height} = {width * height:,} pixels; "
            f"at most {max_pixels:,} are accepted (MAX_IMAGE_PIXELS)"
        )
    # The shorter side is scaled to shorter_side before cropping, so a 1x20000 strip would become a
    # 256x5,120,000 image: refuse shapes whose resized size would exceed the pixel limit.
    short, long = sorted((width, height))
    if shorter_side * shorter_side * long > max_pixels * short:
        raise NotAnImage(
            f"the image is {width}x{height}: too elongated to classify "
            f"(at most {max_pixels // (shorter_side * shorter_side)}:1)"
        )


def _draft(image: Image.Image, min_side: int) -> None:
    """Opt-in (JPEG_DRAFT): let libjpeg decode big photos at 1/2, 1/4 or 1/8 scale (DCT scaling).

    The decoded image keeps a shorter side of at least min_side, twice the size the preprocessing resizes
    to, so the antialiased resize still does the last reduction: a 12 MP photo decodes about 5x faster and
    its scores barely move (bench/accuracy.py measures how much). Photos whose shorter side is under twice
    min_side cannot be reduced and decode exactly as without it.
    """
    width, height = image.size
    scale = min_side / min(width, height)
    if scale <= 0.5:
        image.draft("RGB", (math.ceil(width * scale), math.ceil(height * scale)))
