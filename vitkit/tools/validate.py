"""`vitkit validate` / `python validate.py -c CONFIG --data_dir D --ckpt_path P`: top-1, top-5, mean loss.

The config schema is training's (`vitkit train --help`); the weights come from `--ckpt_path` (a vitkit
checkpoint, or any supported foreign file) or `--pretrained` (true, a file, URL or hub id). A vitkit
checkpoint brings its own model, preprocessing, class names and dataset settings (dataset, data_dir,
val_split, batch_size, amp), so `vitkit validate --ckpt_path runs/x/best.safetensors` is enough on the
machine that trained it. Eval preprocessing comes from the checkpoint (or the weights) and is overridden
only by `--crop_pct`, `--image_resize`, `--interpolation`, `--mean`, `--std` given on the command line: the
recipe's YAML values already shaped what the checkpoint recorded.

It evaluates with `vitkit.engine.evaluate.evaluate`, the function the training loop calls, so the numbers
are the loop's. Weights that do not fit (another model, another number of classes, a dataset with other
classes) are an error naming the mismatch; no weights at all is an error unless `--allow_random`. Weights
holding NaN or inf are an error naming the tensor unless `--allow_nonfinite` (to inspect a broken run; the
results file then holds null for a non-finite number).
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from vitkit.args import VerbParser
from vitkit.data.preprocess import DataConfig, resolve_data_config, to_unit_range
from vitkit.engine.checkpoint import Checkpoint, atomic_write, is_vitkit_checkpoint, load_checkpoint
from vitkit.engine.config import Config, config_parser, load_config, load_yaml, parse_cli, precision_args, resolve
from vitkit.engine.data_args import dataset_from_config, loader_from_config
from vitkit.engine.evaluate import confusion_matrix, evaluate, per_class_accuracy
from vitkit.engine.launch import detect_launcher, distributed_session, gather_objects, is_main
from vitkit.engine.monitor import Bar, plot_confusion
from vitkit.engine.precision import resolve_precision
from vitkit.engine.runtime import cpu_inference_allocator
from vitkit.errors import ConfigError, DataError, WeightsError, path_problem
from vitkit.models.registry import build_config, get_spec, resolve_model_name
from vitkit.models.vit import VisionTransformer
from vitkit.tools.export import OnnxModel
from vitkit.weights import NonFiniteWeightsError, PretrainedWeights, create_model, fit_weights, load_weights

# Dataset settings a checkpoint's saved run config lends to validate (never its weights keys: its ckpt_path
# and pretrained are where *training* started from).
FROM_CHECKPOINT = ("dataset", "data_dir", "val_split", "batch_size", "amp_level", "amp_dtype")
# Eval preprocessing keys the command line may override.
PREPROCESS_KEYS = ("image_resize", "crop_pct", "interpolation", "mean", "std")


def build_parser(with_config: bool = False) -> VerbParser:
    """validate's own options; `with_config` adds every config key too (its --help)."""
    p = config_parser("validate", __doc__) if with_config else VerbParser("validate", __doc__)
    p.add_argument("--use_ema", action="store_true", help="evaluate the checkpoint's EMA weights")
    p.add_argument("--onnx", default=None, metavar="MODEL.onnx", help="validate an exported ONNX model (fp32 or "
                   "int8, `vitkit export`) with the preprocessing and classes of its .onnx.json")
    p.add_argument("--results_file", default=None, help="write the results as JSON to this file")
    p.add_argument("--per_class", action="store_true", help="print (and save) top-1 of every class")
    p.add_argument("--confusion_matrix", default=None, metavar="CSV", help="write the confusion matrix as CSV "
                   "(rows: true class, columns: predicted) and a PNG beside it")
    p.add_argument("--mistakes", default=None, metavar="CSV", help="write every misclassified image as CSV")
    p.add_argument("--allow_random", action="store_true",
                   help="evaluate a randomly initialised model when no weights are given (a chance-level baseline)")
    p.add_argument("--allow_nonfinite", action="store_true",
                   help="load weights holding NaN or inf anyway (to inspect a diverged run)")
    return p


def _checkpoint_defaults(ckpt: Checkpoint) -> dict[str, Any]:
    saved = ckpt.config or {}
    return {k: saved[k] for k in FROM_CHECKPOINT if saved.get(k) is not None}


def given_keys(argv: list[str], *, with_yaml: bool) -> set[str]:
    """The config keys `argv` sets: on the command line, and with `with_yaml` in its `-c` recipe too."""
    config_path, pairs = parse_cli(argv)
    return {k for k, _ in pairs} | (set(load_yaml(config_path)) if with_yaml and config_path else set())


