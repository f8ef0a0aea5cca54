"""What a user sees of a run: a progress bar per epoch (plain log lines when output is not a terminal), an
end-of-epoch summary, and the run directory's records: metrics.jsonl, TensorBoard events, curves.png and
run_info.json (git revision, versions, device, command). Only the process that owns the run (rank 0)
creates a `Monitor` with `enabled=True`.
"""
from __future__ import annotations

import json
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torchvision
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

import vitkit

METRICS = "metrics.jsonl"
CURVES = "curves.png"


def _git_revision() -> str | None:
    root = Path(__file__).resolve().parents[2]
    try:
        out = subprocess.run(["git", "-C", str(root), "describe", "--always", "--dirty", "--abbrev=12"],
                             capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def run_info(device: torch.device, argv: list[str] | None = None) -> dict[str, Any]:
    """Where and how a run ran: enough to reproduce it or explain a difference."""
    info: dict[str, Any] = {
        "command": " ".join(argv if argv is not None else sys.argv),
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "git_revision": _git_revision(),
        "vitkit": vitkit.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "platform": platform.platform(),
        "cpu_threads": torch.get_num_threads(),
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


class Monitor:
    """Progress display and run records. Every method is a no-op when `enabled` is False (ranks > 0)."""

    def __init__(self, run_dir: str | Path, *, enabled: bool = True, log_interval: int = 100,
                 console: Console | None = None):
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self.log_interval = max(1, log_interval)
        self.console = console or Console(stderr=False)
        self.interactive = self.console.is_terminal
        self._progress: Progress | None = None
        self._task: Any = None
        self._tb: Any = None
        if enabled:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(self.run_dir / "tensorboard"))
            except ImportError:  # tensorboard is an optional extra (`vitkit[log]`)
                self.print("note: tensorboard is not installed; no event files (pip install tensorboard)")

    def print(self, text: str) -> None:
        if self.enabled:
            self.console.print(text, markup=False, highlight=False, soft_wrap=True)

    # -- run records ------------------------------------------------------------------------------------
    def write_json(self, name: str, data: dict[str, Any]) -> None:
        if self.enabled:
            (self.run_dir / name).write_text(json.dumps(data, indent=1, default=str) + "\n")

    def write_text(self, name: str, text: str) -> None:
        if self.enabled:
            (self.run_dir / name).write_text(text)

    def truncate_metrics(self, last_epoch: int) -> None:
        """On resume: drop records of epochs after the checkpoint (an interrupted continuation wrote them)."""
        path = self.run_dir / METRICS
        if not self.enabled or not path.is_file():
            return
        kept = [line for line in path.read_text().splitlines()
                if line.strip() and json.loads(line).get("epoch", 0) <= last_epoch]
        path.write_text("".join(line + "\n" for line in kept))

    def log_epoch(self, record: dict[str, Any], step: int) -> None:
        """One line of metrics.jsonl and the same scalars in TensorBoard."""
        if not self.enabled:
            return
        with open(self.run_dir / METRICS, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for key, value in record.items():
                if key != "epoch" and isinstance(value, (int, float)) and value is not None:
                    self._tb.add_scalar(f"epoch/{key}", value, step)
            self._tb.flush()

    def log_step(self, values: dict[str, float], step: int) -> None:
        if self.enabled and self._tb is not None:
            for key, value in values.items():
                self._tb.add_scalar(f"train/{key}", value, step)

    # -- progress ---------------------------------------------------------------------------------------
    def start_epoch(self, epoch: int, epochs: int, total: int, done: int) -> None:
        if not self.enabled:
            return
        if self.interactive:
            self._progress = Progress(
                TextColumn(f"epoch {epoch + 1}/{epochs}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[stats]}"), TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
                console=self.console, transient=False)
            self._progress.start()
            self._task = self._progress.add_task("train", total=total, completed=done, stats="")
        self._epoch, self._epochs, self._total = epoch, epochs, total

    def update(self, done: int, stats: dict[str, float], eta_s: float) -> None:
        """After a step: refresh the bar, or print a line every `log_interval` steps."""
        if not self.enabled:
            return
        text = (f"loss {stats['loss']:.4f}  lr {stats['lr']:.3g}  {stats['images_per_s']:.0f} img/s  "
                f"data {100 * stats['data_wait']:.0f}%")
        if self._progress is not None:
            self._progress.update(self._task, completed=done, stats=text)
        elif done % self.log_interval == 0 or done == self._total:
            self.print(f"epoch {self._epoch + 1}/{self._epochs} step {done}/{self._total}  {text}  "
                       f"eta {format_duration(eta_s)}")

    def end_epoch(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    def close(self) -> None:
        self.end_epoch()
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def plot_curves(self) -> Path | None:
        """curves.png from metrics.jsonl: train loss, and validation top-1 when there is one."""
        path = self.run_dir / METRICS
        if not self.enabled or not path.is_file():
            return None
        records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        if not records:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        epochs = [r["epoch"] for r in records]
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
        axes[0].plot(epochs, [r["train_loss"] for r in records], marker="o", label="train loss")
        if any(r.get("val_loss") is not None for r in records):
            axes[0].plot(epochs, [r.get("val_loss") for r in records], marker="o", label="val loss")
        axes[0].set_xlabel("epoch")
        axes[0].set_ylabel("loss")
        axes[0].legend()
        for key, label in (("val_top1", "val top-1"), ("val_top5", "val top-5"), ("val_top1_ema", "EMA top-1")):
            if any(r.get(key) is not None for r in records):
                axes[1].plot(epochs, [r.get(key) for r in records], marker="o", label=label)
        axes[1].set_xlabel("epoch")
        axes[1].set_ylabel("accuracy (%)")
        if axes[1].lines:
            axes[1].legend()
        else:
            axes[1].text(0.5, 0.5, "no validation (val_while_train: false)", ha="center", va="center")
        fig.tight_layout()
        out = self.run_dir / CURVES
        fig.savefig(out, dpi=100)
        plt.close(fig)
        return out


def format_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"
