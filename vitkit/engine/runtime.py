"""This process's device, seeds, TF32 switch, RNG state and CPU memory allocator: the one copy of each that
training, evaluation and benchmarks use."""
from __future__ import annotations

import ctypes
import random
import sys
from typing import Any

import numpy as np
import torch

from vitkit.errors import ConfigError


def pick_device(name: str, local_rank: int = 0, world_size: int = 1) -> torch.device:
    """`auto`/`cuda` -> this process's GPU (cuda:local_rank) when CUDA is present, else CPU (`auto`) or an
    error (`cuda`); `cpu`; `cuda:N` as given for one process (with several, each process takes
    cuda:local_rank: one GPU per process)."""
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError(f"device: {name!r} but CUDA is not available; use --device cpu (or auto)")
    if name.startswith("cuda:") and world_size == 1:
        return torch.device(name)
    return torch.device("cuda", local_rank % torch.cuda.device_count())


def seed_all(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def seed_everything(seed: int, deterministic: bool) -> None:
    """`seed_all`, and with `deterministic` torch's deterministic kernels (warning where there is none)."""
    seed_all(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


def setup_tf32(device: torch.device, deterministic: bool = False) -> None:
    """TF32 matmuls and convolutions on CUDA (fp32 accuracy for training, ~8x the speed on Ampere and later),
    unless the run asked for deterministic results."""
    if device.type == "cuda" and not deterministic:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


# -- RNG state as plain values and tensors (loadable with torch.load(weights_only=True)) -----------------------

def rng_state() -> dict[str, Any]:
    version, mt, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": {"version": version, "state": torch.tensor(mt, dtype=torch.int64), "gauss": gauss},
        "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    py = state["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss"]))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))


def restore_rank_rng(states: list[dict[str, Any]], rank: int, seed: int) -> None:
    """Continue this rank's random stream (dropout, drop path) from a checkpoint's per-rank RNG states
    (`gather_objects(rng_state())` at save time). A rank that did not exist when the checkpoint was written
    starts a fresh stream of its own (seed + rank) rather than copying another rank's."""
    if rank < len(states):
        set_rng_state(states[rank])
    else:
        seed_all(seed + rank)


# glibc's mallopt parameters (malloc.h) and the values `keep_large_blocks` sets: blocks up to 32 MiB (the most glibc
# accepts on 64-bit: HEAP_MAX_SIZE / 2) come from the heap, and up to 1 GiB of freed memory stays there, instead
# of an mmap, page faults on first touch and an munmap for every large tensor of every call.
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD, TRIM_THRESHOLD = 32 << 20, 1 << 30


def keep_large_blocks() -> bool:
    """Set glibc malloc to keep large blocks (above) for this process: what PyTorch's eager CPU inference of
    large batches gains from (vit_n_4_32 at batch 128: 1.29x images/s; benchmarks/results/int8_cpu.md, allocator
    tables, fresh processes alternating). The same as GLIBC_TUNABLES=glibc.malloc.mmap_threshold=33554432:
    glibc.malloc.trim_threshold=1073741824 at the process start. False where there is no glibc (macOS, musl)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))


LARGE_BATCH = 32  # images per call from which CPU inference keeps large blocks (`cpu_inference_allocator`)


def cpu_inference_allocator(device: str | torch.device, batch_size: int) -> bool:
    """The rule vitkit applies, measured in fresh processes (benchmarks/results/int8_cpu.md): inference on the CPU
    in batches of LARGE_BATCH images or more (validate, predict of many files) keeps large blocks
    (`keep_large_blocks`: PyTorch eager 1.27x at batch 128, 1.02-1.05x at 8); below it glibc's defaults stay
    (0.92x at batch 1, so `vitkit serve`, whose batches are what arrives, keeps them too). True when applied."""
    if torch.device(device).type != "cpu" or batch_size < LARGE_BATCH:
        return False
    return keep_large_blocks()
