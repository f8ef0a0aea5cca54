"""Auto-augmentation strings in MindCV/timm syntax, and Mixup/CutMix on the batch.

`auto_augment` strings and what they do (the facts are timm's `timm/data/auto_augment.py` and MindCV's port of
it, `mindcv/data/auto_augment.py`). The ops and their magnitude-to-argument levels are timm's own table
(`timm.data.auto_augment.NAME_TO_OP` / `LEVEL_TO_ARG`); the op sampling and policy parsing are ours:

- `randaug-m{M}[-n{N}][-mstd{S}][-mmax{X}][-inc{0|1}][-p{P}]` (timm spells it `rand-...`, accepted too):
  RandAugment as timm implements it. Per image, N ops (default 2) are drawn uniformly *with replacement* from
  15 ops (AutoContrast, Equalize, Invert, Rotate, Posterize, Solarize, SolarizeAdd, Color, Contrast,
  Brightness, Sharpness, ShearX, ShearY, TranslateXRel, TranslateYRel). Each drawn op is applied with
  probability P (default 0.5); when applied, its magnitude is M (out of 10) plus N(0, S) gaussian noise drawn
  anew for that op (S > 100 means uniform in [0, M]), clipped to [0, X] (X default 10). `inc1` swaps in the
  "increasing" ops, whose strength grows with magnitude (Posterize keeps 4 - 4m/10 bits, Solarize threshold
  256 - 25.6m, enhance factors 1 +- 0.09m). Rotation is up to 30 deg, shear 0.3, translation 0.45 of the
  side, each negated with probability 0.5; empty pixels are filled with the mean color.
- `autoaug[-mstd{S}]`: AutoAugment's ImageNet policy (Cubuk et al. 2019, Table 9: 25 sub-policies of two
  (op, probability, level) steps; the table is read from torchvision's copy of the paper's policy), one
  sub-policy per image, with timm's "original" op levels (Posterize keeps 4 + 4m/10 bits).
- `autoaugr[-mstd{S}]`: the same policy with increasing-severity Posterize (timm's `originalr`).
- `3a`: DeiT III's 3-Augment: one of Solarize (threshold 128), Grayscale, Gaussian blur (radius U(0.1, 2)).
- `trivialaugwide`: TrivialAugment-Wide, mapped onto `torchvision.transforms.v2.TrivialAugmentWide`
  (the paper's ops and 31 magnitude bins; torchvision's implementation, not timm's op levels).
- `augmix[-m{severity}][-w{width}][-d{depth}][-a{alpha}]`: mapped onto `torchvision.transforms.v2.AugMix`
  (the AugMix paper's reference algorithm; severity default 3, width 3, depth random 1-3, alpha 1). timm's
  AugMix uses its own op levels and differs in detail.

Randomness comes from Python's `random` module, which the loader seeds per sample.
"""
from __future__ import annotations

import math
import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torchvision.transforms.v2 as v2
from PIL import Image
from timm.data.auto_augment import LEVEL_TO_ARG, NAME_TO_OP

from vitkit.errors import ConfigError

LEVEL_MAX = 10.0  # magnitudes are out of 10 (timm's _LEVEL_DENOM)

PIL_INTERPOLATION = {
    "nearest": Image.Resampling.NEAREST, "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC, "lanczos": Image.Resampling.LANCZOS, "area": Image.Resampling.BOX,
}


RAND_OPS = ("AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "SolarizeAdd", "Color",
            "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")
RAND_OPS_INCREASING = tuple(
    n + "Increasing" if n in ("Posterize", "Solarize", "Color", "Contrast", "Brightness", "Sharpness") else n
    for n in RAND_OPS)


@dataclass
class AugmentOp:
    """One op with a probability and a magnitude (out of 10), optionally jittered per call."""

    name: str
    prob: float
    magnitude: float
    magnitude_std: float = 0.0  # gaussian noise; inf = uniform in [0, magnitude]
    magnitude_max: float = LEVEL_MAX
    hparams: dict[str, Any] | None = None

    def sample_magnitude(self) -> float:
        """The magnitude for one application: timm's AugmentOp.__call__ rule."""
        m = self.magnitude
        if self.magnitude_std == math.inf:
            m = random.uniform(0, m)
        elif self.magnitude_std > 0:
            m = random.gauss(m, self.magnitude_std)
        return max(0.0, min(self.magnitude_max, m))

    def __call__(self, img: Image.Image, trace: list | None = None) -> Image.Image:
        if self.prob < 1.0 and random.random() > self.prob:
            return img
        m = self.sample_magnitude()
        if trace is not None:
            trace.append((self.name, m))
        level = LEVEL_TO_ARG[self.name]
        hp = self.hparams or {}
        args = level(m, {"translate_pct": 0.45}) if level is not None else ()
        return NAME_TO_OP[self.name](img, *args, fillcolor=hp.get("fill"), resample=hp.get("resample"))


