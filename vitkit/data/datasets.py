"""Datasets: ImageFolder layouts with any split names, CIFAR-10/100 (download, python format or JPEG folders),
WebDataset tar shards (`wds`, vitkit.data.shards), Hugging Face datasets (`hf`, vitkit.data.hf), stratified
subsets, and an in-memory form for small images.

Every dataset is an `ImageDataset`: `classes` (names, saved into checkpoints), `targets`, `load(i)` (a PIL image
that may not be decoded yet, so transforms can decode at reduced size), `path(i)` (for error messages) and
`__getitem__` -> (RGB PIL image, target).
"""
from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import torch
import torchvision.datasets as tvd
from PIL import Image
from torch.utils.data import Dataset

# open_image, IMG_EXTENSIONS and EXIF_ORIENTATION live in vitkit.data.images (shards and HF datasets open
# images from bytes with it too); importing it also sets the decompression-bomb limit
from vitkit.data.hf import load_hf
from vitkit.data.images import EXIF_ORIENTATION, IMG_EXTENSIONS, open_image  # noqa: F401 (re-exported)
from vitkit.data.shards import open_shards
from vitkit.data.transforms import to_rgb
from vitkit.errors import DataError, path_problem

log = logging.getLogger(__name__)

# Small-image datasets up to this many decoded bytes are held in memory (CIFAR-10 train: 150 MB).
SMALL_MEMORY_BYTES = 2 * 1024**3
CIFAR_DIRS = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}


@runtime_checkable
class ImageDataset(Protocol):
    """What the loader reads: class names, one target per image, and each image by index."""

    classes: list[str]
    targets: list[int]

    def __len__(self) -> int: ...

    def load(self, i: int) -> Image.Image:
        """The opened image; pixels may not be decoded yet."""
        ...

    def path(self, i: int) -> str:
        """Where image i came from, for error messages."""
        ...


class ImageFolderDataset(Dataset):
    """`root/<class>/<image>` with classes sorted by name (torchvision's ImageFolder order)."""

    def __init__(self, root: Path, classes: list[str], samples: list[tuple[str, int]]):
        self.root, self.classes, self.samples = root, classes, samples
        self.targets = [t for _, t in samples]

    def __len__(self) -> int:
        return len(self.samples)

    def path(self, i: int) -> str:
        return self.samples[i][0]

    def load(self, i: int) -> Image.Image:
        """The opened image; pixels are decoded on first use."""
        return open_image(self.samples[i][0])

    def __getitem__(self, i: int) -> tuple[Image.Image, int]:
        return to_rgb(self.load(i)), self.targets[i]


class ArrayDataset(Dataset):
    """Decoded images held in memory: `images` uint8 (N, H, W, 3)."""

    def __init__(self, images: torch.Tensor, targets: Sequence[int], classes: list[str],
                 paths: list[str] | None = None):
        self.images, self.targets, self.classes = images, list(targets), classes
        self._paths = paths
        self.bad: list[int] = []  # indices that failed to decode (to_memory); the loader replaces them

    def __len__(self) -> int:
        return len(self.targets)

    def path(self, i: int) -> str:
        return self._paths[i] if self._paths else f"<in-memory image {i}>"

    def load(self, i: int) -> Image.Image:
        return Image.fromarray(self.images[i].numpy(), "RGB")

    def __getitem__(self, i: int) -> tuple[Image.Image, int]:
        return self.load(i), self.targets[i]


class Subset(Dataset):
    """A subset that keeps the dataset interface (classes, targets, load, path)."""

    def __init__(self, base: ImageDataset, indices: Sequence[int]):
        self.base, self.indices = base, list(indices)
        self.classes = base.classes
        self.targets = [base.targets[i] for i in self.indices]

    def __len__(self) -> int:
        return len(self.indices)

    def path(self, i: int) -> str:
        return self.base.path(self.indices[i])

    def load(self, i: int) -> Image.Image:
        return self.base.load(self.indices[i])

    def __getitem__(self, i: int) -> tuple[Image.Image, int]:
        return self.base[self.indices[i]]


def list_images(folder: Path) -> list[str]:
    """Image files under `folder` (recursive, links followed, hidden files skipped), sorted. A linked folder
    whose real path was already walked (`loop -> .`, two links to each other) is walked once, not again."""
    out, seen = [], set()
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames.sort()
        out += [os.path.join(dirpath, f) for f in filenames if f.lower().endswith(IMG_EXTENSIONS)
                and not f.startswith(".")]
    return sorted(out)


