"""A vitkit model in the other toolkits' own layouts, and on the Hugging Face Hub.

  vitkit export runs/x/best.safetensors --format timm --out vit-timm/   # timm.create_model("local-dir:vit-timm/")
  vitkit export runs/x/best.safetensors --format hf --out vit-hf/       # AutoModelForImageClassification / pipeline
  vitkit push runs/x/best.safetensors user/my-vit [--format hf] [--private] [--revision BRANCH]

`--format timm` builds timm's own model for the architecture (the registered timm name, or timm's
VisionTransformer with the shape as `model_args` for vitkit-only sizes), loads vitkit's weights into it (key names
are timm's; the Eva families through `vitkit_to_eva`) and writes it with timm's `save_for_hf`: `config.json`
(architecture, num_classes, label_names, model_args, pretrained_cfg with mean/std/crop/interpolation) and
`model.safetensors`. `--format hf` writes transformers' ViTForImageClassification layout: `config.json` (id2label),
`model.safetensors` (keys by `formats.HF_KEYS`, the table `vitkit convert` reads with) and
`preprocessor_config.json` (BitImageProcessor: shorter side to the resize size, center crop, mean/std).

An architecture option the target cannot express (timm's config has no LayerNorm eps, HF ViT has no registers,
attention pooling, RoPE, ...) is refused in one line naming the option. Whatever passes is then loaded back by the
target library itself from the written folder and compared with vitkit's logits on real images; a folder whose
logits differ by more than `--tolerance` is not kept. Every folder gets a model card (`README.md`, vitkit/engine/
card.py) and `vitkit_export.json` (the check). The folder is written beside its final name and renamed into place.

`vitkit push` uploads such a folder (or exports a checkpoint first, to `<checkpoint>-<format>/` beside it, which
stays) with huggingface_hub (`create_repo`, `create_branch`, `upload_folder`); the token comes from `HF_TOKEN` or
`hf auth login` as huggingface_hub finds it. Offline or unauthorised is one line, and nothing local is removed.
"""
from __future__ import annotations

import json
import math
import shutil
import tempfile
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from vitkit.engine.card import CARD, CONFUSION, write_card
from vitkit.engine.checkpoint import Checkpoint, is_vitkit_checkpoint, load_checkpoint
from vitkit.engine.monitor import CURVES
from vitkit.errors import VitkitError
from vitkit.io import atomic_write
from vitkit.models.registry import get_spec, timm_model_name
from vitkit.models.vit import ViTConfig
from vitkit.tools.inference import InferenceModel
from vitkit.weights.formats import HF_ACTS, PIL_CODES, TIMM_INTERPOLATIONS, to_transformers, vitkit_to_eva

HUB_FORMATS = ("timm", "hf")
EXPORT_RECORD = "vitkit_export.json"
# Files an export folder holds; an existing --out folder with anything else in it is not replaced.
FOLDER_FILES = {"config.json", "model.safetensors", "preprocessor_config.json", CARD, CURVES, CONFUSION,
                EXPORT_RECORD}
# timm's VisionTransformer for vitkit-only shapes (vit_n_4_32, ...): the shape comes from model_args.
TIMM_GENERIC = "vit_base_patch16_224"
# ViTConfig fields that do not change what an eval-mode model computes.
_EVAL_FREE = {"drop_rate", "pos_drop_rate", "attn_drop_rate", "proj_drop_rate", "drop_path_rate", "dynamic_img_size"}
# ViTConfig field -> timm VisionTransformer keyword (values JSON, as timm's config.json stores them).
_TIMM_KWARGS = {"img_size": "img_size", "patch_size": "patch_size", "in_chans": "in_chans", "embed_dim": "embed_dim",
                "depth": "depth", "num_heads": "num_heads", "mlp_ratio": "mlp_ratio", "qkv_bias": "qkv_bias",
                "qk_norm": "qk_norm", "init_values": "init_values", "class_token": "class_token",
                "reg_tokens": "reg_tokens", "no_embed_class": "no_embed_class", "global_pool": "global_pool",
                "fc_norm": "fc_norm", "pre_norm": "pre_norm", "act": "act_layer", "pos_embed": "pos_embed"}
