"""`vitkit demo` (what `make demo` runs): train the built-in recipe on the CIFAR-10 sample that ships in the
repository (`data/cifar10_sample`: 4,000 training and 1,000 test JPEGs), then validate the checkpoint with
`vitkit validate` and print its top-1. A few minutes on 2 CPU cores.

The same recipe runs for `vitkit train` with no config; any key can be overridden (`vitkit demo --epoch_size 2`).
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Optional, Sequence

SAMPLE_DIR = Path(__file__).resolve().parents[2] / "data" / "cifar10_sample"

# A 6-block, 128-wide ViT with 4x4 patches on 32x32 images (vit_n_4_32: 1.2 M parameters), trained from
# scratch with AdamW and a short warmup + cosine schedule; pad-and-crop + flip augmentation, images in memory.
DEMO_RECIPE: dict[str, Any] = {
    "model": "vit_n_4_32",
    "dataset": "imagefolder",
    "data_dir": str(SAMPLE_DIR),
    "train_split": "train",
    "val_split": "test",
    "image_resize": 32,
    "batch_size": 64,
    "num_parallel_workers": 0,
    "epoch_size": 6,
    "opt": "adamw",
    "lr": 2e-3,
    "weight_decay": 0.05,
    "weight_decay_filter": "auto",
    "scheduler": "cosine_decay",
    "warmup_epochs": 1,
    "warmup_factor": 0.01,
    "min_lr": 1e-5,
    "label_smoothing": 0.1,
    "val_while_train": True,
    "ckpt_save_dir": "runs/demo",
    "keep_checkpoint_max": 2,
    "log_interval": 20,
}


def main(argv: Optional[Sequence[str]] = None) -> int:
    from vitkit.engine.train import run
    from vitkit.tools.validate import run_validate

    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return 0
    if any(a in ("-c", "--config") or a.startswith("--config=") for a in argv):
        print("error: vitkit demo runs the built-in recipe; use `vitkit train -c CONFIG` for a recipe file",
              file=sys.stderr)
        return 2
    metrics = run(argv)
    run_dir = Path(_value(argv, "ckpt_save_dir") or DEMO_RECIPE["ckpt_save_dir"])
    print(f"\nvalidating {run_dir / 'last.safetensors'} with `vitkit validate`:")
    result = run_validate(["--ckpt_path", str(run_dir / "last.safetensors")])
    loop_top1 = metrics.get("val_top1")
    same = "" if loop_top1 is None else f" (the training loop measured {loop_top1:.2f}%)"
    print(f"\ndemo: top-1 {result['top1']:.2f}% on {result['num_images']} CIFAR-10 test images{same}; "
          f"run directory {run_dir} (metrics.jsonl, curves.png, tensorboard/)")
    return 0


def _value(argv: Sequence[str], key: str) -> Optional[str]:
    """The value of `--key v` / `--key=v` in argv, if given."""
    for i, arg in enumerate(argv):
        if arg == f"--{key}" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(f"--{key}="):
            return arg.split("=", 1)[1]
    return None
