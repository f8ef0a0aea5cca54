"""WebDataset tar shards, read map-style: `vitkit data pack` writes them, `--dataset wds` reads them.

The layout `vitkit data pack SRC DST` writes (vitkit.data.pack):

    DST/dataset.json                   format, source, classes and, per split, each shard's sample count,
                                       bytes and sha256, and the index file's sha256
    DST/<split>/shard-000000.tar ...   uncompressed POSIX tars of <key>.<ext> (the source file's bytes, not
                                       re-encoded) + <key>.cls (the class index as ASCII digits)
    DST/<split>/index.npy              per sample: shard number, byte offset and size of its image, target

A key is the sample's index in its split in 8 digits (`00000123`), so member order, key order and index
order are the source's order (an ImageFolder's: classes sorted by name, then files sorted): index i of the
shards is index i of the folder, and the loader's ShardPlan (a seeded order that is a function of (seed,
epoch), exact per-rank counts, resume at any batch) applies unchanged. A sample is read by its offset
(os.pread on a local file, a ranged read through fsspec for a URL): no scan, no shuffle buffer, no shard
assignment to workers, so any number of processes and workers reads the same epoch.

Also read:
- a brace pattern of shard files, `DIR/train/shard-{000000..000127}.tar` (`{a,b}` lists too; a literal
  `{split}` becomes the split's name, so one pattern serves train_split and val_split). With a dataset.json
  in the shards' folder or the one above it, its index is used; without one, the tars are scanned once on
  open (any WebDataset tar: keys grouped by WebDataset's rule, labels from `.cls`, classes "0".."K-1");
- fsspec URLs (`s3://bucket/ds`, `gs://...`, `file://...`) in both forms, when fsspec and its backend (s3fs,
  gcsfs, ...) are installed.

Exactness: every shard is checked when the dataset opens (present, and the size dataset.json records, or a
complete tar when scanned); a shard that is missing, unreachable or truncated is a one-line DataError naming
it, at open or at the read that finds it, never a shorter epoch. A sample whose bytes do not decode is an
unreadable image like a broken file in a folder (the loader replaces it and counts it against
bad_image_limit, naming `SHARD:KEY.EXT`).
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import tarfile
import time
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from vitkit.data.images import open_bytes
from vitkit.data.transforms import to_rgb
from vitkit.errors import DataError, path_problem

log = logging.getLogger(__name__)

INDEX_NAME = "dataset.json"
FORMAT = "vitkit-shards"
VERSION = 1
KEY_DIGITS = 8
INDEX_DTYPE = np.dtype([("shard", "<u4"), ("offset", "<u8"), ("size", "<i8"), ("target", "<i8"), ("ext", "u1")])
# WebDataset's image extensions, in the order a sample's image member is picked when it has several
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "ppm", "pgm", "tif", "tiff", "gif")
MAX_OPEN_SHARDS = 64  # file descriptors one process keeps open (least recently used ones are closed)
REMOTE_TRIES = 3  # ranged reads of a URL before the shard is reported unreachable
END_OF_ARCHIVE = 2 * tarfile.BLOCKSIZE


def shard_name(k: int) -> str:
    return f"shard-{k:06d}.tar"


def sample_key(i: int) -> str:
    return f"{i:0{KEY_DIGITS}d}"


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# -- locations: local paths and fsspec URLs ---------------------------------------------------------------

def is_url(location: str) -> bool:
    return "://" in location


def join(base: str, rel: str) -> str:
    return f"{base.rstrip('/')}/{rel}" if is_url(base) else str(Path(base) / rel)


def parent(location: str) -> str:
    return location.rsplit("/", 1)[0] if is_url(location) else str(Path(location).parent)


def _fsspec(url: str) -> tuple[Any, str]:
    try:
        import fsspec
    except ImportError:
        raise DataError(f"{url}: reading URLs needs fsspec and its backend (pip install fsspec s3fs / gcsfs)") \
            from None
    try:
        return fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as e:  # no backend for the protocol
        raise DataError(f"{url}: {e}") from None


def file_size(location: str) -> int | None:
    """Bytes of a file, None when it is not there; DataError when it cannot be asked."""
    if not is_url(location):
        try:
            return os.stat(location).st_size
        except FileNotFoundError:
            return None
        except OSError as e:
            raise DataError(f"shard {location} cannot be read ({e.strerror})") from None
    fs, path = _fsspec(location)
    try:
        return int(fs.size(path))
    except FileNotFoundError:
        return None
    except Exception as e:  # noqa: BLE001 - any backend failure (network, credentials) is one line naming it
        raise DataError(f"shard {location} is unreachable ({type(e).__name__}: {e})") from None


def read_bytes(location: str) -> bytes | None:
    """A whole (small) file, None when it is not there."""
    if not is_url(location):
        if os.path.exists(location) and (why := path_problem(location)) is not None:  # a folder, FIFO, device
            raise DataError(f"{location} {why}; a packed dataset holds regular files")
        try:
            return Path(location).read_bytes()
        except (FileNotFoundError, NotADirectoryError):
            return None
    fs, path = _fsspec(location)
    try:
        return fs.cat_file(path)
    except FileNotFoundError:
        return None
    except Exception as e:  # noqa: BLE001
        raise DataError(f"{location} is unreachable ({type(e).__name__}: {e})") from None


def _open_binary(location: str) -> Any:
    if not is_url(location):
        if (why := path_problem(location)) is not None:  # a FIFO would block the open, a device never end
            raise DataError(f"shard {location} {why}; a packed dataset holds regular files")
        return open(location, "rb")
    fs, path = _fsspec(location)
    return fs.open(path, "rb", block_size=4 << 20)


# -- brace patterns ------------------------------------------------------------------------------------------

_BRACE = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"(-?\d+)\.\.(-?\d+)")


def expand_braces(pattern: str) -> list[str]:
    """Bash-style braces, as webdataset's shard lists use them: `{000000..000127}` (zero-padded to the
    width written), `{a,b,c}`; several groups multiply out left to right. No nesting; a group that is
    neither (`{x}`) is kept as written."""
    m = _BRACE.search(pattern)
    if m is None:
        return [pattern]
    head, body, rest = pattern[: m.start()], m.group(1), pattern[m.end():]
    rng = _RANGE.fullmatch(body)
    if rng:
        a, b = rng.groups()
        padded = any(len(s.lstrip("-")) > 1 and s.lstrip("-").startswith("0") for s in (a, b))
        width = max(len(a), len(b)) if padded else 0
        lo, hi = int(a), int(b)
        step = 1 if hi >= lo else -1
        options = [f"{v:0{width}d}" for v in range(lo, hi + step, step)]
    elif "," in body:
        options = body.split(",")
    else:
        options = ["{" + body + "}"]
    return [head + o + tail for o in options for tail in expand_braces(rest)]


def is_pattern(location: str) -> bool:
    return bool(_BRACE.search(location.replace("{split}", ""))) or location.endswith(".tar")


# -- tar scanning ---------------------------------------------------------------------------------------------

def split_member_name(name: str) -> tuple[str, str] | None:
    """(key, extension) by WebDataset's rule: the key runs to the first dot of the file name; None for a
    name without one."""
    m = re.match(r"^((?:.*/|)[^./][^.]*)\.([^/]*)$", name)
    return (m.group(1), m.group(2)) if m else None


def scan_tar(location: str) -> tuple[list[tuple[str, int, int]], dict[str, bytes]]:
    """((member name, data offset, size) of every regular file, {name: bytes} of the `.cls` members) of a
    shard, checking that it is whole: every member's data inside the file and the end-of-archive blocks
    present; DataError naming the shard otherwise."""
    size = file_size(location)
    if size is None:
        raise DataError(f"shard {location} is missing")
    members: list[tuple[str, int, int]] = []
    labels: dict[str, bytes] = {}
    end = 0
    try:
        with _open_binary(location) as f, tarfile.open(fileobj=f, mode="r:") as tar:
            for m in tar:
                if not m.isfile():
                    continue
                members.append((m.name, m.offset_data, m.size))
                end = m.offset_data + -(-m.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
                if end > size:
                    break
                if m.name.endswith(".cls"):
                    labels[m.name] = tar.extractfile(m).read()  # type: ignore[union-attr]
            f.seek(end)
            tail = f.read(END_OF_ARCHIVE)
    except (tarfile.TarError, EOFError, OSError) as e:
        raise DataError(f"shard {location} is not a readable tar ({type(e).__name__}: {e}); re-pack or "
                        "re-copy it") from None
    if end > size or tail != bytes(END_OF_ARCHIVE):
        raise DataError(f"shard {location} is truncated ({size} bytes, "
                        f"{'a member runs past the end' if end > size else 'no end-of-archive marker'}); "
                        "re-pack or re-copy it")
    return members, labels


def group_samples(members: Iterable[tuple[str, int, int]], labels: dict[str, bytes], where: str
                  ) -> list[tuple[str, str, int, int, int | None]]:
    """Samples of one scanned shard, in member order: (key, image extension, offset, size, target or None).
    A key without an image member has size -1 (a missing sample: the loader replaces it and says so); one
    without a readable `.cls`, target None."""
    by_key: OrderedDict[str, dict[str, tuple[str, int, int]]] = OrderedDict()
    for name, offset, size in members:
        parts = split_member_name(name)
        if parts is None or parts[0].rsplit("/", 1)[-1].startswith("__"):
            continue
        by_key.setdefault(parts[0], {})[parts[1].lower()] = (name, offset, size)
    out = []
    for key, fields in by_key.items():
        ext = next((e for e in IMAGE_EXTS if e in fields), None)
        target: int | None = None
        if "cls" in fields:
            try:
                target = int(labels[fields["cls"][0]].decode().strip())
            except (KeyError, ValueError, UnicodeDecodeError):
                log.warning("%s: %s.cls is not an integer class index", where, key)
        if ext is None:
            out.append((key, next(iter(fields)), 0, -1, target))
        else:
            _, offset, size = fields[ext]
            out.append((key, ext, offset, size, target))
    return out


# -- the dataset ------------------------------------------------------------------------------------------------

class ShardDataset(Dataset):
    """Samples of tar shards by index: an `ImageDataset` (classes, targets, load, path) over `index` rows
    (INDEX_DTYPE: shard number into `shards`, byte offset and size of the image, target, extension number
    into `extensions`). `keys` are the samples' member keys (default: their index in the split, `first` on)."""

    def __init__(self, shards: Sequence[str], index: np.ndarray, classes: Sequence[str], extensions: Sequence[str],
                 *, keys: Sequence[str] | np.ndarray | None = None, name: str = ""):
        self.shards, self.classes, self.extensions = list(shards), list(classes), list(extensions)
        self.name = name
        self._shard = np.ascontiguousarray(index["shard"], dtype=np.int64)
        self._offset = np.ascontiguousarray(index["offset"], dtype=np.int64)
        self._size = np.ascontiguousarray(index["size"], dtype=np.int64)
        self._ext = np.ascontiguousarray(index["ext"], dtype=np.int64)
        self.targets: list[int] = index["target"].astype(np.int64).tolist()
        self._keys = keys if keys is not None else np.arange(len(index))
        self._remote = bool(self.shards) and is_url(self.shards[0])
        self._reset()

    def _reset(self) -> None:
        self._pid = os.getpid()
        self._fds: OrderedDict[int, int] = OrderedDict()
        self._fs: dict[int, tuple[Any, str]] = {}

    def __getstate__(self) -> dict[str, Any]:  # workers started with spawn: no descriptors travel
        state = dict(self.__dict__)
        state["_fds"], state["_fs"] = OrderedDict(), {}
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._reset()

    def __len__(self) -> int:
        return len(self._shard)

    def key(self, i: int) -> str:
        k = self._keys[i]
        return k if isinstance(k, str) else sample_key(int(k))

    def member(self, i: int) -> str:
        """The image member's name in its shard."""
        return f"{self.key(i)}.{self.extensions[self._ext[i]]}"

    def path(self, i: int) -> str:
        return f"{self.shards[self._shard[i]]}:{self.member(i)}"

    def raw(self, i: int) -> tuple[bytes, str]:
        """(the image's encoded bytes as stored, its extension)."""
        size = int(self._size[i])
        if size < 0:
            raise OSError(f"{self.path(i)}: the sample has no image member in its shard")
        return self._read(int(self._shard[i]), int(self._offset[i]), size, i), self.extensions[self._ext[i]]

    def load(self, i: int) -> Image.Image:
        """The opened image (from the shard's bytes); pixels are decoded on first use."""
        data, _ = self.raw(i)
        return open_bytes(data, self.path(i))

    def __getitem__(self, i: int) -> tuple[Image.Image, int]:
        return to_rgb(self.load(i)), self.targets[i]

    def _read(self, s: int, offset: int, size: int, i: int) -> bytes:
        if os.getpid() != self._pid:  # a forked worker: descriptors and clients are the parent's
            for fd in self._fds.values():
                os.close(fd)
            self._reset()
        location = self.shards[s]
        data = self._read_remote(s, offset, size) if self._remote else os.pread(self._fd(s), size, offset)
        if len(data) != size:
            raise DataError(f"shard {location} is truncated: {self.member(i)} needs bytes {offset}-{offset + size} "
                            f"but the file ends sooner; re-pack or re-copy it")
        return data

    def _fd(self, s: int) -> int:
        fd = self._fds.get(s)
        if fd is not None:
            self._fds.move_to_end(s)
            return fd
        try:
            fd = os.open(self.shards[s], os.O_RDONLY)
        except OSError as e:
            raise DataError(f"shard {self.shards[s]} cannot be read ({e.strerror}); it was there when the "
                            "dataset opened") from None
        self._fds[s] = fd
        if len(self._fds) > MAX_OPEN_SHARDS:
            os.close(self._fds.popitem(last=False)[1])
        return fd

    def _read_remote(self, s: int, offset: int, size: int) -> bytes:
        if s not in self._fs:
            self._fs[s] = _fsspec(self.shards[s])
        fs, path = self._fs[s]
        for attempt in range(REMOTE_TRIES):
            try:
                return fs.cat_file(path, start=offset, end=offset + size)
            except FileNotFoundError:
                raise DataError(f"shard {self.shards[s]} is missing (it was there when the dataset opened)") \
                    from None
            except Exception as e:  # noqa: BLE001 - network and backend errors: retried, then one line
                if attempt == REMOTE_TRIES - 1:
                    raise DataError(f"shard {self.shards[s]} is unreachable ({type(e).__name__}: {e})") from None
                time.sleep(0.5 * 2**attempt)
        raise AssertionError("unreachable")


