"""`vitkit models [PATTERN] [--json]`: the registry as a table."""
from __future__ import annotations

import json
from collections.abc import Sequence

from vitkit.args import VerbParser
from vitkit.models import list_models
from vitkit.weights import model_info


def main(argv: Sequence[str]) -> int:
    p = VerbParser("models", __doc__)
    p.add_argument("pattern", nargs="?", default="*", help="glob over model names (default: all)")
    p.add_argument("--json", action="store_true", help="print the metadata as JSON")
    args = p.parse_args(argv)
    rows = [model_info(n) for n in list_models(args.pattern)]
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title="vitkit models")
    for col in ("name", "input", "params", "GMACs", "mean/std", "interp", "crop_pct", "pretrained sources"):
        table.add_column(col, justify="right" if col in ("params", "GMACs", "crop_pct") else "left")
    for r in rows:
        mean_std = "imagenet" if r["mean"][0] == 0.485 else ("0.5" if r["mean"][0] == 0.5 else "cifar10")
        table.add_row(r["name"], "x".join(map(str, r["input_size"])), f"{r['params']:,}", f"{r['gmacs']:.2f}",
                      mean_std, r["interpolation"], f"{r['crop_pct']:.3f}", ", ".join(r["pretrained"]) or "-")
    Console(width=200).print(table)
    return 0
