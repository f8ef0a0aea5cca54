"""The eval preprocessing contract: what a model expects, resolved once and carried in every checkpoint.

`DataConfig` travels from the model's registry entry (or the pretrained weights) through the config into the
checkpoint, so validate, predict, export and serve preprocess exactly as training evaluated.
"""
from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from vitkit.constants import IMAGENET_MEAN, IMAGENET_STD, INTERPOLATIONS


@dataclass(frozen=True)
class DataConfig:
    input_size: int = 224  # square crop fed to the model
    mean: tuple[float, float, float] = IMAGENET_MEAN  # 0-1 units
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bicubic"
    crop_pct: float = 0.875

    def __post_init__(self) -> None:
        """Every value checked once, here: a DataConfig that exists preprocesses (ValueError names the field)."""
        def bad(field: str, why: str) -> ValueError:
            return ValueError(f"data_config {field} = {getattr(self, field)!r} {why}")
        if isinstance(self.input_size, bool) or not isinstance(self.input_size, int) or self.input_size < 1:
            raise bad("input_size", "is not a whole number >= 1")
        for field in ("mean", "std"):
            values = getattr(self, field)
            if (not isinstance(values, tuple) or len(values) != 3
                    or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                               for v in values)):
                raise bad(field, "is not 3 finite numbers (one per RGB channel)")
        if not all(v > 0 for v in self.std):
            raise bad("std", "has a value <= 0")
        if self.interpolation not in INTERPOLATIONS:
            raise bad("interpolation", f"is not one of {', '.join(INTERPOLATIONS)}")
        if (isinstance(self.crop_pct, bool) or not isinstance(self.crop_pct, (int, float))
                or not 0 < self.crop_pct <= 1):
            raise bad("crop_pct", "is not a number in (0, 1]")

    @property
    def resize_size(self) -> int:
        """Eval: shorter side resized to input_size / crop_pct, then center-cropped to input_size (timm's rule)."""
        return int(math.floor(self.input_size / self.crop_pct))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    def pixel_mean_std(self, device: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
        """mean and std in 0-255 units as (1, 3, 1, 1) tensors, to normalize uint8-range batches."""
        shape = (1, 3, 1, 1)
        return (torch.tensor(self.mean, device=device).view(shape) * 255,
                torch.tensor(self.std, device=device).view(shape) * 255)

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DataConfig:
        """The inverse of to_dict (other keys are ignored: an export's metadata holds them beside these); a
        missing or ill-typed field is a ValueError naming it."""
        missing = [f for f in ("input_size", "mean", "std", "interpolation", "crop_pct") if f not in d]
        if missing:
            raise ValueError(f"data_config lacks {', '.join(missing)}")
        mean, std = (tuple(v) if isinstance(v, (list, tuple)) else v for v in (d["mean"], d["std"]))
        crop_pct = float(d["crop_pct"]) if isinstance(d["crop_pct"], int) and not isinstance(d["crop_pct"], bool) \
            else d["crop_pct"]
        return cls(input_size=d["input_size"], mean=mean, std=std, interpolation=d["interpolation"],
                   crop_pct=crop_pct)


def to_unit_range(values: tuple[float, ...]) -> tuple[float, ...]:
    """MindCV gives mean/std in 0-255 units ([123.675, 116.28, 103.53]); accept both."""
    return tuple(v / 255.0 for v in values) if max(values) > 1.0 else tuple(values)


def resolve_data_config(spec: Any, *, input_size: int, mean: Sequence[float] | None = None,
                        std: Sequence[float] | None = None, interpolation: str | None = None,
                        crop_pct: float | None = None) -> DataConfig:
    """Preprocessing at `input_size` for a model: each keyword overrides the model's own value (`spec`, a ModelSpec
    or anything with mean, std, interpolation, crop_pct); None keeps the model's. mean/std may be in 0-255 units."""
    return DataConfig(
        input_size=int(input_size),
        mean=tuple(to_unit_range(tuple(mean)) if mean is not None else spec.mean),  # type: ignore[arg-type]
        std=tuple(to_unit_range(tuple(std)) if std is not None else spec.std),  # type: ignore[arg-type]
        interpolation=str(interpolation if interpolation is not None else spec.interpolation),
        crop_pct=float(crop_pct if crop_pct is not None else spec.crop_pct),
    )
