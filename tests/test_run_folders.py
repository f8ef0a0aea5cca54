"""Run folders and hand-shrunk recipes (issue 18, items 1 and 4: a new user's first hour).

A folder holds one run: a second run into it is refused (--resume continues it, --overwrite replaces it), a run
given no folder gets a fresh timestamped one (and `--resume` alone finds the newest), a failed start leaves
nothing behind, and `--resume` of a finished run does nothing. `--epoch_size N` over a recipe scales its
warmup and decay, smoke runs keep one checkpoint, `--ckpt_path ""` is no checkpoint.

Runs are `vitkit train` in this process (one thread) on 20 training and 10 test images of the bundled
CIFAR-10 sample: vit_n_4_32 at 32 px, 2 steps per epoch.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch

from vitkit.cli import main as cli_main
from vitkit.engine.checkpoint import load_checkpoint
from vitkit.engine.config import resolve

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "data" / "cifar10_sample"
B32 = ROOT / "configs" / "vit" / "vit_b32_224.yaml"
STAMP = re.compile(r"\d{8}-\d{6}(-\d+)?")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny steps: spinning OpenMP threads on a shared 2-core machine only slow them down."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """2 training and 1 test image per class, linked from the bundled sample."""
    root = tmp_path_factory.mktemp("tiny")
    for split, n in (("train", 2), ("test", 1)):
        for cls in sorted(p.name for p in (SAMPLE / split).iterdir()):
            (root / split / cls).mkdir(parents=True)
            for f in sorted((SAMPLE / split / cls).iterdir())[:n]:
                (root / split / cls / f.name).symlink_to(f)
    return root


def tiny(data: Path, *extra: str) -> list[str]:
    """2 epochs of 2 steps, validated after each (so the run has a best checkpoint)."""
    return ["train", "--model", "vit_n_4_32", "--dataset", "imagefolder", "--data_dir", str(data),
            "--val_split", "test", "--image_resize", "32", "--batch_size", "8", "--num_parallel_workers", "0",
            "--epoch_size", "2", "--warmup_epochs", "1", "--val_while_train", "--device", "cpu",
            "--log_interval", "100", *extra]


def cli(capsys, *argv: str) -> tuple[int, str, list[str]]:
    """`vitkit ...` in this process: (exit code, stdout, stderr lines)."""
    capsys.readouterr()
    rc = cli_main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err.splitlines()


def snapshot(folder: Path) -> dict[str, tuple[int, bytes]]:
    """Every file under `folder` (TensorBoard events too): its mtime and bytes."""
    return {str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.read_bytes())
            for p in sorted(folder.rglob("*")) if p.is_file()}


def epochs(run_dir: Path) -> list[int]:
    return [json.loads(line)["epoch"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def finished(data, tmp_path_factory) -> Path:
    """A complete run (2 epochs, step 4); tests work on copies of it."""
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    assert cli_main(tiny(data, "--ckpt_save_dir", str(run_dir))) == 0
    assert epochs(run_dir) == [1, 2] and load_checkpoint(run_dir / "last.safetensors").step == 4
    return run_dir


def copy_of(run_dir: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(run_dir, dst, copy_function=shutil.copy2)
    return dst


# -- a folder holds one run --------------------------------------------------------------------------------------

def test_second_run_into_a_used_folder_is_refused_and_changes_nothing(finished, data, tmp_path, capsys):
    run_dir = copy_of(finished, tmp_path)
    before = snapshot(run_dir)
    rc, out, err = cli(capsys, *tiny(data, "--ckpt_save_dir", str(run_dir)))
    assert rc == 2 and "Traceback" not in "\n".join(err)
    (line,) = [x for x in err if x.startswith("error:")]
    assert line == err[-1] and f"{run_dir} already holds a run" in line
    assert "--resume" in line and "--overwrite" in line and f"--ckpt_save_dir {run_dir}-2" in line
    assert snapshot(run_dir) == before
    assert not (tmp_path / "run-2").exists()


def test_overwrite_replaces_the_previous_run_and_keeps_other_files(finished, data, tmp_path, capsys):
    run_dir = copy_of(finished, tmp_path)
    previous = len(list(run_dir.iterdir()))  # all of them the run's: checkpoint pairs, records, tensorboard/
    (run_dir / "notes.txt").write_text("mine")
    (run_dir / "weights.safetensors").write_bytes(b"not vitkit's")
    assert (run_dir / "vit_n_4_32-e0002.safetensors").is_file()
    assert len(list((run_dir / "tensorboard").iterdir())) == 1
    # one epoch this time; `--ckpt_path ""` (MindCV's way of saying none) is no checkpoint
    rc, out, _ = cli(capsys, *tiny(data, "--ckpt_save_dir", str(run_dir), "--overwrite", "--epoch_size", "1",
                                   "--ckpt_path", ""))
    assert rc == 0
    assert f"overwrite: removed the previous run's {previous} files from {run_dir}" in out
    assert epochs(run_dir) == [1]  # only the new run's epochs
    assert not (run_dir / "vit_n_4_32-e0002.safetensors").exists()
    index = json.loads((run_dir / "checkpoints.json").read_text())
    assert [e["epoch"] for e in index["checkpoints"]] == [1]
    assert load_checkpoint(run_dir / "last.safetensors").step == 2
    assert len(list((run_dir / "tensorboard").iterdir())) == 1  # the new run's events only
    assert "overwrite: true  # command line" in (run_dir / "config.yaml").read_text()
    # files that are not vitkit's run files stay
    assert (run_dir / "notes.txt").read_text() == "mine"
    assert (run_dir / "weights.safetensors").read_bytes() == b"not vitkit's"


def test_resume_of_a_finished_run_says_complete_and_touches_nothing(finished, tmp_path, capsys):
    run_dir = copy_of(finished, tmp_path)
    before = snapshot(run_dir)
    rc, out, err = cli(capsys, "train", "--resume", "--ckpt_save_dir", str(run_dir))
    assert rc == 0, err
    assert (f"run in {run_dir} is already complete (epoch 2/2, step 4); nothing to do — start a new run with a "
            f"fresh --ckpt_save_dir or raise --epoch_size") in out
    assert "epoch 1/2" not in out and "run dir" not in out  # no training, no header
    assert snapshot(run_dir) == before


def test_runs_without_a_folder_get_timestamped_folders_and_resume_continues_the_newest(data, tmp_path, monkeypatch,
                                                                                      capsys):
    monkeypatch.chdir(tmp_path)
    for _ in range(2):  # stopped after one step each, so there is something to resume
        assert cli(capsys, *tiny(data, "--max_steps", "1"))[0] == 0
    runs = sorted((tmp_path / "ckpt").iterdir())
    assert len(runs) == 2 and all(STAMP.fullmatch(p.name) for p in runs), runs
    newest = max(runs, key=lambda p: (p.name[:15], int(p.name[16:] or 1)))
    for run_dir in runs:  # config.yaml records the folder resolve chose
        line = next(x for x in (run_dir / "config.yaml").read_text().splitlines() if x.startswith("ckpt_save_dir:"))
        assert line == f"ckpt_save_dir: ckpt/{run_dir.name}  # default, new timestamped run folder"
    older = next(p for p in runs if p != newest)
    older_before = snapshot(older)

    rc, out, err = cli(capsys, "train", "--resume")
    assert rc == 0, err
    assert f"resumed from ckpt/{newest.name}/last.safetensors at epoch 1, step 1" in out
    assert load_checkpoint(newest / "last.safetensors").step == 4 and epochs(newest) == [1, 2]
    assert snapshot(older) == older_before
    assert sorted((tmp_path / "ckpt").iterdir()) == runs  # no third folder


def test_failed_start_leaves_nothing_behind(finished, data, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    # a bad data dir, into a folder given and into the default one
    rc, _, err = cli(capsys, *tiny(tmp_path / "nope", "--ckpt_save_dir", str(tmp_path / "new" / "run")))
    assert rc == 2 and "does not exist" in err[-1]
    rc, _, err = cli(capsys, *tiny(tmp_path / "nope"))
    assert rc == 2
    # a bad model name
    rc, _, err = cli(capsys, *tiny(data, "--model", "vit_nope", "--ckpt_save_dir", str(tmp_path / "new" / "run")))
    assert rc == 2 and "unknown model" in err[-1]
    # a start that fails after writing: resuming a checkpoint of another model into a new folder
    other_model = ("--model", "vit_ti_4_32", "--epoch_size", "3")  # (3: the run is not complete yet)
    rc, _, err = cli(capsys, "train", "--resume", str(finished / "last.safetensors"), *other_model,
                     "--ckpt_save_dir", str(tmp_path / "new" / "run"))
    assert rc == 2 and "holds vit_n_4_32" in err[-1]
    # ... and into an empty folder: left empty
    (tmp_path / "empty").mkdir()
    rc, _, err = cli(capsys, "train", "--resume", str(finished / "last.safetensors"), *other_model,
                     "--ckpt_save_dir", str(tmp_path / "empty"))
    assert rc == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"] and not any((tmp_path / "empty").iterdir())


def test_a_run_that_fails_before_its_first_checkpoint_leaves_nothing_behind(data, tmp_path, monkeypatch, capsys):
    """A failure in the first epoch (here a shard found cut short at the first step) removes the new run's folder,
    so the same command runs once the cause is fixed; a run that diverged keeps its logs (they say how)."""
    from vitkit.engine import loop
    from vitkit.errors import DataError

    def cut_short(self):
        raise DataError("shard /data/train/shard-000003.tar is truncated: 00000042.jpg needs bytes 0-9")

    run = tmp_path / "runs" / "a"
    with monkeypatch.context() as m:
        m.setattr(loop.Trainer, "train_epoch", cut_short)
        rc, _, err = cli(capsys, *tiny(data, "--ckpt_save_dir", str(run)))
    assert rc == 2 and err[-1].startswith("error: shard /data/train/shard-000003.tar is truncated")
    assert not (tmp_path / "runs").exists()
    rc, _, _ = cli(capsys, *tiny(data, "--ckpt_save_dir", str(run), "--epoch_size", "1"))  # the same command runs
    assert rc == 0 and (run / "last.safetensors").is_file()
    # divergence at the first step: no checkpoint, but metrics and config stay for the diagnosis
    def diverge(self):
        raise loop.NonFiniteLoss(1, float("nan"), float("nan"))

    with monkeypatch.context() as m:
        m.setattr(loop.Trainer, "train_epoch", diverge)
        rc, _, err = cli(capsys, *tiny(data, "--ckpt_save_dir", str(tmp_path / "nan")))
    assert rc == 2 and "training diverged" in err[-1] and "no checkpoint was saved yet" in err[-1]
    assert (tmp_path / "nan" / "config.yaml").is_file()


# -- recipes shrunk by hand ----------------------------------------------------------------------------------------

def test_epoch_size_on_the_command_line_rescales_warmup_and_decay(tmp_path):
    cfg = resolve(["-c", str(B32), "--epoch_size", "2"], notices=(notes := []))  # warmup 30 of 300 epochs
    assert (cfg.epoch_size, cfg.warmup_epochs, cfg.decay_epochs) == (2, pytest.approx(0.2), pytest.approx(1.8))
    assert cfg.sources["warmup_epochs"] == f"yaml:{B32}, scaled to epoch_size 2"
    (note,) = [n for n in notes if "--epoch_size" in n]
    assert note == (f"note: --epoch_size 2 over the recipe's 300 (yaml:{B32}): warmup_epochs 30 -> 0.2, "
                    f"decay_epochs 270 -> 1.8 (scaled by 2/300, as --smoke does; give them on the command line "
                    f"to choose)")
    # given on the command line too: kept as given; the other one still scales
    cfg = resolve(["-c", str(B32), "--epoch_size", "30", "--warmup_epochs", "1"], notices=[])
    assert (cfg.warmup_epochs, cfg.decay_epochs) == (1, pytest.approx(27)) and cfg.sources["warmup_epochs"] == \
        "command line"
    # a schema default (warmup 3 of 90) scales too; no decay_epochs (None: the rest) stays None
    recipe = tmp_path / "r.yaml"
    recipe.write_text("lr: 0.001\n")
    cfg = resolve(["-c", str(recipe), "--epoch_size", "9"], notices=[])
    assert (cfg.warmup_epochs, cfg.decay_epochs) == (pytest.approx(0.3), None)
    # the same epoch_size, or one from the YAML: nothing to scale
    cfg = resolve(["-c", str(B32), "--epoch_size", "300"], notices=(notes := []))
    assert cfg.warmup_epochs == 30 and not any("--epoch_size" in n for n in notes)


def test_empty_ckpt_path_and_pretrained_mean_none():
    cfg = resolve(["--ckpt_path", "", "--pretrained", "", "--resume", ""], notices=[])
    assert (cfg.ckpt_path, cfg.pretrained, cfg.resume) == ("", False, False)
    assert not cfg.ckpt_path  # falsy: no checkpoint to start from


def test_smoke_run_keeps_one_checkpoint(data, tmp_path, capsys):
    run_dir = tmp_path / "run"
    rc, _, err = cli(capsys, "train", "-c", str(ROOT / "configs/vit/cifar10_cpu.yaml"), "--smoke", "--data_dir",
                     str(data), "--device", "cpu", "--ckpt_save_dir", str(run_dir))
    assert rc == 0, err
    assert "keep_checkpoint_max: 1  # smoke" in (run_dir / "config.yaml").read_text()
    assert sorted(p.name for p in run_dir.glob("*.safetensors")) == ["best.safetensors", "last.safetensors"]
    assert sorted(p.name for p in run_dir.glob("*.state.pt")) == ["best.state.pt", "last.state.pt"]
    # validated at epoch 2 only (val_interval 2): best is last, one file on disk under two names
    assert os.path.samefile(run_dir / "best.safetensors", run_dir / "last.safetensors")
    assert load_checkpoint(run_dir / "last.safetensors").step == 4  # 2 epochs of 2 steps (20 images, batch 8)


def test_demo_validates_the_best_checkpoint_of_its_own_folder(tmp_path, monkeypatch, capsys):
    from vitkit.tools.demo import main as demo

    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    assert demo(["--smoke", "--device", "cpu", "--val_interval", "1"]) == 0
    out = capsys.readouterr().out
    (run_dir,) = (tmp_path / "runs" / "demo").iterdir()
    assert STAMP.fullmatch(run_dir.name)
    best = json.loads((run_dir / "checkpoints.json").read_text())["best_top1"]
    rel = Path("runs") / "demo" / run_dir.name
    assert f"validating {rel / 'best.safetensors'} (the best checkpoint by val top-1, {best:.2f}%" in out
    assert f"with best.safetensors (the training loop measured {best:.2f}%); run directory {rel}" in out
