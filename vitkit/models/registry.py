"""Model names -> architectures, with the metadata every name carries.

A name is `vit_{size}_{patch}_{img_size}` (MindCV's spelling: `vit_b_32_224`). Sizes follow the ViT paper
(Table 1) and DeiT for ti/s. The `_4_32` names are small-image variants for 32x32 data (CIFAR-scale work).
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Any

from vitkit.constants import CIFAR10_MEAN, CIFAR10_STD, IMAGENET_MEAN, IMAGENET_STD
from vitkit.models.vit import ViTConfig, VisionTransformer

# width, depth, heads of each size (ViT paper Table 1; DeiT for ti and s; "n" is ours, for CPU-scale runs).
SIZES: dict[str, tuple[int, int, int]] = {
    "n": (128, 6, 4),
    "ti": (192, 12, 3),
    "s": (384, 12, 6),
    "b": (768, 12, 12),
    "l": (1024, 24, 16),
    "h": (1280, 32, 16),
}


@dataclass(frozen=True)
class ModelSpec:
    """A registered name: the architecture plus the eval preprocessing that goes with it."""

    name: str
    arch: ViTConfig
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bicubic"
    crop_pct: float = 0.875
    notes: str = ""
    tags: tuple[str, ...] = field(default_factory=tuple)

    @property
    def input_size(self) -> tuple[int, int, int]:
        return (self.arch.in_chans, self.arch.img_size, self.arch.img_size)


_REGISTRY: dict[str, ModelSpec] = {}


def register(spec: ModelSpec) -> ModelSpec:
    """Add a name to the registry; a duplicate name is a bug, not an override."""
    if spec.name in _REGISTRY:
        raise ValueError(f"model name {spec.name!r} is already registered")
    _REGISTRY[spec.name] = spec
    return spec


def _vit(size: str, patch: int, img: int, **kw: Any) -> ModelSpec:
    dim, depth, heads = SIZES[size]
    small = img <= 64
    spec_kw = {k: kw.pop(k) for k in ("mean", "std", "crop_pct", "interpolation", "notes") if k in kw}
    if small:
        spec_kw.setdefault("mean", CIFAR10_MEAN)
        spec_kw.setdefault("std", CIFAR10_STD)
        spec_kw.setdefault("crop_pct", 1.0)
    elif img >= 384:
        spec_kw.setdefault("crop_pct", 1.0)  # 384 px models are evaluated on the full resized image
    arch = ViTConfig(img_size=img, patch_size=patch, embed_dim=dim, depth=depth, num_heads=heads, **kw)
    return register(ModelSpec(name=f"vit_{size}_{patch}_{img}", arch=arch, **spec_kw))


# ImageNet-scale names (the seed's seven first, then the rest of the family).
for _size, _patch, _img in [
    ("b", 16, 224), ("b", 16, 384), ("b", 32, 224), ("b", 32, 384),
    ("l", 16, 224), ("l", 16, 384), ("l", 32, 224), ("l", 32, 384),
    ("h", 14, 224),
    ("ti", 16, 224), ("ti", 16, 384), ("s", 16, 224), ("s", 16, 384), ("s", 32, 224), ("s", 32, 384),
]:
    _vit(_size, _patch, _img)
# Small-image variants: 32x32 inputs, 4x4 patches -> an 8x8 grid, 10 classes by default (CIFAR-10).
for _size in ("n", "ti", "s", "b"):
    _vit(_size, 4, 32, num_classes=10)


def list_models(pattern: str = "*") -> list[str]:
    """Registered names matching a shell-style pattern, in registration order."""
    return [n for n in _REGISTRY if fnmatch.fnmatch(n, pattern)]


def get_spec(name: str) -> ModelSpec:
    try:
        return _REGISTRY[name]
    except KeyError:
        import difflib

        close = difflib.get_close_matches(name, list(_REGISTRY), n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else " Run `vitkit models` to list them."
        raise KeyError(f"unknown model {name!r}.{hint}") from None


def build_config(
    name: str, *, num_classes: int | None = None, img_size: int | None = None, **overrides: Any
) -> ViTConfig:
    """The architecture of `name` with the given changes applied (unknown fields are an error)."""
    arch = get_spec(name).arch
    if num_classes is not None:
        overrides["num_classes"] = num_classes
    if img_size is not None:
        overrides["img_size"] = img_size
    valid = set(arch.to_dict())
    unknown = sorted(set(overrides) - valid)
    if unknown:
        import difflib

        hints = [f"{k} (did you mean {difflib.get_close_matches(k, valid, n=1)[0]}?)"
                 if difflib.get_close_matches(k, valid, n=1) else k for k in unknown]
        raise TypeError(f"unknown model argument(s): {', '.join(hints)}")
    return arch.replace(**overrides)


def create_model(name: str, *, num_classes: int | None = None, img_size: int | None = None,
                 **overrides: Any) -> VisionTransformer:
    """Build a registered model with fresh weights (pretrained ones: `vitkit.create_model`)."""
    if "pretrained" in overrides:
        raise TypeError("vitkit.models.create_model builds fresh weights; for pretrained ones call "
                        "vitkit.create_model(name, pretrained=...)")
    model = VisionTransformer(build_config(name, num_classes=num_classes, img_size=img_size, **overrides))
    model.model_name = name
    return model


def count_macs(cfg: ViTConfig, img_size: int | None = None) -> int:
    """Multiply-accumulates of one forward pass (matmuls and convs; norms and softmax left out, as fvcore)."""
    img = img_size or cfg.img_size
    n_patch = (img // cfg.patch_size) ** 2
    n = n_patch + cfg.num_prefix_tokens
    d, hidden = cfg.embed_dim, int(cfg.embed_dim * cfg.mlp_ratio)
    embed = n_patch * d * cfg.in_chans * cfg.patch_size**2
    per_block = n * d * 3 * d + 2 * n * n * d + n * d * d + 2 * n * d * hidden
    return embed + cfg.depth * per_block + d * max(cfg.num_classes, 0)
