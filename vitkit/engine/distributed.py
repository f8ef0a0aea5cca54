"""Data-parallel training on PyTorch's own engine: torch.distributed (DDP or FSDP2), NCCL on GPUs, Gloo on CPUs.

Launching (issue 6):
  torchrun --nproc_per_node N train.py -c CONFIG ...          one node; torchrun sets RANK, WORLD_SIZE, ...
  torchrun --nnodes M --nproc_per_node N --rdzv_backend c10d --rdzv_endpoint HOST:PORT train.py ...
                                                              several nodes (torchrun's c10d rendezvous)
  mpirun -n N python train.py -c CONFIG ...                   the seed's launcher; ranks come from the MPI
                                                              environment (Open MPI, MPICH/Intel MPI, MVAPICH2)
With mpirun the rendezvous address is MASTER_ADDR (default 127.0.0.1, i.e. one node) and MASTER_PORT
(default 29500, torchrun's default); on several nodes pass rank 0's host: `mpirun -x MASTER_ADDR=node0 ...`.

`distribute` (MindCV's key): true on the command line requires a launcher environment and is an error
without one; true from a recipe file runs in one process with a one-line notice (the seed's command
`python train.py -c configs/vit/vit_b32_224.yaml ...` runs as written). false while a launcher started several
processes runs distributed anyway, with a one-line notice: N independent copies would race on the same run
directory, and the user plainly asked for N processes.

The config's `batch_size` is per process, as in MindCV; the global batch is
batch_size x world_size x gradient_accumulation_steps (`apply_global_batch`).

Checkpoints are always gathered: rank 0 writes one full, unsharded safetensors file (and a full optimizer
state), so any number of processes, with DDP, FSDP or none, can load it.
"""
from __future__ import annotations

import contextlib
import os
import random
import sys
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Mapping, Optional

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from vitkit.errors import ConfigError

DEFAULT_MASTER_ADDR = "127.0.0.1"
DEFAULT_MASTER_PORT = "29500"  # torchrun's default port

