"""`vitkit demo` (what `make demo` runs): train the built-in recipe on the CIFAR-10 sample that ships in the
repository (`data/cifar10_sample`: 4,000 training and 1,000 test JPEGs), then validate the run's best checkpoint
(by validation top-1; the last one when there is none) with `vitkit validate` and print its top-1. A few
minutes on 2 CPU cores.

Each run gets its own folder, `runs/demo/<timestamp>` (or --ckpt_save_dir); `vitkit demo --resume` continues
the newest. The same recipe (`vitkit.engine.config.DEMO_RECIPE`) runs for `vitkit train` with no config; any
key can be overridden (`vitkit demo --epoch_size 2`).
"""
from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path

from vitkit.engine.checkpoint import read_metadata
from vitkit.engine.config import DEMO_RECIPE, config_parser, latest_run, parse_cli
from vitkit.engine.saver import BEST, LAST
from vitkit.engine.train import train
from vitkit.tools.validate import run_validate


def checkpoint_to_validate(run_dir: Path) -> tuple[Path, str]:
    """The run's best checkpoint by validation top-1 when it has one, else its last; and which it is."""
    best = run_dir / BEST
    if best.is_file():
        meta = read_metadata(best) or {}
        top1 = json.loads(meta.get("metrics", "{}")).get("val_top1")
        at = f", {top1:.2f}% at epoch {meta.get('epoch')}" if top1 is not None else ""
        return best, f"the best checkpoint by val top-1{at}"
    return run_dir / LAST, "the last checkpoint (no validation during training, so no best one)"


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        config_parser("demo", __doc__).print_help()
        return 0
    config_path, pairs = parse_cli(argv)
    if config_path is not None:
        print("error: vitkit demo runs the built-in recipe; use `vitkit train -c CONFIG` for a recipe file",
              file=sys.stderr)
        return 2
    given = dict(pairs)
    if given.get("resume") is True and "ckpt_save_dir" not in given:  # the newest demo run, not any run
        newest = latest_run(DEMO_RECIPE["ckpt_save_dir"])
        argv += ["--ckpt_save_dir", str(newest or DEMO_RECIPE["ckpt_save_dir"])]
    cfg, metrics = train(argv)
    run_dir = Path(cfg.ckpt_save_dir)
    ckpt, which = checkpoint_to_validate(run_dir)
    print(f"\nvalidating {ckpt} ({which}) with `vitkit validate`:")
    result = run_validate(["--ckpt_path", str(ckpt)])
    loop_top1 = json.loads((read_metadata(ckpt) or {}).get("metrics", "{}")).get("val_top1", metrics.get("val_top1"))
    same = "" if loop_top1 is None else f" (the training loop measured {loop_top1:.2f}%)"
    print(f"\ndemo: top-1 {result['top1']:.2f}% on {result['num_images']} CIFAR-10 test images with {ckpt.name}"
          f"{same}; run directory {run_dir} (metrics.jsonl, curves.png, tensorboard/)")
    return 0
