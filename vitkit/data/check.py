"""`vitkit data check DIR`: unreadable images, empty classes and class-count imbalance in an image folder.

DIR is either one split (`DIR/<class>/*`) or a dataset root with split folders (`DIR/<split>/<class>/*`).
Exit code 0 when clean, 1 when problems were found, 2 for a missing folder.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from vitkit.args import VerbParser
from vitkit.data.datasets import IMG_EXTENSIONS, list_images, open_image  # also sets the decompression-bomb limit
from vitkit.data.loader import DECODE_ERRORS
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


def main(argv: Sequence[str]) -> int:
    args = list(argv)
    if args and args[0] == "check":
        args = args[1:]
    p = VerbParser("data check", __doc__.splitlines()[0])
    p.add_argument("dir", help="dataset root or split folder")
    p.add_argument("--headers_only", action="store_true", help="verify file structure without decoding pixels")
    p.add_argument("--imbalance", type=float, default=2.0, help="flag classes with more than this ratio of images")
    a = p.parse_args(args)
    root = Path(a.dir)
    if not root.is_dir():
        raise DataError(f"{root} is not a folder")
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
