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
(`vit_b_33` -> vit_b_32_224, vit_b_32_384, vit_b_16_224), spelled in the family of the name given; a name that
names a backbone family (`dinov2`, `siglip`, `eva02`, ...) gets the closest names of that family.

Backbone families (issue 15; `ModelSpec.model_family`, `FAMILIES`): each name is one of timm's published models
at its published shape, spelled size, patch, then the family and the input size where it has several:
`vit_s_14_reg4_dinov2` (518 px), `vit_b_16_siglip_224`, `vit_b_32_clip_224`, `eva02_ti_14_224`, `vit_s_16_rope_224`,
`vit_s_16_dinov3` (256 px, any size: RoPE), `vit_sp_16_dinov3` (S+), `deit3_b_16_224`; sizes in FAMILY_SIZES.
Each carries timm's eval preprocessing for it (the default pretrained cfg, timm 1.0.31 `default_cfgs`; for CLIP the
OpenAI tag's; tests/test_backbone_families.py checks them against `timm.models.get_pretrained_cfg`), so
`ModelSpec.family` is "timm" and a timm spelling changes nothing. Their timm
names (`vit_small_patch14_reg4_dinov2`, `eva02_tiny_patch14_224`, `timm/vit_base_patch16_siglip_224.webli`) resolve
to them (`timm_model_name` gives the timm name of any registered model; `timm_name` stays the plain ViTs' own
`vit_{size}_patch{P}_{IMG}` spelling). Fields the weights cannot tell (act, no_embed_class, rope and its
temperature / grid indexing / reference grid, mlp_ratio) come from the name. `list_models` globs family names by
their vitkit name only (`*dinov2*`, `eva02_*`), so `vit_base_*` stays the plain ViT-B family.
  - The backbones whose published weights have no head (DINOv2, SigLIP, EVA-02 MIM, DINOv3: timm num_classes 0)
    are registered with the 1000-class ImageNet head every other name has: a fresh model is an ImageNet
    classifier, and `vitkit.create_model(name, pretrained=...)` takes the head size of the weights (0: a
    headless feature model, as timm). CLIP's head is its projection (512 / 768 outputs, a zero bias, as timm).
  - Not registered: EVA-02 L (its SwiGLU width 2 x 2730 cannot be shrunk to an even width by the model tests'
    generic `embed_dim = 4 * heads`), SigLIP so400m at 384 px (384 is not a multiple of its 14 px patch; timm's 378
    px model `vit_so400m_14_siglip_378` is the exact one), DINOv3 7B (no CPU test fits), timm's GELU variants of
    the OpenAI CLIP weights (`vit_base_patch32_clip_224`: our CLIP names are the quick_gelu models OpenAI trained).
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
# OpenAI CLIP's statistics, also EVA-02's (timm.data.constants OPENAI_CLIP_MEAN / OPENAI_CLIP_STD).
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# width, depth, heads of each size (ViT paper Table 1; DeiT for ti and s; "n" is ours, for CPU-scale runs).
SIZES: dict[str, tuple[int, int, int]] = {
    "n": (128, 6, 4),
    "ti": (192, 12, 3),
    "s": (384, 12, 6),
    "b": (768, 12, 12),
    "l": (1024, 24, 16),
    "h": (1280, 32, 16),
}

# The backbone families' sizes: the table above plus timm's DeiT-III medium, DINOv3 small-plus / huge-plus (20
# heads, not ViT-H's 16), DINOv2 giant and SigLIP's shape-optimised so400m (Alabdulmohsin et al. arXiv 2305.13035).
FAMILY_SIZES: dict[str, tuple[int, int, int]] = {
    **SIZES, "m": (512, 12, 8), "sp": (384, 12, 6), "hp": (1280, 32, 20), "g": (1536, 40, 24),
    "so400m": (1152, 27, 16),
}

