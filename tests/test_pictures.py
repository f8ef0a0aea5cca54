"""The pictures (issue 18, item 6): the confusion matrix PNG has counts, a colour bar and a title with the model
and top-1; curves.png draws train loss per logged step (steps.jsonl) on an epoch axis with integer ticks,
marks validation points, has no accuracy panel without validation and one colour per series.

Each picture is built by a function returning its matplotlib Figure, so the elements are checked here
programmatically; the PNG files are checked to exist and be images.
"""
from __future__ import annotations

import io
import json
import math
from pathlib import Path

import pytest
import torch
from PIL import Image
from rich.console import Console

import vitkit.engine.monitor as monitor
from vitkit.cli import main as cli_main
from vitkit.data.preprocess import DataConfig
from vitkit.engine.checkpoint import save_checkpoint
from vitkit.engine.monitor import STEPS, Monitor, confusion_figure, curves_figure, read_jsonl
from vitkit.models import create_model, get_spec
from vitkit.tools.validate import run_validate

to_hex = pytest.importorskip("matplotlib.colors").to_hex  # matplotlib is the optional `log` extra

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "data" / "cifar10_sample"
CLASSES = sorted(p.name for p in (SAMPLE / "test").iterdir())


def tick_labels(ax) -> list[str]:
    ax.figure.canvas.draw()  # tick labels are only formatted at draw time
    lo, hi = ax.get_xlim()
    return [t.get_text() for t, v in zip(ax.get_xticklabels(), ax.get_xticks()) if lo <= v <= hi]


def line_colours(fig) -> list[str]:
    return [to_hex(line.get_color()) for ax in fig.axes for line in ax.get_lines()]


def by_label(ax, label: str):
    (line,) = [x for x in ax.get_lines() if x.get_label() == label]
    return line


# -- confusion matrix -------------------------------------------------------------------------------------------

def test_confusion_figure_has_counts_a_colour_bar_and_a_title() -> None:
    cm = torch.tensor([[5, 1, 0], [2, 7, 1], [0, 0, 9]])
    fig = confusion_figure(cm, ["cat", "dog", "bird"], "vit_n_4_32 on val: top-1 84.00% (25 images)")
    ax, bar = fig.axes
    assert ax.get_title() == "vit_n_4_32 on val: top-1 84.00% (25 images)"
    assert bar.get_ylabel() == "images" and bar.get_label() == "<colorbar>"  # the colour bar's own axes
    counts = {(round(t.get_position()[1]), round(t.get_position()[0])): t.get_text() for t in ax.texts}
    assert len(ax.texts) == 9
    assert counts == {(i, j): str(int(cm[i, j])) for i in range(3) for j in range(3)}
    # readable on every cell: white on the darkest, dark on the light ones
    assert to_hex(next(t for t in ax.texts if t.get_text() == "9").get_color()) == "#ffffff"
    assert to_hex(next(t for t in ax.texts if t.get_text() == "1").get_color()) == "#000000"
    assert [t.get_text() for t in ax.get_xticklabels()] == ["cat", "dog", "bird"]


def test_confusion_figure_leaves_counts_out_beyond_20_classes() -> None:
    names = [f"c{i}" for i in range(21)]
    fig = confusion_figure(torch.eye(21, dtype=torch.long) * 3, names)
    ax, bar = fig.axes
    assert len(ax.texts) == 0 and bar.get_ylabel() == "images" and ax.get_title() == ""
    assert len(confusion_figure(torch.eye(20, dtype=torch.long), names[:20]).axes[0].texts) == 400


