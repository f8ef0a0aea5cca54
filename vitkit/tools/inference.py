"""What predict, export and serve share: a model with its preprocessing and class names, bounded image
decoding, and top-k answers in one format.

Every image that enters through these tools goes through `open_image` (header only: a decompression bomb,
a small file that claims 20000x20000 pixels, is refused before any pixel is decoded) and `decode_image`;
`image_to_tensor` is both in one call. Whatever a decoder raises on hostile bytes comes out as one
ImageError (`image_error`), never as another exception.
"""
from __future__ import annotations

import io
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from vitkit.data.datasets import list_images
from vitkit.data.preprocess import DataConfig
from vitkit.data.transforms import build_transform
from vitkit.engine.checkpoint import is_vitkit_checkpoint, load_checkpoint
from vitkit.errors import VitkitError, WeightsError, path_problem
from vitkit.models.registry import get_spec, resolve_model_name
from vitkit.models.vit import VisionTransformer
from vitkit.weights import create_model, load_weights

# 40 megapixels: above any photo a ViT is fed (a 50 MP camera frame must be downscaled first), far below
# what would exhaust memory (40e6 * 3 bytes = 120 MB decoded). PIL's own guard is 89 MP, raising only at 2x.
DEFAULT_MAX_PIXELS = 40_000_000

T = TypeVar("T")


class ImageError(VitkitError):
    """An image that cannot be used; `reason` is one of empty, unsupported, corrupt, too_large."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


def one_line(text: str, limit: int = 200) -> str:
    """An exception's text as one short line (a hostile file can put anything in a decoder's message)."""
    text = " ".join("".join(c if c.isprintable() else " " for c in text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def image_error(e: BaseException) -> ImageError:
    """Any exception raised while opening or decoding image bytes -> the ImageError that says what is wrong.

    PIL raises OSError/SyntaxError/ValueError/EOFError for most damaged files, but hostile bytes reach code that
    raises anything else (TypeError from a TIFF tag of the wrong type, NotImplementedError from a DDS header,
    zlib/struct errors, MemoryError): all of them are the image's fault, none is the service's.
    """
    if isinstance(e, ImageError):
        return e
    if isinstance(e, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
        # PIL's own guard (above 2x Image.MAX_IMAGE_PIXELS) fires in open(), before our check can
        return ImageError(f"image refused before decoding, a possible decompression bomb: {one_line(str(e))}",
                          "too_large")
    if isinstance(e, UnidentifiedImageError):
        return ImageError("not an image (unrecognised format); send JPEG, PNG, WebP, BMP, GIF or TIFF bytes",
                          "unsupported")
    if isinstance(e, MemoryError):
        return ImageError("image needs more memory to decode than is available; downscale it first", "too_large")
    if isinstance(e, NotImplementedError):
        return ImageError(f"image uses a variant of its format that cannot be decoded ({one_line(str(e))})",
                          "unsupported")
    if isinstance(e, (OSError, SyntaxError, ValueError, EOFError)):
        # PIL raises OSError("image file is truncated ...") and friends for damaged files
        return ImageError(f"image is corrupt or truncated ({one_line(str(e))})", "corrupt")
    return ImageError(f"image is corrupt: its decoder failed ({type(e).__name__}: {one_line(str(e))})", "corrupt")


def open_image(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Image bytes -> a PIL image whose header has been read and checked, not one pixel decoded yet.

    Refused (ImageError): empty bytes, anything PIL cannot identify, and images above `max_pixels` or PIL's
    decompression-bomb threshold (Image.MAX_IMAGE_PIXELS), from the header alone. Thread-safe: unlike
    `image_to_tensor` it leaves the (process-wide) warnings filters alone, so a server can call it from
    several threads; PIL's DecompressionBombWarning for 1x-2x MAX_IMAGE_PIXELS is then only a warning,
    and the image is refused here all the same.
    """
    if not data:
        raise ImageError("empty image (0 bytes)", "empty")
    try:
        img = Image.open(io.BytesIO(data))  # reads the header only
        width, height = img.size
    except Exception as e:  # any failure on hostile bytes is the image's (see image_error)
        raise image_error(e) from None
    bomb_limit = Image.MAX_IMAGE_PIXELS
    if width * height > max_pixels or (bomb_limit and width * height > bomb_limit):
        img.close()
        limit = min(max_pixels, bomb_limit) if bomb_limit else max_pixels
        raise ImageError(f"image is {width}x{height} = {width * height} pixels, above the limit of {limit:,}; "
                         f"downscale it first", "too_large")
    return img


