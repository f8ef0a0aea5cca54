"""Model cards: the `README.md` the Hugging Face Hub shows for a model, written beside every `best` checkpoint of a
run and into every `vitkit export --format timm|hf` folder.

The metadata block is huggingface_hub's own (`ModelCardData`, with `EvalResult`s for top-1 / top-5, so the Hub
shows them as the model's evaluation results); the body says what the model is (architecture, parameters, input,
preprocessing, classes), how well it does (top-1 / top-5 on the validation split, at which epoch), how it was made
(the resolved recipe, the command that reruns it, hardware, software and wall time) and how to load it, with the
run's training curves (`curves.png`) and the confusion matrix of the best checkpoint (`confusion.png`) as images.
Everything comes from the checkpoint's own metadata plus the run folder's records when they are beside it; a
fact that is not there is left out, never guessed.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import yaml

from vitkit.engine.checkpoint import Checkpoint
from vitkit.engine.monitor import CURVES, METRICS, format_duration, read_jsonl
from vitkit.engine.saver import CARD, CONFUSION, RUN_INFO
from vitkit.io import atomic_write
from vitkit.models.vit import count_params

# Datasets the Hub knows by id, keyed by what a recipe's dataset / data_dir says.
_HUB_DATASETS = {"cifar10": "uoft-cs/cifar10", "cifar100": "uoft-cs/cifar100", "imagenet": "ILSVRC/imagenet-1k"}


def _dataset(config: dict[str, Any]) -> tuple[str, str | None]:
    """(a readable dataset name, the Hub dataset id or None) from a run config."""
    name = str(config.get("dataset") or "")
    where = str(config.get("data_dir") or "")
    for key, hub_id in _HUB_DATASETS.items():
        if key in name.lower() or key in Path(where).name.lower() or key in where.lower():
            return key, hub_id
    return (Path(where).name or name or "custom"), None


def _run_records(run_dir: Path | None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    if run_dir is None:
        return {}, []
    info: dict[str, Any] = {}
    try:
        info = json.loads((run_dir / RUN_INFO).read_text())
    except (OSError, ValueError):
        pass
    try:
        metrics = read_jsonl(run_dir / METRICS)
    except (OSError, ValueError):
        metrics = []
    return (info if isinstance(info, dict) else {}), metrics


def card_data(ckpt: Checkpoint, *, library: str = "vitkit", base_model: str | None = None) -> Any:
    """huggingface_hub's ModelCardData for `ckpt`: library, tags, datasets, metrics and the evaluation results."""
    from huggingface_hub import EvalResult, ModelCardData

    dataset, hub_id = _dataset(ckpt.config)
    metrics = ckpt.metrics or {}
    results = []
    split = str(ckpt.config.get("val_split") or "validation")
    for key, name in (("val_top1", "top-1 accuracy"), ("val_top5", "top-5 accuracy")):
        if isinstance(metrics.get(key), (int, float)):
            results.append(EvalResult(task_type="image-classification", dataset_type=hub_id or dataset,
                                      dataset_name=dataset, dataset_split=split, metric_type="accuracy",
                                      metric_name=name, metric_value=round(float(metrics[key]), 2)))
    tags = ["image-classification", "vision-transformer", "vitkit", "timm" if library == "timm" else None]
    return ModelCardData(
        library_name=library, pipeline_tag="image-classification", license="apache-2.0",
        tags=[t for t in tags if t], datasets=[hub_id] if hub_id else None, metrics=["accuracy"],
        base_model=base_model, model_name=ckpt.model_name, eval_results=results or None)