# (launcher, rank, size, local rank) variables; the first launcher whose rank and size are both set wins.
_LAUNCHERS: tuple[tuple[str, str, str, tuple[str, ...]], ...] = (
    ("torchrun", "RANK", "WORLD_SIZE", ("LOCAL_RANK",)),
    ("Open MPI", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", ("OMPI_COMM_WORLD_LOCAL_RANK",)),
    ("MVAPICH2", "MV2_COMM_WORLD_RANK", "MV2_COMM_WORLD_SIZE", ("MV2_COMM_WORLD_LOCAL_RANK",)),
    # MPICH and Intel MPI (Hydra process manager) export PMI_*; MPI_LOCALRANKID is their local rank.
    ("MPI (PMI)", "PMI_RANK", "PMI_SIZE", ("MPI_LOCALRANKID", "PMI_LOCAL_RANK")),
)


@dataclass(frozen=True)
class LaunchEnv:
    """What a launcher told this process."""

    launcher: str
    rank: int
    world_size: int
    local_rank: Optional[int]  # None when the launcher does not say (then derived from the rank)


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the run."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    is_main: bool

    @property
    def distributed(self) -> bool:
        """True when a process group is up (more than one process)."""
        return self.world_size > 1


def detect_launcher(environ: Optional[Mapping[str, str]] = None) -> Optional[LaunchEnv]:
    """The launcher environment of this process (torchrun or MPI), or None when started plainly."""
    env = os.environ if environ is None else environ
    for name, rank_key, size_key, local_keys in _LAUNCHERS:
        if rank_key in env and size_key in env:
            local = next((int(env[k]) for k in local_keys if k in env), None)
            try:
                rank, size = int(env[rank_key]), int(env[size_key])
            except ValueError:
                raise ConfigError(f"{rank_key}={env[rank_key]!r} / {size_key}={env[size_key]!r} from {name} are "
                                  "not integers") from None
            if not 0 <= rank < size:
                raise ConfigError(f"{name} says rank {rank} of {size} processes; the rank must be in 0..{size - 1}")
            return LaunchEnv(name, rank, size, local)
    return None


def resolve_device(device: str, local_rank: int = 0, world_size: int = 1) -> torch.device:
    """`auto`/`cuda` -> this process's GPU (cuda:local_rank) when CUDA is present, else CPU; `cpu`; `cuda:N`
    as given for one process (with several, each process takes cuda:local_rank: one GPU per process)."""
    if device == "cpu" or (device == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError(f"device: {device!r} but CUDA is not available; use --device cpu (or auto)")
    if device.startswith("cuda:") and world_size == 1:
        return torch.device(device)
    return torch.device("cuda", local_rank % torch.cuda.device_count())


def init_distributed(cfg: Any, environ: Optional[Mapping[str, str]] = None) -> DistInfo:
    """Set up this process from the launcher environment (see the module docstring) and return its place.

    Without a launcher (or with one process) no process group is created and the run is a plain single
    process. With several, the process group uses NCCL for CUDA tensors and Gloo for CPU tensors (so
    object collectives and CPU metrics work on GPU runs too), and `cfg.device` resolves to cuda:local_rank.
    """
    launch = detect_launcher(environ)
    source = getattr(cfg, "sources", {}).get("distribute")
    if cfg.distribute and launch is None and source not in (None, "command line"):
        # The seed's own command, `python train.py -c configs/vit/vit_b32_224.yaml ...`, runs as written: the
        # recipe's 8-device setting falls back to one process, said in one line (apply_global_batch then
        # reports the global batch against the recipe's reference).
        print(f"note: distribute: true (from {source}) but no launcher started this process; running in one "
              f"process (use torchrun or mpirun for several)", file=sys.stderr)
        cfg.distribute = False
    if cfg.distribute and launch is None:
        raise ConfigError(
            "distribute: true but this process was not started by a launcher (no RANK/WORLD_SIZE from torchrun, "
            "no OMPI_COMM_WORLD_*/PMI_*/MV2_* from mpirun): run `torchrun --nproc_per_node N train.py ...` or "
            "`mpirun -n N python train.py ...`, or pass --distribute false for one process")
    if launch is None or launch.world_size == 1:
        return DistInfo(0, 1, 0, resolve_device(cfg.device), True)
    if not cfg.distribute and launch.rank == 0:
        print(f"note: distribute is false but {launch.launcher} started {launch.world_size} processes; "
              f"training data-parallel on all of them", file=sys.stderr)
    local_rank = launch.local_rank
    if local_rank is None:  # assume ranks fill nodes in order, one GPU each
        local_rank = launch.rank % max(torch.cuda.device_count(), 1) if torch.cuda.is_available() else launch.rank
    # env:// reads these; MPI launchers do not set them. Setting them also lets any later code ask RANK.
    os.environ.update(RANK=str(launch.rank), WORLD_SIZE=str(launch.world_size), LOCAL_RANK=str(local_rank))
    os.environ.setdefault("MASTER_ADDR", DEFAULT_MASTER_ADDR)
    os.environ.setdefault("MASTER_PORT", DEFAULT_MASTER_PORT)
    device = resolve_device(cfg.device, local_rank, launch.world_size)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        backend = "cpu:gloo,cuda:nccl"
    else:
        backend = "gloo"
    dist.init_process_group(backend, init_method="env://", rank=launch.rank, world_size=launch.world_size)
    return DistInfo(launch.rank, launch.world_size, local_rank, device, launch.rank == 0)


def destroy_distributed() -> None:
    """Tear the process group down (safe to call when none is up)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def distributed_session(cfg: Any) -> Iterator[DistInfo]:
    """`with distributed_session(cfg) as info:` init, then destroy on exit, on an exception too."""
    info = init_distributed(cfg)
    try:
        yield info
    finally:
        destroy_distributed()


# -- small collectives, each a no-op without a process group -------------------------------------------------

def dist_ready() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    return dist.get_rank() if dist_ready() else 0


def get_world_size() -> int:
    return dist.get_world_size() if dist_ready() else 1


def is_main() -> bool:
    """True on rank 0 (and in a plain single process): the one process that logs and writes files."""
    return get_rank() == 0


def barrier() -> None:
    if dist_ready():
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum `tensor` over all ranks in place and return it."""
    if dist_ready():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank `src`'s `obj` on every rank (picklable objects)."""
    if not dist_ready():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order, on every rank."""
    if not dist_ready():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def print0(*args: Any, **kwargs: Any) -> None:
    """print on rank 0 only."""
    if is_main():
        print(*args, **kwargs)


# -- seeding ---------------------------------------------------------------------------------------------------

def seed_all(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def seed_for_init(cfg: Any) -> None:
    """The same seed on every rank before the model is built: FSDP shards each rank's own copy (it does
    not broadcast), so the initial weights must agree everywhere; DDP broadcasts rank 0's anyway."""
    seed_all(cfg.seed)


def seed_for_augmentation(cfg: Any, rank: int) -> int:
    """seed + rank after the model is built, so ranks draw different random augmentations and dropout
    masks (the loader seeds each sample from its global position, which is rank-independent already)."""
    seed = cfg.seed + rank
    seed_all(seed)
    return seed


# -- global batch and learning rate -----------------------------------------------------------------------------

def apply_global_batch(cfg: Any, world_size: int) -> int:
    """Print the global batch once; with `reference_batch_size` set and different, warn with the linearly
    scaled lr (Goyal et al. 2017, "Accurate, Large Minibatch SGD", sec. 2.1) and, with `scale_lr`, set
    `cfg.lr` to it (recorded in `cfg.sources`). Returns the global batch."""
    accum = cfg.gradient_accumulation_steps
    global_batch = cfg.batch_size * world_size * accum
    print0(f"global batch {global_batch} = batch_size {cfg.batch_size} per process x {world_size} "
           f"process{'es' if world_size != 1 else ''} x {accum} accumulation step{'s' if accum != 1 else ''}")
    ref = cfg.reference_batch_size
    if ref is None:
        if cfg.scale_lr:
            raise ConfigError("scale_lr: true needs reference_batch_size (the global batch the recipe's lr was "
                              "tuned for, e.g. 4096 for 512 x 8 devices)")
        return global_batch
    if ref == global_batch:
        return global_batch
    scaled = cfg.lr * global_batch / ref
    if cfg.scale_lr:
        print0(f"scale_lr: lr {cfg.lr:g} -> {scaled:g} (x {global_batch}/{ref}, the recipe's reference batch)")
        cfg.sources["lr"] = f"{cfg.sources.get('lr', 'default')}, scaled by scale_lr x {global_batch}/{ref}"
        cfg.lr = scaled
    else:
        print0(f"warning: global batch {global_batch} differs from the recipe's reference_batch_size {ref}; "
               f"the linearly scaled lr would be {scaled:g} (pass --scale_lr to use it, or keep lr {cfg.lr:g})",
               file=sys.stderr)
    return global_batch


# -- model wrapping ------------------------------------------------------------------------------------------------

def wrap_model(model: nn.Module, cfg: Any, device: torch.device) -> nn.Module:
    """DDP by default; FSDP2 (`fully_shard` on each transformer block, then the root) with `cfg.fsdp`.

    The model must already be on `device` with its starting weights loaded. Build the optimizer after
    wrapping (FSDP replaces parameters by sharded ones), from `unwrap_model(model)` so parameter names
    carry no wrapper prefix. Without a process group the model comes back unchanged.
    """
    if cfg.fsdp and getattr(cfg, "ema", False):
        raise ConfigError("fsdp: true with ema: true is not supported (the EMA copy would be a full, unsharded "
                          "model on every process); drop one of them")
    if not dist_ready():
        if cfg.fsdp:
            print0("note: fsdp has nothing to shard in a single process; training unsharded")
        return model
    if cfg.fsdp:
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
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain model under DDP and torch.compile wrappers (FSDP2 shards in place: nothing to unwrap)."""
    from torch.nn.parallel import DistributedDataParallel

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
    from torch.nn.parallel import DistributedDataParallel

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


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A plain tensor from a DTensor (FSDP's gradient norm, say); other tensors as they are."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def mean_across_ranks(t: torch.Tensor) -> torch.Tensor:
    """The mean of `t` over all ranks (a copy), e.g. the step's loss, so every rank sees the same value and
    takes the same decision on a non-finite loss."""
    return all_reduce_sum(t.detach().clone()) / get_world_size()


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


def restore_rank_rng(states: list[dict[str, Any]], rank: int, seed: int) -> None:
    """Continue this rank's random stream (dropout, drop path) from a checkpoint's per-rank RNG states
    (`gather_objects(rng_state())` at save time). A rank that did not exist when the checkpoint was written
    starts a fresh stream of its own (seed + rank) rather than copying another rank's."""
    from vitkit.engine.saver import set_rng_state

    if rank < len(states):
        set_rng_state(states[rank])
    else:
        seed_all(seed + rank)


# -- gathered state dicts: what rank 0 writes, loadable by any number of processes ------------------------------

def _full_options(**kw: Any) -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kw)