def _override_preprocessing(dc: DataConfig, cfg: Config, given: set[str]) -> DataConfig:
    """Replace the fields of `dc` whose config keys are in `given` (the ones the user set)."""
    changes: dict[str, Any] = {}
    if "image_resize" in given:
        changes["input_size"] = int(cfg.image_resize)
    if "crop_pct" in given and cfg.crop_pct is not None:
        changes["crop_pct"] = float(cfg.crop_pct)
    if "interpolation" in given and cfg.interpolation is not None:
        changes["interpolation"] = cfg.interpolation
    if "mean" in given and cfg.mean is not None:
        changes["mean"] = to_unit_range(tuple(cfg.mean))
    if "std" in given and cfg.std is not None:
        changes["std"] = to_unit_range(tuple(cfg.std))
    return replace(dc, **changes)


def _arch_summary(arch: Any) -> str:
    return (f"embed_dim {arch.embed_dim}, depth {arch.depth}, patch {arch.patch_size}, {arch.img_size} px, "
            f"{arch.num_classes} classes")


def model_from_checkpoint(cfg: Config, ckpt: Checkpoint, use_ema: bool, given: set[str], named: set[str]
                          ) -> tuple[torch.nn.Module, DataConfig, list[str] | None]:
    """The checkpoint's model; a config (`named`: keys of the command line and recipe) that names another
    model, or a command line (`given`) that names another class count, is an error naming both (a recipe's
    num_classes yields to the checkpoint's head). Preprocessing keys in `given` override the checkpoint's."""
    if "model" in named and resolve_model_name(cfg.model) != ckpt.model_name:
        try:
            wanted = _arch_summary(build_config(cfg.model, num_classes=cfg.num_classes))
        except KeyError as e:
            raise ConfigError(str(e).strip("'\"")) from None
        raise WeightsError(f"{ckpt.path} is a {ckpt.model_name} checkpoint ({_arch_summary(ckpt.arch)}) but the "
                           f"config asks for {cfg.model} ({wanted}); drop `model` or validate a {cfg.model} "
                           f"checkpoint")
    # Only a command-line num_classes is a claim about this checkpoint; a recipe's (the YAML the run trained
    # from, or another one) yields to the head the checkpoint has.
    if "num_classes" in given and cfg.num_classes is not None and cfg.num_classes != ckpt.arch.num_classes:
        raise WeightsError(f"{ckpt.path} has a {ckpt.arch.num_classes}-class head but the config says num_classes "
                           f"{cfg.num_classes}; drop --num_classes or use a checkpoint trained for "
                           f"{cfg.num_classes}")
    model = ckpt.build_model(use_ema=use_ema)
    return model, _override_preprocessing(ckpt.data_config, cfg, given), ckpt.class_names


def model_with_weights(name: str, loaded: PretrainedWeights, *, allow_nonfinite: bool = False) -> VisionTransformer:
    """`create_model(name, pretrained=loaded)`; with `allow_nonfinite` the same architecture (the weights'
    numerics and head) with their tensors loaded even where they hold NaN or inf."""
    if not allow_nonfinite:
        return create_model(name, pretrained=loaded)
    arch = dict(loaded.arch)
    num_classes = arch.pop("num_classes", None)
    try:
        model = create_model(name, num_classes=num_classes, **arch)
    except ValueError as e:
        raise WeightsError(f"{loaded.origin} holds another architecture than {name} ({e})") from None
    fit_weights(model, loaded, allow_nonfinite=True)
    return model


def model_from_weights(cfg: Config, weights: bool | str, allow_random: bool, dataset_classes: int | None,
                       given: set[str], allow_nonfinite: bool = False
                       ) -> tuple[torch.nn.Module, DataConfig, list[str] | None]:
    """`cfg.model` with foreign weights (or random ones with `allow_random`), its eval preprocessing (keys in
    `given`, from the command line or the recipe, override it) and the class names the weights state, if any.

    The head is never reset here: the model takes the weights' own class count, and `check_fit` compares it
    with the dataset, so a foreign checkpoint for another task is an error instead of a random head.
    """
    try:
        spec = get_spec(cfg.model)
    except KeyError as e:
        raise ConfigError(str(e).strip("'\"")) from None
    if not weights:
        if not allow_random:
            raise WeightsError("no weights to validate: pass --ckpt_path FILE, or --pretrained true / a file / a "
                               "hub id (or --allow_random for a chance-level baseline)")
        model = create_model(cfg.model, num_classes=cfg.num_classes or dataset_classes)
        dc, names = resolve_data_config(spec, input_size=model.cfg.img_size), None
    else:
        loaded = load_weights(weights, model_name=cfg.model)
        try:
            model = model_with_weights(cfg.model, loaded, allow_nonfinite=allow_nonfinite)
        except NonFiniteWeightsError:
            raise  # they fit; they are broken
        except WeightsError as e:
            raise WeightsError(f"{loaded.origin} does not fit {cfg.model}: {e}") from None
        if cfg.num_classes is not None and model.num_classes != cfg.num_classes:
            raise WeightsError(f"{loaded.origin} has a {model.num_classes}-class head but the config says "
                               f"num_classes {cfg.num_classes}")
        dc, names = loaded.data_config(spec, model.cfg.img_size), loaded.class_names
    return model.eval(), _override_preprocessing(dc, cfg, given), names


