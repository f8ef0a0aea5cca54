"""Model names -> architectures, with the metadata every name carries; one resolver for every spelling.

A registered name is `vit_{size}_{patch}_{img_size}` (MindCV's spelling: `vit_b_32_224`). Sizes follow the ViT
paper (Table 1) and DeiT for ti/s. The `_4_32` names are small-image variants for 32x32 data (CIFAR-scale work).

Every entry point (`get_spec`, `build_config`, `create_model`, `vitkit.create_model`, each verb's `--model`)
goes through `resolve_model`, which accepts, case-insensitively and with `-`, `/` or spaces for `_`:
  vitkit / MindCV  `vit_b_32_224` (MindCV's registry uses these very names), the short `vit_b_32` = the 224 px
                   model (MindCV's `--model=vit_b_32` style), `vit_b32_224`, and the paper's `ViT-B/32`;
  timm             `vit_{tiny|small|base|large|huge}_patch{P}_{IMG}` (e.g. `vit_base_patch32_224`), optionally
                   `timm/`-prefixed and with a pretrained tag: `vit_base_patch32_224.augreg2_in21k_ft_in1k`.
A name is resolved to the registered vitkit name plus the family of its spelling (`ModelName`). The family
decides the eval preprocessing a bare name stands for (`get_spec`): the vitkit/MindCV spelling keeps the
registry's defaults below (MindCV's: ImageNet mean/std, bicubic, crop 0.875, 1.0 at 384 px; CIFAR-10 stats
for the 32 px models), a timm spelling gets timm's `_cfg` defaults for these ViTs (mean = std = 0.5, bicubic,
crop 0.9, 1.0 at 384 px; timm/models/vision_transformer.py, timm 1.0.31, which every timm tag of these
architectures in `vitkit.weights.sources` also uses). The timm tag is kept in `ModelName.tag`: the weights
layer (`vitkit.weights.load_weights`) makes that source the name's default pretrained weights, and refuses a
tag it does not know. Pretrained weights state their own preprocessing, which wins over the name's.

An unknown name is an `UnknownModelError` (a VitkitError and a KeyError) whose one-line message suggests the
closest names: same size first, then ImageNet-scale vs small-image family, then patch and input size
(`vit_b_33` -> vit_b_32_224, vit_b_32_384, vit_b_16_224), spelled in the family of the name given.
"""
from __future__ import annotations

import difflib
import fnmatch
import math
import re
from dataclasses import dataclass, field, replace
from typing import Any

from vitkit.constants import CIFAR10_MEAN, CIFAR10_STD, IMAGENET_MEAN, IMAGENET_STD
from vitkit.errors import UnknownModelError
from vitkit.models.vit import ViTConfig, VisionTransformer

# Inputs scaled to [-1, 1]: Google's ViT / AugReg and timm's ViT `_cfg` (timm: IMAGENET_INCEPTION_MEAN/STD).
INCEPTION_MEAN = INCEPTION_STD = (0.5, 0.5, 0.5)

# width, depth, heads of each size (ViT paper Table 1; DeiT for ti and s; "n" is ours, for CPU-scale runs).
SIZES: dict[str, tuple[int, int, int]] = {
    "n": (128, 6, 4),
    "ti": (192, 12, 3),
    "s": (384, 12, 6),
    "b": (768, 12, 12),
    "l": (1024, 24, 16),
    "h": (1280, 32, 16),
}

# The spellings `resolve_model` accepts, after `_normalize` (lower case, `-`, `/`, spaces -> `_`).
TIMM_SIZES = {"ti": "tiny", "s": "small", "b": "base", "l": "large", "h": "huge"}
_SIZE_LETTERS = {**{w: k for k, w in TIMM_SIZES.items()}, **{k: k for k in SIZES}}
_VITKIT_NAME = re.compile(r"vit_?(n|ti|s|b|l|h)_?(\d+)(?:_(\d+))?")
_TIMM_NAME = re.compile(r"(?:timm_)?vit_(tiny|small|base|large|huge)_patch(\d+)_(\d+)(?:\.(\w+))?")


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
    family: str = "vitkit"  # whose preprocessing the fields above are: "vitkit" (= MindCV's) or "timm"

    @property
    def input_size(self) -> tuple[int, int, int]:
        return (self.arch.in_chans, self.arch.img_size, self.arch.img_size)


_REGISTRY: dict[str, ModelSpec] = {}
# name -> (size, patch, img_size), for resolving other spellings and ranking suggestions
_PARTS: dict[str, tuple[str, int, int]] = {}