class RandAugment:
    """timm's RandAugment: `num_ops` ops drawn uniformly with replacement; each applies with its own prob."""

    def __init__(self, ops: list[AugmentOp], num_ops: int = 2):
        self.ops, self.num_ops = ops, num_ops
        self.trace: list | None = None  # set to a list to record (op, magnitude) of applied ops (tests)

    def __call__(self, img: Image.Image) -> Image.Image:
        for op in random.choices(self.ops, k=self.num_ops):
            img = op(img, self.trace)
        return img

    def __repr__(self) -> str:
        o = self.ops[0]
        return f"RandAugment(n={self.num_ops}, m={o.magnitude}, mstd={o.magnitude_std}, p={o.prob}, " \
               f"ops={[op.name for op in self.ops]})"


class PolicyAugment:
    """AutoAugment / 3-Augment: one sub-policy (a list of ops) chosen uniformly per image."""

    def __init__(self, policy: list[list[AugmentOp]], name: str):
        self.policy, self.name = policy, name

    def __call__(self, img: Image.Image) -> Image.Image:
        for op in random.choice(self.policy):
            img = op(img)
        return img

    def __repr__(self) -> str:
        return f"PolicyAugment({self.name}, {len(self.policy)} sub-policies)"


def _options(parts: list[str], allowed: set[str], text: str) -> dict[str, str]:
    out = {}
    for part in parts:
        key, val = (re.split(r"(\d.*)", part) + [""])[:2]
        if key not in allowed or val == "":
            raise ConfigError(f"auto_augment {text!r}: unknown section {part!r} (allowed: "
                              f"{', '.join(sorted(allowed))} followed by a number)")
        out[key] = val
    return out


def build_auto_augment(text: str, *, img_size: int, mean: tuple[float, ...], interpolation: str) -> Callable:
    """A PIL -> PIL transform for a MindCV/timm auto-augment string (see the module docstring)."""
    fill = tuple(min(255, round(255 * x)) for x in mean)  # timm's img_mean hparam
    hp = {"fill": fill, "resample": PIL_INTERPOLATION.get(interpolation, Image.Resampling.BILINEAR)}
    parts = text.strip().lower().split("-")
    head = parts[0]
    if head in ("randaug", "rand"):
        o = _options(parts[1:], {"m", "n", "mstd", "mmax", "inc", "p"}, text)
        mstd = float(o.get("mstd", 0.0))
        mstd = math.inf if mstd > 100 else mstd  # timm: mstd > 100 means uniform sampling
        names = RAND_OPS_INCREASING if int(o.get("inc", 0)) else RAND_OPS
        ops = [AugmentOp(n, float(o.get("p", 0.5)), float(o.get("m", LEVEL_MAX)), mstd,
                         float(o.get("mmax", LEVEL_MAX)), hp) for n in names]
        return RandAugment(ops, int(o.get("n", 2)))
    if head in ("autoaug", "autoaugr"):
        mstd = float(_options(parts[1:], {"mstd"}, text).get("mstd", 0.0))
        table = v2.AutoAugment(v2.AutoAugmentPolicy.IMAGENET)._policies  # the paper's ImageNet policy
        poster = "PosterizeOriginal" if head == "autoaug" else "PosterizeIncreasing"
        rename = {"Posterize": poster, "TranslateX": "TranslateXRel", "TranslateY": "TranslateYRel"}
        policy = [[AugmentOp(rename.get(n, n), p, float(m or 0), mstd, LEVEL_MAX, hp) for n, p, m in sub]
                  for sub in table]
        return PolicyAugment(policy, head)
    if head == "3a":
        policy = [[AugmentOp("Solarize", 1.0, 5, 0.0, LEVEL_MAX, hp)], [AugmentOp("Desaturate", 1.0, 10, 0.0,
                  LEVEL_MAX, hp)], [AugmentOp("GaussianBlurRand", 1.0, 10, 0.0, LEVEL_MAX, hp)]]
        return PolicyAugment(policy, "3a")
    if head == "trivialaugwide":
        _options(parts[1:], set(), text)
        return v2.TrivialAugmentWide(interpolation=tv_interpolation(interpolation), fill=list(fill))
    if head == "augmix":
        o = _options(parts[1:], {"m", "w", "d", "a"}, text)
        return v2.AugMix(severity=int(o.get("m", 3)), mixture_width=int(o.get("w", 3)),
                         chain_depth=int(o.get("d", -1)), alpha=float(o.get("a", 1.0)),
                         interpolation=tv_interpolation(interpolation), fill=list(fill))
    raise ConfigError(f"auto_augment {text!r} is not known; use randaug-m9-mstd0.5, randaug-m9-n2-mstd0.5-inc1, "
                      "autoaug, autoaugr, 3a, trivialaugwide or augmix")


