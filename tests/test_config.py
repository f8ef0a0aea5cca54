"""The config schema as a user meets it (issue 3, part 2): defaults <- YAML <- command line with the source of
every value, the command-line forms, MindCV's own ViT recipe loading unchanged, errors that name the key and
suggest the closest one, and the resolved config a run saves beside its checkpoints."""
from __future__ import annotations

import dataclasses
import re
import types
from pathlib import Path

import pytest
import torch
import yaml
from torchvision.transforms import v2

from vitkit.data.transforms import build_transform
from vitkit.engine.checkpoint import load_checkpoint
from vitkit.engine.config import (
    FIELDS,
    IGNORED_KEYS,
    RENAMED_KEYS,
    ConfigError,
    from_dict,
    global_batch_line,
    load_config,
    resolve,
)
from vitkit.engine.data_args import data_config_from_config
from vitkit.engine.train import run
from vitkit.models import get_spec

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "data" / "cifar10_sample"

# MindCV's configs/vit/vit_b32_224.yaml (mindspore-lab/mindcv, commit 1e7abcd), keys and values as shipped
# (its licence header left out), plus the keys of MindCV's config.py that its other recipes and users set:
# device_target, val_amp_level, amp_cast_list, loss_scale_type, drop_overflow_update, eval_shuffle.
MINDCV_VIT_B32 = """\
# system config
mode: 0
distribute: True
num_parallel_workers: 8
val_while_train: True
val_interval: 1
device_target: Ascend

# dataset config
dataset: 'imagenet'
data_dir: '/data/imagenet'
shuffle: True
dataset_download: False
batch_size: 256
drop_remainder: True

# Augmentation config
image_resize: 224
scale: [0.08, 1.0]
ratio: [0.75, 1.333]
hflip: 0.5
interpolation: 'bicubic'
re_prob: 0.1 # 1118 part2, compare to 1118 part1
mixup: 0.2
cutmix: 1.0
cutmix_prob: 1.0
crop_pct: 0.875
color_jitter: [0.4, 0.4, 0.4]
#auto_augment: 'randaug-m7-mstd0.5' # 1118 part2

# model config
model: 'vit_b_32_224'
drop_rate: 0.1 # 1119 add
drop_path_rate: 0.1 # 1119 add
num_classes: 1000
pretrained: False
ckpt_path: ''
keep_checkpoint_max: 10
ckpt_save_policy: 'top_k'
ckpt_save_dir: './vit_b32_224'
epoch_size: 300
dataset_sink_mode: True
amp_level: 'O2'
val_amp_level: 'O2'
amp_cast_list: null
loss_scale_type: 'fixed'
drop_overflow_update: False
eval_shuffle: False

# loss config
loss: 'CE'
loss_scale: 1024.0
label_smoothing: 0.1 # Exp 1119, compared to 1118 part2

# lr scheduler config
scheduler: 'warmup_cosine_decay'
lr: 0.00075
min_lr: 1e-6
warmup_epochs: 38
decay_epochs: 262
lr_epoch_stair: True # exp 1118, compare to 1116, better.

# optimizer config
opt: 'adamw'
weight_decay: 0.025 # 1119 changed from 0.025 to 0.05  TODO :tune
filter_bias_and_bn: True
use_nesterov: False
"""

# Every option of MindCV's config.py (mindspore-lab/mindcv, commit ca71353; `dynamic_loss_scale` and the
# ModelArts keys from older versions): each must mean something here, be renamed, or be announced as ignored.
MINDCV_KEYS = """
mode distribute val_while_train val_interval log_interval seed device_target dataset data_dir train_split val_split
dataset_download num_parallel_workers shuffle num_samples batch_size drop_remainder image_resize scale ratio hflip
vflip color_jitter interpolation auto_augment aug_splits re_prob re_scale re_ratio re_value re_max_attempts mean
std crop_pct mixup cutmix cutmix_prob aug_repeats model num_classes in_channels drop_rate drop_path_rate pretrained
ckpt_path resume_opt keep_checkpoint_max ckpt_save_dir ckpt_save_interval ckpt_save_policy epoch_size
dataset_sink_mode ema ema_decay clip_grad clip_value layer_decay gradient_accumulation_steps opt momentum
weight_decay use_nesterov weight_decay_filter eps scheduler lr min_lr warmup_epochs warmup_factor decay_epochs
decay_rate multi_step_decay_milestones lr_epoch_stair num_cycles cycle_decay loss label_smoothing aux_factor
reduction amp_level val_amp_level amp_cast_list loss_scale_type loss_scale drop_overflow_update eval_shuffle
filter_bias_and_bn dynamic_loss_scale enable_modelarts multi_data_url data_url ckpt_url train_url
""".split()


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# -- precedence and provenance ---------------------------------------------------------------------------------