def render_card(ckpt: Checkpoint, *, run_dir: Path | None = None, library: str = "vitkit",
                images: tuple[str, ...] = (), repo_hint: str | None = None) -> str:
    """The card's text: the metadata block, then the sections the module docstring lists."""
    cfg, arch, dc = ckpt.config, ckpt.arch, ckpt.data_config
    info, records = _run_records(run_dir)
    pretrained = cfg.get("pretrained") if isinstance(cfg.get("pretrained"), str) else None
    data = card_data(ckpt, library=library, base_model=pretrained if pretrained and "/" in pretrained else None)
    dataset, _ = _dataset(cfg)
    metrics = ckpt.metrics or {}
    n_params = count_params(arch)
    lines = ["---", data.to_yaml().strip(), "---", "", f"# {ckpt.model_name}", ""]
    lines += [f"A Vision Transformer ({ckpt.model_name}: {arch.depth} blocks, width {arch.embed_dim}, "
              f"{arch.patch_size}x{arch.patch_size} patches, {n_params / 1e6:.2f} M parameters) trained with "
              f"[vitkit](https://github.com/vitkit/vitkit) for {arch.num_classes}-class image classification on "
              f"{dataset}.", ""]
    lines += ["## Results", ""]
    if isinstance(metrics.get("val_top1"), (int, float)):
        top5 = f", top-5 {metrics['val_top5']:.2f}%" if isinstance(metrics.get("val_top5"), (int, float)) else ""
        images_n = f" ({metrics['val_images']} images)" if metrics.get("val_images") else ""
        lines += [f"top-1 {metrics['val_top1']:.2f}%{top5} on the `{cfg.get('val_split', 'val')}` split of "
                  f"{dataset}{images_n}, epoch {ckpt.epoch} of {cfg.get('epoch_size', '?')} (step {ckpt.step}).", ""]
    else:
        lines += ["Not validated during training (no validation split was configured).", ""]
    if CURVES in images:
        lines += ["Training curves (train loss per logged step; validation loss and accuracy per validation):", "",
                  f"![training curves]({CURVES})", ""]
    if CONFUSION in images:
        lines += ["Confusion matrix of this checkpoint on the validation split:", "",
                  f"![confusion matrix]({CONFUSION})", ""]
    lines += ["## Model", "", "| | |", "|---|---|",
              f"| architecture | `{ckpt.model_name}` ({_arch_options(arch)}) |",
              f"| input | {dc.input_size}x{dc.input_size} RGB, resize {dc.resize_size} ({dc.interpolation}), center "
              f"crop {dc.input_size}, mean {list(dc.mean)}, std {list(dc.std)} |",
              f"| classes | {arch.num_classes}: {_class_list(ckpt.class_names)} |", ""]
    lines += ["## Training", ""]
    time_s = next((r.get("elapsed_s") for r in reversed(records) if r.get("elapsed_s") is not None), None)
    facts = [("hardware", _hardware(info)), ("software", _software(info)),
             ("time", f"{format_duration(float(time_s))} wall for {records[-1]['epoch']} epochs" if time_s else None),
             ("started", info.get("started")), ("git revision", info.get("git_revision"))]
    lines += [f"- {k}: {v}" for k, v in facts if v]
    lines += ["- command (the resolved recipe below, as `config.yaml`):", "", "```bash",
              f"vitkit train -c config.yaml --data_dir {cfg.get('data_dir', 'DATA_DIR')}", "```", "",
              "<details><summary>config.yaml</summary>", "", "```yaml",
              yaml.safe_dump(cfg, sort_keys=False).strip(), "```", "", "</details>", ""]
    lines += ["## How to use", ""] + _usage(library, ckpt, repo_hint)
    return "\n".join(lines) + "\n"


def _arch_options(arch: Any) -> str:
    parts = [f"pooling {arch.global_pool}"]
    if arch.reg_tokens:
        parts.append(f"{arch.reg_tokens} registers")
    if arch.rope != "none":
        parts.append(f"RoPE {arch.rope}")
    if arch.mlp != "mlp":
        parts.append(arch.mlp)
    parts.append(f"{arch.act}, LayerNorm eps {arch.norm_eps:g}")
    return ", ".join(parts)


def _class_list(names: list[str] | None, limit: int = 20) -> str:
    if not names:
        return "indices only"
    shown = ", ".join(f"`{n}`" for n in names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def _hardware(info: dict[str, Any]) -> str | None:
    if not info:
        return None
    device = info.get("gpu") or info.get("cpu") or info.get("device")
    world = info.get("world_size")
    threads = f", {info['cpu_threads']} CPU threads" if info.get("cpu_threads") and not info.get("gpu") else ""
    return f"{device}{f' x {world}' if world and world > 1 else ''}{threads}" if device else None


def _software(info: dict[str, Any]) -> str | None:
    parts = [f"{k} {info[k]}" for k in ("vitkit", "torch", "python") if info.get(k)]
    return ", ".join(parts) or None


def _usage(library: str, ckpt: Checkpoint, repo_hint: str | None) -> list[str]:
    where = repo_hint or "THIS_FOLDER_OR_REPO_ID"
    hub = where if "/" in where and not where.startswith((".", "/")) else None
    if library == "timm":
        source = f"hf-hub:{hub}" if hub else f"local-dir:{where}"
        return ["```python", "import timm", f"model = timm.create_model({source!r}, pretrained=True).eval()",
                "cfg = timm.data.resolve_data_config({}, model=model)  # this card's preprocessing",
                "transform = timm.data.create_transform(**cfg)", "```", ""]
    if library == "transformers":
        return ["```python", "from transformers import pipeline",
                f"classify = pipeline('image-classification', model={where!r})",
                "classify('image.jpg')", "```", ""]
    return ["```bash", f"vitkit predict {ckpt.path.name} image.jpg", f"vitkit validate --ckpt_path {ckpt.path.name} "
            "--data_dir DATA_DIR", "```", ""]


def write_card(folder: Path, ckpt: Checkpoint, *, run_dir: Path | None = None, library: str = "vitkit",
               repo_hint: str | None = None) -> Path:
    """README.md in `folder`; the run's curves.png and confusion.png are copied in (when `folder` is not the run
    folder itself) and shown."""
    images = []
    for name in (CURVES, CONFUSION):
        src = run_dir / name if run_dir is not None else None
        if src is not None and src.is_file():
            if src.resolve() != (folder / name).resolve():
                shutil.copyfile(src, folder / name)
            images.append(name)
        elif (folder / name).is_file():
            images.append(name)
    text = render_card(ckpt, run_dir=run_dir, library=library, images=tuple(images), repo_hint=repo_hint)
    path = folder / CARD
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))
    return path
