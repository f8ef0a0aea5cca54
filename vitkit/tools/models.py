"""`vitkit models [PATTERN] [--family FAMILY] [--json]`: the registry as a table.

PATTERN is a glob over every spelling of a name (ours `vit_b_32_224`, MindCV's short `vit_b_32`, timm's
`vit_base_patch32_224`; case-insensitive, `-` or `/` for `_`); a PATTERN without glob characters is one name
in any accepted spelling (`vit_base_patch32_224.augreg_in1k` included), and an unknown one is an error with
suggestions. One name in timm's spelling shows timm's eval preprocessing, which that spelling stands for.
--family keeps one architecture family: vit (the plain ViTs), deit3, dinov2, siglip, clip, eva02, rope_vit, dinov3
(`vitkit models --family dinov2`, `vitkit models "*_224" --family siglip`); backbone-family names match PATTERN by
their vitkit name (`*dinov3*`), their timm names are shown in the timm name column.
"""
from __future__ import annotations

import json
import re
from collections.abc import Sequence

from vitkit.args import VerbParser
from vitkit.errors import UnknownModelError
from vitkit.models import list_models
from vitkit.models.registry import FAMILIES
from vitkit.weights import model_info, resolve_model

_GLOB = re.compile(r"[*?\[]")
# The mean/std column: each registered set of statistics by its first mean.
_STATS = {0.485: "imagenet", 0.5: "0.5", 0.4914: "cifar10", 0.48145466: "openai clip"}


def main(argv: Sequence[str]) -> int:
    p = VerbParser("models", __doc__)
    p.add_argument("pattern", nargs="?", default="*",
                   help="glob over model names in any spelling, or one name (default: all)")
    p.add_argument("--family", default=None, choices=tuple(FAMILIES), metavar="FAMILY",
                   help=f"only this architecture family: {', '.join(FAMILIES)}")
    p.add_argument("--json", action="store_true", help="print the metadata as JSON")
    args = p.parse_args(argv)
    if _GLOB.search(args.pattern):
        rows = [model_info(n) for n in list_models(args.pattern, family=args.family)]
    else:
        resolve_model(args.pattern)  # an unknown name (or timm tag) is a one-line error with suggestions
        rows = [model_info(args.pattern)]
        if args.family is not None and rows[0]["family"] != args.family:
            raise UnknownModelError(f"{args.pattern} is a {rows[0]['family']} model, not {args.family}",
                                    args.pattern)
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title="vitkit models")
    for col in ("name", "family", "timm name", "input", "params", "GMACs", "mean/std", "interp", "crop_pct",
                "pretrained sources"):
        table.add_column(col, justify="right" if col in ("params", "GMACs", "crop_pct") else "left")
    for r in rows:
        mean_std = _STATS.get(r["mean"][0], f"{r['mean'][0]:.3f}")
        table.add_row(r["name"], r["family"], r["timm_name"] or "-", "x".join(map(str, r["input_size"])),
                      f"{r['params']:,}", f"{r['gmacs']:.2f}", mean_std, r["interpolation"], f"{r['crop_pct']:.3f}",
                      ", ".join(r["pretrained"]) or "-")
    Console(width=220).print(table)
    return 0
