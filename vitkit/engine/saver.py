"""Which checkpoints a run keeps.

Files in the run directory (`ckpt_save_dir`):
  last.safetensors (+ last.state.pt)      the newest state, written at every save; `--resume true` reads it
  prev.safetensors (+ prev.state.pt)      the save before it (hard links): what `--resume true` reads when a
                                          kill or a full disk tore `last` between its two files
  <model>-e<epoch>.safetensors (+ .state.pt)  epoch checkpoints kept by the policy:
                                          latest_k: the newest `keep_checkpoint_max`;
                                          top_k: the `keep_checkpoint_max` best by validation top-1
  best.safetensors (+ .state.pt)          the best validation top-1 so far
  checkpoints.json                        the index: file, epoch, step, val_top1 of each kept checkpoint
Epoch and best files are hard links to `last` (no second write; a later `last` replaces the name, not the
data). Which epoch or step a file holds is read from its metadata, never parsed out of its name. Smoke runs
keep no epoch files (`epoch_files=False`) and drop `prev` once the run is done: one checkpoint, as last and best.

A run folder is one run: a new run refuses a folder that already holds one (`used_by_run`), `--overwrite`
removes the previous run's files first (`clear_run`: vitkit's own files only, never anything else there).
"""
from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vitkit.engine.checkpoint import is_complete_pair, state_path
from vitkit.engine.monitor import CURVES, METRICS
from vitkit.io import atomic_write

LAST = "last.safetensors"
PREV = "prev.safetensors"
BEST = "best.safetensors"
INDEX = "checkpoints.json"
CONFIG = "config.yaml"
RUN_INFO = "run_info.json"
TENSORBOARD = "tensorboard"
CARD = "README.md"  # the model card of `best` (vitkit/engine/card.py)
CONFUSION = "confusion.png"  # the confusion matrix of `best` on the validation split
# A folder holding any of these holds a run (regular files only: a planted /dev/full link is no run).
RUN_MARKERS = (LAST, INDEX, METRICS, CONFIG)
# steps.jsonl: the monitor's step records
RUN_RECORDS = (INDEX, METRICS, "steps.jsonl", CONFIG, RUN_INFO, CURVES, CARD, CONFUSION)
# Checkpoint pairs a run writes: last, prev, best and <model>-e<epoch>; their temporaries (.<name>.<x>.tmp/.link).
_CHECKPOINT = re.compile(r"(last|prev|best|.+-e\d{4,})\.(safetensors|state\.pt)")
_TEMPORARY = re.compile(r"\.(?P<name>.+?)\.(\w+\.tmp|link)")


def _place(src: Path, dst: Path) -> None:
    """Make `dst` hold `src`'s bytes atomically: a hard link under a temporary name, then a rename."""
    tmp = dst.with_name(f".{dst.name}.link")
    if tmp.exists():
        tmp.unlink()
    try:
        os.link(src, tmp)
    except OSError:  # file systems without hard links
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def _place_pair(src: Path, dst: Path) -> None:
    if state_path(src).exists():
        _place(state_path(src), state_path(dst))
    _place(src, dst)  # weights last: their presence means the pair is complete


def _remove_pair(path: Path) -> None:
    for p in (state_path(path), path):
        if p.exists():
            p.unlink()