# What timm's config cannot say (a callable or a module class in timm): why, for the one-line refusal.
_TIMM_FIXED = {"norm_eps": "timm's config.json has no LayerNorm eps (its VisionTransformer uses 1e-6)",
               "mlp": "timm selects SwiGLU by a module class, not a config value",
               "scale_mlp_norm": "timm selects the MLP norm by a module class, not a config value",
               "rope": "RoPE is timm's Eva model, chosen by architecture name",
               "rope_temperature": "RoPE settings are fixed by timm's Eva architecture name",
               "rope_grid_indexing": "RoPE settings are fixed by timm's Eva architecture name",
               "rope_ref_grid": "RoPE settings are fixed by timm's Eva architecture name"}


def _refuse(fmt: str, field: str, value: Any, why: str, hint: str = "") -> VitkitError:
    return VitkitError(f"--format {fmt}: {field}={value!r} has no equivalent: {why}; nothing written{hint}")


def _arch_diff(a: ViTConfig, b: ViTConfig, skip: set[str]) -> str | None:
    """The first ViTConfig field (not in `skip`) where `a` and `b` differ."""
    return next((f.name for f in fields(ViTConfig)
                 if f.name not in skip and getattr(a, f.name) != getattr(b, f.name)), None)


def timm_model(im: InferenceModel) -> tuple[torch.nn.Module, str, dict[str, Any]]:
    """timm's own model for `im`'s architecture with `im`'s weights loaded, its architecture name and model_args."""
    import timm

    arch, name = im.model.cfg, im.model_name
    registered = timm_model_name(name)
    spec_arch = get_spec(name).arch
    architecture = registered or TIMM_GENERIC
    with torch.device("meta"):
        probe = timm.create_model(architecture, pretrained=False, num_classes=arch.num_classes)
    eva = type(probe).__name__ != "VisionTransformer"
    model_args: dict[str, Any] = {"num_classes": arch.num_classes}
    if eva:  # timm's Eva: everything follows from the architecture name
        diff = _arch_diff(arch, spec_arch, _EVAL_FREE | {"num_classes"})
        if diff:
            raise _refuse("timm", diff, getattr(arch, diff), f"timm's {type(probe).__name__} {architecture} fixes it "
                          f"to {getattr(spec_arch, diff)!r}")
    else:
        for field, why in _TIMM_FIXED.items():
            value = getattr(arch, field)
            default = getattr(spec_arch if registered else ViTConfig(), field)
            if value != default:
                raise _refuse("timm", field, value, why, "; --format hf takes layer_norm_eps" if field == "norm_eps"
                              else "")
        if arch.pos_embed == "sincos2d":
            raise _refuse("timm", "pos_embed", "sincos2d", "timm's VisionTransformer has learned or no position "
                          "embeddings")
        for field, kwarg in _TIMM_KWARGS.items():
            if field == "act" and arch.mlp != "mlp":
                continue  # the entrypoint's SwiGLU brings its own activation
            model_args[kwarg] = getattr(arch, field)
    model = timm.create_model(architecture, pretrained=False, **model_args).eval()
    sd = {k: v for k, v in im.model.state_dict().items() if not k.startswith("rope")}
    own = model.state_dict()
    if eva:
        sd = vitkit_to_eva(sd, like=own)
    sd = {k: v for k, v in sd.items() if k in own or not _is_buffer(im.model, k)}
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not _is_buffer(model, k)]
    if missing or unexpected:
        raise VitkitError(f"--format timm: timm's {architecture} and vitkit's {name} differ in their tensors "
                          f"(missing {missing[:3]}, unexpected {list(unexpected)[:3]}); nothing written")
    return model, architecture, model_args


def _is_buffer(module: torch.nn.Module, key: str) -> bool:
    return key in dict(module.named_buffers())


