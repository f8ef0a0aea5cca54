"""`vitkit train -c CONFIG [--key value ...]` (and `python train.py ...` at the repository root).

defaults <- YAML <- command line -> one validated Config -> `Trainer(cfg).fit()`. With no config at all the
built-in demo recipe runs (a small ViT on the CIFAR-10 sample shipped in `data/`); a command that names its own
--data_dir or --dataset starts from the schema's (MindCV's) defaults instead. `--resume` without `-c`
takes the run's config from the checkpoint itself.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

from vitkit.engine.config import help_text, load_config, parse_cli
from vitkit.errors import VitkitError, disk_full_message

USAGE = """usage: vitkit train [-c CONFIG.yaml] [--key value ...]

Train or finetune from a recipe (configs/vit/*.yaml); any key can be overridden on the command line
(--lr 0.001, --lr=0.001, bare --pretrained for true, --no-ema for false). With neither a config nor
--data_dir/--dataset, the built-in demo recipe trains a small ViT on the bundled CIFAR-10 sample. --resume
(true or a checkpoint path) continues a run exactly where it stopped; --smoke shrinks any recipe to a few
steps on a few images."""


def _checkpoint_defaults(argv: Sequence[str]) -> Optional[tuple[dict[str, Any], str]]:
    """`--resume ...` with no `-c`: the resolved config stored in the checkpoint being resumed."""
    from vitkit.engine.checkpoint import read_metadata

    config_path, pairs = parse_cli(argv)
    given = dict(pairs)
    if config_path is not None or not given.get("resume"):
        return None
    resume = given["resume"]
    path = Path(given.get("ckpt_save_dir", "./ckpt")) / "last.safetensors" if resume is True else Path(str(resume))
    meta = read_metadata(path) if path.is_file() else None
    if not meta or "config" not in meta:
        return None  # the Trainer reports the missing or foreign checkpoint
    saved = json.loads(meta["config"])
    for key in ("resume", "max_steps"):  # where that invocation stopped, not part of the recipe
        saved.pop(key, None)
    return saved, f"checkpoint:{path}"


def build_config(argv: Sequence[str], notices: list[str]):  # -> Config
    """The run's config: from -c, from the resumed checkpoint, or the demo recipe when neither a config nor
    data (--data_dir / --dataset) is given."""
    from vitkit.engine.demo import DEMO_RECIPE

    config_path, pairs = parse_cli(argv)
    from_ckpt = _checkpoint_defaults(argv)
    # A command that names its own data (the seed's `--dataset cifar10 --data_dir ...` finetune) is a recipe of
    # its own over the schema's defaults, as in MindCV; the demo's 32 px, run dir and regularisation stay out.
    names_data = any(key in ("data_dir", "dataset") for key, _ in pairs)
    if from_ckpt is not None:
        defaults, source = from_ckpt
    elif config_path is None and not names_data:
        defaults, source = DEMO_RECIPE, "built-in demo recipe"
        notices.append("note: no config given (-c); running the built-in demo recipe (vitkit train --help)")
    else:
        defaults, source = None, ""
    cfg = load_config(argv, defaults=defaults, notices=notices)
    for key, src in cfg.sources.items():
        if src == "built-in recipe":
            cfg.sources[key] = source
    return cfg


def run(argv: Sequence[str]) -> dict[str, Any]:
    """Train from command-line style arguments; returns the last epoch's metrics."""
    from vitkit.engine.distributed import apply_global_batch, distributed_session, print0
    from vitkit.engine.loop import Trainer, apply_smoke

    notices: list[str] = []
    cfg = build_config(argv, notices)
    apply_smoke(cfg)
    # torchrun / mpirun: one process per device, torn down on exit and on errors (vitkit.engine.distributed)
    with distributed_session(cfg) as dist:
        for note in notices:
            print0(note, file=sys.stderr)
        apply_global_batch(cfg, dist.world_size)
        return Trainer(cfg, argv=["vitkit", "train", *argv], rank=dist.rank, world_size=dist.world_size,
                       device=dist.device).fit()


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        print(USAGE)
        print(help_text())
        return 0
    run(argv)
    return 0


def cli() -> int:
    """Entry for `python train.py`: user errors as one line and exit code 2, as the `vitkit` CLI does."""
    try:
        return main()
    except VitkitError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a full disk hit by a small write (metrics, logs): one line too
        if disk_full_message(e) is None:
            raise
        print(f"error: {disk_full_message(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
