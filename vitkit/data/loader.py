"""The loader: deterministic sharded sampling, per-sample seeded augmentation, bad-image replacement, workers.

Determinism contract (the training loop's exact resume relies on it):
- the epoch's sample order is a function of (seed, epoch) only: a seeded permutation, repeated `aug_repeats`
  times per image (DeiT's repeated augmentation: the copies land on different ranks), then sharded rank::world;
- each sample's augmentation randomness is a function of (seed, epoch, position in the epoch's global order):
  Python `random`, NumPy and torch are seeded from it inside the worker (or, with no workers, inside a saved and
  restored RNG state), so batches are identical for any number of workers and after a mid-epoch resume;
- `set_epoch(e, start_batch=k)` skips the first k batches of the epoch without decoding them.
Training shards drop the tail (drop_remainder) or pad with the start of the order, so every rank gets the same
number of batches. Evaluation shards are rank::world slices with no padding: every image counted exactly once.
"""
from __future__ import annotations

import contextlib
import logging
import math
import random
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from vitkit.data.batch_augment import BatchAugment, sample_seed
from vitkit.data.datasets import SMALL_MEMORY_BYTES, ArrayDataset, ImageDataset, image_size_hint, to_memory
from vitkit.data.gpu_decode import GpuCollate, GpuDecoder, JpegCropPlan
from vitkit.data.preprocess import DataConfig
from vitkit.data.transforms import SMALL_IMAGE_MAX, build_transform
from vitkit.errors import DataError

log = logging.getLogger(__name__)

BAD_IMAGE_FLOOR = 10  # a handful of broken files never stops a run, whatever the dataset size
MAX_REPLACEMENTS = 20  # consecutive unreadable replacements before we conclude the data is broken
DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)


class ShardPlan:
    """Which dataset indices (and global positions) one rank reads in an epoch, in batches."""

    def __init__(self, n: int, *, batch_size: int, train: bool, shuffle: bool = True, seed: int = 0,
                 drop_remainder: bool = True, aug_repeats: int = 0, rank: int = 0, world_size: int = 1):
        if n == 0:
            raise DataError("the dataset is empty")
        self.n, self.batch_size, self.train, self.shuffle, self.seed = n, batch_size, train, shuffle, seed
        self.drop, self.repeats = drop_remainder and train, max(1, aug_repeats) if train else 1
        self.rank, self.world = rank, world_size
        if train:
            self.per_rank = n // world_size if self.drop else math.ceil(n / world_size)
            if self.per_rank == 0:
                raise DataError(f"{n} training images cannot be split over {world_size} processes")
        else:
            self.per_rank = len(range(rank, n, world_size))

    def __len__(self) -> int:
        if self.drop:
            return self.per_rank // self.batch_size
        return math.ceil(self.per_rank / self.batch_size)

    def epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(dataset indices, global positions) of this rank's samples in `epoch`, in order."""
        if not self.train:
            idx = np.arange(self.rank, self.n, self.world)
            return idx, idx
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            order = torch.randperm(self.n, generator=g).numpy()
        else:
            order = np.arange(self.n)
        order = np.repeat(order, self.repeats)
        need = self.per_rank * self.world
        if len(order) < need:  # pad with the start of the order so ranks stay in step (DistributedSampler)
            order = np.concatenate([order, np.resize(order, need - len(order))])
        pos = np.arange(len(order))
        return order[self.rank::self.world][: self.per_rank], pos[self.rank::self.world][: self.per_rank]

    def batches(self, epoch: int, start_batch: int = 0) -> list[list[tuple[int, int]]]:
        idx, pos = self.epoch(epoch)
        pairs = list(zip(idx.tolist(), (epoch * 1_000_000_007 + pos).tolist()))
        b = self.batch_size
        return [pairs[i * b:(i + 1) * b] for i in range(start_batch, len(self))]


@contextlib.contextmanager
def seeded(s: int, restore: bool) -> Iterator[None]:
    """Seed Python, NumPy and torch RNGs; with `restore`, put the caller's RNG states back afterwards."""
    states = (random.getstate(), np.random.get_state(), torch.get_rng_state()) if restore else None
    random.seed(s)
    np.random.seed(s % 2**32)
    # The CPU generator only: torch.manual_seed also queues a lazy CUDA seed call that records a stack trace
    # (about 0.3 ms per sample, measured); augmentation runs on the CPU.
    torch.default_generator.manual_seed(s)
    try:
        yield
    finally:
        if states:
            random.setstate(states[0])
            np.random.set_state(states[1])
            torch.set_rng_state(states[2])