def write_timm(im: InferenceModel, folder: Path) -> dict[str, Any]:
    from timm.models._hub import save_for_hf

    model, architecture, model_args = timm_model(im)
    dc = im.data_config
    pretrained_cfg = {"tag": "vitkit", "mean": list(dc.mean), "std": list(dc.std), "crop_pct": dc.crop_pct,
                      "interpolation": TIMM_INTERPOLATIONS.get(dc.interpolation, dc.interpolation),
                      "input_size": [model.patch_embed.proj.in_channels, dc.input_size, dc.input_size]}
    save_for_hf(model, str(folder), model_config={"label_names": im.class_names, "pretrained_cfg": pretrained_cfg},
                model_args=model_args, safe_serialization=True,
                data_config={k: pretrained_cfg[k] for k in ("mean", "std", "crop_pct", "interpolation", "input_size")})
    return {"architecture": architecture, "model_args": model_args}


def hf_config(im: InferenceModel) -> dict[str, Any]:
    """transformers' ViTConfig fields for `im`, or a refusal naming the option HF's ViT has no equivalent for."""
    a = im.model.cfg
    why = {"class_token": (a.class_token, True, "HF ViT always has a class token"),
           "global_pool": (a.global_pool, "token", "HF ViTForImageClassification classifies the class token"),
           "fc_norm": (bool(a.fc_norm), False, "HF ViT has no norm after pooling"),
           "reg_tokens": (a.reg_tokens, 0, "HF ViT has no register tokens"),
           "no_embed_class": (a.no_embed_class, False, "HF ViT's position embedding covers the class token"),
           "pre_norm": (a.pre_norm, False, "HF ViT has no norm before the blocks"),
           "qk_norm": (a.qk_norm, False, "HF ViT has no q/k norm"),
           "init_values": (a.init_values, None, "HF ViT has no layer scale"),
           "mlp": (a.mlp, "mlp", "HF ViT's MLP is dense-GELU-dense"),
           "scale_mlp_norm": (a.scale_mlp_norm, False, "HF ViT has no norm inside the MLP"),
           "pos_embed": (a.pos_embed, "learn", "HF ViT learns its position embedding"),
           "rope": (a.rope, "none", "HF ViT has no rotary embedding")}
    for field, (value, needed, reason) in why.items():
        if value != needed:
            raise _refuse("hf", field, value, reason, "; --format timm may take it")
    if a.act not in HF_ACTS:
        raise _refuse("hf", "act", a.act, f"transformers' activations here are {sorted(HF_ACTS)}")
    names = im.class_names
    return {"hidden_size": a.embed_dim, "num_hidden_layers": a.depth, "num_attention_heads": a.num_heads,
            "intermediate_size": a.mlp_hidden, "hidden_act": HF_ACTS[a.act], "hidden_dropout_prob": 0.0,
            "attention_probs_dropout_prob": 0.0, "layer_norm_eps": a.norm_eps, "image_size": a.img_size,
            "patch_size": a.patch_size, "num_channels": a.in_chans, "qkv_bias": a.qkv_bias,
            "encoder_stride": a.patch_size, "id2label": {i: n for i, n in enumerate(names)},
            "label2id": {n: i for i, n in enumerate(names)} if len(set(names)) == len(names) else None,
            "architectures": ["ViTForImageClassification"]}


def write_hf(im: InferenceModel, folder: Path) -> dict[str, Any]:
    try:
        from transformers import BitImageProcessor
        from transformers import ViTConfig as HFViTConfig
    except ImportError:
        raise VitkitError("--format hf needs transformers: pip install 'vitkit[hub]'") from None
    cfg = hf_config(im)
    label2id = cfg.pop("label2id")
    config = HFViTConfig(**cfg, **({"label2id": label2id} if label2id else {}))
    config.save_pretrained(str(folder))
    sd = to_transformers({k: v for k, v in im.model.state_dict().items() if not _is_buffer(im.model, k)})
    save_file({k: v.contiguous() for k, v in sd.items()}, str(folder / "model.safetensors"), metadata={"format": "pt"})
    dc = im.data_config
    BitImageProcessor(do_resize=True, size={"shortest_edge": dc.resize_size}, resample=PIL_CODES[dc.interpolation],
                      do_center_crop=True, crop_size={"height": dc.input_size, "width": dc.input_size},
                      do_rescale=True, rescale_factor=1 / 255, do_normalize=True, image_mean=list(dc.mean),
                      image_std=list(dc.std), do_convert_rgb=True).save_pretrained(str(folder))
    return {"architecture": "ViTForImageClassification"}


