"""`--dataset hf`: image classification data in Hugging Face `datasets` (the optional extra `vitkit[hf]`).

`--data_dir` is one of:
- a folder written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk` (read with `load_from_disk`);
- a folder of data files (parquet, arrow, or an image folder) that `load_dataset(folder)` understands, or
  one `.parquet` file;
- a hub id (`uoft-cs/cifar10`), loaded with `load_dataset(id, split=...)`: that one needs the network or the
  local cache (HF_DATASETS_OFFLINE=1 reads the cache only); when the Hub cannot be reached (checked first, within
  seconds), that is one line at once, not after huggingface_hub's retries.

`--image_column` (default `image`) holds the images: an `Image` feature (read undecoded: its stored bytes,
or the file it names), raw bytes, or a file path. `--label_column` (default `label`) holds the classes: a
`ClassLabel` (its names are the classes), integers (classes "0".."K-1"), or strings (classes sorted by name).
Splits are the DatasetDict's; `val` falls back to `validation` (or `valid`) when the dataset has no `val`. A
dataset without splits serves every split, with a warning.

Samples keep their row order, so the loader's ShardPlan (seeded order, exact per-rank counts, exact resume)
applies as to any dataset; images are opened from their bytes (vitkit.data.images.open_bytes), so the
augmentation, eval preprocessing, in-memory and GPU-decode paths are those of image folders.
"""
from __future__ import annotations

import json
import logging
import os
import socket
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from PIL import Image
from torch.utils.data import Dataset

from vitkit.data.images import image_format_extension, open_bytes
from vitkit.data.transforms import to_rgb
from vitkit.errors import DataError

log = logging.getLogger(__name__)

SPLIT_ALIASES = {"val": ("validation", "valid"), "validation": ("val", "valid"), "valid": ("validation", "val")}


def _datasets() -> Any:
    try:
        import datasets
    except ImportError:
        raise DataError("--dataset hf needs Hugging Face datasets: pip install 'vitkit[hf]' (or pip install "
                        "datasets)") from None
    return datasets


class HFImageDataset(Dataset):
    """Rows of a Hugging Face `datasets.Dataset` as an `ImageDataset` (classes, targets, load, path)."""

    def __init__(self, table: Any, image_column: str, classes: list[str], targets: list[int], name: str,
                 kind: str, root: Path | None = None):
        self.table, self.image_column, self.classes, self.targets = table, image_column, classes, targets
        self.name, self.kind, self.root = name, kind, root

    def __len__(self) -> int:
        return len(self.targets)

    def path(self, i: int) -> str:
        return f"{self.name}[{i}]"

    def raw(self, i: int) -> tuple[bytes, str]:
        """(the image's encoded bytes as stored, its extension)."""
        cell = self.table[i][self.image_column]
        data, file = None, None
        if isinstance(cell, dict):
            data, file = cell.get("bytes"), cell.get("path")
        elif isinstance(cell, (bytes, bytearray, memoryview)):
            data = bytes(cell)
        elif isinstance(cell, str):
            file = cell
        if data is None:
            if not file:
                raise OSError(f"{self.path(i)}: no image in column {self.image_column!r}")
            where = Path(file) if Path(file).is_absolute() or self.root is None else self.root / file
            with open(where, "rb") as f:
                data = f.read()
            suffix = where.suffix.lower().lstrip(".")
            return data, {"jpeg": "jpg"}.get(suffix, suffix) or image_format_extension(data)
        return bytes(data), image_format_extension(data)

    def load(self, i: int) -> Image.Image:
        data, _ = self.raw(i)
        return open_bytes(data, self.path(i))

    def __getitem__(self, i: int) -> tuple[Image.Image, int]:
        return to_rgb(self.load(i)), self.targets[i]


def _pick_split(obj: Any, split: str, where: str) -> Any:
    if not hasattr(obj, "keys"):  # a Dataset without splits
        log.warning("%s has no splits; using all of it as split %r", where, split)
        return obj
    names = list(obj.keys())
    for name in (split, *SPLIT_ALIASES.get(split, ())):
        if name in names:
            if name != split:
                log.info("%s has no split %r; using %r", where, split, name)
            return obj[name]
    raise DataError(f"{where} has no split {split!r} (found: {', '.join(names) or 'none'}); set train_split / "
                    "val_split to one of them")


def _hub_unreachable() -> str | None:
    """Why the Hugging Face Hub cannot be reached, found within seconds (a name lookup and a TCP connect), so that an
    offline machine is told at once instead of after huggingface_hub's ~25 s of retries. None when it can be
    reached, and when nothing is to be probed: datasets is in offline mode (HF_DATASETS_OFFLINE / HF_HUB_OFFLINE
    as datasets read them on import: then it reads its cache) or a proxy is set."""
    if getattr(_datasets().config, "HF_HUB_OFFLINE", False) or any(
            os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None
    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host, port = url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)
    try:
        socket.create_connection((host, port), timeout=5).close()
    except OSError as e:
        return f"{host} cannot be reached ({e.strerror or type(e).__name__})"
    return None


