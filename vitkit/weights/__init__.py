"""Pretrained weights from every source, fitted exactly to vitkit's VisionTransformer.

    weights = load_weights("timm/vit_base_patch32_224.augreg_in21k_ft_in1k")   # or a file, folder, URL, True
    model = create_model("vit_b_32_224", pretrained=weights)                    # or pretrained=<any of those>

`load_weights` resolves `pretrained` (True = the name's default published source, a source tag of the name
such as "tv_in1k", a local file or folder, an http(s)/file URL, or a hub id), detects the format and returns
the tensors under our names with the architecture the source implies (`arch`, e.g. MindSpore's LayerNorm eps
1e-7 and tanh GELU) and the eval preprocessing that goes with them (`data`). `create_model` builds the
architecture with those overrides (the caller's own arguments win) and `fit_weights` loads the tensors: a
different number of classes gets a fresh head, a different input size a resampled position embedding,
unexpected keys are reported, and anything else that does not fit (a missing tensor, a shape mismatch) is a
WeightsError naming the key. Nothing ever falls back to random weights silently.

Model names may be given in any spelling `vitkit.models.registry.resolve_model` accepts (`vit_b_32`,
`vit_base_patch32_224`, ...). A timm spelling makes timm's weights the default (`pretrained=True`: timm's
default tag, or the tag in `vit_base_patch32_224.augreg_in1k`); a tag the sources table does not know is a
WeightsError, since it would also decide the preprocessing.

Preprocessing (`data`, and `PretrainedWeights.data_config`) follows the weights, never only the model name:
what the file states (timm hub config.json, preprocessor_config.json, a vitkit checkpoint) wins, then the
sources-table entry the weights came from (`WeightSource`: by tag, hub id, URL or published file name), then
the publisher's defaults for the detected format (`vitkit.weights.formats.format_data`: timm and Google .npz
0.5/0.5 bicubic crop 0.9, torchvision ImageNet bilinear 224/256, transformers 0.5/0.5 bilinear no crop, MindCV
ImageNet bicubic 0.875), and only what none of them says comes from the model's registered defaults. Settings
the user gives explicitly (validate's `--mean`, `--crop_pct`, ...) are applied over the result by the verb.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from vitkit.data.preprocess import DataConfig, resolve_data_config
from vitkit.errors import WeightsError, path_problem
from vitkit.models import registry
from vitkit.models.registry import ModelName
from vitkit.models.vit import VisionTransformer, count_params, resample_pos_embed
from vitkit.weights.download import download_url, hub_download
from vitkit.weights.formats import Converted, read_file, read_folder
from vitkit.weights.sources import (
    WeightSource,
    default_source,
    find_source,
    find_source_by_file,
    find_source_by_location,
    sources_for,
)

log = logging.getLogger("vitkit.weights")

_URL = re.compile(r"(https?|file)://.+")
_HUB_ID = re.compile(r"(?:hf-hub:|hf_hub:)?([A-Za-z0-9][\w.-]*/[\w.-]+)(?:@([\w./-]+))?")
_WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".npz", ".ckpt", ".tar")


@dataclass
class PretrainedWeights:
    """Weights under vitkit's names plus what their source says about the model and its preprocessing."""

    state_dict: dict[str, torch.Tensor]
    format: str
    origin: str  # the file, URL or hub id they came from
    arch: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)
    class_names: list[str] | None = None
    notes: list[str] = field(default_factory=list)
    source: WeightSource | None = None  # the sources-table entry, when resolved from one

    def data_config(self, spec: Any, img_size: int | None = None) -> DataConfig:
        """Eval preprocessing: the weights' (`data`: the file's statements, its source's, its format's; see the
        module docstring) over the model's registered defaults (`ModelSpec`), at `img_size` (default: the
        model's)."""
        d = self.data
        try:
            return resolve_data_config(spec, input_size=img_size or spec.arch.img_size, mean=d.get("mean"),
                                       std=d.get("std"), interpolation=d.get("interpolation"),
                                       crop_pct=d.get("crop_pct"))
        except (TypeError, ValueError) as e:
            raise WeightsError(f"{self.origin}: its preprocessing cannot be used ({e}); pass --mean, --std, "
                               f"--interpolation or --crop_pct to set it") from None