def test_defaults_then_yaml_then_command_line_each_with_its_source(tmp_path: Path) -> None:
    recipe = write(tmp_path / "r.yaml", "lr: 1e-5\nbatch_size: 32\nopt: sgd\nwarmup_epochs: 1\nepoch_size: 2\n")
    cfg = load_config(["-c", str(recipe), "--batch_size", "16", "--epoch_size=3"], notices=[])
    src = f"yaml:{recipe}"
    assert (cfg.seed, "seed" in cfg.sources) == (42, False)  # untouched: the schema's default
    assert (cfg.lr, cfg.sources["lr"]) == (1e-5, src)  # YAML over the default
    assert (cfg.opt, cfg.sources["opt"]) == ("sgd", src)
    assert (cfg.batch_size, cfg.sources["batch_size"]) == (16, "command line")  # command line over YAML
    assert (cfg.epoch_size, cfg.sources["epoch_size"]) == (3, "command line")
    # the saved form says the same, one `# source` comment per key
    lines = dict(line.split(": ", 1) for line in cfg.to_yaml().splitlines() if not line.startswith("#"))
    assert lines["seed"] == "42  # default" and lines["lr"] == f"1.0e-05  # {src}"
    assert lines["batch_size"] == "16  # command line"


@pytest.mark.parametrize("argv", [["--lr", "0.002"], ["--lr=0.002"], ["--lr", "2e-3"], ["--lr=2E-3"],
                                  ["--lr", "2.0e-3"]], ids=" ".join)
def test_command_line_number_forms(argv: list[str]) -> None:
    cfg = load_config(argv, notices=[])
    assert cfg.lr == 0.002 and isinstance(cfg.lr, float) and cfg.sources["lr"] == "command line"


def test_command_line_flags_lists_and_strings(tmp_path: Path) -> None:
    recipe = write(tmp_path / "r.yaml", "ema: true\nval_while_train: true\n")
    cfg = load_config(["-c", str(recipe), "--pretrained", "--no-ema", "--no_val_while_train", "--clip_grad",
                       "--scale", "0.5", "1.0", "--val_split", "2012", "--ckpt_save_dir=007"], notices=[])
    assert cfg.pretrained is True  # bare flag: true (MindCV's `nargs='?', const=True`)
    assert cfg.ema is False and cfg.val_while_train is False  # --no-KEY / --no_KEY over the YAML's true
    assert cfg.sources["ema"] == "command line"
    assert cfg.clip_grad is True and cfg.scale == (0.5, 1.0)
    # string keys keep the text as typed: a folder named 2012 is not the integer 2012, '007' keeps its zeros
    assert cfg.val_split == "2012" and cfg.ckpt_save_dir == "007"
    assert load_config(["--pretrained", "false"], notices=[]).pretrained is False
    assert load_config(["--pretrained", "w/vit.pth"], notices=[]).pretrained == "w/vit.pth"
    assert load_config(["--ema", "--no-ema"], notices=[]).ema is False  # the last one wins


def test_exponent_floats_in_yaml(tmp_path: Path) -> None:
    # PyYAML (YAML 1.1) reads `1e-5` without a dot as a string; MindCV's recipes are written that way.
    recipe = write(tmp_path / "r.yaml", "lr: 5e-4\nmin_lr: 1e-6\nweight_decay: 5E-2\nwarmup_factor: 1.0e-3\n"
                                        "ema_decay: 0.9998\nloss_scale: 1024\n")
    cfg = load_config(["-c", str(recipe)], notices=[])
    assert (cfg.lr, cfg.min_lr, cfg.weight_decay, cfg.warmup_factor) == (5e-4, 1e-6, 5e-2, 1e-3)
    assert isinstance(cfg.loss_scale, float) and cfg.loss_scale == 1024.0


# -- MindCV's recipe, unchanged ---------------------------------------------------------------------------------

