"""evaluate(): top-1 / top-5 / loss against a by-hand reference, top-k capping, per-class and confusion."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vitkit.engine.evaluate import confusion_matrix, evaluate, per_class_accuracy
from vitkit.models import create_model


def batches(n: int, batch: int, classes: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 32, 32, generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    return [(x[i:i + batch], y[i:i + batch]) for i in range(0, n, batch)]


def reference(model: torch.nn.Module, data: list[tuple[torch.Tensor, torch.Tensor]], k: int) -> dict[str, float]:
    with torch.no_grad():
        logits = torch.cat([model(x) for x, _ in data])
    y = torch.cat([t for _, t in data])
    top = logits.argsort(-1, descending=True)[:, :k]
    return {"top1": 100.0 * (top[:, 0] == y).sum().item() / len(y),
            "topk": 100.0 * (top == y[:, None]).any(-1).sum().item() / len(y),
            "loss": F.cross_entropy(logits, y).item(), "n": len(y)}


def test_matches_by_hand_reference_with_a_ragged_last_batch() -> None:
    torch.manual_seed(0)
    model = create_model("vit_n_4_32", depth=1).eval()
    data = batches(37, 8, 10)  # 4 full batches and one of 5
    ref = reference(model, data, 5)
    got = evaluate(model, data, device="cpu")
    assert got["num_images"] == 37
    assert got["top1"] == pytest.approx(ref["top1"], abs=1e-9)
    assert got["top5"] == pytest.approx(ref["topk"], abs=1e-9)
    assert got["loss"] == pytest.approx(ref["loss"], rel=1e-6)
    assert got["correct1"] == round(ref["top1"] * 37 / 100)
    assert got["images_per_s"] > 0


def test_topk_is_capped_at_the_number_of_classes_and_train_mode_is_restored() -> None:
    torch.manual_seed(0)
    model = create_model("vit_n_4_32", depth=1, num_classes=3)
    model.train()
    data = batches(20, 6, 3)
    got = evaluate(model, data, device="cpu", num_classes=3)
    assert got["topk"] == 3 and got["top5"] == 100.0  # top-3 of 3 classes always hits
    assert model.training  # evaluate put it in eval mode and back
    model.eval()
    assert got["top1"] == pytest.approx(reference(model, data, 3)["top1"])


def test_collect_gives_per_sample_predictions_for_per_class_and_confusion() -> None:
    torch.manual_seed(0)
    model = create_model("vit_n_4_32", depth=1, num_classes=4).eval()
    data = batches(30, 7, 4)
    got = evaluate(model, data, device="cpu", collect=True)
    y = torch.cat([t for _, t in data])
    assert torch.equal(got["targets"], y)
    assert got["preds"].shape == (30, 4) and got["probs"].shape == (30, 4)
    assert torch.all(got["probs"][:, :-1] >= got["probs"][:, 1:])  # best first
    top1 = got["preds"][:, 0]
    assert int((top1 == y).sum()) == got["correct1"]
    cm = confusion_matrix(y, top1, 4)
    assert cm.sum() == 30 and torch.equal(cm.sum(1), torch.bincount(y, minlength=4))
    assert int(cm.diag().sum()) == got["correct1"]
    acc = per_class_accuracy(y, top1, 4)
    for c in range(4):
        mask = y == c
        expected = 100.0 * (top1[mask] == c).float().mean().item() if mask.any() else float("nan")
        assert acc[c].item() == pytest.approx(expected, nan_ok=True)


def test_bf16_autocast_runs_and_stays_close_to_fp32() -> None:
    torch.manual_seed(0)
    model = create_model("vit_n_4_32", depth=1).eval()
    data = batches(16, 8, 10)
    fp32 = evaluate(model, data, device="cpu")
    bf16 = evaluate(model, data, device="cpu", amp_dtype=torch.bfloat16)
    assert bf16["num_images"] == 16 and bf16["loss"] == pytest.approx(fp32["loss"], rel=0.05)