@dataclass
class FitReport:
    """What `fit_weights` did; `summary()` is the one-paragraph account that is logged."""

    loaded: int
    total: int
    head_reset: str | None = None
    resampled: str | None = None
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)

    def summary(self) -> str:
        parts = [f"loaded {self.loaded}/{self.total} tensors"]
        if self.head_reset:
            parts.append(self.head_reset)
        if self.resampled:
            parts.append(self.resampled)
        if self.missing:
            parts.append(f"missing (left at init): {_short(self.missing)}")
        if self.unexpected:
            parts.append(f"unexpected (ignored): {_short(self.unexpected)}")
        return "; ".join(parts)


def _short(keys: list[str], n: int = 6) -> str:
    return ", ".join(keys[:n]) + (f" ... (+{len(keys) - n} more)" if len(keys) > n else "")


def _from_converted(conv: Converted, origin: str, source: WeightSource | None = None) -> PretrainedWeights:
    """The file's own statements win, then the source's entry, then the format's defaults (`conv.data`)."""
    hints = source.data_hints() if source else {}
    data = {**conv.data, **{k: v for k, v in hints.items() if k not in conv.data_stated}}
    return PretrainedWeights(conv.state_dict, conv.format, origin, conv.arch, data, conv.class_names, conv.notes,
                             source)


def resolve_model(name: str) -> ModelName:
    """`vitkit.models.registry.resolve_model` (UnknownModelError for an unknown name), plus the check the
    registry cannot make: a timm tag (`vit_base_patch32_224.TAG`) must be a timm source of the table."""
    resolved = registry.resolve_model(name)
    if resolved.tag is not None:
        source = find_source(resolved.name, resolved.tag)
        if source is None or source.format != "timm":
            timm = registry.timm_model_name(resolved.name)
            tags = [s.tag for s in sources_for(resolved.name) if s.format == "timm"]
            known = f"known: {', '.join(f'{timm}.{t}' for t in tags)}" if tags else "no timm weights are known"
            raise WeightsError(f"{name}: {resolved.tag!r} is not a timm tag vitkit knows for {timm} ({known})")
    return resolved


def _read_local(path: Path) -> Converted:
    return read_folder(path) if path.is_dir() else read_file(path)


def _read_hub(repo_id: str, revision: str | None) -> Converted:
    """A hub repo: a transformers ViT or a timm model (config.json + weights), or a bare weights file."""
    config = hub_download(repo_id, "config.json", revision=revision, required=False)
    weights = None
    for name in ("model.safetensors", "pytorch_model.bin"):
        weights = hub_download(repo_id, name, revision=revision, required=False)
        if weights is not None:
            break
    if weights is None:
        raise WeightsError(f"hub repo {repo_id} has neither model.safetensors nor pytorch_model.bin")
    if config is None:
        return read_file(weights)
    try:  # optional; transformers' eval preprocessing
        hub_download(repo_id, "preprocessor_config.json", revision=revision, required=False)
    except WeightsError:
        pass
    return read_folder(weights.parent)


def _load_source(source: WeightSource) -> PretrainedWeights:
    if _URL.fullmatch(source.location):
        conv = read_file(download_url(source.location, sha256=source.sha256))
    else:
        conv = _read_hub(source.location, None)
    return _from_converted(conv, source.location, source)


def load_weights(pretrained: bool | str | Path | PretrainedWeights, *,
                 model_name: str | None = None) -> PretrainedWeights:
    """Resolve and read `pretrained` for `model_name` (any accepted spelling; see the module docstring). An
    unknown name is an UnknownModelError, every other failure a WeightsError."""
    if isinstance(pretrained, PretrainedWeights):
        return pretrained
    resolved = resolve_model(model_name) if model_name else None
    name = resolved.name if resolved else None
    if pretrained is True:
        source = default_source(name, family=resolved.family, tag=resolved.tag) if resolved else None
        if source is None:
            raise WeightsError(f"no published weights are known for {model_name!r}; pass a file, folder, URL or "
                               f"hub id as pretrained=")
        return _load_source(source)
    if not isinstance(pretrained, (str, Path)) or not str(pretrained):
        raise WeightsError(f"pretrained must be True, a path, a URL or a hub id, not {pretrained!r}")
    text = str(pretrained)
    if name and (source := find_source(name, text)) is not None:
        return _load_source(source)
    path = Path(text).expanduser()
    if path.exists():
        if (why := path_problem(path, want="file or folder")) is not None:
            raise WeightsError(f"{text} {why}; give a weights file or a model folder")
        conv = _read_local(path)
        source = None if path.is_dir() else find_source_by_file(path.name)
        if source is not None and source.format != conv.format:
            source = None  # a file that merely shares a published name: its content decides
        return _from_converted(conv, str(path), source)
    if (source := find_source_by_location(text, name)) is not None:
        return _load_source(source)
    if _URL.fullmatch(text):
        return _from_converted(read_file(download_url(text)), text)
    hub = _HUB_ID.fullmatch(text)
    if hub and not text.endswith(_WEIGHT_SUFFIXES):
        return _from_converted(_read_hub(hub.group(1), hub.group(2)), text)
    tags = [s.tag for s in sources_for(name)] if name else []
    hint = f" Known sources of {model_name}: {', '.join(tags)}." if tags else ""
    raise WeightsError(f"pretrained={text!r}: no such file or folder, and not a URL or hub id.{hint}")


