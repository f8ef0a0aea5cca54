"""Mixed precision: MindCV's `amp_level` mapped onto PyTorch autocast and GradScaler.

  O0        fp32.
  O1, O2    autocast; bf16 where the GPU supports it (no loss scaling needed), else fp16 with a GradScaler
            (`loss_scale_type` fixed: a constant `loss_scale`; dynamic/auto: starts at `loss_scale`, halves on
            overflow, doubles after 2000 clean steps). MindCV's O1/O2 differ in which ops MindSpore casts;
            autocast decides that per op in PyTorch, so both map to the same thing.
  O3        the weights themselves in bf16 (MindCV's O3 casts the whole network).
On CPU, `amp_dtype: auto` runs fp32 with a one-line notice (CPU autocast is slower than fp32 on most CPUs);
`amp_dtype: bfloat16` asks for CPU bf16 autocast explicitly.
"""
from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch

from vitkit.errors import ConfigError

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Precision:
    device_type: str
    autocast_dtype: torch.dtype | None  # None: no autocast
    param_dtype: torch.dtype
    scaler: torch.amp.GradScaler  # disabled (a pass-through) unless fp16
    notice: str = ""
    fixed_scale: float | None = None  # loss_scale_type fixed: the scale to restore after every update

    def update_scaler(self) -> None:
        """After an optimizer step: dynamic scaling adapts, a fixed scale is put back (an overflowed step is
        still skipped, as MindCV's drop_overflow_update does)."""
        self.scaler.update(self.fixed_scale)

    def autocast(self) -> AbstractContextManager:
        return torch.autocast(self.device_type, dtype=self.autocast_dtype or torch.float32,
                              enabled=self.autocast_dtype is not None)

    @property
    def eval_dtype(self) -> torch.dtype | None:
        """The autocast dtype for evaluation (None for fp32 or bf16 weights, which need no autocast)."""
        return self.autocast_dtype

    def describe(self) -> str:
        if self.param_dtype != torch.float32:
            return f"{str(self.param_dtype).removeprefix('torch.')} weights"
        if self.autocast_dtype is None:
            return "fp32"
        text = f"autocast {str(self.autocast_dtype).removeprefix('torch.')}"
        return text + (f", loss scale {self.scaler.get_scale():g}" if self.scaler.is_enabled() else "")


def resolve_precision(*, amp_level: str, device: torch.device, amp_dtype: str = "auto",
                      loss_scale_type: str = "dynamic", loss_scale: float = 1024.0) -> Precision:
    """What `amp_level` / `amp_dtype` / `loss_scale_type` mean on `device`."""
    disabled = torch.amp.GradScaler(device.type, enabled=False)
    if amp_level == "O0":
        return Precision(device.type, None, torch.float32, disabled)
    if amp_dtype == "auto":
        if device.type != "cuda":
            return Precision(device.type, None, torch.float32, disabled,
                             notice=f"note: amp_level {amp_level} runs in fp32 on {device.type} "
                                    f"(set amp_dtype: bfloat16 for CPU bf16 autocast)")
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    else:
        dtype = DTYPES[amp_dtype]
    if amp_level == "O3":
        if dtype != torch.bfloat16:
            raise ConfigError("config key 'amp_level': O3 (half-precision weights) needs bfloat16; fp16 weights "
                              "without fp32 master copies diverge. Use O2 with float16 instead")
        return Precision(device.type, None, torch.bfloat16, disabled)
    if dtype == torch.float16:
        scaler = torch.amp.GradScaler(device.type, init_scale=loss_scale)
        fixed = loss_scale if loss_scale_type == "fixed" else None
        return Precision(device.type, dtype, torch.float32, scaler, fixed_scale=fixed)
    return Precision(device.type, dtype, torch.float32, disabled)
