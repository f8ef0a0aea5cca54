"""`vitkit train -c CONFIG [--key value ...]` (and `python train.py ...` at the repository root).

defaults <- YAML <- command line -> `resolve` -> one frozen Config -> `Trainer(cfg).fit()`. With no config at all
the built-in demo recipe runs (a small ViT on the CIFAR-10 sample shipped in `data/`); a command that names its
own --data_dir or --dataset starts from the schema's (MindCV's) defaults instead. `--resume` without `-c`
takes the run's config from the checkpoint itself; `--resume` of a run that is already complete says so and
does nothing. Without --ckpt_save_dir each run gets its own timestamped folder under ./ckpt (runs/demo for the
demo recipe), and `--resume` alone continues the newest. SIGTERM or Ctrl+C saves at the next step and exits with
128 + the signal (143, 130), saying how to resume; a second one exits at once (`vitkit.engine.loop.Stopped`).
"""
from __future__ import annotations

import dataclasses
import sys
from collections.abc import Sequence
from typing import Any

from vitkit.engine.config import NEW_RUN_DIR, Config, config_parser, global_batch_line, resolve
from vitkit.engine.launch import detect_launcher, distributed_session, gather_objects, print0
from vitkit.engine.loop import Trainer, finished_run

DESCRIPTION = """Train or finetune from a recipe (configs/vit/*.yaml); any key can be overridden on the command line
(--lr 0.001, --lr=0.001, bare --pretrained for true, --no-ema for false). With neither a config nor
--data_dir/--dataset, the built-in demo recipe trains a small ViT on the bundled CIFAR-10 sample. Without
--ckpt_save_dir each run gets a new timestamped folder under ./ckpt (runs/demo for the demo recipe); a folder
that holds a run is continued with --resume (true: the newest run) or replaced with --overwrite. --resume (true
or a checkpoint path) continues a run exactly where it stopped; --smoke shrinks any recipe to a few steps on a
few images."""


def _same_run_dir(cfg: Config) -> Config:
    """Several processes each resolved a new timestamped folder: all use rank 0's (their clocks may have
    crossed a second between them)."""
    if not cfg.sources.get("ckpt_save_dir", "").endswith(NEW_RUN_DIR):
        return cfg
    chosen = gather_objects(cfg.ckpt_save_dir)[0]
    return cfg if chosen == cfg.ckpt_save_dir else dataclasses.replace(cfg, ckpt_save_dir=chosen)


def train(argv: Sequence[str]) -> tuple[Config, dict[str, Any]]:
    """Train from command-line style arguments; returns the resolved config and the last epoch's metrics."""
    notices: list[str] = []
    launch = detect_launcher()
    cfg = resolve(argv, launch=launch, notices=notices)
    done = finished_run(cfg)  # --resume of a run at its end: nothing to train, nothing to rewrite
    if done is not None:
        if launch is None or launch.rank == 0:
            for note in notices:
                print(note, file=sys.stderr)
            print(done[0])
        return cfg, done[1]
    # torchrun / mpirun: one process per device, torn down on exit and on errors
    with distributed_session(distribute=cfg.distribute, device=cfg.device) as dist:
        for note in notices:
            print0(note, file=sys.stderr)
        if dist.distributed:
            cfg = _same_run_dir(cfg)
        print0(global_batch_line(cfg))
        metrics = Trainer(cfg, argv=["vitkit", "train", *argv], rank=dist.rank, world_size=dist.world_size,
                          device=dist.device).fit()
        return cfg, metrics


def run(argv: Sequence[str]) -> dict[str, Any]:
    """Train from command-line style arguments; returns the last epoch's metrics."""
    return train(argv)[1]


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        config_parser("train", DESCRIPTION).print_help()
        return 0
    run(argv)  # a stop signal raises loop.Stopped; the CLI prints its line and exits with its code
    return 0
