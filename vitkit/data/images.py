"""Opening one image: from a file or from bytes (a shard member, a Hugging Face row), upright, undecoded.

A leaf of vitkit.data (of vitkit it imports only the leaf vitkit.errors), so every dataset kind can use it.
An image opened from bytes keeps them (`encoded_bytes`) and where they came from (`source_name`): the GPU
decode path reads the JPEG bytes of any dataset through them, without knowing whether they came from a file
or a tar.
"""
from __future__ import annotations

import io
from pathlib import Path

from PIL import Image, ImageOps

from vitkit.errors import path_problem

# Decompression-bomb guard: PIL raises DecompressionBombError above 2x this many pixels and warns above it.
# 89.5 Mpx is PIL's own default; we set it explicitly so no other library can switch it off for us.
Image.MAX_IMAGE_PIXELS = 89_478_485

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")
EXIF_ORIENTATION = 0x0112
_BYTES, _SOURCE = "vitkit_encoded_bytes", "vitkit_source_name"


def open_image(path: str | Path | io.BytesIO) -> Image.Image:
    """The image at `path` (a file, or a file object such as io.BytesIO), upright: an EXIF orientation other
    than 1 is applied (as torchvision's `decode_image(apply_exif_orientation=True)` and timm's loaders do).
    Reading the tag costs no decode, so the usual image stays undecoded (a transform may still decode it at
    reduced size); only a rotated one is decoded here. A path that is no regular file (a FIFO named x.jpg would
    block the open, a link to /dev/zero never ends) is an OSError: the callers' bad-image handling names it."""
    if not isinstance(path, io.IOBase) and (why := path_problem(path)) is not None:
        raise OSError(f"{path} {why}")
    img = Image.open(path)
    try:
        rotated = img.getexif().get(EXIF_ORIENTATION, 1) not in (1, None)
    except Exception:  # noqa: BLE001 - a damaged EXIF block: the pixels may still be fine; keep them as stored
        rotated = False
    if not rotated:
        return img
    with img:
        return ImageOps.exif_transpose(img)


def open_bytes(data: bytes, name: str) -> Image.Image:
    """`open_image` of encoded bytes; `name` (e.g. `shard-000003.tar:00000789.jpg`) names them in errors."""
    img = open_image(io.BytesIO(data))
    setattr(img, _BYTES, data)
    setattr(img, _SOURCE, name)
    return img


def encoded_bytes(img: Image.Image) -> bytes:
    """The encoded bytes an image was opened from: kept ones (`open_bytes`), else its file's."""
    data = getattr(img, _BYTES, None)
    if data is not None:
        return data
    with open(img.filename, "rb") as f:  # type: ignore[attr-defined]
        return f.read()


def source_name(img: Image.Image) -> str:
    """Where an image came from, for error messages."""
    return getattr(img, _SOURCE, None) or getattr(img, "filename", "") or "<image>"


def image_format_extension(data: bytes) -> str:
    """The WebDataset extension for encoded image bytes by their format (jpg, png, webp, ...), read from the
    header alone; 'bin' when PIL does not recognize them."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            fmt = (img.format or "").lower()
    except Exception:  # noqa: BLE001 - not an image PIL knows: kept as it is, reported when read
        return "bin"
    return {"jpeg": "jpg", "mpo": "jpg"}.get(fmt, fmt or "bin")