def scan_image_folder(root: Path) -> ImageFolderDataset:
    """Classes and files of `root/<class>/*`; DataError for no classes or classes without images."""
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise DataError(f"{root} has no class folders; expected {root}/<class_name>/<image files>")
    samples, empty = [], []
    for idx, name in enumerate(classes):
        files = list_images(root / name)
        if not files:
            empty.append(name)
        samples += [(f, idx) for f in files]
    if empty:
        raise DataError(f"{root}: class folder(s) with no images: {', '.join(empty[:10])}"
                        f"{' ...' if len(empty) > 10 else ''}; add images or remove the folder(s)")
    return ImageFolderDataset(root, classes, samples)


def stratified_subset(ds: ImageDataset, num_samples: int, seed: int) -> ImageDataset:
    """`num_samples` images with each class's share kept (largest remainder), chosen by a seeded shuffle."""
    if num_samples >= len(ds):
        return ds
    targets = np.asarray(ds.targets)
    counts = np.bincount(targets, minlength=len(ds.classes))
    exact = counts * num_samples / len(ds)
    take = np.floor(exact).astype(int)
    for c in np.argsort(-(exact - take), kind="stable")[: num_samples - take.sum()]:
        take[c] += 1
    rng = np.random.default_rng(seed)
    chosen = [np.sort(rng.permutation(np.flatnonzero(targets == c))[: take[c]]) for c in range(len(counts))]
    return Subset(ds, np.sort(np.concatenate(chosen)).tolist())


def _check_root(data_dir: str | None, *, cifar: bool, download: bool) -> Path:
    if not data_dir:
        raise DataError("data_dir is not set; pass --data_dir /path/to/dataset")
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        if cifar and download:
            root.mkdir(parents=True, exist_ok=True)
            return root
        raise DataError(f"data_dir {str(root)!r} {path_problem(root, want='folder') or 'is not a folder'}" +
                        ("; add --dataset_download to download it" if cifar else ""))
    if not any(root.iterdir()) and not (cifar and download):
        raise DataError(f"data_dir {str(root)!r} is empty")
    return root


def _image_folder_split(root: Path, split: str) -> ImageFolderDataset:
    split_dir = root / split
    if not split_dir.is_dir():
        have = sorted(p.name for p in root.iterdir() if p.is_dir())
        raise DataError(f"split folder {str(split_dir)!r} does not exist (found: {', '.join(have) or 'nothing'}); "
                        "set train_split / val_split to the folder names")
    return scan_image_folder(split_dir)


def _cifar(name: str, root: Path, split: str, *, train: bool, download: bool, train_split: str) -> ImageDataset:
    """CIFAR from the official python files (checksum-verified by torchvision before unpickling), a JPEG
    ImageFolder copy, or a download into the root."""
    cls = tvd.CIFAR10 if name == "cifar10" else tvd.CIFAR100
    is_train_split = split == train_split if train else split in ("train", train_split)
    python_format = (root / CIFAR_DIRS[name]).is_dir()
    if not python_format and not train and not (root / split).is_dir() and (root / "test").is_dir():
        # CIFAR's held-out split is its test set (the python format maps any eval split to it; so does this)
        log.info("%s: no %s/ in %s; evaluating on test/", name, split, root)
        split = "test"
    if not python_format and (root / split).is_dir():  # a local JPEG copy: nothing to download
        return scan_image_folder(root / split)
    if python_format or download:
        try:
            tv = cls(str(root), train=is_train_split, download=download)
        except RuntimeError as e:  # torchvision: "Dataset not found or corrupted"
            raise DataError(f"{name} in {root}: {e}; delete it and pass --dataset_download") from None
        except OSError as e:  # the download itself: no network (URLError), refused, or a full disk
            raise DataError(f"could not download {name} into {root} ({getattr(e, 'reason', None) or e}); "
                            f"without a network, put a copy there ({CIFAR_DIRS[name]}/ in python format, "
                            f"or {train_split}/<class>/*.jpg) and drop --dataset_download") from None
        return ArrayDataset(torch.from_numpy(tv.data), tv.targets, list(tv.classes))
    raise DataError(f"no {name} in {root}: expected {CIFAR_DIRS[name]}/ (python format) or "
                    f"{split}/<class>/*.jpg; pass --dataset_download to download it")