class NonFiniteWeightsError(WeightsError):
    """Weights holding NaN or inf (`fit_weights` without `allow_nonfinite`): broken, not of another model."""


def fit_weights(model: VisionTransformer, weights: PretrainedWeights, *, allow_missing: bool = False,
                allow_nonfinite: bool = False) -> FitReport:
    """Load `weights` into `model` in place: head reset / pos-embed resampling as needed, errors otherwise. A
    tensor to be loaded that holds NaN or inf is a WeightsError naming its key, unless `allow_nonfinite` (to
    inspect a broken file)."""
    target = model.state_dict()
    sd = dict(weights.state_dict)
    report = FitReport(loaded=0, total=len(target))
    name = model.model_name or type(model).__name__

    has_head = isinstance(model.head, torch.nn.Linear)
    src_head = sd.get("head.weight")
    if not has_head or src_head is None or src_head.shape != target["head.weight"].shape:
        src_classes = 0 if src_head is None else src_head.shape[0]
        sd = {k: v for k, v in sd.items() if not k.startswith("head.")}
        if has_head:
            model.reset_classifier(model.num_classes)
            report.head_reset = (f"head reset: weights have {src_classes} classes, model {model.num_classes} "
                                 f"(fresh init)")
        elif src_classes:
            report.head_reset = f"head dropped: weights have {src_classes} classes, model has no head"

    if "pos_embed" in sd and "pos_embed" in target and sd["pos_embed"].shape != target["pos_embed"].shape:
        old, new = sd["pos_embed"], target["pos_embed"]
        prefix = model.cfg.pos_embed_prefix_tokens  # rows of prefix tokens: none with no_embed_class (DINOv2)
        if old.ndim != 3 or old.shape[-1] != new.shape[-1]:
            raise WeightsError(f"pos_embed: weights have shape {tuple(old.shape)}, {name} expects {tuple(new.shape)}")
        try:
            grid = model.cfg.grid_size
            sd["pos_embed"] = resample_pos_embed(old.float(), (grid, grid), prefix)
        except ValueError as e:
            raise WeightsError(f"pos_embed: cannot resample {tuple(old.shape)} to {tuple(new.shape)} ({e})") from None
        report.resampled = f"pos_embed resampled {old.shape[1] - prefix} -> {grid * grid} patches (bicubic)"

    for key in sorted(sd.keys() & target.keys()):
        if sd[key].shape != target[key].shape:
            raise WeightsError(f"{key}: weights have shape {tuple(sd[key].shape)}, {name} expects "
                               f"{tuple(target[key].shape)} (wrong model for these weights?)")
    report.missing = sorted(target.keys() - sd.keys() - ({"head.weight", "head.bias"} if report.head_reset else set()))
    report.unexpected = sorted(sd.keys() - target.keys())
    common = sd.keys() & target.keys()
    if not common:
        raise WeightsError(f"none of the {len(sd)} tensors in {weights.origin} belong to {name}")
    if report.missing and not allow_missing:
        raise WeightsError(f"{weights.origin} lacks {len(report.missing)} tensors of {name}: "
                           f"{_short(report.missing)} (wrong model or a partial checkpoint?)")
    if not allow_nonfinite:
        for key in sorted(common):
            if sd[key].is_floating_point() and not torch.isfinite(sd[key]).all():
                raise NonFiniteWeightsError(f"{weights.origin}: tensor {key} holds NaN or infinite values (weights "
                                            f"of a diverged run?); pass allow_nonfinite=True (--allow_nonfinite) "
                                            f"to load them anyway for inspection")
    model.load_state_dict({k: sd[k] for k in common}, strict=False)
    report.loaded = len(common)

    for note in weights.notes:
        log.info("%s: %s", weights.origin, note)
    message = f"{weights.origin} ({weights.format}) -> {name}: {report.summary()}"
    (log.warning if report.missing or report.unexpected or report.head_reset else log.info)(message)
    model.pretrained_cfg = {
        "origin": weights.origin, "format": weights.format, "tag": weights.source.tag if weights.source else None,
        "data": dict(weights.data), "class_names": weights.class_names, "report": report.summary(),
    }
    return report


