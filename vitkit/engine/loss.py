"""Classification losses on hard labels (B,) or soft targets (B, K), with label smoothing on both.

Smoothing follows timm / torch: the target distribution becomes (1 - s) * y + s / K, for one-hot y and for
mixed (soft) y alike. Mixup/CutMix already fold smoothing into their targets (`vitkit.data.augment`), so the
loop passes `smoothing=0` for mixed batches.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from vitkit.data.augment import smooth_targets


def classification_loss(logits: torch.Tensor, targets: torch.Tensor, *, kind: str = "CE",
                        smoothing: float = 0.0) -> torch.Tensor:
    """Mean loss over the batch. `kind`: CE (softmax cross entropy) or BCE (a sigmoid per class against the
    smoothed one-hot/soft targets, averaged over all elements, as timm's BinaryCrossEntropy)."""
    logits = logits.float()
    if kind == "CE":
        # torch applies label_smoothing to class-index and to probability targets alike.
        return F.cross_entropy(logits, targets, label_smoothing=smoothing)
    if kind == "BCE":
        return F.binary_cross_entropy_with_logits(logits, smooth_targets(targets, logits.shape[-1], smoothing))
    raise ValueError(f"unknown loss {kind!r}")