def test_vitkit_validate_writes_the_png_with_model_and_top1_in_its_title(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    data = tmp_path / "data"
    for c in CLASSES:
        (data / "test" / c).mkdir(parents=True)
        for f in sorted((SAMPLE / "test" / c).iterdir())[:3]:
            (data / "test" / c / f.name).symlink_to(f)
    torch.manual_seed(0)
    spec = get_spec("vit_n_4_32")
    ckpt = save_checkpoint(tmp_path / "c.safetensors", create_model("vit_n_4_32", depth=1), model_name="vit_n_4_32",
                           class_names=CLASSES,
                           data_config=DataConfig(32, spec.mean, spec.std, spec.interpolation, spec.crop_pct))
    figures = []

    def keep(*args, **kwargs):
        figures.append(confusion_figure(*args, **kwargs))
        return figures[-1]

    monkeypatch.setattr(monitor, "confusion_figure", keep)
    csv_path = tmp_path / "cm.csv"
    got = run_validate(["--ckpt_path", str(ckpt), "--data_dir", str(data), "--dataset", "imagefolder",
                        "--val_split", "test", "--num_parallel_workers", "0", "--confusion_matrix", str(csv_path)])
    (fig,) = figures
    assert fig.axes[0].get_title() == f"vit_n_4_32 on test: top-1 {got['top1']:.2f}% (30 images)"
    assert sum(int(t.get_text()) for t in fig.axes[0].texts) == 30 and len(fig.axes[0].texts) == 100
    with Image.open(csv_path.with_suffix(".png")) as img:
        assert img.format == "PNG" and img.width > 500


# -- curves.png ---------------------------------------------------------------------------------------------------

def _run_records(epochs: int, spe: int, *, val_every: int | None, ema: bool = False,
                 log_interval: int = 1) -> tuple[list[dict], list[dict]]:
    steps = [{"step": s, "epoch": s / spe, "loss": 2.3 * math.exp(-s / 50), "lr": 1e-3}
             for s in range(log_interval, epochs * spe + 1, log_interval)]
    records = []
    for e in range(1, epochs + 1):
        r = {"epoch": e, "step": e * spe, "train_loss": 2.3 * math.exp(-e * spe / 50), "val_top1": None,
             "val_top5": None}
        if val_every and (e % val_every == 0 or e == epochs):
            r.update(val_top1=10.0 * e, val_top5=20.0 + 5 * e, val_loss=2.0 - 0.1 * e)
            if ema:
                r["val_top1_ema"] = 11.0 * e
        records.append(r)
    return records, steps


def test_curves_plot_every_logged_step_on_integer_epoch_ticks_with_validation_marked() -> None:
    records, steps = _run_records(7, 30, val_every=3, ema=True, log_interval=5)
    fig = curves_figure(records, steps)
    loss_ax, acc_ax = fig.axes
    step_line = by_label(loss_ax, "train loss (step)")
    assert list(step_line.get_xdata()) == pytest.approx([s["epoch"] for s in steps])  # 42 points, not 7
    assert len(step_line.get_xdata()) == 42
    for ax in (loss_ax, acc_ax):
        labels = tick_labels(ax)
        assert labels and all(t.lstrip("−-").isdigit() for t in labels), labels  # no 1.5, 2.5 ...
        assert ax.get_xlabel() == "epoch"
    val = by_label(acc_ax, "val top-1")
    assert list(val.get_xdata()) == [3, 6, 7] and val.get_marker() not in (None, "None", "")
    assert by_label(loss_ax, "val loss").get_marker() not in (None, "None", "")
    assert {x.get_label() for x in acc_ax.get_lines()} == {"val top-1", "val top-5", "EMA top-1"}
    colours = line_colours(fig)
    assert len(colours) == 6 and len(set(colours)) == 6  # one colour per series across both panels


def test_curves_without_validation_have_no_accuracy_panel() -> None:
    records, steps = _run_records(1, 40, val_every=None, log_interval=10)
    fig = curves_figure(records, steps)
    (loss_ax,) = fig.axes
    assert len(by_label(loss_ax, "train loss (step)").get_xdata()) == 4  # a 1-epoch run is a curve, not a dot
    assert tick_labels(loss_ax) == ["0", "1"]
    assert [x.get_label() for x in loss_ax.get_lines()] == ["train loss (step)", "train loss (epoch mean)"]


def test_curves_keep_the_last_record_of_a_step_logged_twice() -> None:
    records, _ = _run_records(1, 4, val_every=None)
    steps = [{"step": 1, "epoch": 0.25, "loss": 9.0}, {"step": 2, "epoch": 0.5, "loss": 9.0},
             {"step": 1, "epoch": 0.25, "loss": 1.0}, {"step": 2, "epoch": 0.5, "loss": 2.0}]  # resumed from step 0
    line = by_label(curves_figure(records, steps).axes[0], "train loss (step)")
    assert list(line.get_ydata()) == [1.0, 2.0]


def test_monitor_writes_steps_jsonl_on_rank_0_and_truncates_it_on_resume(tmp_path: Path) -> None:
    quiet = Console(file=io.StringIO())
    m = Monitor(tmp_path / "run", console=quiet)
    other = Monitor(tmp_path / "rank1", console=quiet, enabled=False)
    for mon in (m, other):
        mon.start_epoch(0, 2, 4, 0)
        for step in range(1, 5):
            mon.log_step({"loss": 1.0 / step, "lr": 0.1, "grad_norm": 2.0}, step)
        mon.log_epoch({"epoch": 1, "step": 4, "train_loss": 0.5, "val_top1": None}, 4)
        mon.start_epoch(1, 2, 4, 0)
        mon.log_step({"loss": 0.1, "lr": 0.1, "grad_norm": 2.0}, 6)
    assert not (tmp_path / "rank1").exists()
    rows = read_jsonl(tmp_path / "run" / STEPS)
    assert [(r["step"], r["epoch"]) for r in rows] == [(1, 0.25), (2, 0.5), (3, 0.75), (4, 1.0), (6, 1.5)]
    assert rows[0] == {"step": 1, "epoch": 0.25, "loss": 1.0, "lr": 0.1, "grad_norm": 2.0}
    m.truncate_metrics(1)  # resumed from the end of epoch 1: step 6 was written after it
    assert [r["step"] for r in read_jsonl(tmp_path / "run" / STEPS)] == [1, 2, 3, 4]
    assert m.plot_curves() == tmp_path / "run" / "curves.png"
    m.truncate_metrics(0, step=3)  # a mid-epoch checkpoint at step 3 (no epoch completed)
    assert [r["step"] for r in read_jsonl(tmp_path / "run" / STEPS)] == [1, 2, 3]
    assert read_jsonl(tmp_path / "run" / "metrics.jsonl") == []
    m.close()


@pytest.fixture()
def one_thread():
    """Tiny models on a shared 2-core machine: spinning OpenMP threads only slow them down."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_a_training_run_without_validation_plots_its_steps(tmp_path: Path, one_thread) -> None:
    run_dir = tmp_path / "run"
    assert cli_main(["train", "--smoke", "--no-val_while_train", "--device", "cpu", "--ckpt_save_dir",
                     str(run_dir)]) == 0
    steps = [json.loads(line) for line in (run_dir / STEPS).read_text().splitlines()]
    assert [s["step"] for s in steps] == list(range(1, 9))  # --smoke logs every step: 2 epochs of 4
    fig = curves_figure(read_jsonl(run_dir / "metrics.jsonl"), steps)
    assert len(fig.axes) == 1 and len(by_label(fig.axes[0], "train loss (step)").get_xdata()) == 8
    with Image.open(run_dir / "curves.png") as img:
        assert img.format == "PNG" and img.width == 600  # one panel
