"""Data-parallel models: DDP by default, FSDP2 with `fsdp: true`, and state dicts gathered from them.

Checkpoints are always gathered: rank 0 writes one full, unsharded safetensors file (and a full optimizer
state), so any number of processes, with DDP, FSDP or none, can load it. Launching and collectives:
`vitkit.engine.launch`.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.nn.parallel import DistributedDataParallel

from vitkit.engine.launch import dist_ready, is_main, print0
from vitkit.errors import ConfigError
from vitkit.models.vit import VisionTransformer

# -- model wrapping ------------------------------------------------------------------------------------------------

def wrap_model(model: nn.Module, *, fsdp: bool, ema: bool, device: torch.device) -> nn.Module:
    """DDP by default; FSDP2 (`fully_shard` on each transformer block, then the root) with `fsdp`.

    The model must already be on `device` with its starting weights loaded. Build the optimizer after
    wrapping (FSDP replaces parameters by sharded ones), from `unwrap_model(model)` so parameter names
    carry no wrapper prefix. Without a process group the model comes back unchanged.
    """
    if fsdp and ema:
        raise ConfigError("fsdp: true with ema: true is not supported (the EMA copy would be a full, unsharded "
                          "model on every process); drop one of them")
    if not dist_ready():
        if fsdp:
            print0("note: fsdp has nothing to shard in a single process; training unsharded")
        return model
    if fsdp:
        try:
            from torch.distributed.fsdp import fully_shard
        except ImportError:  # public since torch 2.6
            raise ConfigError("fsdp: true needs torch >= 2.6 (torch.distributed.fsdp.fully_shard)") from None
        # One FSDP unit per block: a block's parameters are all-gathered just before it runs and freed after
        # (the FSDP2 tutorial's recipe for transformers); the root unit holds embeddings, norm and head.
        for block in model.blocks:  # type: ignore[union-attr]
            fully_shard(block)
        fully_shard(model)
        return model
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain model under DDP and torch.compile wrappers (FSDP2 shards in place: nothing to unwrap)."""
    while True:
        if isinstance(model, DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):  # torch.compile's OptimizedModule
            model = model._orig_mod  # type: ignore[assignment]
        else:
            return model


def is_fsdp(model: nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return False
    return isinstance(unwrap_model(model), FSDPModule)


def grad_sync(model: nn.Module, sync: bool) -> contextlib.AbstractContextManager:
    """Context for one micro-batch's backward: with `sync` false (not the last micro-batch of a gradient
    accumulation step) gradients stay local, saving one all-reduce per micro-batch."""
    if sync:
        return contextlib.nullcontext()
    if isinstance(model, DistributedDataParallel):
        return model.no_sync()
    if is_fsdp(model):
        return _fsdp_no_sync(unwrap_model(model))
    return contextlib.nullcontext()


@contextlib.contextmanager
def _fsdp_no_sync(model: nn.Module) -> Iterator[None]:
    model.set_requires_gradient_sync(False)  # type: ignore[operator]
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)  # type: ignore[operator]


def even_batches(loader: Iterable[Any], image_shape: tuple[int, ...]) -> Iterator[Any]:
    """Evaluation batches padded with *empty* batches so every rank runs the same number of forwards.

    Under FSDP every forward is a collective (it all-gathers parameters), but exact evaluation shards do not
    pad, so ranks may hold different numbers of batches; a rank that runs out forwards batches of zero
    images, which add nothing to any count."""
    n = torch.tensor([len(loader)], dtype=torch.float64)  # type: ignore[arg-type]
    if dist_ready():
        dist.all_reduce(n, op=dist.ReduceOp.MAX)
    done = 0
    for batch in loader:
        done += 1
        yield batch
    for _ in range(int(n.item()) - done):
        yield torch.zeros((0, *image_shape)), torch.zeros(0, dtype=torch.long)


# -- gathered state dicts: what rank 0 writes, loadable by any number of processes ------------------------------

def _full_options(**kw: Any) -> StateDictOptions:
    return StateDictOptions(full_state_dict=True, **kw)


def model_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """A snapshot of the full, unwrapped state dict on CPU (copies: later steps do not change it). Under
    FSDP this is a collective (call it on every rank) and only rank 0 receives the tensors (others get {})."""
    if is_fsdp(model):
        return get_model_state_dict(unwrap_model(model), options=_full_options(cpu_offload=True))
    return {k: v.detach().to("cpu", copy=True) for k, v in unwrap_model(model).state_dict().items()}