def test_mindcv_vit_recipe_loads_unchanged_with_one_line_notices(tmp_path: Path) -> None:
    recipe = write(tmp_path / "vit_b32_224.yaml", MINDCV_VIT_B32)
    notices: list[str] = []
    cfg = load_config(["-c", str(recipe)], notices=notices)
    ignored = ["mode", "device_target", "dataset_sink_mode", "val_amp_level", "amp_cast_list",
               "drop_overflow_update", "eval_shuffle"]
    assert len(notices) == len(ignored) + 1  # + the renamed filter_bias_and_bn
    for key in ignored:
        (line,) = [n for n in notices if f"'{key}'" in n]
        assert "ignored" in line and "\n" not in line
    assert any("'filter_bias_and_bn'" in n and "'weight_decay_filter'" in n for n in notices)
    # every value MindCV means is taken as MindCV means it
    assert cfg.weight_decay_filter == "norm_and_bias"  # filter_bias_and_bn: True
    assert (cfg.distribute, cfg.amp_level, cfg.loss_scale_type, cfg.loss_scale) == (True, "O2", "fixed", 1024.0)
    assert (cfg.ckpt_save_policy, cfg.keep_checkpoint_max, cfg.ckpt_save_dir) == ("top_k", 10, "./vit_b32_224")
    assert (cfg.scheduler, cfg.lr, cfg.min_lr, cfg.warmup_epochs, cfg.decay_epochs) == (
        "warmup_cosine_decay", 0.00075, 1e-6, 38, 262)
    assert (cfg.lr_epoch_stair, cfg.pretrained, cfg.ckpt_path, cfg.crop_pct) == (True, False, "", 0.875)
    assert cfg.color_jitter == (0.4, 0.4, 0.4) and cfg.auto_augment is None
    # ... and used: the list of jitter strengths reaches the training transform
    cfg = dataclasses.replace(cfg, color_jitter=(0.4, 0.3, 0.2))
    tf = build_transform(data_config_from_config(cfg, get_spec(cfg.model)), train=True, color_jitter=cfg.color_jitter)
    (jitter,) = [t for t in tf.transforms if isinstance(t, v2.ColorJitter)]
    assert (jitter.brightness, jitter.contrast, jitter.saturation) == ((0.6, 1.4), (0.7, 1.3), (0.8, 1.2))


def test_every_mindcv_option_is_known() -> None:
    unknown = [k for k in MINDCV_KEYS if k not in FIELDS and k not in IGNORED_KEYS and k not in RENAMED_KEYS]
    assert unknown == []
    notes: list[str] = []
    cfg = load_config(["--dynamic_loss_scale", "--aux_factor", "0.0"], notices=notes)
    assert cfg.loss_scale_type == "dynamic" and len(notes) == 2


# -- errors that say what to do ---------------------------------------------------------------------------------

@pytest.mark.parametrize("where, key, suggestion", [
    ("yaml", "weight_decy", "weight_decay"), ("yaml", "warmup_epoch", "warmup_epochs"),
    ("cli", "batchsize", "batch_size"), ("cli", "lr-epoch-stair-x", "lr_epoch_stair"),
    ("cli", "dataset_sink", "dataset_sink_mode"),  # an ignored MindCV key is a valid suggestion too
])
def test_unknown_key_names_it_and_suggests_the_closest(tmp_path: Path, where: str, key: str, suggestion: str) -> None:
    if where == "yaml":
        argv, source = ["-c", str(write(tmp_path / "r.yaml", f"lr: 0.01\n{key}: 3\n"))], "yaml:"
    else:
        argv, source = [f"--{key}", "3"], "command line"
    with pytest.raises(ConfigError) as e:
        load_config(argv, notices=[])
    msg = str(e.value)
    assert f"'{key.replace('-', '_')}'" in msg and source in msg and f"did you mean '{suggestion}'?" in msg


def test_unknown_key_with_nothing_close_points_to_help() -> None:
    with pytest.raises(ConfigError, match=r"unknown config key 'zzz_qqq'.*vitkit train --help"):
        load_config(["--zzz_qqq", "1"], notices=[])


