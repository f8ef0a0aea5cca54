"""Exponential moving average of the weights (Polyak averaging), kept in fp32 and evaluated alongside."""
from __future__ import annotations

import copy

import torch
from torch import nn


class ModelEMA:
    """ema <- decay * ema + (1 - decay) * weights after every optimizer step; buffers are copied.

    The copy stays in fp32 even when the trained weights are bf16 (amp_level O3), so small updates are not
    rounded away.
    """

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.module = copy.deepcopy(model).float().eval()
        for p in self.module.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        ema = [p for p in self.module.parameters()]
        cur = [p.detach().to(e.dtype) for p, e in zip(model.parameters(), ema)]
        torch._foreach_lerp_(ema, cur, 1.0 - self.decay)
        for b_ema, b in zip(self.module.buffers(), model.buffers()):
            b_ema.copy_(b)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.module.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.module.load_state_dict(state, strict=True)