def build_dataset(root: str | None, *, name: str, split: str, train: bool, download: bool = False,
                  num_samples: int | None = None, seed: int = 0, train_split: str = "train",
                  image_column: str = "image", label_column: str = "label") -> ImageDataset:
    """The dataset `name` (imagenet / imagefolder: root/<split>/<class>/*, cifar10, cifar100, wds, hf) for `split`.

    download: fetch CIFAR into root if missing. num_samples takes a stratified subset (seeded by `seed`) of a
    training split. train_split names CIFAR's training folder, so that CIFAR's python files map it to the train set.
    wds: `root` is a packed folder (`vitkit data pack`), its dataset.json, a brace pattern of shards or an fsspec
    URL (vitkit.data.shards). hf: `root` is a Hugging Face dataset folder or hub id; image_column and label_column
    name its columns (vitkit.data.hf).
    """
    key = name.lower()
    if key in ("wds", "hf"):
        if not root:
            raise DataError("data_dir is not set; pass --data_dir " + ("/path/to/packed (or a shard pattern)"
                                                                        if key == "wds" else "DIR_OR_HUB_ID"))
        ds: ImageDataset = (open_shards(root, split) if key == "wds" else
                            load_hf(root, split, image_column=image_column, label_column=label_column))
    else:
        root_dir = _check_root(root, cifar=key in CIFAR_DIRS, download=download)
        if key in CIFAR_DIRS:
            ds = _cifar(key, root_dir, split, train=train, download=bool(download), train_split=train_split)
        elif key in ("imagenet", "imagefolder"):
            ds = _image_folder_split(root_dir, split)
        else:
            raise DataError(f"dataset {name!r} is not known; use imagenet, imagefolder, cifar10, cifar100, wds "
                            "(tar shards from `vitkit data pack`) or hf (Hugging Face datasets)")
    if train and num_samples:
        ds = stratified_subset(ds, num_samples, seed)
    return ds


SIZE_HINT_SAMPLE = 64  # headers read to find a dataset's image size (spread over the whole dataset)


def image_size_hint(ds: ImageDataset) -> tuple[int, int] | None:
    """(w, h) most common among up to SIZE_HINT_SAMPLE images spread over the dataset (headers only), with a
    warning when sizes vary; None if none can be read. One odd image (a 1x1 file that sorts first) cannot
    decide the size the whole in-memory dataset is resized to."""
    if isinstance(ds, ArrayDataset):
        return int(ds.images.shape[2]), int(ds.images.shape[1])
    if isinstance(ds, Subset) and isinstance(ds.base, ArrayDataset):
        return image_size_hint(ds.base)
    sizes: Counter[tuple[int, int]] = Counter()
    for i in sorted(set(np.linspace(0, len(ds) - 1, min(len(ds), SIZE_HINT_SAMPLE)).astype(int).tolist())):
        try:
            with ds.load(i) as img:
                sizes[img.size] += 1
        except DataError:  # a shard missing or cut short is the dataset's fault, not one image's
            raise
        except Exception:  # noqa: BLE001 - unreadable files are reported by the loader
            continue
    if not sizes:
        return None
    (size, count), n = sizes.most_common(1)[0], sum(sizes.values())
    if count < n:
        log.warning("image sizes vary: %d sizes among %d sampled images; the most common, %dx%d (%d of them), "
                    "is the size hint", len(sizes), n, size[0], size[1], count)
    return size


def to_memory(ds: ImageDataset, size: tuple[int, int]) -> ArrayDataset:
    """Decode every image once into a uint8 (N, H, W, 3) tensor (images of another size are resized).

    Unreadable images are logged and left black; `bad` lists their indices (the loader replaces them)."""
    if isinstance(ds, ArrayDataset):
        return ds
    if isinstance(ds, Subset) and isinstance(ds.base, ArrayDataset):
        return ArrayDataset(ds.base.images[ds.indices], ds.targets, ds.classes)
    w, h = size
    out = torch.zeros(len(ds), h, w, 3, dtype=torch.uint8)
    bad = []
    for i in range(len(ds)):
        try:
            with ds.load(i) as raw:
                img = to_rgb(raw)
                if img.size != (w, h):
                    img = img.resize((w, h), Image.Resampling.BICUBIC)
                out[i] = torch.from_numpy(np.array(img))
        except DataError:  # a shard missing, cut short or unreachable: never a shorter dataset of black images
            raise
        except Exception as e:  # noqa: BLE001 - any decode failure is a bad image, reported below
            log.warning("unreadable image %s (%s: %s)", ds.path(i), type(e).__name__, e)
            bad.append(i)
    mem = ArrayDataset(out, ds.targets, ds.classes, [ds.path(i) for i in range(len(ds))])
    mem.bad = bad
    return mem