class CheckpointSaver:
    """Writes `last`, and keeps epoch and best checkpoints by policy."""

    def __init__(self, run_dir: str | Path, *, model_name: str, policy: str = "latest_k", keep_max: int = 10,
                 epoch_files: bool = True):
        self.run_dir = Path(run_dir)
        self.model_name, self.policy, self.keep_max = model_name, policy, keep_max
        self.epoch_files = epoch_files  # False (smoke runs): last and best only
        index = self._read_index()
        self.entries: list[dict[str, Any]] = index.get("checkpoints", [])
        self.best_top1: float | None = index.get("best_top1")

    def _read_index(self) -> dict[str, Any]:
        path = self.run_dir / INDEX
        if not path.is_file():
            return {}
        try:
            return json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            return {}

    def _write_index(self) -> None:
        data = {"policy": self.policy, "keep_checkpoint_max": self.keep_max, "best_top1": self.best_top1,
                "checkpoints": self.entries}
        atomic_write(self.run_dir / INDEX, lambda tmp: Path(tmp).write_text(json.dumps(data, indent=1)))

    @property
    def last(self) -> Path:
        return self.run_dir / LAST

    def forget_after(self, step: int) -> None:
        """Resuming from `step`: entries of a later (abandoned) continuation no longer describe this run."""
        self.entries = [e for e in self.entries if e["step"] <= step]

    def save(self, write: Callable[[Path], None], *, epoch: int, step: int, val_top1: float | None,
             keep_epoch: bool) -> Path:
        """`write(path)` writes a checkpoint pair atomically (a new file replacing the name, as `atomic_write`
        does; never in place, which would change the linked epoch and best files too). This calls it for
        `last`, then links the epoch and best files. Returns the path of `last`."""
        # Temporaries of writes a kill interrupted (atomic_write names them .<name>.<random>.tmp).
        for name in (LAST, state_path(LAST).name, INDEX):
            for tmp in self.run_dir.glob(f".{name}.*.tmp"):
                tmp.unlink(missing_ok=True)
        if is_complete_pair(self.last):  # keep it until the new `last` is whole (never a torn pair as prev)
            _place_pair(self.last, self.run_dir / PREV)
        write(self.last)
        if keep_epoch and self.epoch_files:
            name = f"{self.model_name}-e{epoch:04d}.safetensors"
            _place_pair(self.last, self.run_dir / name)
            self.entries = [e for e in self.entries if e["file"] != name]
            self.entries.append({"file": name, "epoch": epoch, "step": step, "val_top1": val_top1})
            self._prune()
        if val_top1 is not None and (self.best_top1 is None or val_top1 > self.best_top1):
            self.best_top1 = val_top1
            _place_pair(self.last, self.run_dir / BEST)
        self._write_index()
        return self.last

    def drop_prev(self) -> None:
        """The run is done and `last` is whole: `prev` (the save before it) is no longer needed."""
        if is_complete_pair(self.last):
            _remove_pair(self.run_dir / PREV)

    def _prune(self) -> None:
        if self.policy == "top_k":
            ranked = sorted(self.entries, key=lambda e: (e["val_top1"] if e["val_top1"] is not None else -1.0,
                                                         e["step"]), reverse=True)
        else:
            ranked = sorted(self.entries, key=lambda e: e["step"], reverse=True)
        keep, drop = ranked[: self.keep_max], ranked[self.keep_max:]
        for e in drop:
            _remove_pair(self.run_dir / e["file"])
        self.entries = sorted(keep, key=lambda e: e["step"])


# -- the run folder ------------------------------------------------------------------------------------------------

def used_by_run(run_dir: str | Path) -> list[str]:
    """The files that say `run_dir` already holds a run (empty when it holds none)."""
    run_dir = Path(run_dir)
    return [name for name in RUN_MARKERS if (run_dir / name).is_file()]


def next_free_run_dir(run_dir: str | Path) -> Path:
    """`D-2`, `D-3`, ...: the first sibling name of `run_dir` that holds no run."""
    run_dir = Path(run_dir)
    if not run_dir.name:  # `.` or `./`: name it by where it is
        run_dir = run_dir.resolve()
    n = 2
    while used_by_run(run_dir.parent / f"{run_dir.name or 'run'}-{n}"):
        n += 1
    return run_dir.parent / f"{run_dir.name or 'run'}-{n}"


def _is_run_file(name: str) -> bool:
    temporary = _TEMPORARY.fullmatch(name)
    if temporary:
        name = temporary["name"]
    return name in RUN_RECORDS or _CHECKPOINT.fullmatch(name) is not None


def run_files(run_dir: str | Path) -> list[Path]:
    """vitkit's own files of a run in `run_dir`: checkpoint pairs, records, tensorboard/ (nothing else there)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = [p for p in run_dir.iterdir() if (p.is_file() or p.is_symlink()) and _is_run_file(p.name)]
    if (run_dir / TENSORBOARD).is_dir():
        found.append(run_dir / TENSORBOARD)
    return sorted(found)


def clear_run(run_dir: str | Path) -> list[Path]:
    """Remove the previous run's files from `run_dir` (`run_files`); returns what was removed."""
    removed = run_files(run_dir)
    for p in removed:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink(missing_ok=True)
    return removed
