"""`vitkit data check DIR`: unreadable images, empty classes and class-count imbalance in an image folder.

DIR is either one split (`DIR/<class>/*`), a dataset root with split folders (`DIR/<split>/<class>/*`), or a
folder packed by `vitkit data pack` (DIR/dataset.json): there every shard is checked against dataset.json
(present, size, sha256), its members against the index (keys, offsets, labels), and every sample is decoded.
Exit code 0 when clean, 1 when problems were found, 2 for a missing folder.

`vitkit data pack SRC DST` (vitkit.data.pack) writes such a folder.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from vitkit.args import VerbParser, at_least
from vitkit.data import pack
from vitkit.data.datasets import IMG_EXTENSIONS, list_images, open_image  # also sets the decompression-bomb limit
from vitkit.data.loader import DECODE_ERRORS
from vitkit.data.shards import INDEX_NAME, ShardDataset, group_samples, load_index, read_meta, scan_tar, sha256_file
from vitkit.errors import DataError


def check_split(split_dir: Path, *, decode: bool = True, imbalance: float = 2.0) -> list[str]:
    """Problems in one `<class>/*` folder, one line each."""
    problems = []
    classes = sorted(p for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        return [f"{split_dir}: no class folders"]
    counts = Counter()
    for c in classes:
        files = list_images(c)
        counts[c.name] = len(files)
        if not files:
            problems.append(f"empty class: {c}")
        for f in files:
            try:
                with open_image(f) as img:
                    img.load() if decode else img.verify()
            except (*DECODE_ERRORS, Exception) as e:  # noqa: B030 - any failure of one file is a problem to list
                problems.append(f"unreadable: {f} ({type(e).__name__}: {e})")
    nonzero = [n for n in counts.values() if n]
    if nonzero and max(nonzero) > imbalance * min(nonzero):
        lo, hi = min(counts, key=lambda k: counts[k] or 1e18), max(counts, key=counts.get)
        problems.append(f"imbalance: {split_dir.name} has {counts[hi]} images in '{hi}' but {counts[lo]} in '{lo}' "
                        f"(more than {imbalance:g}x)")
    print(f"{split_dir}: {len(classes)} classes, {sum(counts.values())} images")
    return problems


def _imbalance(counts: Counter, where: str, imbalance: float) -> list[str]:
    nonzero = [n for n in counts.values() if n]
    if nonzero and max(nonzero) > imbalance * min(nonzero):
        lo, hi = min(counts, key=lambda k: counts[k] or 1e18), max(counts, key=counts.get)
        return [f"imbalance: {where} has {counts[hi]} images in '{hi}' but {counts[lo]} in '{lo}' "
                f"(more than {imbalance:g}x)"]
    return []


def check_packed(root: Path, *, decode: bool = True, imbalance: float = 2.0) -> list[str]:
    """Problems in a packed folder (dataset.json), one line each: shards missing, truncated or changed
    (size, sha256), an index that does not match them, samples that do not decode, empty classes, imbalance."""
    try:
        meta = read_meta(str(root))
    except DataError as e:
        return [str(e)]
    assert meta is not None
    problems: list[str] = []
    for split, info in meta["splits"].items():
        where = root / split
        try:
            index = load_index(str(root / info["index"]["file"]), info)
        except DataError as e:
            problems.append(str(e))
            continue
        good = []
        for k, entry in enumerate(info["shards"]):
            path = root / entry["file"]
            if not path.is_file():
                problems.append(f"missing shard: {path}")
                continue
            size = path.stat().st_size
            if size != entry["bytes"]:
                problems.append(f"{'truncated' if size < entry['bytes'] else 'changed'} shard: {path} ({size} bytes, "
                                f"dataset.json says {entry['bytes']})")
                continue
            if sha256_file(path) != entry["sha256"]:
                problems.append(f"checksum mismatch: {path} (its sha256 is not the one in dataset.json)")
            try:
                members, labels = scan_tar(str(path))
            except DataError as e:
                problems.append(str(e))
                continue
            rows = index[index["shard"] == k]
            samples = group_samples(members, labels, str(path))
            first = np.flatnonzero(index["shard"] == k)
            want = [(f"{j:08d}", int(r["offset"]), int(r["size"]), int(r["target"])) for j, r in zip(first, rows)]
            if [(key, off, n, t) for key, _, off, n, t in samples] != want:
                problems.append(f"index mismatch: {path} does not hold the samples index.npy lists for it")
                continue
            good.append(k)
        ds = ShardDataset([str(root / e["file"]) for e in info["shards"]], index, info["classes"],
                          info["extensions"], name=str(where))
        for i in np.flatnonzero(np.isin(index["shard"], good)).tolist():
            try:
                with ds.load(i) as img:
                    img.load() if decode else img.verify()
            except (*DECODE_ERRORS, Exception) as e:  # noqa: B030 - any failure of one sample is a problem to list
                problems.append(f"unreadable: {ds.path(i)} ({type(e).__name__}: {e})")
        counts = Counter({c: 0 for c in info["classes"]})
        counts.update(info["classes"][t] for t in index["target"].tolist())
        problems += [f"empty class: {where} '{c}'" for c, n in counts.items() if n == 0]
        problems += _imbalance(counts, split, imbalance)
        print(f"{where}: {len(info['classes'])} classes, {len(index)} images in {len(info['shards'])} shards")
    return problems


def main(argv: Sequence[str]) -> int:
    args = list(argv)
    if args and args[0] == "pack":
        return pack.main(args[1:])
    if args and args[0] == "check":
        args = args[1:]
    p = VerbParser("data check", __doc__.splitlines()[0])
    p.add_argument("dir", help="dataset root or split folder")
    p.add_argument("--headers_only", action="store_true", help="verify file structure without decoding pixels")
    p.add_argument("--imbalance", type=at_least(1, float), default=2.0,
                   help="flag classes with more than this ratio of images")
    a = p.parse_args(args)
    root = Path(a.dir)
    if not root.is_dir():
        raise DataError(f"{root} is not a folder")
    if (root / INDEX_NAME).is_file():
        problems = check_packed(root, decode=not a.headers_only, imbalance=a.imbalance)
        for line in problems:
            print(line)
        print(f"{len(problems)} problem(s) found" if problems else "no problems found")
        return 1 if problems else 0
    subdirs = [d for d in sorted(root.iterdir()) if d.is_dir()]
    # A root whose folders hold class folders (no images directly) is a dataset with splits.
    splits = [d for d in subdirs if any(s.is_dir() for s in d.iterdir()) and not any(
        f.is_file() and f.name.lower().endswith(IMG_EXTENSIONS) for f in d.iterdir())]
    problems = []
    for split in (splits or [root]):
        problems += check_split(split, decode=not a.headers_only, imbalance=a.imbalance)
    for line in problems:
        print(line)
    print(f"{len(problems)} problem(s) found" if problems else "no problems found")
    return 1 if problems else 0