# -- opening: a folder with dataset.json, a pattern, URLs ------------------------------------------------------

def read_meta(location: str) -> dict[str, Any] | None:
    """dataset.json at `location` (a folder or the file itself), or None when there is none."""
    path = location if location.endswith(".json") else join(location, INDEX_NAME)
    raw = read_bytes(path)
    if raw is None:
        return None
    try:
        meta = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path} is not valid JSON ({e}); re-run `vitkit data pack`") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or not isinstance(meta.get("splits"), dict):
        raise DataError(f"{path} is not a vitkit shard index (format {FORMAT!r}); pack the data with "
                        "`vitkit data pack SRC DST`")
    if meta.get("version", 0) > VERSION:
        raise DataError(f"{path} is format version {meta['version']}; this vitkit reads version {VERSION}: "
                        "upgrade vitkit")
    return meta


def split_info(meta: dict[str, Any], split: str, where: str) -> dict[str, Any]:
    splits = meta["splits"]
    if split not in splits:
        raise DataError(f"{where}: dataset.json has no split {split!r} (found: {', '.join(sorted(splits)) or 'none'})"
                        "; set train_split / val_split to one of them")
    return splits[split]


def load_index(location: str, info: dict[str, Any]) -> np.ndarray:
    """The split's index rows, checked against dataset.json (sha256, count, per-shard counts)."""
    raw = read_bytes(location)
    if raw is None:
        raise DataError(f"index {location} is missing; re-run `vitkit data pack` (it keeps the finished shards)")
    want = info.get("index", {}).get("sha256")
    if want and hashlib.sha256(raw).hexdigest() != want:
        raise DataError(f"index {location} does not match its sha256 in dataset.json; re-run `vitkit data pack`")
    try:
        index = np.load(io.BytesIO(raw), allow_pickle=False)
    except (ValueError, OSError) as e:
        raise DataError(f"index {location} is unreadable ({e}); re-run `vitkit data pack`") from None
    counts = [int(s["samples"]) for s in info["shards"]]
    if index.dtype != INDEX_DTYPE or len(index) != int(info["num_samples"]) or len(index) != sum(counts) \
            or np.bincount(index["shard"], minlength=len(counts)).tolist() != counts:
        raise DataError(f"index {location} does not match dataset.json (samples per shard); re-run `vitkit data pack`")
    return index


