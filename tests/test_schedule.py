"""The lr schedules equal MindCV's at sampled steps.

The reference below is written from MindCV's `scheduler_factory.create_scheduler` and `dynamic_lr.py` (list
builders: warmup list of `steps_per_epoch * warmup_epochs` values, then the main list over
`num_epochs - warmup_epochs` epochs with its own clock), so any drift of our closed form shows up here.
"""
from __future__ import annotations

import math
from bisect import bisect_right
from pathlib import Path

import pytest

from vitkit.engine.config import load_config, schedule_args
from vitkit.engine.schedule import build_schedule

ROOT = Path(__file__).resolve().parents[1]


def mindcv_lrs(scheduler, *, spe, lr, min_lr, warmup_epochs, warmup_factor, decay_epochs, decay_rate, milestones,
               num_epochs, num_cycles=1, cycle_decay=1.0, stair=False):
    """MindCV's per-step lr list (integers epochs, as MindCV requires)."""
    warm = []
    for i in range(spe * warmup_epochs):
        e = math.floor(i / spe) if stair else i / spe
        warm.append(lr * warmup_factor + min(e, warmup_epochs) / warmup_epochs * (lr - lr * warmup_factor))
    main_epochs = num_epochs - warmup_epochs
    n = spe * main_epochs
    main = []
    if scheduler == "cosine_decay":
        for c in range(num_cycles):
            peak = lr * cycle_decay**c
            for i in range(spe * decay_epochs):
                t = min(math.floor(i / spe) if stair else i / spe, decay_epochs)
                if len(main) < n:
                    main.append(min_lr + 0.5 * (peak - min_lr) * (1 + math.cos(math.pi * t / decay_epochs)))
        main += [min_lr] * max(0, (main_epochs - num_cycles * decay_epochs) * spe)
    for i in range(n):
        e = math.floor(i / spe) if stair else i / spe
        if scheduler == "exponential_decay":
            main.append(lr * decay_rate**e)
        elif scheduler == "polynomial_decay":
            main.append(lr * (1 - min(e, main_epochs) / main_epochs) ** decay_rate)
        elif scheduler == "step_decay":
            main.append(lr * decay_rate ** math.floor(math.floor(i / spe) / decay_epochs))
        elif scheduler == "multi_step_decay":
            main.append(lr * decay_rate ** bisect_right(sorted(milestones), math.floor(i / spe)))
        elif scheduler == "constant":
            main.append(lr)
    return warm + main


CASES = [
    ("cosine_decay", dict(decay_epochs=15)),
    ("cosine_decay", dict(decay_epochs=6, num_cycles=2, cycle_decay=0.5)),
    ("cosine_decay", dict(decay_epochs=20)),  # longer than training: truncated, as MindCV does
    ("exponential_decay", dict(decay_epochs=4)),
    ("polynomial_decay", dict(decay_epochs=4)),
    ("step_decay", dict(decay_epochs=4)),
    ("multi_step_decay", dict(decay_epochs=4, milestones=[3, 7, 11])),
    ("constant", dict(decay_epochs=4)),
]


@pytest.mark.parametrize("stair", [False, True])
@pytest.mark.parametrize("scheduler, extra", CASES)
def test_schedule_equals_mindcv(scheduler, extra, stair):
    spe, epochs, warmup = 7, 18, 3
    kw = dict(spe=spe, lr=0.01, min_lr=1e-4, warmup_epochs=warmup, warmup_factor=0.01, decay_rate=0.7,
              milestones=extra.get("milestones", [30]), num_epochs=epochs, stair=stair,
              decay_epochs=extra["decay_epochs"],
              num_cycles=extra.get("num_cycles", 1), cycle_decay=extra.get("cycle_decay", 1.0))
    ref = mindcv_lrs(scheduler, **kw)
    assert len(ref) == spe * epochs
    argv = ["--scheduler", scheduler, "--lr", "0.01", "--min_lr", "1e-4", "--warmup_epochs", str(warmup),
            "--warmup_factor", "0.01", "--decay_rate", "0.7", "--epoch_size", str(epochs),
            "--decay_epochs", str(extra["decay_epochs"]), "--lr_epoch_stair", str(stair).lower(),
            "--num_cycles", str(kw["num_cycles"]), "--cycle_decay", str(kw["cycle_decay"]),
            "--multi_step_decay_milestones", *map(str, kw["milestones"])]
    schedule = build_schedule(**schedule_args(load_config(argv, notices=[])), steps_per_epoch=spe)
    for step in list(range(0, spe * epochs, 5)) + [spe * warmup - 1, spe * warmup, spe * epochs - 1]:
        assert schedule(step) == pytest.approx(ref[step], rel=1e-12, abs=1e-15), (scheduler, step)


def test_vit_b32_recipe_schedule_points():
    """MindCV's vit_b32_224_ascend numbers: 1.6e-3 peak, warmup from 1.6e-5 over 30 epochs, cosine to 0."""
    cfg = load_config(["-c", str(ROOT / "configs/vit/vit_b32_224.yaml")], notices=[])
    spe = 312  # 1,281,167 images // (512 x 8)
    s = build_schedule(**schedule_args(cfg), steps_per_epoch=spe)
    assert s(0) == pytest.approx(1.6e-5)
    assert s(30 * spe) == pytest.approx(1.6e-3)
    assert s(165 * spe) == pytest.approx(0.8e-3)  # half-way through the 270 decay epochs
    assert s(300 * spe - 1) == pytest.approx(0.0, abs=1e-9)
    assert s(10**9) == s(300 * spe - 1)  # past the end: the final value


def test_fractional_epochs_and_polynomial_power_key():
    s = build_schedule(**schedule_args(load_config(["--scheduler", "constant", "--warmup_epochs", "0.5",
                                                    "--warmup_factor", "0", "--epoch_size", "2"], notices=[])),
                       steps_per_epoch=10)
    assert [s(i) for i in (0, 1, 4, 5)] == pytest.approx([0.0, 0.0002, 0.0008, 0.001])
    # MindCV uses decay_rate as the polynomial power; an explicit `power` wins.
    p = build_schedule(**schedule_args(load_config(["--scheduler", "polynomial_decay", "--warmup_epochs", "0",
                                                    "--epoch_size", "4", "--power", "2.0"], notices=[])),
                       steps_per_epoch=10)
    assert p(20) == pytest.approx(0.001 * 0.5**2)
