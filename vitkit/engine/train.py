"""`vitkit train -c CONFIG [--key value ...]` (and `python train.py ...` at the repository root).

defaults <- YAML <- command line -> `resolve` -> one frozen Config -> `Trainer(cfg).fit()`. With no config at all
the built-in demo recipe runs (a small ViT on the CIFAR-10 sample shipped in `data/`); a command that names its
own --data_dir or --dataset starts from the schema's (MindCV's) defaults instead. `--resume` without `-c`
takes the run's config from the checkpoint itself.
"""
from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

from vitkit.engine.config import config_parser, global_batch_line, resolve
from vitkit.engine.launch import detect_launcher, distributed_session, print0
from vitkit.engine.loop import Trainer

DESCRIPTION = """Train or finetune from a recipe (configs/vit/*.yaml); any key can be overridden on the command line
(--lr 0.001, --lr=0.001, bare --pretrained for true, --no-ema for false). With neither a config nor
--data_dir/--dataset, the built-in demo recipe trains a small ViT on the bundled CIFAR-10 sample. --resume
(true or a checkpoint path) continues a run exactly where it stopped; --smoke shrinks any recipe to a few
steps on a few images."""


def run(argv: Sequence[str]) -> dict[str, Any]:
    """Train from command-line style arguments; returns the last epoch's metrics."""
    notices: list[str] = []
    cfg = resolve(argv, launch=detect_launcher(), notices=notices)
    # torchrun / mpirun: one process per device, torn down on exit and on errors
    with distributed_session(distribute=cfg.distribute, device=cfg.device) as dist:
        for note in notices:
            print0(note, file=sys.stderr)
        print0(global_batch_line(cfg))
        return Trainer(cfg, argv=["vitkit", "train", *argv], rank=dist.rank, world_size=dist.world_size,
                       device=dist.device).fit()


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        config_parser("train", DESCRIPTION).print_help()
        return 0
    run(argv)
    return 0
