"""`vitkit demo` (what `make demo` runs): train the built-in recipe on the CIFAR-10 sample that ships in the
repository (`data/cifar10_sample`: 4,000 training and 1,000 test JPEGs), then validate the checkpoint with
`vitkit validate` and print its top-1. A few minutes on 2 CPU cores.

The same recipe (`vitkit.engine.config.DEMO_RECIPE`) runs for `vitkit train` with no config; any key can be
overridden (`vitkit demo --epoch_size 2`).
"""
from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from vitkit.engine.config import DEMO_RECIPE, config_parser, parse_cli
from vitkit.engine.train import run
from vitkit.tools.validate import run_validate


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
    metrics = run(argv)
    run_dir = Path(str(dict(pairs).get("ckpt_save_dir", DEMO_RECIPE["ckpt_save_dir"])))
    print(f"\nvalidating {run_dir / 'last.safetensors'} with `vitkit validate`:")
    result = run_validate(["--ckpt_path", str(run_dir / "last.safetensors")])
    loop_top1 = metrics.get("val_top1")
    same = "" if loop_top1 is None else f" (the training loop measured {loop_top1:.2f}%)"
    print(f"\ndemo: top-1 {result['top1']:.2f}% on {result['num_images']} CIFAR-10 test images{same}; "
          f"run directory {run_dir} (metrics.jsonl, curves.png, tensorboard/)")
    return 0