def check_fit(model: torch.nn.Module, ds: Any, class_names: list[str] | None, source: str) -> None:
    """The dataset's labels must mean what the model's outputs mean."""
    classes = getattr(ds, "classes", None)
    if classes is None:
        return
    if len(classes) != model.num_classes:
        raise WeightsError(f"the dataset has {len(classes)} classes but {source} has a {model.num_classes}-class "
                           f"head; validate on data with the model's classes (or finetune it first)")
    if class_names and list(class_names) != list(classes):
        diff = next(i for i, (a, b) in enumerate(zip(class_names, classes)) if a != b)
        raise DataError(f"class {diff} is {class_names[diff]!r} in {source} but {classes[diff]!r} in the dataset; "
                        f"the labels would not match")


def _dataset_indices(loader: Any, world_size: int) -> list[int] | None:
    """Dataset index of each collected prediction (ranks in order), when the loader says how it shards."""
    plan = getattr(loader, "plan", None)
    if plan is None:
        return None
    return [i for part in gather_objects(plan.epoch(0)[0].tolist()) for i in part]


def write_reports(opts: argparse.Namespace, result: dict[str, Any], names: list[str],
                  samples: list[tuple[int, str]] | None, title: str | None = None) -> dict[str, Any]:
    """Per-class accuracy (printed, and returned for the results file), confusion matrix CSV + PNG, mistakes
    CSV. `samples`: (dataset index, path) of each prediction, when known; `title`: the PNG's (model, top-1)."""
    targets, preds, probs = result["targets"], result["preds"], result["probs"]
    top1 = preds[:, 0]
    n = len(names)
    extra: dict[str, Any] = {}
    if opts.per_class:
        acc = per_class_accuracy(targets, top1, n)
        counts = torch.bincount(targets, minlength=n)
        extra["per_class"] = {name: {"top1": float(a), "num_images": int(c)}
                              for name, a, c in zip(names, acc.tolist(), counts.tolist())}
        width = max(len(x) for x in names)
        print("per-class top-1:")
        for name, a, c in zip(names, acc.tolist(), counts.tolist()):
            print(f"  {name:<{width}}  {a:6.2f}%  ({c} images)")
    if opts.confusion_matrix:
        cm = confusion_matrix(targets, top1, n)
        path = Path(opts.confusion_matrix)

        def write_csv(tmp: str) -> None:
            with open(tmp, "w", newline="") as f:
                w = csv.writer(f)
                w.writerow(["true \\ predicted"] + names)
                w.writerows([names[i]] + row for i, row in enumerate(cm.tolist()))

        atomic_write(path, write_csv)
        png = plot_confusion(cm, names, path.with_suffix(".png"), title)
        print(f"confusion matrix: {path}" + (f" and {png}" if png else " (install matplotlib for the PNG)"))
    if opts.mistakes:
        wrong = (top1 != targets).nonzero().flatten().tolist()

        def write_mistakes(tmp: str) -> None:
            with open(tmp, "w", newline="") as f:
                w = csv.writer(f)
                w.writerow(["index", "path", "true", "predicted", "probability", "top_k"])
                for j in wrong:
                    idx, path = samples[j] if samples else (j, "")
                    w.writerow([idx, path, names[int(targets[j])], names[int(top1[j])],
                                f"{float(probs[j, 0]):.4f}", " ".join(names[int(c)] for c in preds[j])])

        atomic_write(opts.mistakes, write_mistakes)
        print(f"mistakes: {opts.mistakes} ({len(wrong)} images)")
    return extra


