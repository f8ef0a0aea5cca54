"""`vitkit models [PATTERN] [--json]`: the registry as a table.

PATTERN is a glob over every spelling of a name (ours `vit_b_32_224`, MindCV's short `vit_b_32`, timm's
`vit_base_patch32_224`; case-insensitive, `-` or `/` for `_`); a PATTERN without glob characters is one name
in any accepted spelling (`vit_base_patch32_224.augreg_in1k` included), and an unknown one is an error with
suggestions. One name in timm's spelling shows timm's eval preprocessing, which that spelling stands for.
"""
from __future__ import annotations

import json
import re
from collections.abc import Sequence

from vitkit.args import VerbParser
from vitkit.models import list_models
from vitkit.weights import model_info, resolve_model

_GLOB = re.compile(r"[*?\[]")


def main(argv: Sequence[str]) -> int:
    p = VerbParser("models", __doc__)
    p.add_argument("pattern", nargs="?", default="*",
                   help="glob over model names in any spelling, or one name (default: all)")
    p.add_argument("--json", action="store_true", help="print the metadata as JSON")
    args = p.parse_args(argv)
    if _GLOB.search(args.pattern):
        rows = [model_info(n) for n in list_models(args.pattern)]
    else:
        resolve_model(args.pattern)  # an unknown name (or timm tag) is a one-line error with suggestions
        rows = [model_info(args.pattern)]
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title="vitkit models")
    for col in ("name", "timm name", "input", "params", "GMACs", "mean/std", "interp", "crop_pct",
                "pretrained sources"):
        table.add_column(col, justify="right" if col in ("params", "GMACs", "crop_pct") else "left")
    for r in rows:
        mean_std = "imagenet" if r["mean"][0] == 0.485 else ("0.5" if r["mean"][0] == 0.5 else "cifar10")
        table.add_row(r["name"], r["timm_name"] or "-", "x".join(map(str, r["input_size"])), f"{r['params']:,}",
                      f"{r['gmacs']:.2f}", mean_std, r["interpolation"], f"{r['crop_pct']:.3f}",
                      ", ".join(r["pretrained"]) or "-")
    Console(width=220).print(table)
    return 0
