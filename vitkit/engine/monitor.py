"""What a user sees of a run: a progress bar per epoch with the epoch's and the whole run's ETA (plain log lines
when output is not a terminal), an end-of-epoch summary, and the run directory's records: metrics.jsonl (one
line per epoch), steps.jsonl (one line per logged step), TensorBoard events, curves.png and run_info.json (git
revision, versions, device, command). Only the process that owns the run (rank 0) creates a `Monitor` with
`enabled=True`.

`Bar` is the progress bar of everything else that takes a while (validation, `vitkit validate`, `predict` over
many files, `export`'s steps): drawn only on a terminal, silent otherwise. Every layout here fits 80 columns
without cutting a number: fixed-width fields never shrink, only the bar itself does.
"""
from __future__ import annotations

import json
import math
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
import torchvision
from rich.console import Console, RenderableType
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Column
from rich.text import Text

import vitkit
from vitkit.io import atomic_write

METRICS = "metrics.jsonl"
STEPS = "steps.jsonl"
CURVES = "curves.png"
# Below this many columns the training bar puts its loss / lr / throughput on a second line.
ONE_LINE_WIDTH = 140
# curves.png: one colour per series, across both panels.
COLOURS = {"train_step": "tab:blue", "train_loss": "navy", "val_loss": "tab:orange", "val_top1": "tab:green",
           "val_top5": "tab:purple", "val_top1_ema": "tab:red"}