def register(spec: ModelSpec) -> ModelSpec:
    """Add a name to the registry; a duplicate name is a bug, not an override."""
    if spec.name in _REGISTRY:
        raise ValueError(f"model name {spec.name!r} is already registered")
    _REGISTRY[spec.name] = spec
    m = _VITKIT_NAME.fullmatch(spec.name)
    if m and m.group(3):
        _PARTS[spec.name] = (m.group(1), int(m.group(2)), int(m.group(3)))
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


# -- names ------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ModelName:
    """A resolved model name: the registered vitkit name, the family of the spelling given, and its tag."""

    name: str  # the registered vitkit name (`vit_b_32_224`)
    family: str = "vitkit"  # "vitkit" (vitkit's or MindCV's spelling) | "timm"
    tag: str | None = None  # a timm pretrained tag (`vit_base_patch32_224.augreg2_in21k_ft_in1k`), else None
    given: str = ""  # the name as given


def _normalize(name: str) -> str:
    return re.sub(r"_+", "_", re.sub(r"[-/\s]", "_", name.strip().lower())).strip("_")


def timm_name(name: str) -> str | None:
    """timm's name of a registered (ImageNet-scale) model: vit_b_32_224 -> vit_base_patch32_224; else None."""
    parts = _PARTS.get(resolve_model_name(name))
    if parts is None:
        return None
    size, patch, img = parts
    return f"vit_{TIMM_SIZES[size]}_patch{patch}_{img}" if size in TIMM_SIZES and img >= 224 else None


def aliases(name: str) -> list[str]:
    """Every spelling `resolve_model` maps to `name` (leaving out tags, case and separators): ours, MindCV's
    short form (224 px models) and timm's."""
    name = resolve_model_name(name)
    if name not in _PARTS:
        return [name]
    size, patch, img = _PARTS[name]
    out = [name] + ([f"vit_{size}_{patch}"] if img == 224 else [])
    timm = timm_name(name)
    return out + ([timm] if timm else [])


def resolve_model(name: str) -> ModelName:
    """Any accepted spelling (module docstring) -> `ModelName`; anything else is an UnknownModelError."""
    if not isinstance(name, str):
        raise UnknownModelError(f"model name must be a string, not {name!r}", str(name))
    if name in _REGISTRY:
        return ModelName(name, "vitkit", None, name)
    n = _normalize(name)
    if n in _REGISTRY:
        return ModelName(n, "vitkit", None, name)
    m = _TIMM_NAME.fullmatch(n)
    if m:
        ours = f"vit_{_SIZE_LETTERS[m.group(1)]}_{m.group(2)}_{m.group(3)}"
        if ours in _REGISTRY and timm_name(ours) is not None:  # timm has no 32 px ViTs
            return ModelName(ours, "timm", m.group(4), name)
    m = _VITKIT_NAME.fullmatch(n)
    if m:
        ours = f"vit_{m.group(1)}_{m.group(2)}_{m.group(3) or 224}"
        if ours in _REGISTRY:
            return ModelName(ours, "vitkit", None, name)
    raise _unknown(name)


def resolve_model_name(name: str) -> str:
    """The registered vitkit name for any accepted spelling: `vit_b_32`, `ViT-B/32`, `vit_base_patch32_224`,
    `vit_base_patch32_224.augreg2_in21k_ft_in1k` -> `vit_b_32_224`. Unknown names: UnknownModelError."""
    return resolve_model(name).name


def _loose_parts(n: str) -> tuple[str | None, int | None, int | None]:
    """(size, patch, img) guessed from a name no rule accepts, each None when it cannot be told."""
    m = re.search(r"(?:^|_)(tiny|small|base|large|huge)(?=_|\d|$)", n) \
        or re.match(r"(?:timm_)?vit_?(ti|n|s|b|l|h)(?=_|\d|$)", n)
    size = _SIZE_LETTERS[m.group(1)] if m else None
    numbers = [int(x) for x in re.findall(r"\d+", n[m.end():] if m else n)][:2]
    if len(numbers) == 2:
        return size, numbers[0], numbers[1]
    if len(numbers) == 1:  # one number: an input size if it is large (patch sizes are 4..32), else a patch size
        return (size, None, numbers[0]) if numbers[0] >= 96 else (size, numbers[0], None)
    return size, None, None