def decode_image(img: Image.Image, transform: Callable[[Image.Image], T]) -> T:
    """`transform(img)` for an image from `open_image`, every decoder failure an ImageError (`image_error`)."""
    try:
        return transform(img)
    except Exception as e:  # TypeError, zlib.error, MemoryError, ... from hostile pixels data
        raise image_error(e) from None


# Peak memory of decoding one pixel with the eval transform, relative to 8-bit RGB (~4-5 bytes per pixel:
# the decoded image plus its RGB conversion), measured on PIL 11-13 with 40 Mpx images: alpha, CMYK and
# float images ~8-9 B/px, WebP (decoded via RGBA) ~16, 16/32-bit integer images ~26-28 (to_rgb rescales
# them in float64).
_DECODE_COST = {"1": 1, "L": 1, "P": 1, "RGB": 1, "YCbCr": 1, "RGBA": 2, "RGBa": 2, "LA": 2, "La": 2, "PA": 2,
                "CMYK": 2, "LAB": 2, "HSV": 2, "F": 2, "I": 7, "I;16": 7, "I;16B": 7, "I;16L": 7, "I;16N": 7}


def decode_cost(img: Image.Image) -> int:
    """What decoding `img` (from `open_image`) costs in memory, in 8-bit-RGB pixels: width x height, times
    ~2 for alpha/CMYK/float modes, 4 for WebP and 7 for 16/32-bit integer images (unknown modes count 2)."""
    width, height = img.size
    weight = 4 if img.format == "WEBP" else _DECODE_COST.get(img.mode, 2)
    return max(1, width * height) * weight


def image_to_tensor(data: bytes | str | Path, transform: Callable[[Image.Image], torch.Tensor], *,
                    max_pixels: int = DEFAULT_MAX_PIXELS) -> torch.Tensor:
    """Bytes or a path -> `transform(image)`, or an ImageError saying what is wrong with the image.

    The image is handed to the transform undecoded: the eval transform decodes it itself (at reduced size
    where libjpeg can), so predict, export and serve see exactly the pixels validate sees. For one thread
    at a time (predict, export): it silences PIL's DecompressionBombWarning with `warnings.catch_warnings`,
    which changes process-wide state; threaded callers use `open_image` + `decode_image`.
    """
    if isinstance(data, (str, Path)):
        if (why := path_problem(data)) is not None:  # a FIFO would block the read, /dev/zero never end it
            raise ImageError(f"{data} {why}", "unsupported")
        try:
            data = Path(data).read_bytes()
        except OSError as e:
            raise ImageError(f"cannot read {data}: {e.strerror or e}", "unsupported") from None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # open_image refuses the image itself
        img = open_image(data, max_pixels=max_pixels)
    with img:
        return decode_image(img, transform)


