"""Every shipped recipe loads, validates, builds its schedule, model and loader, and says how to run it; the small
ones train end to end on a smoke run through the real entry point (LitGPT's config-hub and full tests)."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import yaml

from vitkit.engine.config import DEMO_RECIPE, load_config, resolve, schedule_args
from vitkit.engine.data_args import data_config_from_config, dataset_from_config, loader_from_config
from vitkit.engine.schedule import build_schedule
from vitkit.engine.train import run
from vitkit.models import create_model, get_spec
from vitkit.weights import model_info

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").rglob("*.yaml"))
SAMPLE = ROOT / "data" / "cifar10_sample"
# Parameter counts of timm's models of the same architecture with a 1000-class head (timm 1.0).
TIMM_PARAMS = {"vit_b_32_224": 88_224_232, "vit_b_16_224": 86_567_656, "vit_l_16_224": 304_326_632,
               "vit_l_32_224": 306_535_400}
# Recipes whose whole smoke run (model init, 8 steps, 2 validations) takes seconds on 2 CPU cores. The others are
# marked slow: the 224 px ImageNet-scale models take 30 s to minutes, and cifar10_gpu.yaml compiles (2 min on CPU).
FAST_SMOKE = {"cifar10_cpu.yaml"}


def test_recipes_are_shipped():
    names = {p.name for p in CONFIGS}
    assert {"vit_b32_224.yaml", "vit_b16_224.yaml", "vit_l16_224.yaml", "vit_l32_224.yaml",
            "vit_b32_224_ascend.yaml", "cifar10_finetune.yaml", "cifar10_cpu.yaml", "cifar10_gpu.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_recipe_loads_and_validates(path):
    notices: list[str] = []
    cfg = load_config(["-c", str(path)], notices=notices)
    get_spec(cfg.model)  # a registered model
    schedule = build_schedule(**schedule_args(cfg), steps_per_epoch=100)
    lrs = [schedule(s) for s in range(0, schedule.total_steps, 97)]
    assert all(0 <= lr <= cfg.lr * (1 + 1e-9) for lr in lrs) and max(lrs) > 0
    assert all(src.startswith("yaml:") for src in cfg.sources.values())
    if "ascend" in path.name:  # MindCV's own file: its MindSpore-only keys are announced, not rejected
        assert any("'mode'" in n for n in notices) and any("dataset_sink_mode" in n for n in notices)
    else:
        assert notices == []


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_recipe_header_says_command_hardware_time_accuracy(path):
    header = "\n".join(line for line in path.read_text().splitlines() if line.startswith("#"))
    for word in ("command:", "hardware:", "time:", "accuracy:"):
        assert re.search(rf"^# *{word}", header, re.M), f"{path.name}: no '{word}' line in the header comment"


def test_vit_b32_recipe_has_mindcv_hyperparameters():
    cfg = load_config(["-c", str(ROOT / "configs/vit/vit_b32_224.yaml")], notices=[])
    ascend = load_config(["-c", str(ROOT / "configs/vit/vit_b32_224_ascend.yaml")], notices=[])
    expected = dict(model="vit_b_32_224", batch_size=512, opt="adamw", lr=1.6e-3, weight_decay=0.3,
                    weight_decay_filter="norm_and_bias", epoch_size=300, warmup_epochs=30, warmup_factor=0.01,
                    scheduler="cosine_decay", min_lr=0.0, label_smoothing=0.1, auto_augment="randaug-m9-mstd0.5",
                    mixup=0.8, cutmix=1.0, drop_path_rate=0.1, amp_level="O2")
    for key, value in expected.items():
        assert getattr(cfg, key) == value == getattr(ascend, key), key


def test_demo_recipe_is_valid():
    cfg = load_config([], defaults=DEMO_RECIPE, notices=[])
    assert Path(cfg.data_dir, cfg.train_split).is_dir() and Path(cfg.data_dir, cfg.val_split).is_dir()


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    """4 images a class of the CIFAR-10 sample in every split a recipe names (train, val, test)."""
    root = tmp_path_factory.mktemp("tiny")
    for split, src in (("train", "train"), ("val", "test"), ("test", "test")):
        for cls in sorted(p.name for p in (SAMPLE / src).iterdir()):
            (root / split / cls).mkdir(parents=True)
            for f in sorted((SAMPLE / src / cls).iterdir())[:4]:
                (root / split / cls / f.name).symlink_to(f)
    return root


def _smoke_argv(path: Path, data: Path, run_dir: Path) -> list[str]:
    return ["-c", str(path), "--smoke", "--data_dir", str(data), "--device", "cpu", "--ckpt_save_dir", str(run_dir)]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_recipe_builds_its_model_and_loader(path, tiny_data, tmp_path):
    cfg = resolve(_smoke_argv(path, tiny_data, tmp_path), notices=[])
    # Its model, as the trainer builds it (pretrained weights aside), on the meta device: no memory, no init time.
    with torch.device("meta"):
        model = create_model(cfg.model, num_classes=cfg.num_classes, img_size=cfg.image_resize,
                             drop_rate=cfg.drop_rate, drop_path_rate=cfg.drop_path_rate)
        logits = model(torch.empty(2, 3, cfg.image_resize, cfg.image_resize))
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params == model_info(cfg.model)["params"]
    if cfg.model in TIMM_PARAMS:
        assert n_params == TIMM_PARAMS[cfg.model]
    assert logits.shape == (2, model.cfg.num_classes) and (cfg.num_classes is None or
                                                           model.cfg.num_classes == cfg.num_classes)
    # Its loaders: one smoke batch each, at the recipe's image_resize, through the recipe's augmentation.
    data_config = data_config_from_config(cfg, get_spec(cfg.model))
    for split, train in ((cfg.train_split, True), (cfg.val_split, False)):
        ds = dataset_from_config(cfg, split, train=train)
        images, targets = next(iter(loader_from_config(cfg, ds, train=train, data_config=data_config)))
        assert images.shape == (cfg.batch_size, 3, cfg.image_resize, cfg.image_resize), (split, images.shape)
        assert images.dtype == torch.float32 and torch.isfinite(images).all() and images.std() > 0.1
        assert targets.shape == (cfg.batch_size,) and 0 <= targets.min() and targets.max() < len(ds.classes)


@pytest.mark.parametrize("path", [p if p.name in FAST_SMOKE else pytest.param(p, marks=pytest.mark.slow)
                                  for p in CONFIGS], ids=lambda p: p.name)
def test_recipe_smoke_run_writes_checkpoint_and_config(path, tiny_data, tmp_path):
    recipe = yaml.safe_load(path.read_text())
    run_dir = tmp_path / "run"
    argv = _smoke_argv(path, tiny_data, run_dir)
    if recipe.get("num_classes", 10) != 10:
        argv += ["--num_classes", "10"]  # the tiny data's classes, in place of ImageNet's 1000
    if recipe.get("pretrained"):
        argv += ["--no-pretrained"]  # downloads are tested in test_weights_download; here: no network
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny steps: spinning OpenMP threads on a shared machine only slow them down
    try:
        metrics = run(argv)
    finally:
        torch.set_num_threads(before)
    assert (run_dir / "last.safetensors").is_file() and (run_dir / "last.state.pt").is_file()
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["model"] == recipe["model"] and saved["image_resize"] == recipe["image_resize"]
    assert saved["smoke"] is True and saved["epoch_size"] < recipe["epoch_size"]
    assert metrics and all(v == v for v in metrics.values() if isinstance(v, float))  # no NaN