# model_family -> what it is (`vitkit models --family`). "vit" is the plain ViT of the names above.
FAMILIES: dict[str, str] = {
    "vit": "ViT (Dosovitskiy et al. arXiv 2010.11929): the plain ViTs of the paper, DeiT and AugReg",
    "deit3": "DeiT III (Touvron et al. arXiv 2204.07118): layer scale, no position embedding for the class token",
    "dinov2": "DINOv2 with registers (Oquab et al. arXiv 2304.07193; Darcet et al. arXiv 2309.16588)",
    "siglip": "SigLIP / SigLIP 2 image towers (Zhai et al. arXiv 2303.15343): no class token, attention pooling",
    "clip": "OpenAI CLIP image towers (Radford et al. arXiv 2103.00020): pre-norm, quick GELU, projection head",
    "eva02": "EVA-02 (Fang et al. arXiv 2303.11331): SwiGLU, RoPE, MIM-pretrained on IN-22k",
    "rope_vit": "ROPE-ViT (Heo et al. arXiv 2403.13298): DeiT III with axial RoPE instead of a position embedding",
    "dinov3": "DINOv3 (Simeoni et al. arXiv 2508.10104): RoPE, registers; DINOv3 license",
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
    model_family: str = "vit"  # the architecture family (`FAMILIES`): "vit", "dinov2", "siglip", ...

    @property
    def input_size(self) -> tuple[int, int, int]:
        return (self.arch.in_chans, self.arch.img_size, self.arch.img_size)


_REGISTRY: dict[str, ModelSpec] = {}
# name -> (size, patch, img_size), for resolving other spellings and ranking suggestions
_PARTS: dict[str, tuple[str, int, int]] = {}
# The backbone families' names: ours -> timm's, and timm's -> ours.
_FAMILY_TIMM: dict[str, str] = {}
_TIMM_FAMILY: dict[str, str] = {}


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


# -- backbone families (issue 15): timm's published models, each with timm's eval preprocessing ----------------

def _family(name: str, timm: str, family: str, size: str, patch: int, img: int, *, mean: tuple[float, ...],
            std: tuple[float, ...], crop_pct: float, notes: str = "", **kw: Any) -> ModelSpec:
    """Register `name` (timm's `timm`) of a backbone family: sizes from FAMILY_SIZES, the rest ViTConfig fields."""
    dim, depth, heads = FAMILY_SIZES[size]
    arch = ViTConfig(img_size=img, patch_size=patch, embed_dim=dim, depth=depth, num_heads=heads, **kw)
    spec = register(ModelSpec(name=name, arch=arch, mean=mean, std=std, interpolation="bicubic", crop_pct=crop_pct,
                              notes=notes, family="timm", model_family=family))
    if timm in _TIMM_FAMILY:
        raise ValueError(f"timm name {timm!r} is already registered")
    _FAMILY_TIMM[name], _TIMM_FAMILY[timm] = timm, name
    return spec


_IMAGENET = dict(mean=IMAGENET_MEAN, std=IMAGENET_STD)
_CLIP = dict(mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD)
_HALF = dict(mean=INCEPTION_MEAN, std=INCEPTION_STD)
_TIMM_SIZE = {"ti": "tiny", "s": "small", "m": "medium", "b": "base", "l": "large", "h": "huge", "g": "giant",
              "sp": "small_plus", "hp": "huge_plus", "so400m": "so400m"}
# SwiGLU in timm's packed layout: mlp_ratio sizes fc1 (gate and value). 2.66667 * 2 is timm's own constant for
# DINOv2-g (fc1 8192 at 1536) and gives EVA-02 T/S/B their fc1 2 * int(D * 8/3) (1024 / 2048 / 4096) too, while
# 2 * int(D * 8/3) / D itself (5.3333...) would round int(D' * r) down to an odd width for shrunk copies.
_SWIGLU_8_3 = 2.66667 * 2

# DeiT III (timm deit.py deit3_*): layer scale 1e-6, no_embed_class; ImageNet stats, crop 0.9 (1.0 at 384 px)
# for the default fb_in1k weights.
for _size, _patch, _img in [("s", 16, 224), ("s", 16, 384), ("m", 16, 224), ("b", 16, 224), ("b", 16, 384),
                            ("l", 16, 224), ("l", 16, 384), ("h", 14, 224)]:
    _family(f"deit3_{_size}_{_patch}_{_img}", f"deit3_{_TIMM_SIZE[_size]}_patch{_patch}_{_img}", "deit3", _size,
            _patch, _img, **_IMAGENET, crop_pct=1.0 if _img >= 384 else 0.9, init_values=1e-6, no_embed_class=True)

# DINOv2 with registers (timm vision_transformer.py vit_*_patch14_reg4_dinov2): 518 px, layer scale 1e-5, 4
# registers, no_embed_class; g/14 SwiGLU. ImageNet stats, no crop (crop_pct 1.0).
for _size in ("s", "b", "l", "g"):
    _family(f"vit_{_size}_14_reg4_dinov2", f"vit_{_TIMM_SIZE[_size]}_patch14_reg4_dinov2", "dinov2", _size, 14, 518,
            **_IMAGENET, crop_pct=1.0, init_values=1e-5, reg_tokens=4, no_embed_class=True,
            **(dict(mlp="swiglu", mlp_ratio=_SWIGLU_8_3) if _size == "g" else {}))

# SigLIP (timm vit_*_siglip_*): no class token, MAP head; exact GELU for these (timm's default act; only some
# so400m/16 and giantopt models use gelu_tanh). mean = std = 0.5, crop 0.9.
for _size, _patch, _img in [("b", 16, 224), ("b", 16, 256), ("b", 16, 384), ("b", 16, 512), ("so400m", 14, 224),
                            ("so400m", 14, 378)]:
    _family(f"vit_{_size}_{_patch}_siglip_{_img}", f"vit_{_TIMM_SIZE[_size]}_patch{_patch}_siglip_{_img}", "siglip",
            _size, _patch, _img, **_HALF, crop_pct=0.9, class_token=False, global_pool="map",
            **(dict(mlp_ratio=3.7362) if _size == "so400m" else {}))

# OpenAI CLIP (timm vit_*_clip_quickgelu_*): pre-norm (no patch-embedding bias), LayerNorm eps 1e-5, quick GELU;
# the head is the image projection (512 for B, 768 for L). OpenAI CLIP stats; crop 0.9 for B, 1.0 for L.
for _size, _patch, _img, _proj in [("b", 32, 224, 512), ("b", 16, 224, 512), ("l", 14, 224, 768),
                                   ("l", 14, 336, 768)]:
    _family(f"vit_{_size}_{_patch}_clip_{_img}", f"vit_{_TIMM_SIZE[_size]}_patch{_patch}_clip_quickgelu_{_img}",
            "clip", _size, _patch, _img, **_CLIP, crop_pct=0.9 if _size == "b" else 1.0, num_classes=_proj,
            pre_norm=True, norm_eps=1e-5, act="quick_gelu")

# EVA-02 (timm eva.py eva02_*_patch14_*): SwiGLU (B: separate fc1_g / fc1_x and a norm before fc2), EVA RoPE on a
# 16x16 reference grid, learned position embedding, average pooling with fc_norm. OpenAI CLIP stats; crop 0.9
# for the 224 px MIM weights, 1.0 for the fine-tuned 336 / 448 px ones.
for _size, _img in [("ti", 224), ("s", 224), ("b", 224), ("ti", 336), ("s", 336), ("b", 448)]:
    _family(f"eva02_{_size}_14_{_img}", f"eva02_{_TIMM_SIZE[_size]}_patch14_{_img}", "eva02", _size, 14, _img,
            **_CLIP, crop_pct=0.9 if _img == 224 else 1.0, mlp="swiglu", mlp_ratio=_SWIGLU_8_3,
            scale_mlp_norm=_size == "b", global_pool="avg", rope="eva", rope_ref_grid=16)

# ROPE-ViT axial (timm eva.py vit_*_patch16_rope_224, NAVER's DeiT-III models): no position embedding, EVA RoPE
# with temperature 100 over "xy" grids, layer scale 1e-5, class-token pooling. ImageNet stats, crop 0.9.
for _size in ("s", "b", "l"):
    _family(f"vit_{_size}_16_rope_224", f"vit_{_TIMM_SIZE[_size]}_patch16_rope_224", "rope_vit", _size, 16, 224,
            **_IMAGENET, crop_pct=0.9, init_values=1e-5, pos_embed="none", rope="eva", rope_temperature=100.0,
            rope_grid_indexing="xy")

# DINOv3 (timm eva.py vit_*_patch16_dinov3[_qkvb]): 256 px, DINOv3 RoPE (temperature 100), 4 registers, layer
# scale 1e-5, LayerNorm eps 1e-5, no qkv bias (`_qkvb`: with), timm's average pooling without fc_norm (pass
# global_pool="token" for upstream's class token), any input size; S+ / H+ SwiGLU of width 2 x 4D. ImageNet stats,
# no crop. Weights under the DINOv3 license.
for _size in ("s", "sp", "b", "l", "hp"):
    for _qkvb in (False, True):
        _family(f"vit_{_size}_16_dinov3{'_qkvb' if _qkvb else ''}",
                f"vit_{_TIMM_SIZE[_size]}_patch16_dinov3{'_qkvb' if _qkvb else ''}", "dinov3", _size, 16, 256,
                **_IMAGENET, crop_pct=1.0, notes="weights under the DINOv3 license", qkv_bias=_qkvb,
                init_values=1e-5, reg_tokens=4, global_pool="avg", fc_norm=False, norm_eps=1e-5, pos_embed="none",
                rope="dinov3", rope_temperature=100.0, dynamic_img_size=True,
                **(dict(mlp="swiglu", mlp_ratio=8.0) if _size in ("sp", "hp") else {}))


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


def timm_model_name(name: str) -> str | None:
    """timm's model of any registered name: the plain ViTs' (`timm_name`) and the backbone families'
    (vit_s_14_reg4_dinov2 -> vit_small_patch14_reg4_dinov2, eva02_ti_14_224 -> eva02_tiny_patch14_224); else None."""
    name = resolve_model_name(name)
    return timm_name(name) or _FAMILY_TIMM.get(name)


def aliases(name: str) -> list[str]:
    """Every spelling `resolve_model` maps to `name` (leaving out tags, case and separators): ours, MindCV's
    short form (224 px models) and timm's."""
    name = resolve_model_name(name)
    if name in _FAMILY_TIMM:
        return [name, _FAMILY_TIMM[name]]
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
    base, _, tag = (n[len("timm_"):] if n.startswith("timm_") else n).partition(".")
    if base in _TIMM_FAMILY and (not tag or re.fullmatch(r"\w+", tag)):
        return ModelName(_TIMM_FAMILY[base], "timm", tag or None, name)
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


# Words that name a backbone family in a model name (ours or timm's), the most specific first: suggestions stay in
# that family.
_FAMILY_WORDS = {"dinov2": "dinov2", "dinov3": "dinov3", "siglip": "siglip", "clip": "clip", "eva02": "eva02",
                 "deit3": "deit3", "rope": "rope_vit", "reg4": "dinov2", "eva": "eva02", "deit": "deit3"}


def _family_suggestions(given: str, timm_style: bool, n: int) -> list[str] | None:
    """The closest names of the backbone family `given` names (None if it names none), by string similarity over
    their spellings, in the spelling family of `given`."""
    words = set(re.split(r"[_.]", given))
    family = next((f for w, f in _FAMILY_WORDS.items() if w in words), None)
    if family is None:
        return None
    names = [ours for ours, spec in _REGISTRY.items() if spec.model_family == family]
    ranked = sorted(names, key=lambda ours: -max(difflib.SequenceMatcher(None, given, a).ratio()
                                                 for a in aliases(ours)))
    return [(timm_model_name(p) or p) if timm_style else p for p in ranked[:n]]


def suggest_models(name: str, n: int = 3) -> list[str]:
    """The registered names closest to `name`, best first (ranking: module docstring), in the spelling family
    of `name` (timm's where the input looks like a timm name and the model has one)."""
    given = _normalize(name.split(".")[0] if "." in name else name)
    size, patch, img = _loose_parts(given)
    timm_style = given.startswith("timm") or bool(re.match(r"vit_(tiny|small|base|large|huge)", given)) \
        or "patch" in given
    family = _family_suggestions(given, timm_style, n)
    if family is not None:
        return family
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
            timm = timm_model_name(ours.name)
            where = f"timm names ({timm}.TAG)" if timm else "timm names only"
            hint = f" A .TAG suffix goes with {where}; otherwise pass the tag as pretrained=TAG (--pretrained TAG)."
    return UnknownModelError(f"unknown model {name!r}.{hint}", str(name), close)


def list_models(pattern: str = "*", family: str | None = None) -> list[str]:
    """Registered names matching a shell-style pattern over any of their spellings (`aliases`: ours, MindCV's
    short form, timm's), case-insensitively, in registration order: "vit_base_*", "vit_b_32", "*patch16*".
    Backbone-family names match by their own name only ("*dinov2*", "eva02_*"; module docstring). `family` keeps
    the names of one `FAMILIES` entry ("dinov2", "vit", ...)."""
    if family is not None and family not in FAMILIES:
        raise UnknownModelError(f"unknown model family {family!r}; families: {', '.join(FAMILIES)}", family)
    pat = _normalize(pattern) if pattern.strip() not in ("", "*") else "*"
    return [n for n, spec in _REGISTRY.items() if (family is None or spec.model_family == family)
            and any(fnmatch.fnmatchcase(a, pat) for a in ([n] if n in _FAMILY_TIMM else aliases(n)))]


def get_spec(name: str) -> ModelSpec:
    """The registered spec of any accepted spelling. A timm spelling carries timm's eval preprocessing
    (mean = std = 0.5, bicubic, crop 0.9; 1.0 at >= 384 px), a vitkit/MindCV one the registry's own; the backbone
    families' registered preprocessing is timm's already."""
    resolved = resolve_model(name)
    spec = _REGISTRY[resolved.name]
    if resolved.family == "timm" and spec.family != "timm":
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
    """Multiply-accumulates of one forward pass (matmuls and convs; norms, softmax, RoPE rotations and SwiGLU's
    gating product left out, as fvcore). A SwiGLU MLP of fc1 width h costs n*d*h + n*(h/2)*d = 1.5 n d h (a plain
    one 2 n d h); the "map" head is one latent query over the patch tokens (q, kv, attention, proj, its MLP)."""
    img = img_size or cfg.img_size
    n_patch = (img // cfg.patch_size) ** 2
    n = n_patch + cfg.num_prefix_tokens
    d, hidden = cfg.embed_dim, cfg.mlp_hidden
    embed = n_patch * d * cfg.in_chans * cfg.patch_size**2
    mlp = (3 * n * d * hidden) // 2 if cfg.mlp == "swiglu" else 2 * n * d * hidden
    per_block = n * d * 3 * d + 2 * n * n * d + n * d * d + mlp
    pool = d * d + n_patch * d * 2 * d + 2 * n_patch * d + d * d + 2 * d * hidden if cfg.global_pool == "map" else 0
    return embed + cfg.depth * per_block + pool + d * max(cfg.num_classes, 0)