def load_pretrained(model: VisionTransformer, name: str | None, pretrained: bool | str | Path | PretrainedWeights,
                    *, allow_missing: bool = False) -> FitReport:
    """Load weights into an already-built model, whose architecture must already match what they imply.

    A model built with other numerics than the source's (MindCV's LayerNorm eps and tanh GELU, a different
    head count) would give wrong outputs, so that is an error; `create_model(name, pretrained=...)` builds
    the right architecture by itself.
    """
    weights = load_weights(pretrained, model_name=name)
    have = model.cfg.to_dict()
    # init_values only switches layer scale on (the loaded gammas replace it), so only its truthiness counts.
    wrong = {k: v for k, v in weights.arch.items() if k != "num_classes" and k in have
             and (bool(have[k]) != bool(v) if k == "init_values" else have[k] != v)}
    if wrong:
        diffs = ", ".join(f"{k}={v!r} (model has {have[k]!r})" for k, v in sorted(wrong.items()))
        raise WeightsError(f"{weights.origin} implies {diffs}; build the model with create_model(name, "
                           f"pretrained=...) or with those arguments")
    return fit_weights(model, weights, allow_missing=allow_missing)


__all__ = ["PretrainedWeights", "FitReport", "load_weights", "fit_weights", "load_pretrained", "sources_for",
           "WeightSource", "resolve_model", "NonFiniteWeightsError"]


def create_model(name: str, *, pretrained: bool | str | Path | PretrainedWeights = False,
                 num_classes: int | None = None, img_size: int | None = None, **overrides: Any) -> VisionTransformer:
    """Build a registered model (any spelling `vitkit.models.registry.resolve_model` accepts); `pretrained`
    is True (the name's default source), a source tag, a path, URL or hub id.

    With pretrained weights, a different `num_classes` gets a fresh head and a different `img_size` a
    resampled position embedding; anything else that does not fit is an error naming the key. An unknown
    name is an UnknownModelError, an unknown timm tag (`vit_base_patch32_224.TAG`) a WeightsError.
    """
    resolved = resolve_model(name)
    name = resolved.name
    if not pretrained:
        return registry.create_model(name, num_classes=num_classes, img_size=img_size, **overrides)
    weights = load_weights(pretrained, model_name=resolved.given)
    arch = dict(weights.arch)  # the source's numerics and head size; the caller's own arguments win
    source_classes = arch.pop("num_classes", None)
    if arch.get("init_values") and registry.get_spec(name).arch.init_values:
        del arch["init_values"]  # it only switches layer scale on (the gammas are loaded): the name's value stays
    num_classes = source_classes if num_classes is None else num_classes
    overrides = {**arch, **overrides}
    try:
        model = registry.create_model(name, num_classes=num_classes, img_size=img_size, **overrides)
    except ValueError as e:  # the source's architecture cannot be applied to this model's shape
        own = registry.get_spec(name).arch.to_dict()
        differs = ", ".join(f"{k} {v!r} (not {own[k]!r})" for k, v in weights.arch.items()
                            if k in own and k != "num_classes" and own[k] != v)
        raise WeightsError(f"{weights.origin} holds another architecture than {name} ({differs or e}); use weights "
                           f"of a {name} model, or --model of the weights' own architecture") from None
    fit_weights(model, weights)
    return model


def model_info(name: str) -> dict[str, Any]:
    """One row of `vitkit models`: what a user needs to know about a name (any accepted spelling; a timm
    spelling shows timm's preprocessing)."""
    spec = registry.get_spec(name)
    name = spec.name
    return {
        "name": name,
        "aliases": registry.aliases(name)[1:],
        "timm_name": registry.timm_model_name(name),
        "family": spec.model_family,
        "input_size": spec.input_size,
        "patch_size": spec.arch.patch_size,
        "embed_dim": spec.arch.embed_dim,
        "depth": spec.arch.depth,
        "num_heads": spec.arch.num_heads,
        "num_classes": spec.arch.num_classes,
        "params": count_params(spec.arch),
        "gmacs": registry.count_macs(spec.arch) / 1e9,
        "mean": spec.mean,
        "std": spec.std,
        "interpolation": spec.interpolation,
        "crop_pct": spec.crop_pct,
        "pretrained": [s.tag for s in sources_for(name)],
        "notes": spec.notes,
    }