def tv_interpolation(name: str) -> v2.InterpolationMode:
    """An interpolation name (as in DataConfig) -> torchvision's mode; "area" is PIL's box filter."""
    return v2.InterpolationMode.BOX if name == "area" else v2.InterpolationMode(name)


# ---------------------------------------------------------------------------------------------------------------
# Mixup / CutMix on the batch


def smooth_targets(targets: torch.Tensor, num_classes: int, smoothing: float) -> torch.Tensor:
    """Hard labels (B,) or soft targets (B, K) -> probability targets (B, K) with label smoothing: (1 - s) * y +
    s / num_classes (timm's and torch's rule)."""
    if targets.ndim == 2:
        return targets * (1.0 - smoothing) + smoothing / num_classes
    off = smoothing / num_classes
    out = torch.full((targets.shape[0], num_classes), off, dtype=torch.float32, device=targets.device)
    return out.scatter_(1, targets.view(-1, 1), 1.0 - smoothing + off)


def cutmix_box(h: int, w: int, lam: float, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """A box of area (1 - lam) * h * w centered uniformly, clipped to the image (Yun et al. 2019)."""
    cut = math.sqrt(1.0 - lam)
    ch, cw = int(h * cut), int(w * cut)
    cy, cx = int(rng.integers(0, h)), int(rng.integers(0, w))
    y0, y1 = max(cy - ch // 2, 0), min(cy + ch // 2, h)
    x0, x1 = max(cx - cw // 2, 0), min(cx + cw // 2, w)
    return y0, y1, x0, x1


class Mixup:
    """Mixup (Zhang et al. 2018) or CutMix (Yun et al. 2019) on a whole batch, paired with the flipped batch.

    Per step: with probability `prob` the batch is mixed; if both are on, CutMix is chosen with probability
    `switch_prob`; lambda ~ Beta(alpha, alpha). For CutMix, lambda is recomputed from the pasted area after the
    box is clipped to the image, so the targets match the pixels. Randomness is a function of (seed, step).
    """

    def __init__(self, num_classes: int, *, mixup_alpha: float = 0.0, cutmix_alpha: float = 0.0, prob: float = 1.0,
                 switch_prob: float = 0.5, label_smoothing: float = 0.0, seed: int = 0):
        self.num_classes, self.mixup_alpha, self.cutmix_alpha = num_classes, mixup_alpha, cutmix_alpha
        self.prob, self.switch_prob, self.label_smoothing, self.seed = prob, switch_prob, label_smoothing, seed
        self.last: dict[str, Any] = {}  # what the last call did: mode, lam, box (logging and tests)

    def __call__(self, images: torch.Tensor, targets: torch.Tensor, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng([self.seed, step])
        y = smooth_targets(targets, self.num_classes, self.label_smoothing)
        u = rng.random(2)
        use_cutmix = self.cutmix_alpha > 0 and (self.mixup_alpha == 0 or u[1] < self.switch_prob)
        if u[0] >= self.prob:
            self.last = {"mode": "none", "lam": 1.0}
            return images, y
        alpha = self.cutmix_alpha if use_cutmix else self.mixup_alpha
        lam = float(rng.beta(alpha, alpha))
        flipped = images.flip(0)
        if use_cutmix:
            h, w = images.shape[-2:]
            y0, y1, x0, x1 = cutmix_box(h, w, lam, rng)
            images = images.clone()
            images[..., y0:y1, x0:x1] = flipped[..., y0:y1, x0:x1]
            lam = 1.0 - (y1 - y0) * (x1 - x0) / float(h * w)
            self.last = {"mode": "cutmix", "lam": lam, "box": (y0, y1, x0, x1)}
        else:
            images = images * lam + flipped * (1.0 - lam)
            self.last = {"mode": "mixup", "lam": lam}
        return images, y * lam + y.flip(0) * (1.0 - lam)


def build_mixup(num_classes: int, *, mixup: float = 0.0, cutmix: float = 0.0, prob: float = 1.0,
                switch_prob: float = 0.5, label_smoothing: float = 0.0, seed: int = 0) -> Mixup | None:
    """Mixup/CutMix with these alphas; None when both are 0 (then the loss smooths labels itself)."""
    if mixup <= 0 and cutmix <= 0:
        return None
    return Mixup(num_classes, mixup_alpha=mixup, cutmix_alpha=cutmix, prob=prob, switch_prob=switch_prob,
                 label_smoothing=label_smoothing, seed=seed)