def run_validate(argv: list[str]) -> dict[str, Any]:
    """Parse, build, evaluate, report; returns the results dict (without per-sample tensors)."""
    opts, rest = build_parser().parse_known_args(argv)
    cfg = load_config(rest, notices=[])  # where the weights are; `resolve` below says the notices
    ckpt = None
    if cfg.ckpt_path:
        if (why := path_problem(cfg.ckpt_path, want="file or folder")) is not None:
            raise WeightsError(f"ckpt_path {cfg.ckpt_path} {why}")
        if cfg.pretrained:
            raise ConfigError("give either ckpt_path or pretrained, not both: which weights should be validated?")
        if is_vitkit_checkpoint(cfg.ckpt_path):
            ckpt = load_checkpoint(cfg.ckpt_path, allow_nonfinite=opts.allow_nonfinite)
    if opts.use_ema and ckpt is None:
        raise WeightsError("--use_ema needs a vitkit checkpoint in --ckpt_path (other weights carry no EMA copy)")
    cfg = resolve(rest, defaults=_checkpoint_defaults(ckpt) if ckpt is not None else {}, launch=detect_launcher())
    with distributed_session(distribute=cfg.distribute, device=cfg.device) as info:
        ds = dataset_from_config(cfg, cfg.val_split, train=False)
        if opts.onnx:  # an exported model in onnxruntime, behind a module (vitkit.tools.export.OnnxModel)
            model = OnnxModel(opts.onnx)
            dc, class_names = _override_preprocessing(model.data_config, cfg, given_keys(rest, with_yaml=False)), \
                model.class_names
            source, model_name = opts.onnx, model.meta["model_name"]
        elif ckpt is not None:
            model, dc, class_names = model_from_checkpoint(cfg, ckpt, opts.use_ema, given_keys(rest, with_yaml=False),
                                                           given_keys(rest, with_yaml=True))
            source, model_name = str(ckpt.path), ckpt.model_name
        else:
            weights = cfg.ckpt_path or cfg.pretrained
            classes = getattr(ds, "classes", None)
            model, dc, class_names = model_from_weights(cfg, weights, opts.allow_random,
                                                        len(classes) if classes else None,
                                                        given_keys(rest, with_yaml=True), opts.allow_nonfinite)
            source, model_name = str(weights or "random weights"), cfg.model
        if dc.input_size != model.cfg.img_size:  # evaluate at another resolution, as timm's --img-size
            model.set_input_size(dc.input_size)
        check_fit(model, ds, class_names, source)
        loader = loader_from_config(cfg, ds, train=False, data_config=dc, rank=info.rank, world_size=info.world_size)
        precision = resolve_precision(**precision_args(cfg), device=info.device)
        if precision.notice and is_main():
            print(precision.notice, file=sys.stderr)
        model.to(info.device, dtype=precision.param_dtype)
        cpu_inference_allocator(info.device, cfg.batch_size)
        want_samples = bool(opts.per_class or opts.confusion_matrix or opts.mistakes)
        result = evaluate(model, loader, device=info.device, amp_dtype=precision.eval_dtype,
                          num_classes=model.num_classes, collect=want_samples,
                          progress=Bar("validate", enabled=is_main()))
        indices = _dataset_indices(loader, info.world_size) if want_samples else None
        if not is_main():
            return {}
        names = list(getattr(ds, "classes", None) or class_names or [str(i) for i in range(model.num_classes)])
        summary = {k: result[k] for k in ("top1", "top5", "topk", "loss", "num_images", "correct1", "correct5",
                                          "images_per_s")}
        summary.update(model=model_name, weights=source, use_ema=opts.use_ema, dataset=cfg.dataset,
                       data_dir=cfg.data_dir, split=cfg.val_split, data_config=dc.to_dict(),
                       precision=precision.describe(), device=str(info.device), world_size=info.world_size)
        print(f"{model_name} ({source}{', EMA' if opts.use_ema else ''}) on {cfg.data_dir}/{cfg.val_split}: "
              f"top-1 {result['top1']:.2f}%  top-{result['topk']} {result['top5']:.2f}%  loss {result['loss']:.4f}  "
              f"{result['num_images']} images  {result['images_per_s']:.1f} images/s")
        print(f"preprocessing: resize {dc.resize_size} ({dc.interpolation}), center crop {dc.input_size}, "
              f"mean {list(dc.mean)}, std {list(dc.std)}; {precision.describe()} on {info.device}")
        if want_samples:
            samples = [(i, ds.path(i)) for i in indices] if indices is not None and hasattr(ds, "path") else None
            title = (f"{model_name}{' (EMA)' if opts.use_ema else ''} on {cfg.val_split}: top-1 {result['top1']:.2f}% "
                     f"({result['num_images']} images)")
            summary.update(write_reports(opts, result, names, samples, title))
        if opts.results_file:  # strict JSON: a NaN loss (--allow_nonfinite) is null
            text = json.dumps(finite_or_null(summary), indent=2, allow_nan=False)
            atomic_write(opts.results_file, lambda tmp: Path(tmp).write_text(text))
        return summary


def finite_or_null(value: Any) -> Any:
    """`value` (nested dicts and lists) with NaN and inf floats replaced by None: strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite_or_null(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_null(v) for v in value]
    return value


def main(argv: list[str]) -> int:
    if any(a in ("-h", "--help") for a in argv):
        build_parser(with_config=True).print_help()
        return 0
    run_validate(argv)
    return 0
