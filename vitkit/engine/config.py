"""One config schema for every verb: defaults <- YAML <- command line -> one validated `Config`.

Keys are MindCV's (`mindcv/config.py`), so a MindCV recipe loads unchanged; keys that have no meaning in
PyTorch (graph mode, dataset sinking, Ascend device ids) are accepted with a one-line notice. An unknown key
or a wrong type is a `ConfigError` naming the key and the closest valid one. Every value remembers where it
came from (`Config.sources`), and that record is saved in the run directory.

`resolve` is the one place a run's config is completed: the built-in demo recipe or a resumed checkpoint's
config as defaults, smoke shrinking, the run folder (a fresh timestamped one when none was given; the newest
run for `--resume`), the single-process fallback, world size, global batch and lr scaling, and the
optimizer's / schedule's own defaults written out as values. The result is frozen.

An `--epoch_size` on the command line over a recipe's keeps the recipe's schedule shape: warmup_epochs and
decay_epochs not given there are scaled with it, as `--smoke` does. An empty `ckpt_path` / `pretrained`
(MindCV's `''`) means none.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import functools
import json
import math
import os
import re
import reprlib
import sys
import time
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Union

import yaml

from vitkit.args import VerbParser
from vitkit.constants import INTERPOLATIONS
from vitkit.engine.checkpoint import read_metadata
from vitkit.engine.saver import LAST, PREV
from vitkit.errors import ConfigError, VitkitError  # noqa: E402  (re-exported: callers import it from here too)
from vitkit.models.registry import get_spec


def _f(default: Any, help: str, group: str, choices: Sequence[Any] | None = None, **kw: Any) -> Any:
    meta = {"help": help, "group": group, "choices": tuple(choices) if choices else None}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta, **kw)
    return field(default=default, metadata=meta, **kw)


SYS, DATA, AUG, MODEL, OPT, SCHED, LOSS, CKPT = (
    "system", "dataset", "augmentation", "model", "optimizer", "scheduler", "loss", "checkpoint")


@dataclass(frozen=True)
class Config:
    # -- system -----------------------------------------------------------------------------------
    distribute: bool = _f(False, "run data-parallel over all launched processes (torchrun/mpirun)", SYS)
    device: str = _f("auto", "auto (CUDA if present, else CPU), cpu, cuda or cuda:N", SYS)
    seed: int = _f(42, "random seed; each rank adds its rank for augmentation", SYS)
    deterministic: bool = _f(False, "bit-identical runs (deterministic kernels, fixed worker seeds)", SYS)
    log_interval: int = _f(100, "steps between log lines when output is not a terminal", SYS)
    val_while_train: bool = _f(False, "validate on val_split during training", SYS)
    val_interval: int = _f(1, "epochs between validations", SYS)
    compile: bool = _f(False, "torch.compile the model", SYS)
    fsdp: bool = _f(False, "shard parameters with FSDP instead of replicating them (DDP)", SYS)
    scale_lr: bool = _f(False, "scale lr linearly by global batch / reference_batch_size", SYS)
    reference_batch_size: int | None = _f(None, "global batch the recipe's lr was tuned for", SYS)
    nan_policy: str = _f("stop", "on a non-finite loss: stop, or rollback to the last checkpoint", SYS,
                         choices=("stop", "rollback"))
    max_steps: int | None = _f(None, "stop after this many optimizer steps (schedule unchanged)", SYS)
    resume: bool | str = _f(False, "continue a run: a checkpoint path, or true for the latest "
                                         "checkpoint in ckpt_save_dir", SYS)
    smoke: bool = _f(False, "shrink any recipe to a few steps on a few images, to check it runs", SYS)
    world_size: int = _f(1, "processes the run is launched on (set by resolve from the launcher)", SYS)
    global_batch: int | None = _f(None, "batch_size x world_size x gradient_accumulation_steps (set by "
                                           "resolve)", SYS)
    # -- dataset ----------------------------------------------------------------------------------
    dataset: str = _f("imagenet", "imagenet / imagefolder (data_dir/<split>/<class>/*), cifar10, cifar100, wds (tar "
                                  "shards from `vitkit data pack`), hf (Hugging Face datasets)", DATA)
    data_dir: str | None = _f(None, "dataset root; wds: a packed folder, a shard pattern (DIR/{split}/shard-"
                                    "{000000..000127}.tar) or an fsspec URL; hf: a saved or parquet folder, or a hub "
                                    "id", DATA)
    shuffle: bool = _f(True, "shuffle training data", DATA)
    dataset_download: bool = _f(False, "download the dataset (cifar10/cifar100) if it is not in data_dir", DATA)
    batch_size: int = _f(128, "images per device per step", DATA)
    drop_remainder: bool = _f(True, "drop the last partial training batch", DATA)
    train_split: str = _f("train", "training split folder", DATA)
    val_split: str = _f("val", "validation split folder", DATA)
    image_column: str = _f("image", "hf: the column holding the images", DATA)
    label_column: str = _f("label", "hf: the column holding the class labels", DATA)
    num_parallel_workers: int = _f(8, "data loader worker processes", DATA)
    num_samples: int | None = _f(None, "use a stratified, seeded subset of this many training images", DATA)
    val_num_samples: int | None = _f(None, "validate on a stratified, seeded subset of this many images", DATA)
    num_classes: int | None = _f(None, "number of classes (default: the dataset's)", DATA)
    aug_repeats: int = _f(0, "repeated augmentation: each image this many times per epoch (0/1 = off)", DATA)
    bad_image_limit: float = _f(0.01, "stop when more than this share of an epoch's images (and more than 10) "
                                      "are unreadable; unreadable images are replaced and counted", DATA)
    in_memory: bool | None = _f(None, "decode small images (<= 64 px) once into memory and augment whole "
                                         "batches (default: when they fit in 2 GiB)", DATA)
    gpu_decode: bool = _f(False, "decode JPEGs on the GPU (nvJPEG) and crop/flip/normalize there", DATA)
    # -- augmentation -----------------------------------------------------------------------------
    image_resize: int = _f(224, "training crop size and model input size", AUG)
    scale: tuple[float, float] = _f((0.08, 1.0), "RandomResizedCrop area range", AUG)
    ratio: tuple[float, float] = _f((0.75, 1.333), "RandomResizedCrop aspect-ratio range", AUG)
    hflip: float = _f(0.5, "horizontal flip probability", AUG)
    vflip: float = _f(0.0, "vertical flip probability", AUG)
    # MindCV's ViT recipes write a list (`color_jitter: [0.4, 0.4, 0.4]`), as timm accepts: 3 or 4 strengths.
    color_jitter: float | tuple[float, float, float] | tuple[float, float, float, float] | None = _f(
        None, "jitter strength: one number for brightness/contrast/saturation, or a list of 3 (or 4, with hue)", AUG)
    interpolation: str | None = _f(None, "resize interpolation (default: the model's)", AUG,
                                      choices=(None, *INTERPOLATIONS))
    auto_augment: str | None = _f(None, "randaug-m9-mstd0.5, autoaug, autoaugr, trivialaugwide, augmix, 3a", AUG)
    re_prob: float = _f(0.0, "random erasing probability", AUG)
    re_scale: tuple[float, float] = _f((0.02, 0.33), "random erasing area range", AUG)
    re_ratio: tuple[float, float] = _f((0.3, 3.3), "random erasing aspect-ratio range", AUG)
    re_value: float | str = _f(0, "random erasing fill: a number or 'random'", AUG)
    re_max_attempts: int = _f(10, "random erasing attempts", AUG)
    mean: tuple[float, float, float] | None = _f(None, "normalization mean (0-1 or 0-255 units; default: "
                                                          "model's)", AUG)
    std: tuple[float, float, float] | None = _f(None, "normalization std (0-1 or 0-255 units; default: model's)",
                                                   AUG)
    crop_pct: float | None = _f(None, "eval: resize to image_resize / crop_pct, center crop (default: model's)", AUG)
    mixup: float = _f(0.0, "mixup alpha (0 = off)", AUG)
    cutmix: float = _f(0.0, "cutmix alpha (0 = off)", AUG)
    cutmix_prob: float = _f(1.0, "probability of applying mixup or cutmix to a batch", AUG)
    mixup_switch_prob: float = _f(0.5, "probability of cutmix instead of mixup when both are on", AUG)
    # -- model ------------------------------------------------------------------------------------
    model: str = _f("vit_b_32_224", "registered model name (`vitkit models`)", MODEL)
    pretrained: bool | str = _f(False, "true (the model's default weights), a file, URL or hub id", MODEL)
    ckpt_path: str = _f("", "weights to start from (any supported format), or with resume_opt a run to resume", MODEL)
    resume_opt: bool = _f(False, "with ckpt_path: also restore optimizer, scheduler and step", MODEL)
    in_channels: int = _f(3, "input channels", MODEL)
    drop_rate: float = _f(0.0, "dropout before the head", MODEL)
    drop_path_rate: float = _f(0.0, "stochastic depth rate of the last block", MODEL)
    grad_checkpointing: bool = _f(False, "recompute activations in backward to save memory", MODEL)
    ema: bool = _f(False, "keep an exponential moving average of the weights", MODEL)
    ema_decay: float = _f(0.9999, "EMA decay per step", MODEL)
    epoch_size: int = _f(90, "number of training epochs", MODEL)
    amp_level: str = _f("O0", "O0 fp32; O1/O2 autocast (bf16 where supported, else fp16 + loss scaling); O3 bf16 "
                              "weights", MODEL, choices=("O0", "O1", "O2", "O3"))
    amp_dtype: str = _f("auto", "dtype of amp_level O1-O3: auto (bf16 on GPUs that have it, else fp16 + loss "
                                "scaling; fp32 on CPU), bfloat16 or float16 (also on CPU)", MODEL,
                        choices=("auto", "bfloat16", "float16"))
    gradient_accumulation_steps: int = _f(1, "micro-batches per optimizer step", MODEL)
    clip_grad: bool = _f(False, "clip the global gradient norm to clip_value", MODEL)
    clip_value: float = _f(15.0, "max gradient norm", MODEL)
    # -- checkpoint -------------------------------------------------------------------------------
    ckpt_save_dir: str = _f("./ckpt", "run directory: checkpoints, logs, metrics (when not given: a new "
                                      "timestamped folder under ./ckpt for each run)", CKPT)
    overwrite: bool = _f(False, "start over in a ckpt_save_dir that holds a run: remove that run's files (checkpoints, "
                                "metrics, config, logs; nothing else) first", CKPT)
    ckpt_save_interval: int = _f(1, "epochs between checkpoints", CKPT)
    ckpt_save_policy: str = _f("latest_k", "which checkpoints to keep", CKPT, choices=("latest_k", "top_k"))
    keep_checkpoint_max: int = _f(10, "how many checkpoints the policy keeps (plus last and best)", CKPT)
    # -- optimizer --------------------------------------------------------------------------------
    opt: str = _f("adamw", "optimizer", OPT, choices=("adamw", "adam", "sgd", "momentum", "lamb", "lion"))
    momentum: float = _f(0.9, "momentum (sgd/momentum) or beta1 (adam/adamw/lamb/lion)", OPT)
    beta2: float | None = _f(None, "second-moment decay (adam/adamw/lamb), beta2 of lion (default: the "
                                      "optimizer's own, 0.99 for lion as in its paper, else 0.999)", OPT)
    eps: float = _f(1e-8, "optimizer epsilon", OPT)
    weight_decay: float = _f(1e-6, "weight decay", OPT)
    weight_decay_filter: str = _f("disable", "which parameters skip weight decay: disable (none), "
                                             "auto (no_weight_decay + 1-d), norm_and_bias (1-d)", OPT,
                                  choices=("disable", "auto", "norm_and_bias"))
    use_nesterov: bool = _f(False, "nesterov momentum", OPT)
    layer_decay: float | None = _f(None, "layer-wise lr decay factor (e.g. 0.65 for finetuning)", OPT)
    freeze_backbone: bool = _f(False, "linear probe: train only the classifier head; every other weight is "
                                      "frozen and runs in eval mode (no dropout or drop path in it)", OPT)
    loss_scale_type: str = _f("dynamic", "fp16 loss scaling", OPT, choices=("fixed", "dynamic", "auto"))
    loss_scale: float = _f(1024.0, "initial (dynamic) or constant (fixed) fp16 loss scale", OPT)
    # -- scheduler --------------------------------------------------------------------------------
    scheduler: str = _f("cosine_decay", "lr schedule", SCHED, choices=(
        "cosine_decay", "step_decay", "multi_step_decay", "exponential_decay", "polynomial_decay",
        "constant", "warmup_cosine_decay"))
    lr: float = _f(0.001, "peak learning rate", SCHED)
    min_lr: float = _f(1e-6, "final learning rate of decaying schedules", SCHED)
    warmup_epochs: float = _f(3, "linear warmup length in epochs", SCHED)
    warmup_factor: float = _f(0.0, "warmup starts at lr * warmup_factor", SCHED)
    decay_epochs: float | None = _f(None, "decay length in epochs (default: epoch_size - warmup_epochs)", SCHED)
    decay_rate: float = _f(0.9, "factor of step/multi_step/exponential decay", SCHED)
    multi_step_decay_milestones: list[int] = _f([30, 60, 90], "epochs at which multi_step_decay decays", SCHED)
    lr_epoch_stair: bool = _f(False, "keep lr constant within an epoch", SCHED)
    num_cycles: int = _f(1, "cosine cycles", SCHED)
    cycle_decay: float = _f(1.0, "peak lr factor per cosine cycle", SCHED)
    power: float | None = _f(None, "power of polynomial_decay (default: decay_rate, as MindCV)", SCHED)
    # -- loss -------------------------------------------------------------------------------------
    loss: str = _f("CE", "CE (softmax cross entropy) or BCE", LOSS, choices=("CE", "BCE"))
    label_smoothing: float = _f(0.0, "label smoothing", LOSS)

    # Filled by the loader, not by the user: where each value came from.
    sources: dict[str, str] = field(default_factory=dict, repr=False, compare=False)

    # -- derived --------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out = {}
        for f in fields(self):
            if f.name == "sources":
                continue
            v = getattr(self, f.name)
            out[f.name] = list(v) if isinstance(v, tuple) else v
        return out

    def to_yaml(self, with_sources: bool = True) -> str:
        """The resolved config; each line says where its value came from."""
        lines, group = [], None
        for f in fields(self):
            if f.name == "sources":
                continue
            if f.metadata["group"] != group:
                group = f.metadata["group"]
                lines.append(f"# -- {group}")
            dumped = yaml.safe_dump({f.name: self.to_dict()[f.name]}, default_flow_style=True, width=1000).strip()
            dumped = dumped[1:-1] if dumped.startswith("{") else dumped
            src = self.sources.get(f.name, "default")
            lines.append(f"{dumped}  # {src}" if with_sources else dumped)
        return "\n".join(lines) + "\n"


# Keys of MindCV recipes that mean nothing in PyTorch: accepted, announced, ignored.
IGNORED_KEYS: dict[str, str] = {
    "mode": "MindSpore graph/pynative mode; PyTorch runs eagerly (use compile: true for a compiled graph)",
    "dataset_sink_mode": "MindSpore data sinking; the PyTorch loader prefetches instead",
    "device_target": "the device is chosen automatically (or with device:)",
    "amp_cast_list": "autocast decides per op in PyTorch",
    "drop_overflow_update": "the fp16 loss scaler always skips steps with overflowed gradients",
    "enable_modelarts": "ModelArts is Huawei-cloud specific",
    "multi_data_url": "ModelArts is Huawei-cloud specific",
    "data_url": "ModelArts is Huawei-cloud specific",
    "ckpt_url": "ModelArts is Huawei-cloud specific",
    "train_url": "ModelArts is Huawei-cloud specific",
    "pretrain_url": "ModelArts is Huawei-cloud specific",
    "jit_level": "MindSpore compiler setting",
    "auto_tuning": "MindSpore compiler setting",
    "val_amp_level": "validation uses amp_level",
    "ps_mode": "MindSpore parameter-server mode",
    "aug_splits": "augmentation splits (AugMix JSD) are not supported; ignored",
    "num_parallel_workers_eval": "one worker setting covers both loaders",
    "eval_batch_size": "validation uses batch_size",
    "eval_shuffle": "validation order does not change its metrics",
    "aux_factor": "auxiliary-head loss weight of Inception-style models; ViTs have no auxiliary head",
    "reduction": "the loss is always the batch mean",
}
# Old MindCV spellings mapped onto today's keys.
RENAMED_KEYS: dict[str, tuple[str, Any]] = {
    "filter_bias_and_bn": ("weight_decay_filter", lambda v: "norm_and_bias" if v else "disable"),
    "dynamic_loss_scale": ("loss_scale_type", lambda v: "dynamic" if v else "fixed"),
}

FIELDS = {f.name: f for f in fields(Config) if f.name != "sources"}
# Keys whose empty value ('' in MindCV's recipes and CLI, or a bare `--key ""`) means none: their default.
EMPTY_MEANS_NONE = ("ckpt_path", "pretrained", "resume")


def _type_name(tp: Any) -> str:
    names = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}
    if tp in names:
        return names[tp]
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) if a is not type(None) else "null" for a in typing.get_args(tp))
    if origin is tuple:
        return f"a list of {len(typing.get_args(tp))} numbers"
    if origin is list:
        return "a list of integers"
    return str(tp)


def _coerce(value: Any, tp: Any) -> tuple[bool, Any]:
    """(ok, value converted to `tp`). Only lossless conversions: int -> float, list -> tuple."""
    if tp is Any:
        return True, value
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        for arg in typing.get_args(tp):
            ok, v = _coerce(value, arg)
            if ok:
                return True, v
        return False, value
    if tp is type(None):
        return value is None, None
    if tp is bool:
        return isinstance(value, bool), value
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if tp is float:
        # YAML 1.1 (PyYAML) reads `1e-5` (no dot) as a string; MindCV recipes and users write it that way.
        numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not (numeric or isinstance(value, str) and _is_number(value)):
            return False, value
        try:
            number = float(value)
        except OverflowError:  # an integer beyond float range
            return False, value
        return math.isfinite(number), number  # inf/nan (YAML .inf, 1e400) are no setting
    if tp is str:
        return isinstance(value, str), value
    if origin is tuple:
        args = typing.get_args(tp)
        if isinstance(value, (list, tuple)) and len(value) == len(args):
            out = [_coerce(v, a) for v, a in zip(value, args)]
            return all(ok for ok, _ in out), tuple(v for _, v in out)
        return False, value
    if origin is list:
        (arg,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):  # `--multi_step_decay_milestones 30` is a list of one
            ok, v = _coerce(value, arg)
            return ok, [v] if ok else value
        out = [_coerce(v, arg) for v in value]
        return all(ok for ok, _ in out), [v for _, v in out]
    raise TypeError(f"unsupported config type {tp}")


_HINTS = typing.get_type_hints(Config)


def _suggest(key: str) -> str:
    close = difflib.get_close_matches(key, list(FIELDS) + list(IGNORED_KEYS), n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else "; see `vitkit train --help` for the keys"


def _set(values: dict[str, Any], key: str, value: Any, source: str, notices: list[str]) -> None:
    """Check and convert one value into `values` (its source in `values["sources"]`)."""
    if key in IGNORED_KEYS:
        notices.append(f"note: '{key}' ({source}) is ignored: {IGNORED_KEYS[key]}")
        return
    if key in RENAMED_KEYS:
        new_key, convert = RENAMED_KEYS[key]
        notices.append(f"note: '{key}' ({source}) is the old spelling of '{new_key}'")
        key, value = new_key, convert(value)
    if key not in FIELDS:
        raise ConfigError(f"unknown config key {key!r} ({source}){_suggest(key)}")  # repr: one line, always
    if key in EMPTY_MEANS_NONE and value in (None, ""):  # MindCV's `ckpt_path: ''`, `--ckpt_path ""`
        value = FIELDS[key].default
    tp = _HINTS[key]
    try:
        ok, converted = _coerce(value, tp)
    except RecursionError:  # a 5000-deep YAML list
        ok = False
    if not ok:  # reprlib: an alias bomb's value is never expanded into the message
        raise ConfigError(f"config key '{key}' ({source}): expected {_type_name(tp)}, got {_short_repr(value)}")
    if isinstance(converted, str) and "\x00" in converted:
        raise ConfigError(f"config key '{key}' ({source}): a NUL character in {_short_repr(converted)}")
    if key in PATH_KEYS and isinstance(converted, str) and (why := path_too_long(converted)):
        raise ConfigError(f"config key '{key}' ({source}): {_short_repr(converted)} {why}")
    values[key] = converted
    values.setdefault("sources", {})[key] = source


# Keys that name files or folders: each is checked against the file system's name limits when read, so a
# name no file can have is one line here, not an OSError traceback from the first stat of it.
PATH_KEYS = ("resume", "data_dir", "pretrained", "ckpt_path", "ckpt_save_dir", "train_split", "val_split")


def path_too_long(path: str) -> str | None:
    """Why no file can have this name (a component over NAME_MAX bytes, the whole over PATH_MAX), else None."""
    try:
        name_max, path_max = os.pathconf("/", "PC_NAME_MAX"), os.pathconf("/", "PC_PATH_MAX")
    except (OSError, ValueError, AttributeError):  # no pathconf (Windows): the common limits
        name_max, path_max = 255, 4096
    size = lambda text: len(text.encode("utf-8", "surrogatepass"))  # noqa: E731 - bytes, as the kernel counts
    if size(path) >= path_max:
        return f"is longer than any path can be ({path_max} bytes)"
    longest = max((size(part) for part in path.split(os.sep)), default=0)
    return f"has a name longer than any file's ({longest} > {name_max} bytes)" if longest > name_max else None


def _short_repr(value: Any) -> str:
    """At most ~80 characters of `value`, whatever its size or nesting (reprlib never expands it all)."""
    r = reprlib.Repr()
    r.maxstring, r.maxother, r.maxlevel, r.maxlist = 60, 60, 2, 4
    text = r.repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _parse_cli_value(text: str, key: str = "") -> Any:
    """A YAML scalar or list (`1e-3`, `true`, `[0.4, 0.4, 0.4]`); a string key keeps the text as typed, so
    `--val_split 2012` names the folder '2012' as it does with argparse (MindCV), not the integer 2012."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if value is not None and not isinstance(value, str) and _HINTS.get(key) in (str, str | None):
        return text
    return value