def gathered_model(model: nn.Module) -> nn.Module | None:
    """For `save_checkpoint(path, gathered_model(model), ...)` on rank 0: the plain model holding the full
    weights (the model itself without FSDP; under FSDP a CPU copy built from the gathered state dict, with
    no second allocation: its tensors are the gathered ones). A collective under FSDP; None off rank 0."""
    if not is_fsdp(model):
        return unwrap_model(model) if is_main() else None
    full = model_state_dict(model)
    if not is_main():
        return None
    sharded = unwrap_model(model)
    with torch.device("meta"):  # no memory: load_state_dict(assign=True) puts the gathered tensors in
        plain = VisionTransformer(sharded.cfg)  # type: ignore[arg-type]
    plain.load_state_dict(full, assign=True)
    for name, buf in plain.named_buffers():  # non-persistent ones (the sincos2d table) are not in `full`
        if buf.is_meta:
            owner, _, attr = name.rpartition(".")
            setattr(plain.get_submodule(owner), attr, sharded.get_buffer(name).detach().to("cpu", copy=True))
    plain.model_name = sharded.model_name
    return plain


def load_model_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load a full state dict (every rank passes it) into a plain, DDP or FSDP model."""
    if is_fsdp(model):
        set_model_state_dict(unwrap_model(model), state, options=_full_options())
        return
    unwrap_model(model).load_state_dict(state, strict=True)


def _fqn_to_index(state: dict[str, Any]) -> dict[str, Any]:
    """A parameter-name-keyed optimizer state dict -> torch's usual integer-keyed one (ids numbered in
    param_groups order, exactly as `Optimizer.state_dict` numbers them)."""
    ids: dict[str, int] = {}
    groups = []
    for group in state["param_groups"]:
        names = group["params"]
        for name in names:
            ids.setdefault(name, len(ids))
        groups.append(dict(group, params=[ids[n] for n in names]))
    return {"state": {ids[n]: s for n, s in state["state"].items()}, "param_groups": groups}


def _index_to_fqn(state: dict[str, Any], optimizer: torch.optim.Optimizer, model: nn.Module) -> dict[str, Any]:
    """The inverse of `_fqn_to_index` for this optimizer's parameters."""
    names = {id(p): n for n, p in unwrap_model(model).named_parameters()}
    order = [names[id(p)] for g in optimizer.param_groups for p in g["params"]]
    groups = [dict(g, params=[order[i] for i in g["params"]]) for g in state["param_groups"]]
    return {"state": {order[i]: s for i, s in state["state"].items()}, "param_groups": groups}


def optimizer_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The full optimizer state in torch's integer-keyed format, tensors on CPU: the same file content
    whether the run was single-process, DDP or FSDP. A collective under FSDP (rank 0 gets it, others {})."""
    if is_fsdp(model):
        full = get_optimizer_state_dict(unwrap_model(model), optimizer, options=_full_options(cpu_offload=True))
        return _fqn_to_index(full) if full else {}
    state = optimizer.state_dict()
    return {"state": {i: {k: v.detach().to("cpu", copy=True) if torch.is_tensor(v) else v for k, v in s.items()}
                      for i, s in state["state"].items()},
            "param_groups": state["param_groups"]}


def load_optimizer_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Load a full integer-keyed optimizer state (every rank passes it); under FSDP each rank keeps its shard.

    The kernel choice (`fused` / `foreach`) stays this run's: a checkpoint from a run on another device or
    sharding (fused on one CPU, foreach under FSDP) must not carry its kernel over."""
    kernels = ("fused", "foreach", "capturable")
    keep = [{k: g[k] for k in kernels if k in g} for g in optimizer.param_groups]
    if len(keep) == len(state["param_groups"]):  # otherwise torch's own check names the mismatch
        state = {**state, "param_groups": [{**saved, **mine} for saved, mine in zip(state["param_groups"], keep)]}
    if is_fsdp(model):
        set_optimizer_state_dict(unwrap_model(model), optimizer, _index_to_fqn(state, optimizer, model),
                                 options=_full_options())
        return
    optimizer.load_state_dict(state)
