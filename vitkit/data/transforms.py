"""Train and eval transforms: PIL image (possibly not yet decoded) -> normalized float tensor (C, H, W).

Built on torchvision transforms v2 where they fit. The first step of each pipeline decodes the JPEG itself so
it can use libjpeg's reduced-size decode (PIL `draft`, DCT scaling by 1/2, 1/4, 1/8) whenever the crop will
be shrunk by at least that factor anyway: the image is decoded at the smallest scale that still has at least
the output resolution over the crop, which is where a full-size decode would be downsampled to (measured in
benchmarks/bench_loader.py).

Pipelines (build_transform keywords in brackets):
- train, large images: RandomResizedCrop(input_size, [scale], [ratio], interpolation) -> flips [hflip,
  vflip] -> ColorJitter [color_jitter] (off when auto_augment is set, as in timm) -> auto augment -> tensor ->
  Normalize [mean, std] -> RandomErasing [re_*].
- train, small images (<= 64 px, e.g. CIFAR): pad by size/8 (4 for 32 px) + random crop at the native size ->
  flips -> jitter / auto augment -> resize to input_size if it differs (finetuning a 224 px model on CIFAR
  with the pretrained model's mean/std) -> tensor -> Normalize -> RandomErasing.
- eval: shorter side resized to DataConfig.resize_size (input_size / crop_pct), center crop input_size; small
  images are resized straight to input_size.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torchvision.transforms.v2 as v2
from PIL import Image
from torchvision.transforms import RandomResizedCrop as _RRCv1

from vitkit.data.augment import PIL_INTERPOLATION, build_auto_augment, tv_interpolation
from vitkit.data.preprocess import DataConfig

SMALL_IMAGE_MAX = 64  # images at most this size take the pad-and-crop path (CIFAR-style)


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB: grayscale, CMYK, palette, alpha (dropped, as timm/torchvision do), 16-bit."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # convert("RGB") would clip 16-bit values at 255; scale the range down instead.
        a = np.asarray(img, dtype=np.float64)
        # I;16*: 16-bit by the file's own word (a dark 16-bit image must not come out 257x too bright); mode I
        # (32-bit, how some PIL versions open 16-bit PNGs) says nothing, so its range decides.
        peak = 65535.0 if img.mode.startswith("I;16") or a.max() > 255 else 255.0
        img = Image.fromarray(np.clip(a * (255.0 / peak) + 0.5, 0, 255).astype(np.uint8), "L")
    elif img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")  # avoids PIL's warning on palette transparency
    return img.convert("RGB")


def _draft(img: Image.Image, needed_w: float, needed_h: float) -> float:
    """Ask libjpeg for a reduced-size decode that keeps >= needed pixels; returns the scale actually used."""
    if getattr(img, "format", None) != "JPEG" or not getattr(img, "tile", None):  # not JPEG, or decoded
        return 1.0
    w, h = img.size
    k = 1
    while k < 8 and w / (2 * k) >= needed_w and h / (2 * k) >= needed_h:
        k *= 2
    if k > 1:
        img.draft("RGB", (w // k, h // k))  # PIL picks the largest scale with size >= this
    return img.size[0] / w


class DecodeRandomResizedCrop(torch.nn.Module):
    """RandomResizedCrop that samples the box from the header size, then decodes just enough resolution.

    The box is drawn by torchvision's RandomResizedCrop.get_params (same distribution as timm's); the crop and
    resize are one PIL `resize(box=...)` call.
    """

    def __init__(self, size: int, scale: tuple[float, float], ratio: tuple[float, float], interpolation: str):
        super().__init__()
        self.size, self.scale, self.ratio = size, list(scale), list(ratio)
        self.resample = PIL_INTERPOLATION[interpolation]

    def forward(self, img: Image.Image) -> Image.Image:
        w, h = img.size
        top, left, ch, cw = _RRCv1.get_params(img, self.scale, self.ratio)  # reads the header size only
        s = _draft(img, w * self.size / cw, h * self.size / ch)
        img = to_rgb(img)
        box = (left * s, top * s, (left + cw) * s, (top + ch) * s)
        return img.resize((self.size, self.size), self.resample, box=box)


class DecodeResize(torch.nn.Module):
    """Shorter side -> `size` (torchvision Resize semantics), decoding at reduced size where that is lossless."""

    def __init__(self, size: int, interpolation: str):
        super().__init__()
        self.size, self.resample = size, PIL_INTERPOLATION[interpolation]

    def forward(self, img: Image.Image) -> Image.Image:
        w, h = img.size
        short = min(w, h)
        _draft(img, w * self.size / short, h * self.size / short)
        img = to_rgb(img)
        w2, h2 = img.size
        if w <= h:
            size = (self.size, int(self.size * h / w))
        else:
            size = (int(self.size * w / h), self.size)
        return img if (w2, h2) == size else img.resize(size, self.resample)


class ToRGB(torch.nn.Module):
    def forward(self, img: Image.Image) -> Image.Image:
        return to_rgb(img)


def build_transform(data_config: DataConfig, *, train: bool, scale: tuple[float, float] = (0.08, 1.0),
                    ratio: tuple[float, float] = (0.75, 1.333), hflip: float = 0.5, vflip: float = 0.0,
                    auto_augment: str | None = None, color_jitter: Any = None, re_prob: float = 0.0,
                    re_scale: tuple[float, float] = (0.02, 0.33), re_ratio: tuple[float, float] = (0.3, 3.3),
                    re_value: float | str = 0, small_data: bool | None = None,
                    normalize: bool = True) -> v2.Compose:
    """PIL image -> normalized float tensor (C, H, W); the augmentation keywords apply with train=True only.

    color_jitter: one strength for brightness/contrast/saturation or a list of 3 (4 with hue), as timm and MindCV
    read it; ignored when auto_augment is set. small_data: the source images are CIFAR-sized (default:
    data_config.input_size <= 64). normalize=False stops at a uint8 tensor (the loader normalizes whole batches).
    """
    dc = data_config
    small = dc.input_size <= SMALL_IMAGE_MAX if small_data is None else small_data
    tail = [v2.PILToTensor(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(dc.mean), list(dc.std))] \
        if normalize else [v2.PILToTensor()]
    if not train:
        if small:
            resize = v2.Resize((dc.input_size, dc.input_size), interpolation=tv_interpolation(dc.interpolation),
                               antialias=True)
            return v2.Compose([ToRGB(), resize] + tail)
        return v2.Compose([DecodeResize(dc.resize_size, dc.interpolation), v2.CenterCrop(dc.input_size)] + tail)
    flips = [v2.RandomHorizontalFlip(hflip)] if hflip > 0 else []
    flips += [v2.RandomVerticalFlip(vflip)] if vflip > 0 else []
    if auto_augment:
        color = [build_auto_augment(auto_augment, img_size=dc.input_size, mean=dc.mean, interpolation=dc.interpolation)]
    elif color_jitter:
        j = color_jitter
        color = [v2.ColorJitter(*(tuple(float(v) for v in j) if isinstance(j, (list, tuple)) else (float(j),) * 3))]
    else:
        color = []
    if small:
        # CIFAR recipe (He et al. 2016): zero-pad by 1/8 of the side, random crop back, at the native size.
        head = [ToRGB(), _NativePadCrop()] + flips + color + [_ResizeIfNeeded(dc.input_size, dc.interpolation)]
    else:
        head = [DecodeRandomResizedCrop(dc.input_size, tuple(scale), tuple(ratio), dc.interpolation)] + flips + color
    erasing = []
    if re_prob > 0 and normalize:  # random erasing works on normalized pixels
        value: Any = "random" if re_value == "random" else float(re_value)
        erasing = [v2.RandomErasing(p=re_prob, scale=tuple(re_scale), ratio=tuple(re_ratio), value=value)]
    return v2.Compose(head + tail + erasing)


class _NativePadCrop(torch.nn.Module):
    """RandomCrop at the image's own size with zero padding of size // 8 on each side."""

    def forward(self, img: Image.Image) -> Image.Image:
        w, h = img.size
        pad = max(1, min(w, h) // 8)
        return v2.RandomCrop((h, w), padding=pad)(img)


class _ResizeIfNeeded(torch.nn.Module):
    def __init__(self, size: int, interpolation: str):
        super().__init__()
        self.size, self.resample = size, PIL_INTERPOLATION[interpolation]

    def forward(self, img: Image.Image) -> Image.Image:
        return img if img.size == (self.size, self.size) else img.resize((self.size, self.size), self.resample)