def load_folder(fmt: str, folder: Path) -> torch.nn.Module:
    """The written folder loaded by the target library itself: what its users will run."""
    if fmt == "timm":
        import timm

        return timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    from transformers import AutoModelForImageClassification

    model = AutoModelForImageClassification.from_pretrained(str(folder)).eval()
    return _Logits(model)


class _Logits(torch.nn.Module):
    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=x).logits


@torch.no_grad()
def compare(im: InferenceModel, other: torch.nn.Module, x: torch.Tensor, source: str, batch_size: int = 50
            ) -> dict[str, Any]:
    """max |logits - vitkit's| and top-1 agreement on `x` (images preprocessed as vitkit validates)."""
    diff, agree = 0.0, 0
    for start in range(0, len(x), batch_size):
        batch = x[start:start + batch_size]
        ref, got = im.model(batch).float(), other(batch).float()
        diff = max(diff, float((got - ref).abs().max()))
        agree += int((got.argmax(-1) == ref.argmax(-1)).sum())
    return {"inputs": source, "max_abs_diff": diff, "top1_agreement": 100.0 * agree / max(1, len(x))}


def _checkpoint_of(im: InferenceModel) -> Checkpoint:
    """The card's facts: the vitkit checkpoint itself, or what a foreign source tells."""
    if Path(im.source).is_file() and is_vitkit_checkpoint(im.source):
        return load_checkpoint(im.source)
    return Checkpoint(path=Path(im.source), model_name=im.model_name, arch=im.model.cfg, data_config=im.data_config,
                      state_dict=dict(im.model.state_dict()), class_names=im.class_names,
                      config={"pretrained": im.source})


def _run_dir(source: str) -> Path | None:
    parent = Path(source).parent
    return parent if (parent / "metrics.jsonl").is_file() else None


def _prepare_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise VitkitError(f"--out {out} is a file; give a folder for --format timm|hf")
    if out.is_dir():
        other = sorted(p.name for p in out.iterdir() if p.name not in FOLDER_FILES)
        if other:
            raise VitkitError(f"--out {out} holds other files ({', '.join(other[:3])}); give an empty or new folder")


def export_folder(im: InferenceModel, fmt: str, out: Path, *, inputs: tuple[torch.Tensor, str], tolerance: float,
                  repo_hint: str | None = None) -> dict[str, Any]:
    """Write, load back with the target library, compare on `inputs` ((images as vitkit preprocesses them, where
    they are from)), add the card; then move into `out`. Returns the record (vitkit_export.json)."""
    _prepare_out(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        written = write_timm(im, tmp) if fmt == "timm" else write_hf(im, tmp)
        check = compare(im, load_folder(fmt, tmp), *inputs)
        passed = check["max_abs_diff"] <= tolerance and check["top1_agreement"] == 100.0
        if not passed or not math.isfinite(check["max_abs_diff"]):
            raise VitkitError(f"--format {fmt}: {written['architecture']} loaded from the export gives logits "
                              f"{check['max_abs_diff']:.2e} from vitkit's (tolerance {tolerance:g}, top-1 agreement "
                              f"{check['top1_agreement']:.2f}%) on {check['inputs']}; nothing written")
        ckpt = _checkpoint_of(im)
        library = "timm" if fmt == "timm" else "transformers"
        write_card(tmp, ckpt, run_dir=_run_dir(im.source), library=library, repo_hint=repo_hint or str(out))
        record = {"format": fmt, "source": im.source, "model_name": im.model_name, **written,
                  "check": {**check, "tolerance": tolerance, "passed": True}}
        atomic_write(tmp / EXPORT_RECORD, lambda t: Path(t).write_text(json.dumps(record, indent=1) + "\n"))
        if out.is_dir():
            shutil.rmtree(out)
        tmp.rename(out)
        return record
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
