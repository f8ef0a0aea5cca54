"""Evaluation: top-1 / top-5 / mean loss of a model over a loader, exact across any number of ranks.

The training loop (`val_while_train`) and `vitkit validate` both call `evaluate`, so the two report the
same number for the same checkpoint and data. Ranks exchange *sums* (correct counts, loss sum, image
count), never per-rank accuracies: averaging per-rank accuracies is wrong when shards differ in size, and
padded shards (a DistributedSampler that repeats images to even out ranks, the bug timm and MindCV users
hit) count some images twice. The loader is expected to shard without padding (`vitkit.data.build_loader`).

`progress` draws a bar over the batches on a terminal (the main rank's only) and nothing otherwise; it
never touches the computation (no extra synchronisation, no RNG), so results are the same with or without.
"""
from __future__ import annotations

import time
from collections.abc import Iterable
from contextlib import nullcontext
from typing import Any

import torch
import torch.nn.functional as F

from vitkit.engine.launch import all_reduce_sum, gather_objects, is_main
from vitkit.engine.monitor import Bar

TOPK = (1, 5)


def _advancing(loader: Iterable[Any], bar: Bar) -> Iterable[Any]:
    """The loader's batches, advancing `bar` after each one has been used."""
    for batch in loader:
        yield batch
        bar.advance()


def _batch(batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(images, targets) from a loader batch: a (images, targets[, ...]) sequence or a dict."""
    if isinstance(batch, dict):
        return batch["image"], batch["label"]
    return batch[0], batch[1]


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    loader: Iterable[Any],
    *,
    device: torch.device | str,
    amp_dtype: torch.dtype | None = None,
    num_classes: int | None = None,
    collect: bool = False,
    confusion: bool = False,
    progress: Bar | bool | None = None,
) -> dict[str, Any]:
    """Evaluate `model` on every batch of `loader`.

    Returns top1 and top5 in percent (timm's convention), `loss` (mean cross-entropy per image),
    `num_images`, `images_per_s` (all ranks' images over this rank's wall time) and `correct1` /
    `correct5`. Top-k is capped at the number of classes (top-5 of a 3-class model is top-3), reported
    as `topk`. With `collect`, also `targets`, `preds` (top-k class indices per image, best first) and
    `probs` (their softmax probabilities), gathered from all ranks in rank order. With `confusion`, also
    `confusion`: the (num_classes, num_classes) counts of `confusion_matrix`, summed over all ranks.
    The model's train/eval mode is restored afterwards.

    `progress`: a `Bar` (e.g. `Monitor.progress_bar("val")`, which draws on the run's console), or True for a
    "validate" bar on stderr; either is drawn only on a terminal, on the main rank. None/False: silent.
    """
    device = torch.device(device)
    was_training = model.training
    model.eval()
    autocast = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None else nullcontext()
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # correct@1, correct@k, loss sum, images
    cm: torch.Tensor | None = None
    k = None
    parts: dict[str, list[torch.Tensor]] = {"targets": [], "preds": [], "probs": []}
    if not isinstance(progress, Bar):
        progress = Bar("validate", enabled=bool(progress) and is_main())
    try:
        total = len(loader)  # type: ignore[arg-type]
    except TypeError:  # an iterable without a length: a bar without an end
        total = None
    start = time.perf_counter()
    with progress.start(total):
        for batch in _advancing(loader, progress):
            images, targets = _batch(batch)
            images = images.to(device, non_blocking=True)
            targets = targets.to(device, non_blocking=True)
            with autocast:
                logits = model(images)
            logits = logits.float()  # loss and softmax in fp32 whatever the autocast dtype
            if k is None:
                classes = num_classes or logits.shape[-1]
                k = min(max(TOPK), classes)
            top = logits.topk(k, dim=-1).indices  # (B, k), best first
            hits = top.eq(targets[:, None])  # (B, k)
            sums[0] += hits[:, 0].sum()
            sums[1] += hits.any(dim=-1).sum()
            sums[2] += F.cross_entropy(logits, targets, reduction="sum").double()
            sums[3] += targets.numel()
            if confusion:
                cm = confusion_matrix(targets, top[:, 0], classes) + (0 if cm is None else cm)
            if collect:
                parts["targets"].append(targets.cpu())
                parts["preds"].append(top.cpu())
                parts["probs"].append(logits.softmax(-1).gather(1, top).cpu())
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - start
    # float64 keeps integer counts exact up to 2**53 images
    sums = all_reduce_sum(sums)
    correct1, correctk, loss_sum, n = (float(v) for v in sums.tolist())
    model.train(was_training)
    n_int = int(n)
    result: dict[str, Any] = {
        "top1": 100.0 * correct1 / n if n else float("nan"),
        "top5": 100.0 * correctk / n if n else float("nan"),
        "topk": k or min(max(TOPK), num_classes or max(TOPK)),
        "loss": loss_sum / n if n else float("nan"),
        "num_images": n_int,
        "correct1": int(correct1),
        "correct5": int(correctk),
        "images_per_s": n / elapsed if elapsed > 0 else float("nan"),
    }
    if confusion:
        n_cls = num_classes or (cm.shape[0] if cm is not None else 0)
        cm = all_reduce_sum(cm if cm is not None else torch.zeros(n_cls, n_cls, dtype=torch.long, device=device))
        result["confusion"] = cm.cpu()
    if collect:
        local = {key: torch.cat(v) if v else torch.empty(0) for key, v in parts.items()}
        ranks = gather_objects(local)  # objects: shard sizes differ by up to one batch
        result.update({key: torch.cat([r[key] for r in ranks]) for key in local})
    return result


def per_class_accuracy(targets: torch.Tensor, top1: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Top-1 accuracy in percent of each class (NaN for a class with no images), shape (num_classes,)."""
    counts = torch.bincount(targets, minlength=num_classes).double()
    correct = torch.bincount(targets[top1 == targets], minlength=num_classes).double()
    return torch.where(counts > 0, 100.0 * correct / counts.clamp(min=1), torch.full_like(counts, float("nan")))


def confusion_matrix(targets: torch.Tensor, top1: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Counts (num_classes, num_classes): row = true class, column = predicted class."""
    flat = targets.long() * num_classes + top1.long()
    return torch.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes)
