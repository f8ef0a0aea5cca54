"""`vitkit data pack SRC DST`: any dataset vitkit reads -> WebDataset tar shards + an index (dataset.json).

SRC is an ImageFolder root with split folders (`SRC/<split>/<class>/*`), one split folder (`SRC/<class>/*`;
the split is named after the folder), CIFAR's python files (--dataset cifar10 / cifar100), a packed folder
(re-shard it) or a Hugging Face dataset (--dataset hf); --splits picks some of the splits.

Each sample becomes `<key>.<ext>` (the source file's bytes, not re-encoded; images that exist only decoded,
as CIFAR's python format, are stored as lossless PNG) + `<key>.cls`, the key being the sample's index in its
split (the folder's sorted order), in shards of about --shard_size bytes (`DST/<split>/shard-000000.tar`,
...), then `DST/<split>/index.npy` (the members' byte offsets, for map-style reads) and `DST/dataset.json`
(classes, per-shard sample counts, bytes and sha256, the source); layout and reading: vitkit.data.shards.
Every file is written atomically (vitkit.io.atomic_write). Interrupted, the same command resumes: shards
already finished are kept once their sha256 (and the source files they hold: path, size, mtime) checks out,
the rest is written again. The output is the same for the same source, byte for byte.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
import sys
import tarfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from vitkit.args import VerbParser
from vitkit.data.datasets import CIFAR_DIRS, ImageDataset, Subset, build_dataset
from vitkit.data.hf import hf_splits
from vitkit.data.images import IMG_EXTENSIONS
from vitkit.data.shards import (
    END_OF_ARCHIVE,
    FORMAT,
    INDEX_DTYPE,
    INDEX_NAME,
    VERSION,
    group_samples,
    read_meta,
    sample_key,
    scan_tar,
    sha256_file,
    shard_name,
)
from vitkit.data.transforms import to_rgb
from vitkit.errors import DataError, path_problem
from vitkit.io import atomic_write

JOURNAL = ".pack-journal.json"  # finished shards of an unfinished pack (removed once dataset.json is written)
DEFAULT_SHARD_SIZE = "256MB"
SIZE_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
              "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
KINDS = ("auto", "imagefolder", "cifar10", "cifar100", "wds", "hf")


def parse_size(text: str) -> int:
    """'256MB' (10**6), '1GiB' (2**30), '65536' -> bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(text))
    unit = m.group(2).lower() if m else None
    if m is None or unit not in SIZE_UNITS or float(m.group(1)) * SIZE_UNITS[unit] < 1:
        raise DataError(f"--shard_size {text!r}: expected a size such as 256MB, 1GiB or 65536 (bytes)")
    return int(float(m.group(1)) * SIZE_UNITS[unit])