def check_shard_files(shards: Sequence[str], sizes: Sequence[int | None]) -> None:
    """Every shard present with the recorded size (None: any); a one-line DataError naming the first that is
    not. URLs are asked in parallel."""
    with ThreadPoolExecutor(16 if shards and is_url(shards[0]) else 1) as pool:
        found = list(pool.map(file_size, shards))
    for location, want, got in zip(shards, sizes, found):
        if got is None:
            raise DataError(f"shard {location} is missing; copy it back or re-run `vitkit data pack`")
        if want is not None and got != want:
            raise DataError(f"shard {location} is {'truncated' if got < want else 'changed'}: {got} bytes, "
                            f"dataset.json says {want}; re-pack or re-copy it")


def open_packed(root: str, split: str, meta: dict[str, Any] | None = None,
                only: Sequence[str] | None = None) -> ShardDataset:
    """Split `split` of a packed folder (dataset.json in `root`); `only`: these shard files alone (a pattern)."""
    meta = meta if meta is not None else read_meta(root)
    if meta is None:
        raise DataError(f"{root} has no {INDEX_NAME}; pack a dataset into it with `vitkit data pack SRC {root}`, "
                        "or give shard files as a brace pattern (DIR/shard-{000000..000009}.tar)")
    info = split_info(meta, split, root)
    shards = [join(root, s["file"]) for s in info["shards"]]
    index = load_index(join(root, info["index"]["file"]), info)
    keys = np.arange(len(index))
    if only is not None:
        pos = {_norm(s): k for k, s in enumerate(shards)}
        picked = [pos[_norm(s)] for s in only]
        rows = np.concatenate([np.flatnonzero(index["shard"] == k) for k in picked]) if picked else np.zeros(0, int)
        index, keys = index[rows].copy(), keys[rows]
        remap = np.zeros(len(shards), dtype=np.int64)
        remap[picked] = np.arange(len(picked))
        index["shard"] = remap[index["shard"]]
        sizes = [info["shards"][k]["bytes"] for k in picked]
        shards = [shards[k] for k in picked]
    else:
        sizes = [s["bytes"] for s in info["shards"]]
    check_shard_files(shards, sizes)
    if len(index) == 0:
        raise DataError(f"{root}: split {split!r} has no samples")
    return ShardDataset(shards, index, info["classes"], info["extensions"], keys=keys,
                        name=f"{root}/{split}")