def _git_revision() -> str | None:
    root = Path(__file__).resolve().parents[2]
    try:
        out = subprocess.run(["git", "-C", str(root), "describe", "--always", "--dirty", "--abbrev=12"],
                             capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo's 'model name'; platform.processor() elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


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
        "cpu": cpu_model(),
        "cpu_threads": torch.get_num_threads(),
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


def _fixed(min_width: int = 0) -> Column:
    """A table column that never shrinks or wraps: numbers stay whole (no `0:03:…`)."""
    return Column(no_wrap=True, min_width=min_width)


def _bar_column() -> BarColumn:
    """The one flexible column: it takes what the fixed ones leave."""
    return BarColumn(bar_width=None, table_column=Column(ratio=1, min_width=6, no_wrap=True))


def is_live_terminal(console: Console) -> bool:
    """Whether `console` writes to a terminal that can redraw a bar (not a file, pipe, or TERM=dumb)."""
    return console.is_terminal and not console.is_dumb_terminal


class Bar:
    """A progress bar for a loop outside training: validation batches, predict's files, export's steps.

    Drawn (transient: gone when done, so what is printed after it stands alone) only when `enabled` and
    `console` (default: stderr, so stdout stays the results) is a terminal; otherwise every method is a
    no-op and callers never branch on it. Use as a context manager, or `start(total)` / `stop()`.
    """

    def __init__(self, label: str, *, total: int | None = None, console: Console | None = None,
                 enabled: bool = True, eta: bool = True, transient: bool = True):
        self.label, self.total, self.eta, self.transient = label, total, eta, transient
        self.console = console or Console(stderr=True)
        self.live = enabled and is_live_terminal(self.console)
        self._progress: Progress | None = None
        self._task: Any = None

    def start(self, total: int | None = None) -> Bar:
        if total is not None:
            self.total = total
        if not self.live or self._progress is not None:
            return self
        columns: list[Any] = [TextColumn("{task.description}", table_column=_fixed()), _bar_column(),
                              MofNCompleteColumn(table_column=_fixed()),
                              TextColumn("{task.fields[info]}", table_column=_fixed()),
                              TimeElapsedColumn(table_column=_fixed(7))]
        if self.eta:
            columns += [TextColumn("eta", table_column=_fixed()), TimeRemainingColumn(table_column=_fixed(7))]
        self._progress = Progress(*columns, console=self.console, transient=self.transient, expand=True)
        self._progress.start()
        self._task = self._progress.add_task(self.label, total=self.total, info="")
        return self

    def advance(self, n: int = 1, *, info: str | None = None) -> None:
        if self._progress is not None:
            self._progress.update(self._task, advance=n, **({} if info is None else {"info": info}))

    def update(self, *, completed: int | None = None, label: str | None = None, info: str | None = None) -> None:
        """A discrete change (export's next step): drawn at once, so a step shorter than rich's refresh
        interval (a quick reload) is still shown rather than skipped between two timed redraws."""
        if self._progress is not None:
            fields: dict[str, Any] = {} if info is None else {"info": info}
            self._progress.update(self._task, completed=completed, description=label, refresh=True, **fields)

    def stop(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    def __enter__(self) -> Bar:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class _TrainProgress(Progress):
    """The training bar; on a narrow terminal its loss / lr / throughput go on a second line."""

    stats_below = True

    def get_renderables(self) -> Iterable[RenderableType]:
        yield self.make_tasks_table(self.tasks)
        if self.stats_below:
            for task in self.tasks:
                yield Text("  " + task.fields.get("stats", ""), no_wrap=True, overflow="crop")


class Monitor:
    """Progress display and run records. Every method is a no-op when `enabled` is False (ranks > 0)."""

    def __init__(self, run_dir: str | Path, *, enabled: bool = True, log_interval: int = 100,
                 console: Console | None = None, clock: Callable[[], float] = time.perf_counter):
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self.log_interval = max(1, log_interval)
        self.console = console or Console(stderr=False)
        self.interactive = is_live_terminal(self.console)
        self.clock = clock
        self._progress: _TrainProgress | None = None
        self._task: Any = None
        self._tb: Any = None
        self._epoch, self._epochs, self._total, self._last_step = 0, 0, 0, 0
        self._run_start: tuple[float, int] | None = None  # (clock, global step) of this process's first step
        self.run_eta_s: float | None = None
        if enabled:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(self.run_dir / "tensorboard"))
            except ImportError:  # tensorboard is an optional extra (`vitkit[log]`)
                self.print("note: tensorboard is not installed; no event files (pip install tensorboard)")

    def print(self, text: str) -> None:
        """A line as is to a log file; on a terminal word-wrapped to its width (not cut by it mid-word)."""
        if self.enabled:
            self.console.print(text, markup=False, highlight=False, soft_wrap=not self.interactive)

    # -- run records ------------------------------------------------------------------------------------
    def write_json(self, name: str, data: dict[str, Any]) -> None:
        if self.enabled:
            (self.run_dir / name).write_text(json.dumps(data, indent=1, default=str) + "\n")

    def write_text(self, name: str, text: str) -> None:
        if self.enabled:
            (self.run_dir / name).write_text(text)

    def truncate_metrics(self, last_epoch: int, step: int | None = None) -> None:
        """On resume (or rollback): drop records after the checkpoint (an interrupted continuation wrote them):
        metrics.jsonl's epochs after `last_epoch`, steps.jsonl's steps after `step` (when given, exact for a
        mid-epoch checkpoint) or else after the end of `last_epoch`."""
        if not self.enabled:
            return
        for name, keep in ((METRICS, lambda r: r.get("epoch", 0) <= last_epoch),
                           (STEPS, lambda r: r.get("step", 0) <= step if step is not None
                            else (r.get("epoch") or 0) <= last_epoch)):
            path = self.run_dir / name
            if path.is_file():
                kept = [line for line in path.read_text().splitlines() if line.strip() and keep(json.loads(line))]
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
        """Step-level scalars: one line of steps.jsonl (what curves.png draws the train loss from) and
        TensorBoard's train/*. `epoch` in the line is fractional: step / steps per epoch."""
        if not self.enabled:
            return
        record: dict[str, Any] = {"step": step, "epoch": round(step / self._total, 6) if self._total else None}
        record.update({k: float(v) for k, v in values.items()})
        with open(self.run_dir / STEPS, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for key, value in values.items():
                self._tb.add_scalar(f"train/{key}", value, step)

    # -- progress ---------------------------------------------------------------------------------------
    def start_epoch(self, epoch: int, epochs: int, total: int, done: int, last_step: int | None = None) -> None:
        """Epoch `epoch` (0-based) of `epochs`, `total` steps long, `done` of them already (a resume).
        `last_step`: the global step this run stops at (max_steps), by default the end of the last epoch."""
        if not self.enabled:
            return
        self._epoch, self._epochs, self._total = epoch, epochs, total
        self._last_step = last_step if last_step is not None else epochs * total
        if self._run_start is None:
            self._run_start = (self.clock(), epoch * total + done)
        if self.interactive:
            below = self.console.width < ONE_LINE_WIDTH
            columns: list[Any] = [
                TextColumn(f"epoch {epoch + 1}/{epochs}", table_column=_fixed()), _bar_column(),
                MofNCompleteColumn(table_column=_fixed(2 * len(str(total)) + 1)),
                *([] if below else [TextColumn("{task.fields[stats]}", table_column=_fixed())]),
                TimeElapsedColumn(table_column=_fixed(7)), TextColumn("{task.fields[eta]}", table_column=_fixed())]
            self._progress = _TrainProgress(*columns, console=self.console, transient=False, expand=True)
            self._progress.stats_below = below
            self._progress.start()
            self._task = self._progress.add_task("train", total=total, completed=done, stats="",
                                                 eta=self._eta_text(None, None))

    def _run_eta(self, done: int) -> float | None:
        """Seconds left in the run at step `done` of this epoch: the run's own pace since this process's first
        step (so time spent validating and saving between epochs counts), times the steps left."""
        if self._run_start is None:
            return None
        start, first = self._run_start
        step = self._epoch * self._total + done
        if step <= first:
            return None
        return (self.clock() - start) / (step - first) * max(0, self._last_step - step)

    @staticmethod
    def _eta_text(epoch_eta: float | None, run_eta: float | None) -> str:
        def fmt(s: float | None) -> str:
            return "-:--" if s is None else format_duration(s)

        return f"eta {fmt(epoch_eta)} | run eta {fmt(run_eta)}"

    def update(self, done: int, stats: dict[str, float], eta_s: float) -> None:
        """After a step: refresh the bar, or print a line every `log_interval` steps."""
        if not self.enabled:
            return
        self.run_eta_s = self._run_eta(done)
        text = (f"loss {stats['loss']:.4f}  lr {stats['lr']:.3g}  {stats['images_per_s']:.0f} img/s  "
                f"data {100 * stats['data_wait']:.0f}%")
        if self._progress is not None:
            self._progress.update(self._task, completed=done, stats=text, eta=self._eta_text(eta_s, self.run_eta_s))
        elif done % self.log_interval == 0 or done == self._total:
            self.print(f"epoch {self._epoch + 1}/{self._epochs} step {done}/{self._total}  {text}  "
                       f"eta {format_duration(eta_s)}")

    def end_epoch(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    def progress_bar(self, label: str, total: int | None = None) -> Bar:
        """A `Bar` on this run's console (validation during training: `evaluate(..., progress=...)`); silent on
        ranks > 0 and when the output is not a terminal."""
        return Bar(label, total=total, console=self.console, enabled=self.enabled)

    def close(self) -> None:
        self.end_epoch()
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def plot_curves(self) -> Path | None:
        """curves.png from metrics.jsonl and steps.jsonl (see `curves_figure`); None without matplotlib."""
        path = self.run_dir / METRICS
        if not self.enabled or not path.is_file():
            return None
        records = read_jsonl(path)
        if not records:
            return None
        try:
            fig = curves_figure(records, read_jsonl(self.run_dir / STEPS))
        except ImportError:  # matplotlib is an optional extra (`vitkit[log]`)
            return None
        out = self.run_dir / CURVES
        fig.savefig(out, dpi=100)
        return out


MAX_COUNTED_CLASSES = 20  # up to this many classes every cell of the confusion PNG shows its count
MAX_LABELLED_CLASSES = 50  # beyond this the class names are unreadable; the CSV has them


def confusion_figure(cm: torch.Tensor, names: list[str], title: str | None = None) -> Any:
    """The matplotlib Figure of the confusion matrix PNG: counts coloured (with a colour bar), each cell's
    count written in it up to MAX_COUNTED_CLASSES classes, class names up to MAX_LABELLED_CLASSES, `title`."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    n = len(names)
    counts = cm.numpy()
    size = min(4 + 0.4 * n, 40)
    fig = Figure(figsize=(size + 1.5, size))
    ax = fig.subplots()
    image = ax.imshow(counts, cmap="Blues", vmin=0, vmax=max(1, int(counts.max())))
    bar = fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    bar.set_label("images")
    bar.locator = MaxNLocator(integer=True)
    bar.update_ticks()
    if n <= MAX_COUNTED_CLASSES:
        dark = 0.55 * max(1, int(counts.max()))  # white text where the cell is dark enough
        fontsize = 10 if n <= 10 else 7
        for i in range(n):
            for j in range(n):
                value = int(counts[i, j])
                ax.text(j, i, str(value), ha="center", va="center", fontsize=fontsize,
                        color="white" if value > dark else ("black" if value else "0.6"))
    if n <= MAX_LABELLED_CLASSES:
        ax.set_xticks(range(n), names, rotation=90)
        ax.set_yticks(range(n), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return fig


def plot_confusion(cm: torch.Tensor, names: list[str], path: Path, title: str | None = None) -> Path | None:
    """confusion.png-style picture of `cm` at `path` (atomic); None without matplotlib."""
    try:
        fig = confusion_figure(cm, names, title)
    except ImportError:  # matplotlib is an optional extra (`vitkit[log]`)
        return None
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    return path


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def curves_figure(records: list[dict[str, Any]], steps: list[dict[str, Any]] | None = None) -> Any:
    """The matplotlib Figure of curves.png. Left: train loss at every logged step (`steps`, steps.jsonl),
    the epoch means and validation loss; right, only when the run validated: validation top-1 / top-5 (and
    EMA top-1). x in epochs with integer ticks, validation points marked, one colour per series."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    by_step: dict[int, dict[str, Any]] = {}
    for r in steps or []:  # a resumed or rolled-back run may have logged a step twice: the last one counts
        if r.get("loss") is not None and r.get("epoch") is not None:
            by_step[int(r["step"])] = r
    points = [by_step[k] for k in sorted(by_step)]

    def series(key: str) -> tuple[list[float], list[float]]:
        kept = [r for r in records if r.get(key) is not None]
        return [r["epoch"] for r in kept], [r[key] for r in kept]

    accuracy = [(k, label, marker) for k, label, marker in (("val_top1", "val top-1", "o"), ("val_top5", "val top-5",
                                                            "s"), ("val_top1_ema", "EMA top-1", "^"))
                if series(k)[0]]
    fig = Figure(figsize=(10, 3.8) if accuracy else (6, 3.8))
    axes = fig.subplots(1, 2 if accuracy else 1, squeeze=False)[0]
    loss_ax = axes[0]
    if points:
        loss_ax.plot([r["epoch"] for r in points], [r["loss"] for r in points], color=COLOURS["train_step"],
                     linewidth=1, alpha=0.8, marker="." if len(points) < 3 else None, label="train loss (step)")
    x, y = series("train_loss")
    loss_ax.plot(x, y, color=COLOURS["train_loss"], marker="D", markersize=4, linestyle="--" if points else "-",
                 linewidth=1, label="train loss (epoch mean)")
    x, y = series("val_loss")
    if x:
        loss_ax.plot(x, y, color=COLOURS["val_loss"], marker="o", label="val loss")
    loss_ax.set_ylabel("loss")
    loss_ax.set_title("loss")
    for key, label, marker in accuracy:
        x, y = series(key)
        axes[1].plot(x, y, color=COLOURS[key], marker=marker, label=label)
    if accuracy:
        axes[1].set_ylabel("accuracy (%)")
        axes[1].set_title("validation")
    last = max([r["epoch"] for r in records] + [r["epoch"] for r in points])
    for ax in axes:
        ax.set_xlabel("epoch")
        end = max(1, math.ceil(last))
        ax.set_xlim(0, end * 1.03)  # room for the last markers
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.tight_layout()
    return fig


def format_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"