def _member_bytes(n: int) -> int:
    return tarfile.BLOCKSIZE + -(-n // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE


def _tar_bytes(content: int) -> int:
    """Size of a tar whose members take `content` bytes: the end-of-archive blocks, padded to a record."""
    return -(-(content + END_OF_ARCHIVE) // tarfile.RECORDSIZE) * tarfile.RECORDSIZE


def _extension(path: str) -> str:
    ext = os.path.splitext(path)[1].lower().lstrip(".")
    return {"jpeg": "jpg"}.get(ext, ext)


def _base(ds: ImageDataset, i: int) -> tuple[Any, int]:
    while isinstance(ds, Subset):
        ds, i = ds.base, ds.indices[i]
    return ds, i


def sample_bytes(ds: ImageDataset, i: int) -> tuple[bytes, str]:
    """(encoded bytes, extension) of sample i as the source holds it: a file's bytes, a shard's or a Hugging
    Face row's stored bytes; lossless PNG for images held only decoded (CIFAR's python format)."""
    base, j = _base(ds, i)
    if hasattr(base, "raw"):
        return base.raw(j)
    path = base.path(j)
    if os.path.isfile(path):
        with open(path, "rb") as f:
            return f.read(), _extension(path) or "bin"
    if os.path.lexists(path) and (why := path_problem(path)) is not None:  # a FIFO named x.jpg would block
        raise DataError(f"{path} {why}: it cannot be packed; remove it from the source (`vitkit data check` lists "
                        f"every such file), then run the same pack again: finished shards are kept")
    buf = io.BytesIO()
    with base.load(j) as img:
        to_rgb(img).save(buf, "PNG")
    return buf.getvalue(), "png"


def sample_identity(ds: ImageDataset, i: int, data: bytes | None = None) -> str:
    """What identifies sample i's content cheaply: a file's path, size and mtime; otherwise the hash of its
    bytes (`data`, when already read)."""
    base, j = _base(ds, i)
    path = base.path(j)
    if not hasattr(base, "raw") and os.path.isfile(path):
        st = os.stat(path)
        return f"{path}|{st.st_size}|{st.st_mtime_ns}"
    return hashlib.sha1(sample_bytes(ds, i)[0] if data is None else data).hexdigest()


def _fingerprint(ds: ImageDataset, first: int, count: int) -> str:
    h = hashlib.sha256()
    for i in range(first, first + count):
        h.update(f"{sample_identity(ds, i)}|{ds.targets[i]}\n".encode())
    return h.hexdigest()


class _Bar:
    """A rich progress bar over the samples, on a terminal only."""

    def __init__(self, total: int, enabled: bool):
        self.progress = None
        if enabled:
            self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                     TimeElapsedColumn(), TimeRemainingColumn(), transient=True)
            self.progress.start()
            self.task = self.progress.add_task("pack", total=total)

    def describe(self, text: str) -> None:
        if self.progress is not None:
            self.progress.update(self.task, description=text)

    def advance(self, n: int = 1) -> None:
        if self.progress is not None:
            self.progress.advance(self.task, n)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()


def _write_shard(ds: ImageDataset, path: Path, first: int, shard_size: int, pending: tuple | None, bar: _Bar
                 ) -> tuple[dict[str, Any], tuple | None]:
    """Write samples first.. into the tar at `path` until the next would pass shard_size (at least one);
    returns (the shard's entry, the sample read that did not fit)."""
    n = len(ds)
    out: list[Any] = [None, None]

    def write(tmp: str) -> None:
        h = hashlib.sha256()
        nxt, j, content = pending, first, 0
        with open(tmp, "wb") as f, tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            while j < n:
                if nxt is not None and nxt[0] == j:
                    data, ext = nxt[1], nxt[2]
                    nxt = None
                else:
                    data, ext = sample_bytes(ds, j)
                label = str(int(ds.targets[j])).encode()
                cost = _member_bytes(len(data)) + _member_bytes(len(label))
                if j > first and _tar_bytes(content + cost) > shard_size:
                    nxt = (j, data, ext)
                    break
                key = sample_key(j)
                for name, payload in ((f"{key}.{ext}", data), (f"{key}.cls", label)):
                    info = tarfile.TarInfo(name)
                    info.size, info.mtime, info.mode = len(payload), 0, 0o644
                    tar.addfile(info, io.BytesIO(payload))
                h.update(f"{sample_identity(ds, j, data)}|{ds.targets[j]}\n".encode())
                content += cost
                j += 1
                bar.advance()
        out[0] = {"first": first, "samples": j - first, "bytes": os.path.getsize(tmp), "sha256": sha256_file(tmp),
                  "fingerprint": h.hexdigest()}
        out[1] = nxt

    atomic_write(path, write)
    return out[0], out[1]


def _kept(entry: dict[str, Any] | None, ds: ImageDataset, dst: Path, rel: str, first: int) -> bool:
    """A finished shard of an earlier run is kept: same first sample, same source files, same bytes on disk."""
    if not entry or entry.get("first") != first or first + int(entry.get("samples", 0)) > len(ds):
        return False
    path = dst / rel
    if not path.is_file() or path.stat().st_size != entry.get("bytes"):
        return False
    return _fingerprint(ds, first, int(entry["samples"])) == entry.get("fingerprint") \
        and sha256_file(path) == entry.get("sha256")


def _index_rows(dst: Path, entries: list[dict[str, Any]], ds: ImageDataset, extensions: dict[str, int]) -> np.ndarray:
    """The split's index from its shards as written (scanned back: offsets, and a check of keys and labels)."""
    rows = []
    for k, entry in enumerate(entries):
        members, labels = scan_tar(str(dst / entry["file"]))
        samples = group_samples(members, labels, entry["file"])
        first = entry["first"]
        want = [sample_key(i) for i in range(first, first + entry["samples"])]
        if [s[0] for s in samples] != want or any(s[4] != ds.targets[first + q] for q, s in enumerate(samples)):
            raise DataError(f"{dst / entry['file']} does not hold the samples it should; delete it and pack again")
        rows += [(k, off, size, target, extensions.setdefault(ext, len(extensions)))
                 for _, ext, off, size, target in samples]
    return np.array(rows, dtype=INDEX_DTYPE)


def pack_split(ds: ImageDataset, dst: Path, split: str, shard_size: int, previous: dict[str, dict[str, Any]],
               journal: dict[str, Any], bar: _Bar) -> tuple[dict[str, Any], int]:
    """Shards, index and the split's dataset.json entry for `ds`; (entry, shards kept from an earlier run)."""
    out_dir = dst / split
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.glob(".shard-*.tmp"):  # a killed run's half-written shard
        stale.unlink()
    entries: list[dict[str, Any]] = []
    done = journal["splits"].setdefault(split, {})
    i, kept, pending = 0, 0, None
    while i < len(ds):
        rel = f"{split}/{shard_name(len(entries))}"
        bar.describe(f"{split} {shard_name(len(entries))}")
        if _kept(previous.get(rel), ds, dst, rel, i):
            entry, pending = dict(previous[rel]), None
            kept += 1
            bar.advance(entry["samples"])
        else:
            entry, pending = _write_shard(ds, dst / rel, i, shard_size, pending, bar)
        entry["file"] = rel
        entries.append(entry)
        done[rel] = entry
        if kept < len(entries):  # a new shard: on record before the next one starts (kept ones already are)
            atomic_write(dst / JOURNAL, lambda tmp: Path(tmp).write_text(json.dumps(journal)))
        i += entry["samples"]
    for old in out_dir.glob("shard-*.tar"):  # shards past the end, from an earlier pack of other data
        m = re.fullmatch(r"shard-(\d+)\.tar", old.name)
        if m and int(m.group(1)) >= len(entries):
            old.unlink()
    extensions: dict[str, int] = {}
    index = _index_rows(dst, entries, ds, extensions)
    index_rel = f"{split}/index.npy"

    def write_index(tmp: str) -> None:
        with open(tmp, "wb") as f:
            np.save(f, index, allow_pickle=False)

    atomic_write(dst / index_rel, write_index)
    info = {"classes": list(ds.classes), "num_samples": len(ds), "extensions": list(extensions),
            "index": {"file": index_rel, "sha256": sha256_file(dst / index_rel)}, "shards": entries}
    return info, kept


def _previous(dst: Path, source: dict[str, Any], shard_size: int) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """(finished shards by file name, dataset.json's splits) of an earlier pack of the same source and shard
    size into dst: the journal of an unfinished one, else the dataset.json of a finished one."""
    entries: dict[str, dict[str, Any]] = {}
    old_splits: dict[str, Any] = {}
    try:
        meta = read_meta(str(dst)) if (dst / INDEX_NAME).is_file() else None
    except DataError:
        meta = None
    if meta and meta.get("source") == source and meta.get("shard_size") == shard_size:
        old_splits = meta["splits"]
        for info in old_splits.values():
            entries.update({s["file"]: s for s in info["shards"]})
    try:
        journal = json.loads((dst / JOURNAL).read_text())
    except (OSError, ValueError):
        journal = None
    if isinstance(journal, dict) and journal.get("source") == source and journal.get("shard_size") == shard_size:
        for split in journal.get("splits", {}).values():
            entries.update(split)
    return entries, old_splits


def pack(sources: dict[str, ImageDataset], dst: str | Path, *, shard_size: int, source: dict[str, Any],
         progress: bool | None = None, say: Any = print) -> dict[str, Any]:
    """Pack each split of `sources` into dst (see the module docstring); returns dataset.json's content."""
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    previous, old_splits = _previous(dst, source, shard_size)
    journal: dict[str, Any] = {"format": "vitkit-pack-journal", "source": source, "shard_size": shard_size,
                               "splits": {}}
    bar = _Bar(sum(len(ds) for ds in sources.values()), sys.stdout.isatty() if progress is None else progress)
    splits = dict(old_splits)
    try:
        for split, ds in sources.items():
            info, kept = pack_split(ds, dst, split, shard_size, previous, journal, bar)
            splits[split] = info
            total = sum(s["bytes"] for s in info["shards"])
            say(f"{split}: {info['num_samples']} images, {len(info['classes'])} classes in "
                f"{len(info['shards'])} shard(s) of {total / 1e6:.1f} MB ({kept} kept from an earlier run, "
                f"{len(info['shards']) - kept} written) -> {dst / split}")
    finally:
        bar.close()
    meta = {"format": FORMAT, "version": VERSION, "source": source, "shard_size": shard_size, "splits": splits}
    atomic_write(dst / INDEX_NAME, lambda tmp: Path(tmp).write_text(json.dumps(meta, indent=1) + "\n"))
    (dst / JOURNAL).unlink(missing_ok=True)
    say(f"wrote {dst / INDEX_NAME}; read it with --dataset wds --data_dir {dst}")
    return meta


# -- the command --------------------------------------------------------------------------------------------

def _has_images(folder: Path) -> bool:
    return any(f.is_file() and f.name.lower().endswith(IMG_EXTENSIONS) for f in folder.iterdir())


def find_splits(src: Path, exclude: Path | None = None) -> list[str]:
    """Split folders of an ImageFolder root: folders that hold class folders and no images directly (not
    `exclude`, the output folder when it lies inside the source, nor a packed folder)."""
    skip = exclude.resolve() if exclude is not None else None
    return [d.name for d in sorted(src.iterdir()) if d.is_dir() and not d.name.startswith(".")
            and d.resolve() != skip and not (d / INDEX_NAME).is_file()
            and any(s.is_dir() for s in d.iterdir()) and not _has_images(d)]


def resolve_sources(src: str, kind: str, splits: Sequence[str] | None, *, image_column: str = "image",
                    label_column: str = "label", dst: Path | None = None
                    ) -> tuple[dict[str, ImageDataset], dict[str, Any]]:
    """({split: dataset}, the source's description for dataset.json) of `vitkit data pack SRC`."""
    path = Path(src).expanduser()
    local = "://" not in src
    if kind == "auto":
        if local and path.is_dir() and (path / INDEX_NAME).is_file():
            kind = "wds"
        elif local and path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file()):
            kind = "hf"
        elif local and path.is_dir() and any((path / d).is_dir() for d in CIFAR_DIRS.values()):
            kind = next(k for k, d in CIFAR_DIRS.items() if (path / d).is_dir())
        else:
            kind = "imagefolder"
    root = str(path.resolve()) if local else src
    if kind == "imagefolder":
        if not path.is_dir():
            raise DataError(f"{src} is not a folder")
        found = find_splits(path, exclude=dst)
        if not found:  # SRC is one split: its class folders are right here
            splits = list(splits or [path.name])
            if splits != [path.name]:
                raise DataError(f"{src} is one split ({path.name}/<class>/*); --splits can only name {path.name!r}")
            root = str(path.resolve().parent)
        elif splits is None:
            splits = found
    elif splits is None:
        if kind == "wds":
            meta = read_meta(src)
            splits = list(meta["splits"]) if meta else []
        elif kind == "hf":
            splits = hf_splits(src)
        else:
            splits = ["train", "test"]
    ds_kind = "imagenet" if kind == "imagefolder" else kind
    sources = {s: build_dataset(root, name=ds_kind, split=s, train=False, image_column=image_column,
                                label_column=label_column) for s in splits}
    if not sources:
        raise DataError(f"{src}: no splits found to pack; name them with --splits")
    return sources, {"path": root, "dataset": kind}


