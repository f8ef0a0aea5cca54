"""Optimizers: MindCV names on torch kernels, LAMB and Lion equal to timm's, weight-decay filters, layer decay."""
from __future__ import annotations

import pytest
import torch
from timm.optim import Lamb, Lion

from vitkit.engine.config import load_config, optimizer_args
from vitkit.engine.optim import create_optimizer, param_groups
from vitkit.models import create_model


def tiny():
    torch.manual_seed(0)
    return create_model("vit_n_4_32", depth=2)


def _groups_by_name(model, **kw):
    names = {id(p): n for n, p in model.named_parameters()}
    return [({names[id(p)] for p in g["params"]}, g["weight_decay"], g["lr_scale"]) for g in param_groups(model, **kw)]


def test_weight_decay_filters():
    model = tiny()
    all_names = {n for n, _ in model.named_parameters()}
    (only,) = _groups_by_name(model, weight_decay=0.3, weight_decay_filter="disable")
    assert only[0] == all_names and only[1] == 0.3

    groups = _groups_by_name(model, weight_decay=0.3, weight_decay_filter="norm_and_bias")
    no_decay = set().union(*(names for names, wd, _ in groups if wd == 0))
    # MindCV's rule (names with gamma/beta/bias) == every LayerNorm parameter and every bias in a ViT
    assert no_decay == {n for n in all_names if n.endswith(".bias") or "norm" in n}
    assert "pos_embed" not in no_decay and "cls_token" not in no_decay

    groups = _groups_by_name(model, weight_decay=0.3, weight_decay_filter="auto")
    no_decay_auto = set().union(*(names for names, wd, _ in groups if wd == 0))
    assert no_decay_auto == no_decay | {"pos_embed", "cls_token"}


def test_layer_decay_scales():
    model = tiny()  # depth 2: embeddings at layer 0, blocks 1..2, head at 3
    scale = {n: s for names, _, s in _groups_by_name(model, weight_decay=0.0, layer_decay=0.5) for n in names}
    assert scale["head.weight"] == 1.0 and scale["norm.weight"] == 1.0
    assert scale["blocks.1.mlp.fc1.weight"] == 0.5
    assert scale["blocks.0.attn.qkv.weight"] == 0.25
    assert scale["pos_embed"] == scale["patch_embed.proj.weight"] == 0.125


def _run(make, model, steps=4):
    opt = make(model)
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    for _ in range(steps):
        model(x).square().mean().backward()
        opt.step()
        opt.zero_grad()
    return torch.cat([p.detach().flatten() for p in model.parameters()])


@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_lamb_equals_timm(wd):
    ours = _run(lambda m: create_optimizer(m, opt="lamb", lr=1e-2, eps=1e-6, weight_decay=wd), tiny())
    ref = _run(lambda m: Lamb(m.parameters(), lr=1e-2, weight_decay=wd, max_grad_norm=None, foreach=False), tiny())
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_lion_equals_timm(wd):
    cfg = load_config(["--opt", "lion", "--lr", "1e-3", "--weight_decay", str(wd)], notices=[])  # beta2: lion's own
    ours = _run(lambda m: create_optimizer(m, **optimizer_args(cfg)), tiny())
    ref = _run(lambda m: Lion(m.parameters(), lr=1e-3, weight_decay=wd), tiny())
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-7)


@pytest.mark.parametrize("name, cls, extra", [
    ("adamw", torch.optim.AdamW, {}), ("adam", torch.optim.Adam, {}), ("sgd", torch.optim.SGD, {}),
    ("momentum", torch.optim.SGD, {"nesterov": True}), ("lamb", Lamb, {}), ("lion", Lion, {}),
])
def test_create_optimizer_names(name, cls, extra):
    argv = ["--opt", name, "--lr", "0.01", "--weight_decay", "0.05", "--weight_decay_filter", "norm_and_bias"]
    if extra.get("nesterov"):
        argv += ["--use_nesterov"]
    opt = create_optimizer(tiny(), **optimizer_args(load_config(argv, notices=[])))
    assert type(opt) is cls
    assert sorted(g["weight_decay"] for g in opt.param_groups) == [0.0, 0.05]
    if name in ("adamw", "adam", "sgd", "momentum"):  # torch's fused kernels on the CPU too (6x faster AdamW)
        assert opt.defaults["fused"] is True
    if name in ("sgd", "momentum"):
        assert opt.defaults["momentum"] == 0.9 and opt.defaults["nesterov"] == extra.get("nesterov", False)
    if name == "lion":
        assert opt.defaults["betas"] == (0.9, 0.99)  # the Lion paper's beta2 unless beta2 is set


def test_resumed_optimizer_keeps_this_runs_kernel():
    """A state saved by a fused optimizer (one CPU) loads into a foreach one (FSDP's choice) without switching."""
    from vitkit.engine.parallel import load_optimizer_state_dict

    model = tiny()
    fused = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, fused=True)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    fused.step()
    mine = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, foreach=True)
    load_optimizer_state_dict(model, mine, fused.state_dict())
    assert mine.param_groups[0]["foreach"] is True and not mine.param_groups[0]["fused"]
    assert len(mine.state) == len(fused.state)