class SampleReader(Dataset):
    """Reads (index, key) pairs: decode + transform under a per-sample seed; unreadable images are replaced."""

    def __init__(self, ds: ImageDataset, transform: Any, seed: int):
        self.ds, self.transform, self.seed = ds, transform, seed

    def __len__(self) -> int:
        return len(self.ds)

    def __getitems__(self, items: list[tuple[int, int]]) -> list[tuple[torch.Tensor, int, list[str]]]:
        """A batch (DataLoader calls this when defined); in the main process the caller's RNG states are saved
        and restored once per batch rather than once per image."""
        in_worker = torch.utils.data.get_worker_info() is not None
        with seeded(0, restore=not in_worker):
            return [self._read(i, key) for i, key in items]

    def __getitem__(self, item: tuple[int, int]) -> tuple[torch.Tensor, int, list[str]]:
        return self.__getitems__([item])[0]

    def _read(self, i: int, key: int) -> tuple[torch.Tensor, int, list[str]]:
        s = sample_seed(self.seed, key)
        bad: list[str] = []
        with seeded(s, restore=False):
            rng = np.random.default_rng(s)
            for _ in range(MAX_REPLACEMENTS):
                try:
                    with self.ds.load(i) as img:
                        return self.transform(img), int(self.ds.targets[i]), bad
                except DECODE_ERRORS as e:
                    path = self.ds.path(i)
                    log.warning("unreadable image %s (%s: %s); using another image", path, type(e).__name__, e)
                    bad.append(path)
                    i = int(rng.integers(len(self.ds)))
        raise DataError(f"{MAX_REPLACEMENTS} unreadable images in a row (last: {bad[-1]}); "
                        "run `vitkit data check DIR` to list the broken files")


class Collate:
    """Stack samples; with mean/std, samples are uint8 and the whole batch is normalized at once (in the worker):
    a quarter of the bytes through stacking, and one vectorized op instead of one per image."""

    def __init__(self, data_config: DataConfig | None = None):
        self.scale = None if data_config is None else data_config.pixel_mean_std()

    def __call__(self, items: list[tuple[torch.Tensor, int, list[str]]]
                 ) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        images = torch.stack([x for x, _, _ in items])
        if self.scale is not None:
            images = images.float().sub_(self.scale[0]).div_(self.scale[1])
        targets = torch.tensor([t for _, t, _ in items], dtype=torch.long)
        return images, targets, [p for _, _, bad in items for p in bad]


class _EpochBatches:
    """The batch sampler handed to DataLoader; the loader swaps its batch list every epoch."""

    def __init__(self) -> None:
        self.batches: list[list[tuple[int, int]]] = []

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class Loader:
    """Batches of (images float (B, C, H, W) normalized, targets long (B,)) for one rank.

    `transform` maps a PIL image to a normalized float tensor, or with normalize=data_config to a uint8 tensor
    that the collate step normalizes batch-wise; `batch_fn` replaces workers for in-memory data.
    """

    def __init__(self, ds: ImageDataset, plan: ShardPlan, *, transform: Any = None, seed: int = 0,
                 num_workers: int = 0, pin_memory: bool = False, bad_image_limit: float = 0.01, batch_fn: Any = None,
                 normalize: DataConfig | None = None,
                 collate_fn: Any = None, post_fn: Any = None):
        self.ds, self.plan, self.seed = ds, plan, seed
        self.bad_image_limit = bad_image_limit
        self.batch_fn = batch_fn  # in-memory path: (indices, keys) -> (images, targets), no workers
        self.post_fn = post_fn  # GPU decode path: collated bytes -> (images, targets, bad) in the main process
        self.epoch, self.start_batch = 0, 0
        self._batches = _EpochBatches()
        self._loader: DataLoader | None = None
        if batch_fn is None:
            self._loader = DataLoader(
                SampleReader(ds, transform, seed), batch_sampler=self._batches, num_workers=num_workers,
                collate_fn=collate_fn or Collate(normalize), pin_memory=pin_memory, persistent_workers=num_workers > 0,
                prefetch_factor=4 if num_workers > 0 else None,
                generator=torch.Generator())  # DataLoader draws a base seed; keep it off the global RNG
        self._stats: dict[str, Any] = {}
        self._reset_stats()

    def _reset_stats(self) -> None:
        self._stats = {"bad_images": 0, "bad_paths": [], "images": 0, "batches": 0, "data_wait_s": 0.0}

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Select the epoch's order; start_batch > 0 resumes mid-epoch (earlier batches are not read)."""
        self.epoch, self.start_batch = epoch, start_batch

    def __len__(self) -> int:
        return len(self.plan)

    @property
    def num_images(self) -> int:
        """Images this rank reads per epoch."""
        return min(len(self.plan) * self.plan.batch_size, self.plan.per_rank)

    def stats(self) -> dict[str, Any]:
        """This epoch so far: bad_images (count), bad_paths, images, batches, data_wait_s (time in next())."""
        return dict(self._stats, bad_paths=list(self._stats["bad_paths"]))

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self._reset_stats()
        batches = self.plan.batches(self.epoch, self.start_batch)
        self.start_batch = 0  # a resume offset applies once
        limit = max(BAD_IMAGE_FLOOR, self.bad_image_limit * self.plan.per_rank)
        if self.batch_fn is not None:
            source: Iterator = (self.batch_fn(b) for b in batches)
        else:
            self._batches.batches = batches
            source = iter(self._loader)  # type: ignore[arg-type]
            if self.post_fn is not None:
                source = map(self.post_fn, source)
        while True:
            t0 = time.perf_counter()
            try:
                images, targets, bad = next(source)
            except StopIteration:
                return
            except DataError as e:  # from a worker, torch wraps it in its traceback: keep the one line
                raise DataError(worker_message(e)) from None
            st = self._stats
            st["data_wait_s"] += time.perf_counter() - t0
            st["batches"] += 1
            st["images"] += len(targets)
            if bad:
                st["bad_images"] += len(bad)
                st["bad_paths"] += bad[: max(0, 100 - len(st["bad_paths"]))]
                if st["bad_images"] > limit:
                    raise DataError(f"{st['bad_images']} unreadable images this epoch (limit {limit:.0f}, "
                                    f"bad_image_limit={self.bad_image_limit}); e.g. {st['bad_paths'][:3]}; "
                                    "run `vitkit data check DIR`")
            yield images, targets


