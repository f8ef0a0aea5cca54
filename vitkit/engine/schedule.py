"""Learning-rate schedules, updated every optimizer step, equal to MindCV's.

MindCV (`mindcv/scheduler/scheduler_factory.py`, `dynamic_lr.py`) builds a list of per-step lrs: a linear
warmup from `lr * warmup_factor` over `warmup_epochs`, then the main schedule over the remaining
`epoch_size - warmup_epochs` epochs, with the main schedule's clock restarting at 0 after warmup. We compute
the same value in closed form for any step (no 750k-entry list), and accept fractional epochs by rounding
phase lengths to whole steps. MindCV's facts we keep on purpose:
  - `lr_epoch_stair` holds the lr for a whole epoch (warmup, cosine, exponential and polynomial);
    `step_decay` and `multi_step_decay` are always per epoch;
  - `multi_step_decay` milestones count epochs after warmup;
  - `polynomial_decay` goes to 0 at the end of training (min_lr unused) with power `decay_rate`
    (MindCV overloads it; the config's `power` resolves to `decay_rate` unless set);
  - cosine runs `num_cycles` cycles of `decay_epochs`, each peak `cycle_decay` times the last, then holds
    `min_lr`.
Past the last step the lr stays at its final value.
"""
from __future__ import annotations

import math
from bisect import bisect_right
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from vitkit.errors import ConfigError


@dataclass(frozen=True)
class LRSchedule:
    """lr as a pure function of the optimizer step: resuming needs only the step."""

    name: str
    lr: float
    steps_per_epoch: int
    epochs: float
    warmup_epochs: float = 0.0
    warmup_factor: float = 0.0
    decay_epochs: float = 1.0
    min_lr: float = 0.0
    decay_rate: float = 0.9
    milestones: tuple[int, ...] = ()
    power: float = 1.0
    num_cycles: int = 1
    cycle_decay: float = 1.0
    stair: bool = False

    @property
    def total_steps(self) -> int:
        return max(1, round(self.epochs * self.steps_per_epoch))

    @property
    def warmup_steps(self) -> int:
        return round(self.warmup_epochs * self.steps_per_epoch)

    def __call__(self, step: int) -> float:
        step = min(max(step, 0), self.total_steps - 1)
        spe = self.steps_per_epoch
        if step < self.warmup_steps:
            # linear_refined_lr: multiplier = i / (spe * warmup_epochs); linear_lr uses whole epochs.
            done = math.floor(step / spe) / self.warmup_epochs if self.stair else step / self.warmup_steps
            return self.lr * (self.warmup_factor + (1.0 - self.warmup_factor) * min(done, 1.0))
        j = step - self.warmup_steps  # the main phase's own clock
        epoch = math.floor(j / spe) if self.stair else j / spe
        whole_epoch = math.floor(j / spe)
        if self.name in ("cosine_decay", "warmup_cosine_decay"):
            cycle_steps = max(1, round(self.decay_epochs * spe))
            cycle = j // cycle_steps
            if cycle >= self.num_cycles:
                return self.min_lr
            in_cycle = j - cycle * cycle_steps
            t = math.floor(in_cycle / spe) if self.stair else in_cycle / spe
            peak = self.lr * self.cycle_decay**cycle
            return self.min_lr + 0.5 * (peak - self.min_lr) * (1.0 + math.cos(math.pi * t / self.decay_epochs))
        if self.name == "exponential_decay":
            return self.lr * self.decay_rate**epoch
        if self.name == "polynomial_decay":
            main_epochs = self.epochs - self.warmup_epochs
            return self.lr * (1.0 - min(epoch, main_epochs) / main_epochs) ** self.power
        if self.name == "step_decay":
            return self.lr * self.decay_rate ** math.floor(whole_epoch / self.decay_epochs)
        if self.name == "multi_step_decay":
            return self.lr * self.decay_rate ** bisect_right(sorted(self.milestones), whole_epoch)
        if self.name == "constant":
            return self.lr
        raise ValueError(f"unknown scheduler {self.name!r}")


def build_schedule(
    *, name: str, lr: float, steps_per_epoch: int, epochs: float, warmup_epochs: float = 0.0,
    warmup_factor: float = 0.0, decay_epochs: float | None = None, min_lr: float = 0.0, decay_rate: float = 0.9,
    milestones: Sequence[int] = (), power: float = 1.0, num_cycles: int = 1, cycle_decay: float = 1.0,
    stair: bool = False,
) -> LRSchedule:
    """The run's schedule; `steps_per_epoch` counts optimizer steps (after gradient accumulation);
    `decay_epochs` None: the epochs after warmup."""
    if name == "polynomial_decay" and epochs <= warmup_epochs:
        raise ConfigError("config key 'warmup_epochs': polynomial_decay needs epochs after warmup")
    return LRSchedule(
        name=name, lr=lr, steps_per_epoch=max(1, steps_per_epoch), epochs=epochs, warmup_epochs=warmup_epochs,
        warmup_factor=warmup_factor, decay_epochs=epochs - warmup_epochs if decay_epochs is None else decay_epochs,
        min_lr=min_lr, decay_rate=decay_rate, milestones=tuple(milestones), power=power, num_cycles=num_cycles,
        cycle_decay=cycle_decay, stair=stair)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Apply the scheduled lr to every group, times the group's layer-decay scale."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)