def main(argv: Sequence[str]) -> int:
    p = VerbParser("data pack", __doc__)
    p.add_argument("src", help="dataset to pack: ImageFolder root or split folder, packed folder, HF dataset")
    p.add_argument("dst", help="output folder (dataset.json + <split>/shard-NNNNNN.tar)")
    p.add_argument("--shard_size", default=DEFAULT_SHARD_SIZE, help="target bytes per shard: 256MB, 1GiB, ... "
                                                                   f"(default {DEFAULT_SHARD_SIZE})")
    p.add_argument("--dataset", default="auto", choices=KINDS, help="what SRC is (default: found from its files)")
    p.add_argument("--splits", default=None, help="comma-separated splits to pack (default: every split found)")
    p.add_argument("--image_column", default="image", help="--dataset hf: the column holding the images")
    p.add_argument("--label_column", default="label", help="--dataset hf: the column holding the classes")
    a = p.parse_args(list(argv))
    shard_size = parse_size(a.shard_size)
    dst = Path(a.dst).expanduser()
    if "://" not in a.src and Path(a.src).expanduser().resolve() == dst.resolve():
        raise DataError("DST must not be SRC; pack into another folder")
    splits = [s for s in a.splits.split(",") if s] if a.splits else None
    sources, source = resolve_sources(a.src, a.dataset, splits, image_column=a.image_column,
                                      label_column=a.label_column, dst=dst)
    pack(sources, dst, shard_size=shard_size, source=source)
    return 0
