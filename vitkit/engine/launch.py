"""Launching data-parallel runs on torch.distributed (NCCL on GPUs, Gloo on CPUs) and the small collectives.

Launching:
  torchrun --nproc_per_node N train.py -c CONFIG ...          one node; torchrun sets RANK, WORLD_SIZE, ...
  torchrun --nnodes M --nproc_per_node N --rdzv_backend c10d --rdzv_endpoint HOST:PORT train.py ...
                                                              several nodes (torchrun's c10d rendezvous)
  mpirun -n N python train.py -c CONFIG ...                   the seed's launcher; ranks come from the MPI
                                                              environment (Open MPI, MPICH/Intel MPI, MVAPICH2)
With mpirun the rendezvous address is MASTER_ADDR (default 127.0.0.1, i.e. one node) and MASTER_PORT
(default 29500, torchrun's default); on several nodes pass rank 0's host: `mpirun -x MASTER_ADDR=node0 ...`.

`distribute` (MindCV's key) true requires a launcher environment; the recipe-file fallback to one process is
decided in `vitkit.engine.config.resolve`, before this module sees the value. false while a launcher started
several processes runs distributed anyway, with a one-line notice: N independent copies would race on the same
run directory, and the user plainly asked for N processes. Model wrapping and gathered state dicts:
`vitkit.engine.parallel`.
"""
from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from vitkit.engine.runtime import pick_device
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
    local_rank: int | None  # None when the launcher does not say (then derived from the rank)


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


def detect_launcher(environ: Mapping[str, str] | None = None) -> LaunchEnv | None:
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


def init_distributed(*, distribute: bool, device: str, environ: Mapping[str, str] | None = None) -> DistInfo:
    """Set up this process from the launcher environment (see the module docstring) and return its place.

    Without a launcher (or with one process) no process group is created and the run is a plain single
    process. With several, the process group uses NCCL for CUDA tensors and Gloo for CPU tensors (so
    object collectives and CPU metrics work on GPU runs too), and `device` resolves to cuda:local_rank.
    """
    launch = detect_launcher(environ)
    if distribute and launch is None:
        raise ConfigError(
            "distribute: true but this process was not started by a launcher (no RANK/WORLD_SIZE from torchrun, "
            "no OMPI_COMM_WORLD_*/PMI_*/MV2_* from mpirun): run `torchrun --nproc_per_node N train.py ...` or "
            "`mpirun -n N python train.py ...`, or pass --distribute false for one process")
    if launch is None or launch.world_size == 1:
        return DistInfo(0, 1, 0, pick_device(device), True)
    if not distribute and launch.rank == 0:
        print(f"note: distribute is false but {launch.launcher} started {launch.world_size} processes; "
              f"training data-parallel on all of them", file=sys.stderr)
    local_rank = launch.local_rank
    if local_rank is None:  # assume ranks fill nodes in order, one GPU each
        local_rank = launch.rank % max(torch.cuda.device_count(), 1) if torch.cuda.is_available() else launch.rank
    # env:// reads these; MPI launchers do not set them. Setting them also lets any later code ask RANK.
    os.environ.update(RANK=str(launch.rank), WORLD_SIZE=str(launch.world_size), LOCAL_RANK=str(local_rank))
    os.environ.setdefault("MASTER_ADDR", DEFAULT_MASTER_ADDR)
    os.environ.setdefault("MASTER_PORT", DEFAULT_MASTER_PORT)
    torch_device = pick_device(device, local_rank, launch.world_size)
    if torch_device.type == "cuda":
        torch.cuda.set_device(torch_device)
        backend = "cpu:gloo,cuda:nccl"
    else:
        backend = "gloo"
    dist.init_process_group(backend, init_method="env://", rank=launch.rank, world_size=launch.world_size)
    return DistInfo(launch.rank, launch.world_size, local_rank, torch_device, launch.rank == 0)


def destroy_distributed() -> None:
    """Tear the process group down (safe to call when none is up)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def distributed_session(*, distribute: bool, device: str) -> Iterator[DistInfo]:
    """`with distributed_session(distribute=..., device=...) as info:` init, then destroy on exit, on an
    exception too."""
    info = init_distributed(distribute=distribute, device=device)
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


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A plain tensor from a DTensor (FSDP's gradient norm, say); other tensors as they are."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def mean_across_ranks(t: torch.Tensor) -> torch.Tensor:
    """The mean of `t` over all ranks (a copy), e.g. the step's loss, so every rank sees the same value and
    takes the same decision on a non-finite loss."""
    return all_reduce_sum(t.detach().clone()) / get_world_size()