def suggest_models(name: str, n: int = 3) -> list[str]:
    """The registered names closest to `name`, best first (ranking: module docstring), in the spelling family
    of `name` (timm's where the input looks like a timm name and the model has one)."""
    given = _normalize(name.split(".")[0] if "." in name else name)
    size, patch, img = _loose_parts(given)
    timm_style = given.startswith("timm") or bool(re.match(r"vit_(tiny|small|base|large|huge)", given)) \
        or "patch" in given
    if ("vit" not in given and "patch" not in given) or (size is None and patch is None and img is None):
        spellings = {a: ours for ours in _REGISTRY for a in aliases(ours)}
        close = difflib.get_close_matches(given, list(spellings), n=n * 2, cutoff=0.6)
        picked = list(dict.fromkeys(spellings[c] for c in close))[:n]
    else:
        # the small-image family (4 px patches at 32 px): a small patch and a small input, where given
        small_given = (img is None or img <= 64) and (patch is None or patch <= 8)
        ranked = []
        for ours, (c_size, c_patch, c_img) in _PARTS.items():
            size_pen = 0 if size == c_size else (1 if size is None else 2)
            family_pen = 0 if (c_img <= 64) == small_given else 1
            dist = (abs(math.log2(patch / c_patch)) if patch else 0.0) \
                + 0.5 * abs(math.log2((img or 224) / c_img))
            sim = difflib.SequenceMatcher(None, given, ours).ratio()
            # the other family only when really close (a 4 px patch model is no typo of a 16 px one)
            if dist <= (2.5 if family_pen == 0 else 1.0):
                ranked.append(((size_pen, family_pen, round(dist, 6), -sim), ours))
        picked = [ours for _, ours in sorted(ranked)][:n]
    return [(timm_name(p) or p) if timm_style else p for p in picked]


def _unknown(name: str) -> UnknownModelError:
    close = suggest_models(str(name))
    hint = f" Did you mean {', '.join(close)}?" if close else " Run `vitkit models` to list them."
    base = str(name).split(".")[0]
    if "." in str(name):  # a tag on a spelling that takes none (or on an unknown model)
        try:
            ours = resolve_model(base)
        except UnknownModelError:
            pass
        else:
            timm = timm_name(ours.name)
            where = f"timm names ({timm}.TAG)" if timm else "timm names only"
            hint = f" A .TAG suffix goes with {where}; otherwise pass the tag as pretrained=TAG (--pretrained TAG)."
    return UnknownModelError(f"unknown model {name!r}.{hint}", str(name), close)


def list_models(pattern: str = "*") -> list[str]:
    """Registered names matching a shell-style pattern over any of their spellings (`aliases`: ours, MindCV's
    short form, timm's), case-insensitively, in registration order: "vit_base_*", "vit_b_32", "*patch16*"."""
    pat = _normalize(pattern) if pattern.strip() not in ("", "*") else "*"
    return [n for n in _REGISTRY if any(fnmatch.fnmatchcase(a, pat) for a in aliases(n))]


def get_spec(name: str) -> ModelSpec:
    """The registered spec of any accepted spelling. A timm spelling carries timm's eval preprocessing
    (mean = std = 0.5, bicubic, crop 0.9; 1.0 at >= 384 px), a vitkit/MindCV one the registry's own."""
    resolved = resolve_model(name)
    spec = _REGISTRY[resolved.name]
    if resolved.family == "timm":
        spec = replace(spec, mean=INCEPTION_MEAN, std=INCEPTION_STD, interpolation="bicubic",
                       crop_pct=1.0 if spec.arch.img_size >= 384 else 0.9, family="timm")
    return spec


def build_config(
    name: str, *, num_classes: int | None = None, img_size: int | None = None, **overrides: Any
) -> ViTConfig:
    """The architecture of `name` (any accepted spelling) with the given changes applied (unknown fields are
    an error)."""
    arch = get_spec(name).arch
    if num_classes is not None:
        overrides["num_classes"] = num_classes
    if img_size is not None:
        overrides["img_size"] = img_size
    valid = set(arch.to_dict())
    unknown = sorted(set(overrides) - valid)
    if unknown:
        hints = [f"{k} (did you mean {difflib.get_close_matches(k, valid, n=1)[0]}?)"
                 if difflib.get_close_matches(k, valid, n=1) else k for k in unknown]
        raise TypeError(f"unknown model argument(s): {', '.join(hints)}")
    return arch.replace(**overrides)


def create_model(name: str, *, num_classes: int | None = None, img_size: int | None = None,
                 **overrides: Any) -> VisionTransformer:
    """Build a registered model (any accepted spelling) with fresh weights (pretrained ones:
    `vitkit.create_model`); `model.model_name` is the registered vitkit name."""
    if "pretrained" in overrides:
        raise TypeError("vitkit.models.create_model builds fresh weights; for pretrained ones call "
                        "vitkit.create_model(name, pretrained=...)")
    model = VisionTransformer(build_config(name, num_classes=num_classes, img_size=img_size, **overrides))
    model.model_name = resolve_model_name(name)
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