def _offline_error(data_dir: str, why: str) -> DataError:
    return DataError(f"--dataset hf could not load {data_dir!r}: it is no local folder and {why}; offline, give a "
                     "folder written by save_to_disk or of parquet files, or set HF_DATASETS_OFFLINE=1 to read "
                     "the Hugging Face cache")


def _load(data_dir: str, split: str) -> tuple[Any, Path | None]:
    """(the split's datasets.Dataset, the local folder it came from or None)."""
    datasets = _datasets()
    local = Path(os.path.expanduser(data_dir))
    try:
        if local.is_dir():
            if (local / "dataset_dict.json").is_file() or (local / "state.json").is_file():
                return _pick_split(datasets.load_from_disk(str(local)), split, data_dir), local
            return _pick_split(datasets.load_dataset(str(local)), split, data_dir), local
        if local.is_file() and local.suffix == ".parquet":
            return datasets.load_dataset("parquet", data_files=str(local), split="train"), local.parent
        if local.exists() or data_dir.startswith((".", "/", "~")) or data_dir.count("/") > 1:
            raise DataError(f"data_dir {data_dir!r} is not a Hugging Face dataset folder, a .parquet file or a hub "
                            "id (user/name)")
        if why := _hub_unreachable():
            raise _offline_error(data_dir, why)
        return datasets.load_dataset(data_dir, split=split), None
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - datasets raises many kinds (missing files, network, bad split)
        first = (str(e).strip().splitlines() or [""])[0]
        raise DataError(f"--dataset hf could not load {data_dir!r} split {split!r} ({type(e).__name__}: {first})") \
            from None


def load_hf(data_dir: str, split: str, *, image_column: str = "image", label_column: str = "label"
            ) -> HFImageDataset:
    """Split `split` of the Hugging Face dataset at `data_dir` (see the module docstring)."""
    datasets = _datasets()
    table, root = _load(data_dir, split)
    columns = list(table.column_names)
    for what, col in (("image_column", image_column), ("label_column", label_column)):
        if col not in columns:
            raise DataError(f"{data_dir} ({split}) has no column {col!r} (columns: {', '.join(columns)}); set "
                            f"--{what}")
    feature = table.features[label_column]
    labels = list(table[label_column])
    if any(v is None for v in labels):
        raise DataError(f"{data_dir} ({split}): {sum(v is None for v in labels)} row(s) without a label in "
                        f"{label_column!r}")
    if isinstance(feature, datasets.ClassLabel):
        classes, targets = list(feature.names), [int(v) for v in labels]
    elif all(isinstance(v, str) for v in labels):
        classes = sorted(set(labels))
        idx = {c: k for k, c in enumerate(classes)}
        targets = [idx[v] for v in labels]
    else:
        try:
            targets = [int(v) for v in labels]
        except (TypeError, ValueError):
            raise DataError(f"{data_dir} ({split}): column {label_column!r} is neither class indices nor class "
                            "names") from None
        if targets and min(targets) < 0:
            raise DataError(f"{data_dir} ({split}): negative class index {min(targets)} in {label_column!r}")
        classes = [str(c) for c in range(max(targets, default=-1) + 1)]
    images = table.select_columns([image_column])
    if isinstance(images.features[image_column], datasets.Image):
        images = images.cast_column(image_column, datasets.Image(decode=False))
    if not targets:
        raise DataError(f"{data_dir} ({split}) has no rows")
    return HFImageDataset(images, image_column, classes, targets, name=f"{data_dir}:{split}", kind="hf", root=root)


def hf_splits(data_dir: str) -> list[str]:
    """The split names of the Hugging Face dataset at `data_dir` (`vitkit data pack` packs them all)."""
    local = Path(os.path.expanduser(data_dir))
    if (local / "dataset_dict.json").is_file():
        return list(json.loads((local / "dataset_dict.json").read_text())["splits"])
    if (local / "state.json").is_file():
        return ["train"]
    if not local.exists() and (why := _hub_unreachable()):
        raise _offline_error(data_dir, why)
    try:
        obj = _datasets().load_dataset(str(local) if local.is_dir() else data_dir)
    except Exception as e:  # noqa: BLE001
        raise DataError(f"--dataset hf could not load {data_dir!r} ({type(e).__name__}: {e})") from None
    return list(obj.keys()) if hasattr(obj, "keys") else ["train"]
