"""The seed's commands, run as written on tiny data (issue 3, "What must show"):

  python train.py -c configs/vit/vit_b32_224.yaml --data_dir IMAGENET_STYLE_FOLDER   (+ overrides making it tiny)
  python train.py --model M --pretrained LOCAL_FILE --opt momentum --lr 0.001 --dataset cifar10 --num_classes 10
                  --data_dir LOCAL_CIFAR10
  python validate.py -c configs/vit/vit_b32_224.yaml --data_dir ... --ckpt_path CHECKPOINT
  vitkit train                                                                      (the built-in demo recipe)

The two train.py runs and validate.py are real subprocesses of the scripts at the repository root; each
training run is vit_n_4_32 at 32 px on a few dozen CIFAR-10 sample images. One thread per process: on a shared
2-core machine, spinning OpenMP threads make these tiny runs several times slower.
"""
from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import urllib.error
from pathlib import Path

import pytest
import torch
from PIL import Image

from vitkit.cli import main as cli_main
from vitkit.engine.checkpoint import load_checkpoint
from vitkit.engine.config import from_dict, resolve, schedule_args
from vitkit.engine.loop import Trainer
from vitkit.engine.schedule import build_schedule
from vitkit.errors import ConfigError
from vitkit.models import create_model, get_spec

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "data" / "cifar10_sample"
CLASSES = sorted(p.name for p in (SAMPLE / "train").iterdir())
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
B32 = str(ROOT / "configs" / "vit" / "vit_b32_224.yaml")
# What shrinks the ImageNet recipe to a 1.2 M-parameter ViT at 32 px and two 4-step epochs (--smoke keeps the
# recipe's schedule shape: warmup 30/300 of the run, cosine decay over the rest). The recipe's `distribute:
# true` stays: without a launcher the run falls back to one process with a notice.
TINY_B32 = ["--model", "vit_n_4_32", "--num_classes", "10", "--image_resize", "32",
            "--smoke", "--device", "cpu"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def link_split(src: Path, dst: Path, per_class: int) -> None:
    for cls in CLASSES:
        (dst / cls).mkdir(parents=True)
        for f in sorted((src / cls).iterdir())[:per_class]:
            (dst / cls / f.name).symlink_to(f)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """An ImageNet-style folder (train/ and val/) and a CIFAR-10 JPEG copy (train/ and test/), both 10 classes."""
    root = tmp_path_factory.mktemp("data")
    link_split(SAMPLE / "train", root / "imagenet" / "train", 4)
    link_split(SAMPLE / "test", root / "imagenet" / "val", 2)
    link_split(SAMPLE / "train", root / "cifar10" / "train", 2)
    link_split(SAMPLE / "test", root / "cifar10" / "test", 1)
    return {"imagenet": root / "imagenet", "cifar10": root / "cifar10", "root": root}


def script(name: str, *argv: str) -> subprocess.CompletedProcess:
    """`python <repo>/<name> argv...` from another directory, output captured (so stdout is not a terminal)."""
    return subprocess.run([sys.executable, str(ROOT / name), *argv], capture_output=True, text=True, env=ENV,
                          timeout=300, cwd=ROOT.parent)


@pytest.fixture(scope="module")
def seed_run(data: dict[str, Path]) -> tuple[subprocess.CompletedProcess, Path]:
    run_dir = data["root"] / "run_b32"
    proc = script("train.py", "-c", B32, "--data_dir", str(data["imagenet"]), *TINY_B32,
                  "--ckpt_save_dir", str(run_dir))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc, run_dir


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# -- (a) train.py -c configs/vit/vit_b32_224.yaml --data_dir ... ----------------------------------------------

def test_seed_train_command_writes_a_self_describing_checkpoint(seed_run, data) -> None:
    proc, run_dir = seed_run
    assert "Traceback" not in proc.stderr
    assert "no launcher started this process; running in one process" in proc.stderr
    ckpt = load_checkpoint(run_dir / "last.safetensors")
    spec = get_spec("vit_n_4_32")
    assert ckpt.model_name == "vit_n_4_32"
    assert (ckpt.arch.img_size, ckpt.arch.num_classes, ckpt.arch.embed_dim) == (32, 10, spec.arch.embed_dim)
    dc = ckpt.data_config
    assert (dc.input_size, dc.mean, dc.std, dc.crop_pct) == (32, spec.mean, spec.std, spec.crop_pct)
    assert dc.interpolation == "bicubic"  # the recipe's, not the model's default
    assert ckpt.class_names == CLASSES
    assert (ckpt.epoch, ckpt.step) == (2, 8)
    # the run's whole config is inside: the recipe's values and the command line's
    cfg = from_dict(ckpt.config)
    assert (cfg.opt, cfg.lr, cfg.weight_decay, cfg.weight_decay_filter) == ("adamw", 1.6e-3, 0.3, "norm_and_bias")
    assert (cfg.auto_augment, cfg.mixup, cfg.label_smoothing) == ("randaug-m9-mstd0.5", 0.8, 0.1)
    assert (cfg.data_dir, cfg.model, cfg.smoke) == (str(data["imagenet"]), "vit_n_4_32", True)
    # and nothing else is needed to use it
    model = ckpt.build_model()
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


# -- (d) what a user sees: log lines, metrics.jsonl, TensorBoard, curves --------------------------------------

def test_run_directory_has_metrics_events_and_curves(seed_run) -> None:
    proc, run_dir = seed_run
    recs = records(run_dir)
    assert [r["epoch"] for r in recs] == [1, 2]
    for r in recs:
        for key in ("train_loss", "lr", "val_top1", "val_top5", "images_per_s"):
            assert isinstance(r[key], float) and r[key] >= 0, key
        assert 0 <= r["val_top1"] <= r["val_top5"] <= 100
    # lr is the recipe's schedule at the epoch's last step (smoke: 2 epochs of 4 steps, warmup 0.2 epochs)
    cfg = from_dict(load_checkpoint(run_dir / "last.safetensors").config)
    schedule = build_schedule(**schedule_args(cfg), steps_per_epoch=4)
    assert [r["lr"] for r in recs] == [schedule(3), schedule(7)]

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    assert [e.value for e in events.Scalars("epoch/val_top1")] == pytest.approx([r["val_top1"] for r in recs])
    assert len(events.Scalars("train/loss")) == 8  # smoke logs every step

    png = (run_dir / "curves.png").read_bytes()
    assert png.startswith(b"\x89PNG")
    with Image.open(run_dir / "curves.png") as img:
        assert img.width > 400 and img.height > 200


def test_plain_log_lines_when_stdout_is_not_a_terminal(seed_run) -> None:
    proc, run_dir = seed_run
    out = proc.stdout
    assert "\x1b[" not in out and "\r" not in out  # no progress-bar redraws in a log file
    steps = re.findall(r"^epoch (\d)/2 step (\d)/4  loss [\d.]+  lr \S+  \d+ img/s  data \d+%  eta \d+:\d\d$",
                       out, re.M)
    assert steps == [(e, s) for e in "12" for s in "1234"]
    summaries = re.findall(r"^epoch (\d)/2 \| train loss ([\d.]+) \| .*val top-1 ([\d.]+)% .*saved (\S+)$", out, re.M)
    recs = records(run_dir)
    assert [(int(e), float(loss), float(top1)) for e, loss, top1, _ in summaries] == [
        (r["epoch"], round(r["train_loss"], 4), round(r["val_top1"], 2)) for r in recs]
    assert summaries[-1][3] == str(run_dir / "last.safetensors")


# -- (c) validate.py -c CONFIG --data_dir ... --ckpt_path ... --------------------------------------------------

def test_seed_validate_command_equals_the_training_loop(seed_run, data) -> None:
    _, run_dir = seed_run
    results = data["root"] / "validate.json"
    proc = script("validate.py", "-c", B32, "--data_dir", str(data["imagenet"]), "--model", "vit_n_4_32",
                  "--num_classes", "10", "--ckpt_path", str(run_dir / "last.safetensors"),
                  "--results_file", str(results))
    assert proc.returncode == 0, proc.stderr[-3000:]
    top1, top5 = map(float, re.search(r"top-1 ([\d.]+)%  top-5 ([\d.]+)%", proc.stdout).groups())
    last = records(run_dir)[-1]
    assert (top1, top5) == (round(last["val_top1"], 2), round(last["val_top5"], 2))
    got = json.loads(results.read_text())
    assert (got["top1"], got["top5"], got["num_images"]) == (last["val_top1"], last["val_top5"], 20)
    assert got["world_size"] == 1  # the recipe's `distribute: true` without a launcher: one process


# -- (b) finetune from a local file -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pretrained_file(data) -> Path:
    """A 1000-class vit_n_4_32 saved as a timm-style state dict (timm's key names, a plain torch.save)."""
    torch.manual_seed(0)
    path = data["root"] / "vit_n_4_32_in1k.pth"
    torch.save(create_model("vit_n_4_32", num_classes=1000).state_dict(), path)
    return path


def finetune_args(data, pretrained_file, run_dir: Path) -> list[str]:
    """The seed's finetune command; the last line only makes it tiny (32 px, 16 images, one epoch)."""
    return ["--model", "vit_n_4_32", "--pretrained", str(pretrained_file), "--opt", "momentum", "--lr", "0.001",
            "--dataset", "cifar10", "--num_classes", "10", "--data_dir", str(data["cifar10"]),
            "--image_resize", "32", "--batch_size", "8", "--epoch_size", "1", "--warmup_epochs", "0",
            "--num_parallel_workers", "0", "--device", "cpu", "--ckpt_save_dir", str(run_dir)]


def test_finetune_starts_from_the_file_with_a_fresh_head(data, pretrained_file, monkeypatch) -> None:
    import torchvision.datasets.cifar as tv_cifar

    def no_download(*args, **kwargs):
        raise AssertionError("a local CIFAR-10 copy must not be downloaded again")

    monkeypatch.setattr(tv_cifar, "download_and_extract_archive", no_download)
    argv = finetune_args(data, pretrained_file, data["root"] / "unused") + ["--dataset_download"]
    cfg = resolve(argv, notices=(notices := []))
    # the command names its own data: MindCV's defaults under it, not the demo recipe's
    assert notices == [] and "built-in demo recipe" not in cfg.sources.values()
    assert (cfg.weight_decay, cfg.label_smoothing, cfg.val_while_train) == (1e-6, 0.0, False)
    trainer = Trainer(cfg)  # before any step
    source = torch.load(pretrained_file, weights_only=True)
    got = trainer.model.state_dict()
    assert trainer.class_names == CLASSES and got["head.weight"].shape == (10, 128)
    assert source["head.weight"].shape == (1000, 128)
    body = [k for k in got if not k.startswith("head.")]
    assert len(body) == len(source) - 2
    for k in body:
        assert torch.equal(got[k], source[k]), k


def test_seed_finetune_command_runs(data, pretrained_file) -> None:
    run_dir = data["root"] / "run_finetune"
    proc = script("train.py", *finetune_args(data, pretrained_file, run_dir))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "head reset: weights have 1000 classes, model 10" in proc.stderr
    assert "demo recipe" not in proc.stderr + proc.stdout
    assert "optimizer   momentum, lr 0.001" in proc.stdout
    ckpt = load_checkpoint(run_dir / "last.safetensors")
    assert ckpt.arch.num_classes == 10 and ckpt.class_names == CLASSES and ckpt.step == 2
    # two SGD steps at lr <= 1e-3 move the loaded body a little; a body not loaded would be a fresh init
    source = torch.load(pretrained_file, weights_only=True)
    torch.manual_seed(1)
    fresh = create_model("vit_n_4_32", num_classes=10).state_dict()
    key = "blocks.3.attn.qkv.weight"
    moved = (ckpt.state_dict[key] - source[key]).abs().max()
    assert 0 < moved < 0.05 * (fresh[key] - source[key]).abs().max()


def test_dataset_download_offline_is_a_one_line_error(data, monkeypatch, capsys) -> None:
    import torchvision.datasets.cifar as tv_cifar

    def offline(*args, **kwargs):  # what urllib raises without a network (as on this machine)
        raise urllib.error.URLError(socket.gaierror(-2, "Name or service not known"))

    monkeypatch.setattr(tv_cifar, "download_and_extract_archive", offline)
    empty = data["root"] / "no_cifar_here"
    rc = cli_main(["train", "--model", "vit_n_4_32", "--dataset", "cifar10", "--dataset_download", "--data_dir",
                   str(empty), "--num_classes", "10", "--ckpt_save_dir", str(data["root"] / "run_dl")])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    (line,) = [x for x in err.splitlines() if x.startswith("error:")]
    assert f"could not download cifar10 into {empty}" in line and "Name or service not known" in line
    assert "drop --dataset_download" in line


# -- (e) vitkit train with no config ---------------------------------------------------------------------------

def test_vitkit_train_without_config_runs_the_demo_recipe(data, capsys) -> None:
    run_dir = data["root"] / "run_demo"
    assert cli_main(["train", "--smoke", "--ckpt_save_dir", str(run_dir), "--device", "cpu"]) == 0
    err = capsys.readouterr().err
    assert "running the built-in demo recipe" in err
    saved = dict(line.split(": ", 1) for line in (run_dir / "config.yaml").read_text().splitlines()
                 if not line.startswith("#"))
    assert saved["model"] == "vit_n_4_32  # built-in demo recipe"
    assert saved["data_dir"] == f"{SAMPLE}  # built-in demo recipe"
    assert saved["val_split"] == "test  # built-in demo recipe" and saved["epoch_size"] == "2  # smoke"
    recs = records(run_dir)
    assert [r["epoch"] for r in recs] == [1, 2] and recs[-1]["val_images"] == 32
    ckpt = load_checkpoint(run_dir / "last.safetensors")
    assert ckpt.class_names == CLASSES and ckpt.arch.num_classes == 10


def test_freeze_backbone_is_a_linear_probe(data, pretrained_file) -> None:
    """--freeze_backbone: the optimizer holds the head alone, the body ends bit-equal to the loaded file, the
    head moves, and the frozen body runs in eval mode (drop path off) while the trainer is in train mode."""
    run_dir = data["root"] / "run_probe"
    argv = finetune_args(data, pretrained_file, run_dir) + ["--freeze_backbone", "True", "--drop_path_rate", "0.5"]
    trainer = Trainer(resolve(argv, notices=[]))
    held = [p for g in trainer.optimizer.param_groups for p in g["params"]]
    assert {id(p) for p in held} == {id(p) for p in trainer.model.head.parameters()}
    trainer.model.train()
    assert trainer.model.head.training and not any(b.training for b in trainer.model.blocks)
    start_head = trainer.model.head.weight.detach().clone()
    trainer.fit()
    ckpt = load_checkpoint(run_dir / "last.safetensors")
    source = torch.load(pretrained_file, weights_only=True)
    assert ckpt.step == 2 and ckpt.config["freeze_backbone"] is True
    for k, v in ckpt.state_dict.items():
        if not k.startswith("head."):
            assert torch.equal(v, source[k]), k
    assert not torch.equal(ckpt.state_dict["head.weight"], start_head)


def test_freeze_backbone_with_fsdp_is_a_one_line_error(data, pretrained_file) -> None:
    argv = finetune_args(data, pretrained_file, data["root"] / "unused2") + ["--freeze_backbone", "True",
                                                                            "--fsdp", "True"]
    with pytest.raises(ConfigError, match="freeze_backbone.*without fsdp"):
        resolve(argv, notices=[])