def _norm(location: str) -> str:
    return location if is_url(location) else os.path.realpath(location)


def _find_meta(shards: Sequence[str]) -> tuple[str, dict[str, Any], str] | None:
    """(root, dataset.json, split) of a packed folder holding every shard of `shards`, looking in the first
    shard's folder and the one above it."""
    folder = parent(shards[0])
    for root in (folder, parent(folder)):
        meta = read_meta(root)
        if meta is None:
            continue
        wanted = {_norm(s) for s in shards}
        for name, info in meta["splits"].items():
            have = {_norm(join(root, s["file"])) for s in info["shards"]}
            if wanted <= have:
                return root, meta, name
        log.info("%s/%s lists none or only some of the shards; scanning them instead", root, INDEX_NAME)
    return None


def scan_shards(shards: Sequence[str], name: str) -> ShardDataset:
    """A dataset over WebDataset tars that have no dataset.json: each is scanned once (headers and labels)."""
    log.info("indexing %d shard(s) of %s (no %s beside them; `vitkit data pack` writes one)", len(shards), name,
             INDEX_NAME)
    rows, keys, exts = [], [], {}
    no_image = no_label = 0
    for k, location in enumerate(shards):
        members, labels = scan_tar(location)
        for key, ext, offset, size, target in group_samples(members, labels, location):
            no_image += size < 0
            if target is None:
                no_label += 1
                size, target = -1, 0  # unusable without a label: read as a missing sample
            rows.append((k, offset, size, target, exts.setdefault(ext, len(exts))))
            keys.append(key)
    if not rows:
        raise DataError(f"{name}: the shards hold no samples (WebDataset members <key>.jpg + <key>.cls)")
    if no_image or no_label:
        log.warning("%s: %d sample(s) without an image and %d without a .cls label; they are read as unreadable "
                    "images (replaced, and counted against bad_image_limit)", name, no_image, no_label)
    index = np.array(rows, dtype=INDEX_DTYPE)
    num_classes = int(index["target"].max()) + 1 if len(index) else 0
    return ShardDataset(shards, index, [str(c) for c in range(num_classes)], list(exts), keys=keys, name=name)


def open_shards(data_dir: str, split: str) -> ShardDataset:
    """`--dataset wds --data_dir DATA_DIR`: a packed folder (or its dataset.json), or a brace pattern of shard
    files, local or fsspec URLs; see the module docstring."""
    location = data_dir if is_url(data_dir) else os.path.expanduser(data_dir)
    location = location.replace("{split}", split)
    if is_pattern(location):
        shards = expand_braces(location)
        if not shards:
            raise DataError(f"{data_dir}: the pattern names no shards")
        found = _find_meta(shards)
        if found is not None:
            root, meta, name = found
            return open_packed(root, name, meta, only=shards)
        check_shard_files(shards, [None] * len(shards))
        return scan_shards(shards, data_dir)
    if location.endswith(".json"):
        return open_packed(parent(location), split, read_meta(location))
    if not is_url(location) and not os.path.isdir(location):
        raise DataError(f"data_dir {location!r} {path_problem(location, want='folder') or 'is not a folder'}")
    return open_packed(location, split)