class _ConfigValue(argparse.Action):
    """One config key on the command line -> `(key, value)` in `namespace.config_pairs`, in order: a bare
    flag is true (`--no_KEY` false), several values a list, each value read as YAML (`_parse_cli_value`)."""

    plain_metavar = True  # `--lr FLOAT`, not argparse's `--lr [FLOAT ...]`

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        if self.const is False:
            value: Any = False
        elif not values:
            value = True
        else:
            parsed = [_parse_cli_value(v, self.dest) for v in values]
            value = parsed[0] if len(parsed) == 1 else parsed
        namespace.config_pairs = [*(getattr(namespace, "config_pairs", None) or []), (self.dest, value)]


def _metavar(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return "|".join(dict.fromkeys(_metavar(a) for a in typing.get_args(tp) if a is not type(None)))
    if origin in (tuple, list):
        return f"{_metavar(typing.get_args(tp)[0])} ..."
    return {int: "INT", float: "FLOAT", bool: "BOOL", str: "STR"}.get(tp, "VALUE")


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """Every config key as an option of `parser`, one group per schema group: the one command line of the
    verbs that take a run config (train, validate, demo). MindCV keys we ignore or renamed are accepted too."""
    parser.add_argument("-c", "--config", default=None, metavar="CONFIG.yaml",
                        help="YAML recipe (ours in configs/, or MindCV's own) under the command-line keys")
    parser.set_defaults(config_pairs=None)
    groups: dict[str, Any] = {}
    for f in FIELDS.values():
        group = groups.get(f.metadata["group"]) or groups.setdefault(
            f.metadata["group"], parser.add_argument_group(f.metadata["group"]))
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        choices = f.metadata.get("choices")
        extra = f" [{'|'.join(map(str, choices))}]" if choices else ""
        text = f"{f.metadata['help']}{extra} (default: {default!r})".replace("%", "%%")
        group.add_argument(f"--{f.name}", action=_ConfigValue, nargs="*", default=argparse.SUPPRESS,
                           metavar=_metavar(_HINTS[f.name]), help=text)
        if _coerce(False, _HINTS[f.name])[0]:
            parser.add_argument(f"--no_{f.name}", dest=f.name, action=_ConfigValue, nargs=0, const=False,
                                default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    for key in (*IGNORED_KEYS, *RENAMED_KEYS):
        if key not in FIELDS:
            parser.add_argument(f"--{key}", action=_ConfigValue, nargs="*", default=argparse.SUPPRESS,
                                help=argparse.SUPPRESS)


class _ConfigParser(VerbParser):
    """The schema's own parser: an argparse error is a one-line ConfigError, an unknown key names the closest."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        # `--lr -1e-3`, `--min_lr -inf`: negative numbers are values (argparse knows only -1 and -.5)
        self._negative_number_matcher = re.compile(r"^-(\d+\.?\d*|\.\d+)(e[-+]?\d+)?$|^-(inf|nan)$", re.I)

    def error(self, message: str) -> typing.NoReturn:
        raise ConfigError(" ".join(message.split()))

    def parse_config(self, argv: Sequence[str]) -> tuple[str | None, list[tuple[str, Any]]]:
        ns, extra = self.parse_known_args(list(argv))
        if extra:
            first = extra[0]
            if first.startswith("--") and len(first) > 2:
                key = first[2:].partition("=")[0]
                raise ConfigError(f"unknown config key {key!r} (command line){_suggest(key)}")
            raise ConfigError(f"unexpected argument {first!r}: options look like --key value")
        return ns.config, list(ns.config_pairs or [])


def config_parser(verb: str, doc: str | None = None, *, cls: type[VerbParser] = VerbParser, **kw: Any) -> VerbParser:
    """A verb's parser with every config key (`add_config_arguments`)."""
    parser = cls(verb, doc, usage="%(prog)s [-c CONFIG.yaml] [--key value ...]", **kw)
    add_config_arguments(parser)
    return parser


@functools.cache
def _schema_parser() -> _ConfigParser:
    return config_parser("train", cls=_ConfigParser, add_help=False)  # type: ignore[return-value]


def parse_cli(argv: Sequence[str]) -> tuple[str | None, list[tuple[str, Any]]]:
    """`-c FILE --key value --key=value --flag --no-flag --key v1 v2` -> (config file, [(key, value)]).

    A flag with no value is true; several values make a list (`--scale 0.08 1.0`); `--no-flag` is false;
    `--a-b` and `--a_b` are the same key.
    """
    return _schema_parser().parse_config(argv)


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


class _RecipeLoader(yaml.SafeLoader):
    """yaml.safe_load's loader that refuses a key written twice in one mapping (YAML keeps the last one without
    a word, so `lr: 0.1` ... `lr: 0.2` would train at a rate the reader of the file may not have meant)."""


def _mapping_once(loader: _RecipeLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *defaults`, whose keys may be overridden here
            continue
        key = loader.construct_object(key_node)
        try:
            first = seen.setdefault(key, key_node.start_mark.line)
        except TypeError:  # an unhashable key (`? [a]`): refused later as not a key name
            continue
        if first != key_node.start_mark.line:
            raise yaml.constructor.ConstructorError(
                None, None, f"key {key!r} is written twice (lines {first + 1} and {key_node.start_mark.line + 1}); "
                            "keep one", key_node.start_mark)
    return loader.construct_mapping(node)


_RecipeLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_once)


def load_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if "\0" in str(p):
        raise ConfigError(f"config file {str(p)!r} is not a valid path (it holds a NUL byte)")
    try:
        special = p.exists() and not p.is_file()  # a folder, a FIFO or a device would fail late or block
    except OSError as e:  # a name too long for the file system (pathlib raises it from stat)
        raise ConfigError(f"config file {str(p)[:80]!r}... cannot be read ({e.strerror})") from None
    if special:
        raise ConfigError(f"config file {str(p)!r} is not a regular file")
    try:
        text = p.read_text()
    except FileNotFoundError:
        raise ConfigError(f"config file {str(p)!r} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:  # a folder, a long name, a checkpoint passed as -c
        why = e.strerror if isinstance(e, OSError) else "not a text file"
        raise ConfigError(f"config file {str(p)!r} cannot be read ({why})") from None
    try:
        data = yaml.load(text, Loader=_RecipeLoader) or {}  # noqa: S506 - a SafeLoader subclass
    except RecursionError:
        raise ConfigError(f"config file {str(p)!r} nests too deeply to be a recipe") from None
    except yaml.YAMLError as e:  # one line: where and what (str(e) spans several lines)
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"config file {str(p)!r} is not valid YAML{where}: "
                          f"{getattr(e, 'problem', None) or type(e).__name__}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(p)!r} must be a mapping of key: value")
    # MindCV recipes are flat; accept one level of grouping (`optimizer: {lr: ...}`) too.
    flat: dict[str, Any] = {}
    for k, v in data.items():
        if isinstance(v, dict) and k not in FIELDS:
            flat.update(v)
        else:
            flat[k] = v
    for k in flat:
        if not isinstance(k, str):  # `1: x`, `? [a]`, a bare `?`: YAML allows keys that name nothing here
            raise ConfigError(f"config file {str(p)!r}: {k!r} is not a config key name")
    return flat


def load_config(
    argv: Sequence[str] = (), *, defaults: dict[str, Any] | None = None, yaml_path: str | None = None,
    notices: list[str] | None = None, defaults_source: str = "built-in recipe",
) -> Config:
    """defaults <- YAML (`-c`) <- command line, then validated (not resolved: see `resolve`). An `--epoch_size`
    over the recipe's scales the recipe's warmup_epochs and decay_epochs with it (`_rescale_epochs`). Notices
    (ignored keys, rescaling) are appended to `notices` (printed to stderr when not given)."""
    return _build(parse_cli(argv), defaults=defaults, yaml_path=yaml_path, notices=notices,
                  defaults_source=defaults_source)


def _build(parsed: tuple[str | None, list[tuple[str, Any]]], *, defaults: dict[str, Any] | None,
           yaml_path: str | None, notices: list[str] | None, defaults_source: str) -> Config:
    cli_path, pairs = parsed
    notes: list[str] = [] if notices is None else notices
    values: dict[str, Any] = {"sources": {}}
    for key, value in (defaults or {}).items():
        _set(values, key, value, defaults_source, notes)
    path = cli_path or yaml_path
    if path:
        for key, value in load_yaml(path).items():
            _set(values, key, value, f"yaml:{path}", notes)
    recipe = {key: (values.get(key), values["sources"].get(key, "default")) for key in SCALED_WITH_EPOCHS}
    for key, value in pairs:
        _set(values, key, value, "command line", notes)
    _rescale_epochs(values, recipe, notes)
    # "the optimizer's / schedule's own default", written out as the value it means
    own = {"beta2": 0.99 if values.get("opt") == "lion" else 0.999,  # the Lion paper's beta2; else Adam's
           "power": values.get("decay_rate", FIELDS["decay_rate"].default)}  # MindCV: polynomial power = decay_rate
    values.update({key: value for key, value in own.items() if values.get(key) is None})
    cfg = validate(Config(**values))
    if notices is None:
        for n in notes:
            print(n, file=sys.stderr)
    return cfg


SCALED_WITH_EPOCHS = ("epoch_size", "warmup_epochs", "decay_epochs")


def _rescale_epochs(values: dict[str, Any], recipe: dict[str, tuple[Any, str]], notes: list[str]) -> None:
    """`--epoch_size N` over a recipe's (YAML or defaults, not a resumed checkpoint's): its warmup_epochs and
    decay_epochs, unless given on the command line too, scale by N / the recipe's epoch_size (as `--smoke`)."""
    sources = values["sources"]
    old, old_source = recipe["epoch_size"]
    old = FIELDS["epoch_size"].default if old is None else old
    new = values.get("epoch_size", old)
    if sources.get("epoch_size") != "command line" or old_source.startswith("checkpoint") or new == old \
            or not (isinstance(old, int) and isinstance(new, int) and 1 <= old <= 10**9 and 1 <= new <= 10**9):
        return  # (out of range: validate names the key)
    changed = []
    for key in ("warmup_epochs", "decay_epochs"):
        value, source = recipe[key]
        value = FIELDS[key].default if source == "default" else value
        if sources.get(key) == "command line" or value is None or not math.isfinite(value * new / old):
            continue
        values[key] = value * new / old
        sources[key] = f"{source}, scaled to epoch_size {new}"
        changed.append(f"{key} {value:g} -> {values[key]:g}")
    if changed:
        notes.append(f"note: --epoch_size {new} over the recipe's {old} ({old_source}): {', '.join(changed)} "
                     f"(scaled by {new}/{old}, as --smoke does; give them on the command line to choose)")


def from_dict(values: dict[str, Any], source: str = "checkpoint") -> Config:
    """Rebuild a config saved by `Config.to_dict` (e.g. inside a checkpoint)."""
    out: dict[str, Any] = {"sources": {}}
    for key, value in values.items():
        if key in FIELDS:
            _set(out, key, value, source, [])
    return Config(**out)


MAX_IMAGE_SIZE = 4096  # px: beyond any published ViT (448-518 px); a typo of 100000 would allocate ~300 GB


def validate(cfg: Config) -> Config:
    """Choices and ranges; raises ConfigError naming the key."""
    for name, f in FIELDS.items():
        choices = f.metadata.get("choices")
        if choices and getattr(cfg, name) not in choices:
            close = difflib.get_close_matches(str(getattr(cfg, name)), [str(c) for c in choices], n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"config key '{name}': {getattr(cfg, name)!r} is not one of "
                              f"{', '.join(map(str, choices))}{hint}")

    def need(cond: bool, key: str, msg: str) -> None:
        if not cond:
            raise ConfigError(f"config key '{key}': {msg} (got {getattr(cfg, key)!r})")

    need(cfg.lr > 0, "lr", "must be > 0")
    need(0 <= cfg.seed < 2**32, "seed", "must be between 0 and 2**32 - 1")
    need(0 <= cfg.min_lr <= cfg.lr, "min_lr", f"must be between 0 and lr ({cfg.lr:g}); the lr decays to it")
    need(0 <= cfg.warmup_factor <= 1, "warmup_factor", "must be in [0, 1]: warmup starts at lr * warmup_factor")
    need(cfg.decay_rate > 0, "decay_rate", "must be > 0")
    need(cfg.power is None or cfg.power > 0, "power", "must be > 0")
    need(cfg.num_cycles >= 1, "num_cycles", "must be >= 1")
    need(cfg.cycle_decay > 0, "cycle_decay", "must be > 0")
    need(cfg.clip_value > 0, "clip_value", "must be > 0 (a gradient-norm limit)")
    need(cfg.eps > 0, "eps", "must be > 0")
    need(0 <= cfg.momentum < 1, "momentum", "must be in [0, 1)")
    need(cfg.beta2 is None or 0 <= cfg.beta2 < 1, "beta2", "must be in [0, 1)")
    need(cfg.image_resize <= MAX_IMAGE_SIZE, "image_resize", f"must be at most {MAX_IMAGE_SIZE}")
    need(cfg.batch_size >= 1, "batch_size", "must be >= 1")
    need(cfg.epoch_size >= 1, "epoch_size", "must be >= 1")
    need(0 <= cfg.warmup_epochs <= cfg.epoch_size, "warmup_epochs", f"must be between 0 and epoch_size "
                                                                    f"({cfg.epoch_size})")
    need(cfg.gradient_accumulation_steps >= 1, "gradient_accumulation_steps", "must be >= 1")
    need(cfg.num_parallel_workers >= 0, "num_parallel_workers", "must be >= 0")
    need(cfg.weight_decay >= 0, "weight_decay", "must be >= 0")
    need(0 <= cfg.label_smoothing < 1, "label_smoothing", "must be in [0, 1)")
    for key in ("hflip", "vflip", "re_prob", "cutmix_prob", "mixup_switch_prob", "drop_rate", "drop_path_rate"):
        need(0 <= getattr(cfg, key) <= 1, key, "must be a probability in [0, 1]")
    need(cfg.mixup >= 0, "mixup", "must be >= 0 (a Beta distribution's alpha; 0 is off)")
    need(cfg.cutmix >= 0, "cutmix", "must be >= 0 (a Beta distribution's alpha; 0 is off)")
    need(cfg.log_interval >= 1, "log_interval", "must be >= 1 (steps between log lines)")
    need(cfg.reference_batch_size is None or cfg.reference_batch_size >= 1, "reference_batch_size", "must be >= 1")
    need(cfg.world_size >= 1, "world_size", "must be >= 1")
    need(cfg.global_batch is None or cfg.global_batch >= 1, "global_batch", "must be >= 1")
    need(cfg.aug_repeats >= 0, "aug_repeats", "must be >= 0 (0 and 1 are off)")
    need(0 <= cfg.bad_image_limit <= 1, "bad_image_limit", "must be a share of an epoch's images in [0, 1]")
    need(cfg.in_channels == 3, "in_channels", "must be 3: vitkit reads images as RGB")
    need(cfg.loss_scale > 0, "loss_scale", "must be > 0 (fp16 gradients are multiplied by it)")
    need(cfg.re_max_attempts >= 1, "re_max_attempts", "must be >= 1")
    need(0 < cfg.re_scale[0] <= cfg.re_scale[1] <= 1, "re_scale", "must be an increasing range of area shares "
                                                                    "in (0, 1]")
    need(0 < cfg.re_ratio[0] <= cfg.re_ratio[1], "re_ratio", "must be an increasing range above 0")
    jitter = () if cfg.color_jitter is None else (cfg.color_jitter,) if isinstance(cfg.color_jitter, (int, float)) \
        else tuple(cfg.color_jitter)
    need(all(v >= 0 for v in jitter) and (len(jitter) < 4 or jitter[3] <= 0.5), "color_jitter",
         "strengths must be >= 0 (hue, the 4th, at most 0.5)")
    need(all(m >= 0 for m in cfg.multi_step_decay_milestones) and list(cfg.multi_step_decay_milestones)
         == sorted(cfg.multi_step_decay_milestones), "multi_step_decay_milestones", "must be increasing epochs >= 0")
    need(0 < cfg.ema_decay < 1, "ema_decay", "must be in (0, 1)")
    need(cfg.image_resize >= 1, "image_resize", "must be >= 1")
    need(cfg.val_interval >= 1, "val_interval", "must be >= 1")
    need(cfg.ckpt_save_interval >= 1, "ckpt_save_interval", "must be >= 1")
    need(cfg.keep_checkpoint_max >= 1, "keep_checkpoint_max", "must be >= 1")
    need(cfg.max_steps is None or cfg.max_steps >= 1, "max_steps", "must be >= 1")
    need(cfg.num_samples is None or cfg.num_samples >= 1, "num_samples", "must be >= 1")
    need(cfg.val_num_samples is None or cfg.val_num_samples >= 1, "val_num_samples", "must be >= 1")
    need(cfg.num_classes is None or cfg.num_classes >= 1, "num_classes", "must be >= 1")
    need(cfg.crop_pct is None or 0 < cfg.crop_pct <= 1, "crop_pct", "must be in (0, 1]")
    need(cfg.std is None or min(cfg.std) > 0, "std", "must be > 0 (images are divided by it)")
    need(cfg.layer_decay is None or 0 < cfg.layer_decay <= 1, "layer_decay", "must be in (0, 1]")
    need(not (cfg.freeze_backbone and cfg.fsdp), "freeze_backbone",
         "a linear probe trains the head alone: run it without fsdp (DDP keeps the frozen backbone unsharded)")
    need(cfg.scale[0] <= cfg.scale[1] and cfg.scale[0] > 0, "scale", "must be an increasing range above 0")
    need(cfg.ratio[0] <= cfg.ratio[1] and cfg.ratio[0] > 0, "ratio", "must be an increasing range above 0")
    if cfg.decay_epochs is not None:
        need(cfg.decay_epochs > 0, "decay_epochs", "must be > 0")
    if isinstance(cfg.re_value, str):
        need(cfg.re_value == "random", "re_value", "must be a number or 'random'")
    if not (cfg.device in ("auto", "cpu", "cuda") or cfg.device.startswith("cuda:")):
        raise ConfigError(f"config key 'device': {cfg.device!r} is not auto, cpu, cuda or cuda:N")
    return cfg


SAMPLE_DIR = Path(__file__).resolve().parents[2] / "data" / "cifar10_sample"

# A 6-block, 128-wide ViT with 4x4 patches on 32x32 images (vit_n_4_32: 1.2 M parameters), trained from
# scratch with AdamW and a short warmup + cosine schedule; pad-and-crop + flip augmentation, images in memory.
DEMO_RECIPE: dict[str, Any] = {
    "model": "vit_n_4_32", "dataset": "imagefolder", "data_dir": str(SAMPLE_DIR), "train_split": "train",
    "val_split": "test", "image_resize": 32, "batch_size": 64, "num_parallel_workers": 0, "epoch_size": 6,
    "opt": "adamw", "lr": 2e-3, "weight_decay": 0.05, "weight_decay_filter": "auto", "scheduler": "cosine_decay",
    "warmup_epochs": 1, "warmup_factor": 0.01, "min_lr": 1e-5, "label_smoothing": 0.1, "val_while_train": True,
    "ckpt_save_dir": "runs/demo", "keep_checkpoint_max": 2, "log_interval": 20,
}
SMOKE_IMAGES, SMOKE_VAL_IMAGES, SMOKE_EPOCHS, SMOKE_ACCUMULATION = 32, 32, 2, 2
# Keys a resumed checkpoint's config does not lend: where that invocation stopped, and what resolve derives.
NOT_FROM_CHECKPOINT = ("resume", "max_steps", "world_size", "global_batch", "overwrite")
RUN_STAMP = "%Y%m%d-%H%M%S"  # a new run's folder under the default ckpt_save_dir: ./ckpt/20261202-153012
_STAMPED = re.compile(r"(\d{8}-\d{6})(?:-(\d+))?")
UNNAMED_RUN_DIR = ("default", "built-in demo recipe")  # sources of a ckpt_save_dir the user did not choose
NEW_RUN_DIR, NEWEST_RUN_DIR = "new timestamped run folder", "newest run folder (--resume)"


def _resumable(folder: Path) -> bool:
    return (folder / LAST).is_file() or (folder / PREV).is_file()


def latest_run(root: str | Path) -> Path | None:
    """The newest timestamped run folder under `root` that holds a checkpoint to resume, or None."""
    root = Path(root)
    if not root.is_dir():
        return None
    runs = []
    for p in root.iterdir():
        m = _STAMPED.fullmatch(p.name)
        if m and p.is_dir() and _resumable(p):
            runs.append(((m[1], int(m[2] or 1)), p))
    return max(runs)[1] if runs else None


def find_run(folder: str | Path) -> Path | None:
    """What `--resume true` continues in `folder`: the run there, else the newest timestamped one under it."""
    folder = Path(folder)
    return folder if _resumable(folder) else latest_run(folder)


def new_run_dir(root: str | Path) -> Path:
    """A fresh timestamped folder name under `root` (`-2`, `-3`, ... when runs start within the same second)."""
    root, stamp = Path(root), time.strftime(RUN_STAMP)
    path, n = root / stamp, 2
    while path.exists():
        path, n = root / f"{stamp}-{n}", n + 1
    return path


def _last_file(folder: Path) -> Path:
    return folder / LAST if (folder / LAST).is_file() else folder / PREV


def _checkpoint_defaults(config_path: str | None, given: dict[str, Any],
                         names_data: bool) -> tuple[dict[str, Any], str] | None:
    """`--resume ...` with no `-c`: the resolved config stored in the checkpoint being resumed. `--resume true`
    without a folder finds the newest run under ./ckpt (and the demo's runs/demo, when no data is named)."""
    if config_path is not None or not given.get("resume"):
        return None
    resume, folder = given["resume"], None
    if resume is True:
        if "ckpt_save_dir" in given:
            folder = find_run(str(given["ckpt_save_dir"]))
        else:
            roots = [FIELDS["ckpt_save_dir"].default] + ([] if names_data else [DEMO_RECIPE["ckpt_save_dir"]])
            found = [run for run in map(find_run, roots) if run is not None]
            folder = max(found, key=lambda run: _last_file(run).stat().st_mtime) if found else None
        if folder is None:
            return None  # the Trainer says there is nothing to resume
        path = _last_file(folder)
    else:
        path = Path(str(resume))
    meta = read_metadata(path) if path.is_file() else None
    if not meta or "config" not in meta:
        return None  # the Trainer reports the missing or foreign checkpoint
    saved = {k: v for k, v in json.loads(meta["config"]).items() if k not in NOT_FROM_CHECKPOINT}
    if folder is not None:
        saved["ckpt_save_dir"] = str(folder)  # where it was found, not the path as written from another cwd
    return saved, f"checkpoint:{path}"


def _run_dir(cfg: Config, notices: list[str]) -> tuple[str, str] | None:
    """(ckpt_save_dir, its source) when resolve chooses the run folder, else None (the one given is used).

    `--resume true`: the run in ckpt_save_dir, else the newest timestamped run under it. `--resume PATH` (or
    ckpt_path + resume_opt) without a folder: the checkpoint's own folder. A new run without a folder: a fresh
    timestamped folder under the default (./ckpt, or runs/demo for the demo recipe), so runs never mix."""
    source = cfg.sources.get("ckpt_save_dir", "default")
    folder = Path(cfg.ckpt_save_dir)
    if cfg.resume is True:
        if _resumable(folder):
            return None
        run = latest_run(folder)
        if run is None:
            return None  # the Trainer says there is nothing to resume
        notices.append(f"note: --resume: continuing the newest run under {folder}: {run}")
        return str(run), f"{source}, {NEWEST_RUN_DIR}"
    if source not in UNNAMED_RUN_DIR:
        return None
    resumed = cfg.resume or (cfg.ckpt_path if cfg.resume_opt else None)
    if resumed:
        return str(Path(str(resumed)).parent), f"{source}, the folder of the checkpoint resumed"
    return str(new_run_dir(folder)), f"{source}, {NEW_RUN_DIR}"


def _smoke_changes(cfg: Config) -> dict[str, Any]:
    """Shrink any recipe to a couple of short epochs on a few images, keeping the schedule's shape."""
    changes: dict[str, Any] = {
        "batch_size": min(cfg.batch_size, 8), "num_parallel_workers": 0, "log_interval": 1,
        "epoch_size": SMOKE_EPOCHS, "warmup_epochs": cfg.warmup_epochs * SMOKE_EPOCHS / cfg.epoch_size,
        "val_num_samples": min(cfg.val_num_samples or SMOKE_VAL_IMAGES, SMOKE_VAL_IMAGES),
        "keep_checkpoint_max": 1,  # and no epoch files (the Trainer's saver): last and best only
    }
    if cfg.decay_epochs is not None:
        changes["decay_epochs"] = cfg.decay_epochs * SMOKE_EPOCHS / cfg.epoch_size
    # accumulation stays on (its code path is part of what a smoke run checks) but short: a recipe's 8 micro-batches
    # per step would need 128 images where a smoke run has a few dozen
    changes["gradient_accumulation_steps"] = min(cfg.gradient_accumulation_steps, SMOKE_ACCUMULATION)
    changes["num_samples"] = max(SMOKE_IMAGES, 2 * changes["batch_size"] * changes["gradient_accumulation_steps"])
    if cfg.num_samples:
        changes["num_samples"] = min(cfg.num_samples, changes["num_samples"])
    return changes


def _global_batch(cfg: Config, world_size: int, notices: list[str]) -> dict[str, Any]:
    """World size, global batch and, with `reference_batch_size`, the linearly scaled lr (Goyal et al. 2017,
    "Accurate, Large Minibatch SGD", sec. 2.1): used with `scale_lr`, else a warning names it."""
    accum = cfg.gradient_accumulation_steps
    global_batch = cfg.batch_size * world_size * accum
    changes: dict[str, Any] = {"world_size": world_size, "global_batch": global_batch}
    ref = cfg.reference_batch_size
    if ref is None:
        if cfg.scale_lr:
            raise ConfigError("scale_lr: true needs reference_batch_size (the global batch the recipe's lr was "
                              "tuned for, e.g. 4096 for 512 x 8 devices)")
        return changes
    if ref == global_batch:
        return changes
    scaled = cfg.lr * global_batch / ref
    if cfg.scale_lr:
        notices.append(f"scale_lr: lr {cfg.lr:g} -> {scaled:g} (x {global_batch}/{ref}, the recipe's reference batch)")
        changes["lr"] = scaled
    else:
        notices.append(f"warning: global batch {global_batch} differs from the recipe's reference_batch_size {ref}; "
                       f"the linearly scaled lr would be {scaled:g} (pass --scale_lr to use it, or keep lr {cfg.lr:g})")
    return changes


def global_batch_line(cfg: Config) -> str:
    """How a resolved config's global batch is made up, as the run prints it."""
    n, accum = cfg.world_size, cfg.gradient_accumulation_steps
    return (f"global batch {cfg.global_batch} = batch_size {cfg.batch_size} per process x {n} "
            f"process{'es' if n != 1 else ''} x {accum} accumulation step{'s' if accum != 1 else ''}")


def _native_size(model: str) -> int | None:
    """The registered input size of `model` (any accepted spelling); None for an unknown name (refused later, in
    one line, by whatever builds it)."""
    try:
        return get_spec(model).arch.img_size
    except VitkitError:
        return None


def resolve(argv: Sequence[str] = (), *, defaults: dict[str, Any] | None = None, launch: Any = None,
            notices: list[str] | None = None) -> Config:
    """The run's frozen config: defaults <- YAML <- command line, validated, then completed.

    Defaults are `defaults`, else the resumed checkpoint's config (`--resume` without `-c`), else the demo
    recipe when neither a config nor data (--data_dir / --dataset) is named; an `--epoch_size` over the
    recipe's scales its warmup/decay epochs (`load_config`). Then: smoke shrinking, the run folder (`_run_dir`:
    a fresh timestamped one for a new run given none, the newest run for `--resume`), the single-process
    fallback of a recipe's `distribute: true`, world size from `launch` (a launcher's `LaunchEnv`, or None for
    a plain process), global batch and lr scaling, and the optimizer's and schedule's own defaults as values
    (`load_config`). Notices go to `notices` (stderr when not given).
    """
    notes: list[str] = [] if notices is None else notices
    config_path, pairs = parse_cli(argv)
    source = "built-in recipe"
    if defaults is None:
        # A command that names its own data (the seed's `--dataset cifar10 --data_dir ...` finetune) is a recipe
        # of its own over the schema's defaults, as in MindCV; the demo's 32 px, run dir and regularisation stay out.
        names_data = any(key in ("data_dir", "dataset") for key, _ in pairs)
        from_ckpt = _checkpoint_defaults(config_path, dict(pairs), names_data)
        if from_ckpt is not None:
            defaults, source = from_ckpt
        elif config_path is None and not names_data:
            defaults, source = DEMO_RECIPE, "built-in demo recipe"
            notes.append("note: no config given (-c); running the built-in demo recipe (vitkit train --help)")
    cfg = _build((config_path, pairs), defaults=defaults, yaml_path=None, notices=notes, defaults_source=source)
    sources = dict(cfg.sources)
    changes: dict[str, Any] = {}
    native = _native_size(cfg.model)
    if "image_resize" not in sources and native is not None and native != cfg.image_resize:
        # the schema's 224 is MindCV's ImageNet size: a model made for another size (vit_n_4_32, vit_b_16_384)
        # trains at its own, not at 224 px guessed for it
        changes["image_resize"], sources["image_resize"] = native, f"model {cfg.model}'s input size"
        cfg = dataclasses.replace(cfg, image_resize=native)
    if cfg.smoke:
        smoke = _smoke_changes(cfg)
        changes.update(smoke)
        sources.update(dict.fromkeys(smoke, "smoke"))
    if cfg.overwrite and (cfg.resume or (cfg.ckpt_path and cfg.resume_opt)):
        raise ConfigError("--overwrite starts the run over and --resume continues it: pass one of them")
    run_dir = _run_dir(cfg, notes)
    if run_dir is not None:
        changes["ckpt_save_dir"], sources["ckpt_save_dir"] = run_dir
    if cfg.distribute and launch is None and "distribute" not in dict(pairs):  # an explicit flag is an error later
        # The seed's own command, `python train.py -c configs/vit/vit_b32_224.yaml ...`, runs as written: the
        # recipe's 8-device setting falls back to one process, said in one line.
        notes.append(f"note: distribute: true (from {sources['distribute']}) but no launcher started this process; "
                     f"running in one process (use torchrun or mpirun for several)")
        changes["distribute"] = False
        sources["distribute"] = f"{sources['distribute']}, no launcher: one process"
    cfg = dataclasses.replace(cfg, **changes)
    scaled = _global_batch(cfg, launch.world_size if launch is not None else 1, notes)
    if "lr" in scaled:
        sources["lr"] = f"{sources.get('lr', 'default')}, scaled by scale_lr x {scaled['global_batch']}/" \
                        f"{cfg.reference_batch_size}"
    sources.update({k: sources.get(k, "resolved") for k in ("world_size", "global_batch")})
    cfg = validate(dataclasses.replace(cfg, **scaled))
    object.__setattr__(cfg, "sources", sources)  # the provenance record, written once here
    if notices is None:
        for n in notes:
            print(n, file=sys.stderr)
    return cfg


# -- config fields -> builder keywords (engine.optim, engine.schedule, engine.precision) ---------------------------

def optimizer_args(cfg: Config) -> dict[str, Any]:
    """Keywords of `create_optimizer` for a resolved config."""
    return dict(opt=cfg.opt, lr=cfg.lr, momentum=cfg.momentum, beta2=cfg.beta2, eps=cfg.eps,
                weight_decay=cfg.weight_decay, weight_decay_filter=cfg.weight_decay_filter,
                layer_decay=cfg.layer_decay, nesterov=cfg.use_nesterov)


def schedule_args(cfg: Config) -> dict[str, Any]:
    """Keywords of `build_schedule` (besides steps_per_epoch) for a resolved config."""
    return dict(name=cfg.scheduler, lr=cfg.lr, epochs=cfg.epoch_size, warmup_epochs=cfg.warmup_epochs,
                warmup_factor=cfg.warmup_factor, decay_epochs=cfg.decay_epochs, min_lr=cfg.min_lr,
                decay_rate=cfg.decay_rate, milestones=cfg.multi_step_decay_milestones, power=cfg.power,
                num_cycles=cfg.num_cycles, cycle_decay=cfg.cycle_decay, stair=cfg.lr_epoch_stair)


def precision_args(cfg: Config) -> dict[str, Any]:
    """Keywords of `resolve_precision` (besides device)."""
    return dict(amp_level=cfg.amp_level, amp_dtype=cfg.amp_dtype, loss_scale_type=cfg.loss_scale_type,
                loss_scale=cfg.loss_scale)