def model_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """A snapshot of the full, unwrapped state dict on CPU (copies: later steps do not change it). Under
    FSDP this is a collective (call it on every rank) and only rank 0 receives the tensors (others get {})."""
    if is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        return get_model_state_dict(unwrap_model(model), options=_full_options(cpu_offload=True))
    return {k: v.detach().to("cpu", copy=True) for k, v in unwrap_model(model).state_dict().items()}


def gathered_model(model: nn.Module) -> Optional[nn.Module]:
    """For `save_checkpoint(path, gathered_model(model), ...)` on rank 0: the plain model holding the full
    weights (the model itself without FSDP; under FSDP a CPU copy built from the gathered state dict, with
    no second allocation: its tensors are the gathered ones). A collective under FSDP; None off rank 0."""
    if not is_fsdp(model):
        return unwrap_model(model) if is_main() else None
    full = model_state_dict(model)
    if not is_main():
        return None
    from vitkit.models.vit import VisionTransformer

    sharded = unwrap_model(model)
    with torch.device("meta"):  # no memory: load_state_dict(assign=True) puts the gathered tensors in
        plain = VisionTransformer(sharded.cfg)  # type: ignore[arg-type]
    plain.load_state_dict(full, assign=True)
    plain.model_name = sharded.model_name
    return plain


def load_model_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load a full state dict (every rank passes it) into a plain, DDP or FSDP model."""
    if is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import set_model_state_dict

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
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

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
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

        set_optimizer_state_dict(unwrap_model(model), optimizer, _index_to_fqn(state, optimizer, model),
                                 options=_full_options())
        return
    optimizer.load_state_dict(state)
