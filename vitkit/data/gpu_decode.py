"""JPEG decode and RandomResizedCrop / flip / normalize on the GPU (nvJPEG through
`torchvision.io.decode_jpeg(device="cuda")`); the same code runs with device="cpu" (tests, no GPU).

Workers only read file bytes and draw each sample's crop box and flip (seeded per sample as everywhere else);
the main process decodes the whole batch on the device, crops and resizes each image (bilinear/bicubic with
antialias) and normalizes the batch. RandAugment and other PIL ops are not available on this path.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import RandomResizedCrop as _RRCv1

from vitkit.data.batch_augment import tensor_interpolation
from vitkit.data.images import encoded_bytes, source_name
from vitkit.data.preprocess import DataConfig


class JpegCropPlan:
    """Worker side: lazy PIL image -> (its JPEG bytes uint8, [top, left, h, w, hflip]) from header size only; the
    bytes are the file's, or those a shard or Hugging Face sample was opened from (`images.encoded_bytes`)."""

    def __init__(self, scale: tuple[float, float], ratio: tuple[float, float], hflip: float, train: bool,
                 data_config: DataConfig):
        self.scale, self.ratio, self.hflip, self.train, self.dc = list(scale), list(ratio), hflip, train, data_config

    def __call__(self, img: Image.Image) -> tuple[torch.Tensor, torch.Tensor]:
        if img.format != "JPEG":
            raise OSError(f"{source_name(img)}: gpu_decode reads JPEG files only (found {img.format})")
        w, h = img.size
        if self.train:
            top, left, ch, cw = _RRCv1.get_params(img, self.scale, self.ratio)
            flip = int(torch.rand(1).item() < self.hflip)
        else:  # eval: the center crop of the resized image, expressed in source pixels
            side = min(w, h) * self.dc.input_size / self.dc.resize_size
            ch = cw = max(1, round(side))
            top, left, flip = (h - ch) // 2, (w - cw) // 2, 0
        # the file's bytes, or the shard member's / Hugging Face row's the image was opened from
        data = torch.frombuffer(bytearray(encoded_bytes(img)), dtype=torch.uint8)
        return data, torch.tensor([top, left, ch, cw, flip])


class GpuCollate:
    def __call__(self, items: list) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor, list[str]]:
        return ([d for (d, _), _, _ in items], torch.stack([p for (_, p), _, _ in items]),
                torch.tensor([t for _, t, _ in items], dtype=torch.long), [p for _, _, bad in items for p in bad])


class GpuDecoder:
    """Main-process side: (bytes, boxes) -> images float (B, 3, S, S) normalized on `device`."""

    def __init__(self, data_config: DataConfig, device: str | torch.device):
        self.dc, self.device = data_config, torch.device(device)
        self.mean, self.std = data_config.pixel_mean_std(self.device)
        self.mode = tensor_interpolation(data_config.interpolation)

    def __call__(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        data, boxes, targets, bad = batch
        decoded = decode_jpeg(data, device=self.device, mode=ImageReadMode.RGB)
        s = self.dc.input_size
        out = torch.empty(len(decoded), 3, s, s, device=self.device)
        for k, (img, (top, left, ch, cw, flip)) in enumerate(zip(decoded, boxes.tolist())):
            crop = img[:, top:top + ch, left:left + cw].unsqueeze(0).float()
            crop = F.interpolate(crop, size=(s, s), mode=self.mode, antialias=True, align_corners=False)
            out[k] = crop[0].flip(-1) if flip else crop[0]
        return out.clamp_(0, 255).sub_(self.mean).div_(self.std), targets, bad