@pytest.mark.parametrize("text, key, expected", [
    ("batch_size: 32.5", "batch_size", "an integer"), ("lr: fast", "lr", "a number"),
    ("ema: maybe", "ema", "true or false"), ("scale: 0.5", "scale", "a list of 2 numbers"),
    ("num_samples: [1, 2]", "num_samples", "an integer or null"),
])
def test_wrong_type_names_key_and_expected_type(tmp_path: Path, text: str, key: str, expected: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(["-c", str(write(tmp_path / "r.yaml", text + "\n"))], notices=[])
    assert re.search(rf"config key '{key}' \(yaml:[^)]*\): expected {expected}, got ", str(e.value))
    with pytest.raises(ConfigError, match=rf"config key '{key}' \(command line\): expected {expected}"):
        load_config([f"--{key}", *text.split(": ")[1].strip("[]").split(", ")], notices=[])


def test_a_value_outside_the_choices_suggests_one() -> None:
    with pytest.raises(ConfigError, match=r"config key 'opt': 'adamm' is not one of .*did you mean 'adam"):
        load_config(["--opt", "adamm"], notices=[])


# -- the resolved config in the run directory -------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[str], Path]:
    """One optimizer step of vit_n_4_32 on 8 sample images, from a recipe file plus command-line overrides."""
    root = tmp_path_factory.mktemp("cfgrun")
    for cls in ("airplane", "cat"):
        (root / "data" / "train" / cls).mkdir(parents=True)
        for f in sorted((SAMPLE / "train" / cls).iterdir())[:4]:
            (root / "data" / "train" / cls / f.name).symlink_to(f)
    recipe = write(root / "recipe.yaml", "model: vit_n_4_32\nimage_resize: 32\nlr: 3e-4\nweight_decay: 0.05\n"
                                         "epoch_size: 1\nwarmup_epochs: 0\nmode: 0\n")
    argv = ["-c", str(recipe), "--dataset", "imagefolder", "--data_dir", str(root / "data"), "--batch_size", "8",
            "--num_parallel_workers", "0", "--ckpt_save_dir", str(root / "run"), "--device", "cpu"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a one-step run: spinning OpenMP threads only cost time on a shared machine
    try:
        run(argv)
    finally:
        torch.set_num_threads(threads)
    return argv, root / "run"


def test_run_saves_the_resolved_config_with_sources_and_it_round_trips(tiny_run: tuple[list[str], Path]) -> None:
    argv, run_dir = tiny_run
    expected = resolve(argv, notices=[])
    text = (run_dir / "config.yaml").read_text()
    # every key once, with its source as a trailing comment
    entries = [line for line in text.splitlines() if not line.startswith("#")]
    assert sorted(line.split(":", 1)[0] for line in entries) == sorted(FIELDS)
    saved_sources = {line.split(":", 1)[0]: line.rsplit("  # ", 1)[1] for line in entries}
    assert saved_sources == {k: expected.sources.get(k, "default") for k in FIELDS}
    assert saved_sources["lr"].startswith("yaml:") and saved_sources["batch_size"] == "command line"
    assert saved_sources["seed"] == "default"
    # the file is a recipe: loading it back gives the same config, and so does the checkpoint's copy
    again = load_config(["-c", str(run_dir / "config.yaml")], notices=[])
    assert again == expected and from_dict(yaml.safe_load(text)) == expected
    assert from_dict(load_checkpoint(run_dir / "last.safetensors").config) == expected


def test_resolve_sets_world_size_global_batch_and_scales_lr() -> None:
    four = types.SimpleNamespace(world_size=4)  # what resolve reads of a launcher's LaunchEnv
    args = ["--batch_size", "64", "--gradient_accumulation_steps", "2", "--lr", "1.6e-3",
            "--reference_batch_size", "4096"]
    cfg = resolve(args, launch=four, notices=(notes := []))
    assert (cfg.world_size, cfg.global_batch) == (4, 512)
    assert global_batch_line(cfg) == "global batch 512 = batch_size 64 per process x 4 processes x 2 accumulation steps"
    assert any("linearly scaled lr would be 0.0002" in n for n in notes) and cfg.lr == 1.6e-3  # warned, not applied
    scaled = resolve([*args, "--scale_lr"], launch=four, notices=[])
    assert scaled.lr == pytest.approx(2e-4) and "scaled by scale_lr" in scaled.sources["lr"]
    same = resolve(["--batch_size", "512", "--lr", "1e-3", "--reference_batch_size", "4096", "--scale_lr"],
                   launch=types.SimpleNamespace(world_size=8), notices=(notes := []))
    assert same.lr == 1e-3 and not any("warning" in n for n in notes)
    with pytest.raises(ConfigError, match="reference_batch_size"):
        resolve(["--scale_lr"], notices=[])
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.lr = 1.0  # type: ignore[misc]


def test_resolve_falls_back_to_one_process_only_for_a_recipe_setting(tmp_path: Path) -> None:
    recipe = write(tmp_path / "r.yaml", "distribute: true\n")
    cfg = resolve(["-c", str(recipe)], notices=(notes := []))
    assert not cfg.distribute and cfg.world_size == 1
    assert any("no launcher started this process; running in one process" in n for n in notes)
    # on the command line it stays true, and starting without a launcher is then an error (launch)
    assert resolve(["-c", str(recipe), "--distribute"], notices=[]).distribute is True
    assert resolve(["-c", str(recipe)], launch=types.SimpleNamespace(world_size=2), notices=[]).distribute


def test_optimizer_and_schedule_defaults_are_written_out() -> None:
    assert load_config(["--opt", "lion"], notices=[]).beta2 == 0.99  # the Lion paper's
    assert load_config(["--opt", "adamw"], notices=[]).beta2 == 0.999
    assert load_config(["--opt", "lion", "--beta2", "0.98"], notices=[]).beta2 == 0.98
    assert load_config(["--decay_rate", "0.5"], notices=[]).power == 0.5  # MindCV's polynomial power
    assert load_config(["--power", "2"], notices=[]).power == 2.0
    assert load_config([], notices=[]).interpolation is None  # the model's own