def find_images(paths: list[str]) -> list[Path]:
    """Files given, plus every image file under the folders given (sorted, recursive)."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            out += map(Path, list_images(p))
        elif (why := path_problem(p)) is None:
            out.append(p)
        else:
            raise VitkitError(f"{p} {why}")
    return out


@lru_cache(maxsize=1)
def imagenet_class_names() -> list[str]:
    """The 1000 ImageNet-1k class names in label order (shipped in vitkit/assets; torchvision's spelling)."""
    text = resources.files("vitkit").joinpath("assets/imagenet1k_classes.txt").read_text()
    return text.splitlines()


def default_class_names(num_classes: int, own: list[str] | None = None) -> list[str]:
    """A checkpoint's own names win; a 1000-class head gets ImageNet's; anything else gets class_<i>."""
    if own is not None and len(own) == num_classes:
        return list(own)
    if num_classes == 1000:
        return imagenet_class_names()
    return [f"class_{i}" for i in range(num_classes)]


@dataclass
class InferenceModel:
    """A model ready to answer: weights, eval preprocessing and class names."""

    model: VisionTransformer
    model_name: str
    data_config: DataConfig
    class_names: list[str]
    source: str

    def transform(self, normalize: bool = True) -> Callable[[Image.Image], torch.Tensor]:
        """PIL image -> normalized float (C, H, W) tensor exactly as validate preprocesses, or with
        `normalize=False` the uint8 (C, H, W) crop before normalization."""
        return build_transform(self.data_config, train=False, normalize=normalize)

    def metadata(self) -> dict[str, Any]:
        dc = self.data_config
        return {
            "model_name": self.model_name,
            "source": self.source,
            "num_classes": len(self.class_names),
            "classes": self.class_names,
            "input_size": [3, dc.input_size, dc.input_size],
            "mean": list(dc.mean),
            "std": list(dc.std),
            "interpolation": dc.interpolation,
            "crop_pct": dc.crop_pct,
            "resize_size": dc.resize_size,
        }


def load_inference_model(source: str, *, model_name: str | None = None, use_ema: bool = False,
                         device: str | torch.device = "cpu") -> InferenceModel:
    """A vitkit checkpoint, a registered model name (its default pretrained weights), or foreign weights
    (any format vitkit reads) with `model_name` saying which architecture they are for."""
    if Path(source).is_file() and is_vitkit_checkpoint(source):
        ckpt = load_checkpoint(source)
        if model_name and resolve_model_name(model_name) != ckpt.model_name:
            raise WeightsError(f"{source} is a {ckpt.model_name} checkpoint, not {model_name}; drop --model")
        model = ckpt.build_model(use_ema=use_ema)
        names = default_class_names(ckpt.arch.num_classes, ckpt.class_names)
        return InferenceModel(model.to(device), ckpt.model_name, ckpt.data_config, names, str(source))
    if use_ema:
        raise WeightsError("--use_ema needs a vitkit checkpoint (other weights carry no EMA copy)")
    if Path(source).exists() and (why := path_problem(source, want="file or folder")) is not None:
        raise WeightsError(f"{source} {why}; give a checkpoint or weights file")
    try:  # a model name in any spelling (vit_b_32, timm/vit_base_patch32_224.<tag>): its published weights
        as_name, why = (None if Path(source).exists() else resolve_model_name(source)), ""
    except KeyError as e:
        as_name, why = None, f" ({e})"
    name, weights = (source, True) if as_name else (model_name, source)
    if name is None:
        raise WeightsError(f"{source} is neither a vitkit checkpoint nor a registered model name{why}; for other "
                           f"weights files pass --model NAME (see `vitkit models`)")
    loaded = load_weights(weights, model_name=name)
    model = create_model(name, pretrained=loaded).eval()
    dc = loaded.data_config(get_spec(name), model.cfg.img_size)
    names = default_class_names(model.cfg.num_classes, loaded.class_names)
    return InferenceModel(model.to(device), resolve_model_name(name), dc, names, str(source))


def topk_answer(probs: torch.Tensor | np.ndarray, class_names: list[str], k: int) -> list[dict[str, Any]]:
    """One image's probabilities (num_classes,) -> its top-k as [{index, label, probability}], best first."""
    probs = torch.as_tensor(probs, dtype=torch.float32)
    values, indices = probs.topk(min(k, probs.numel()))
    return [{"index": int(i), "label": class_names[int(i)], "probability": float(v)}
            for v, i in zip(values.tolist(), indices.tolist())]
