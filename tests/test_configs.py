"""Every shipped recipe loads, validates, builds its schedule and says how to run it (LitGPT's config-hub test)."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from vitkit.engine.config import load_config
from vitkit.engine.demo import DEMO_RECIPE
from vitkit.engine.schedule import build_schedule
from vitkit.models import get_spec


ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").rglob("*.yaml"))


def test_recipes_are_shipped():
    names = {p.name for p in CONFIGS}
    assert {"vit_b32_224.yaml", "vit_b16_224.yaml", "vit_l16_224.yaml", "vit_l32_224.yaml",
            "vit_b32_224_ascend.yaml", "cifar10_finetune.yaml", "cifar10_cpu.yaml", "cifar10_gpu.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_recipe_loads_and_validates(path):
    notices: list[str] = []
    cfg = load_config(["-c", str(path)], notices=notices)
    get_spec(cfg.model)  # a registered model
    schedule = build_schedule(cfg, steps_per_epoch=100)
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