def worker_message(e: BaseException) -> str:
    """The message of an error raised in a DataLoader worker: torch re-raises it in the main process as
    `Caught DataError in DataLoader worker process 0.\nOriginal Traceback ...\nvitkit.errors.DataError: MSG`;
    MSG alone (the error's own message when it was raised in this process)."""
    text = str(e)
    if not text.startswith("Caught ") or "\n" not in text:
        return text
    last = text.rstrip().splitlines()[-1]
    return last.split(": ", 1)[1] if ": " in last and "Error" in last.split(": ", 1)[0] else last


def build_loader(ds: ImageDataset, *, data_config: DataConfig, train: bool, batch_size: int, seed: int = 0,
                 shuffle: bool = True, drop_remainder: bool = True, aug_repeats: int = 0, num_workers: int = 0,
                 bad_image_limit: float = 0.01, in_memory: bool | None = None, gpu_decode: bool = False,
                 rank: int = 0, world_size: int = 1, **augment: Any) -> Loader:
    """The loader for `ds` on one rank; `augment` holds build_transform's training keywords (scale, ratio, hflip,
    vflip, auto_augment, color_jitter, re_*). Small in-memory datasets with the plain CIFAR recipe (pad-crop,
    flip) skip workers and augment whole batches (vitkit.data.batch_augment); everything else decodes per sample
    in `num_workers` processes. in_memory None: small images (<= 64 px) that fit in SMALL_MEMORY_BYTES."""
    plan = ShardPlan(len(ds), batch_size=batch_size, train=train, shuffle=shuffle, seed=seed,
                     drop_remainder=drop_remainder, aug_repeats=aug_repeats, rank=rank, world_size=world_size)
    augment = augment if train else {}
    size = image_size_hint(ds)
    small = size is not None and max(size) <= SMALL_IMAGE_MAX
    if in_memory is None:
        in_memory = small and len(ds) * size[0] * size[1] * 3 <= SMALL_MEMORY_BYTES  # type: ignore[index]
    if in_memory and size is not None:
        ds = to_memory(ds, size)
        # whole batches: eval always; training when the recipe is pad-crop + flips only (no per-image color ops)
        if not (augment.get("auto_augment") or augment.get("color_jitter") or augment.get("re_prob", 0) > 0):
            aug = BatchAugment(ds, data_config, train=train, seed=seed, hflip=augment.get("hflip", 0.5),
                               vflip=augment.get("vflip", 0.0))
            return Loader(ds, plan, seed=seed, bad_image_limit=bad_image_limit, batch_fn=aug)
    if gpu_decode and not in_memory:
        plan_tf = JpegCropPlan(tuple(augment.get("scale", (0.08, 1.0))), tuple(augment.get("ratio", (0.75, 1.333))),
                               augment.get("hflip", 0.5), train, data_config)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        if device == "cpu":  # the documented recovery: same decode and crops, run by torchvision on the CPU
            log.warning("gpu_decode: true but this machine has no CUDA GPU; decoding on the CPU instead")
        return Loader(ds, plan, transform=plan_tf, seed=seed, num_workers=num_workers,
                      bad_image_limit=bad_image_limit, collate_fn=GpuCollate(), post_fn=GpuDecoder(data_config, device))
    # Random erasing works on normalized pixels, so only then does each sample normalize itself.
    batch_norm = not augment.get("re_prob", 0) > 0
    transform = build_transform(data_config, train=train, small_data=small, normalize=not batch_norm, **augment)
    workers = num_workers if not isinstance(ds, ArrayDataset) or augment.get("auto_augment") else 0
    return Loader(ds, plan, transform=transform, seed=seed, num_workers=workers,
                  pin_memory=torch.cuda.is_available(), bad_image_limit=bad_image_limit,
                  normalize=data_config if batch_norm else None)
