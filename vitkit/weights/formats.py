"""Every published ViT weight format -> a state dict under vitkit's (= timm's) parameter names.

Each reader returns a `Converted`: the tensors renamed to our keys, the architecture the source implies
(`arch`: e.g. MindSpore's LayerNorm eps 1e-7 and tanh GELU, Hugging Face's eps 1e-12), the eval preprocessing
(`data`: mean/std/crop_pct/interpolation/input_size) and notes on what was dropped. Keys that have no
counterpart in our model keep their source names, so fitting reports them as unexpected instead of losing
them silently.

`data` is what the file states (a timm hub config.json's pretrained_cfg, a preprocessor_config.json, a vitkit
checkpoint's data_config; those keys are listed in `data_stated`) over the preprocessing its publisher uses
for that format (`format_data`), so weights are never evaluated with another source's statistics:
  timm         mean = std = 0.5, bicubic, crop_pct 0.9, 1.0 at >= 384 px: timm's `_cfg` defaults for ViT, which
               every timm tag of our architectures uses (timm 1.0.31 `default_cfgs`; the MAE/DINO tags, with
               ImageNet statistics, are not in our sources table). Only for tensors shaped like a plain timm ViT
               (width and patch of one of timm's vit_{tiny..huge}_patch*, and none of the backbone families'
               structure: registers, layer scale, pre-norm, attention pooling, SwiGLU, no position embedding,
               timm's Eva layout): a plain state dict of vitkit's own small models has the same key names and
               keeps its model's registered preprocessing, and so do the families' (DINOv2, SigLIP, CLIP, EVA-02,
               ROPE-ViT, DINOv3, DeiT III), whose registered preprocessing is timm's own cfg for them.
  jax          Google's .npz: the same as timm, which is what timm's cfgs for those very .npz URLs say.
  torchvision  ImageNet mean/std; IMAGENET1K_V1 (the DEFAULT weights of vit_b_16/b_32/l_16/l_32): bilinear,
               crop 224/256 (vit_l_16: 224/242); SWAG (inputs above 224 px, and every vit_h_14): bicubic, no
               crop (`ViT_*_Weights.transforms()`, torchvision 0.29). SWAG linear-classifier weights of
               vit_b_16/l_16 at 224 px look like V1 ones; a file under its published name is recognised by it.
  transformers mean = std = 0.5, resized straight to the input size (crop_pct 1.0), bilinear: ViTImageProcessor's
               defaults (transformers 5.x: size 224, resample BILINEAR, image_mean/std 0.5).
  mindcv       ImageNet mean/std, crop_pct 0.875, bicubic (see `vitkit.weights.sources`).
  vitkit       its own data_config, nothing added.

Formats:
  vitkit       our own safetensors checkpoint (vitkit.engine.checkpoint), with its arch and preprocessing
  timm         timm state dicts (.safetensors/.pth/.bin), or a timm hub folder (config.json + weights); timm's
               `Eva` layout (EVA-02, ROPE-ViT, DINOv3: gamma_1, q_bias / v_bias, q_proj / k_proj / v_proj,
               mlp.fc1_g / fc1_x) is recognised by those keys and renamed by `eva_to_vitkit`
  torchvision  torchvision.models.vit_* state dicts (class_token, conv_proj, encoder.layers.encoder_layer_N)
  transformers Hugging Face ViTModel / ViTForImageClassification (folder with config.json + weights)
  jax          Google's .npz (original ViT, AugReg, big_vision), laid out as timm's `_load_weights` reads it
  mindcv       MindSpore .ckpt files of MindCV's ViT (all three layouts MindCV has published, see below)
Untrusted pickles are never executed: `.pth`/`.bin` go through `torch.load(weights_only=True)` only.
"""
from __future__ import annotations

import json
import math
import re
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vitkit.constants import IMAGENET_MEAN, IMAGENET_STD
from vitkit.errors import WeightsError, path_problem
from vitkit.models import registry
from vitkit.models.registry import INCEPTION_MEAN, INCEPTION_STD
from vitkit.weights.mindspore_ckpt import read_mindspore_ckpt

# The prefix of the EMA copy's tensors in a vitkit checkpoint (written by engine/checkpoint.py).
EMA_PREFIX = "ema."

# ViTConfig fields a source may decide (numerics and structure flags). Sizes (embed_dim, depth, patch_size,
# mlp_ratio) are never taken from a source: the model name decides them and a mismatch is an error naming the key.
# Of these, the keys of a state dict tell (`infer_arch`) the head size, class token, registers, pooling, qkv
# bias, q/k norm, layer scale, pre-norm, SwiGLU and the MLP norm; the others (act, norm_eps, no_embed_class,
# pos_embed, rope and its settings) only a file's own statement can (a vitkit checkpoint's arch, a config.json),
# else the model name decides them.
ARCH_FIELDS = ("num_classes", "num_heads", "qkv_bias", "qk_norm", "init_values", "class_token", "reg_tokens",
               "no_embed_class", "global_pool", "fc_norm", "pre_norm", "norm_eps", "act", "mlp", "scale_mlp_norm",
               "pos_embed", "rope", "rope_temperature", "rope_grid_indexing", "rope_ref_grid")
# timm hub config.json `global_pool` values that are ViTConfig pooling modes.
_GLOBAL_POOLS = ("token", "avg", "map")

# MindSpore defaults that MindCV's ViT inherits: nn.LayerNorm(epsilon=1e-7) and nn.GELU(approximate=True),
# i.e. the tanh approximation (tests/data/mindcv_vit_tiny.json, numerics_notes).
MINDCV_ARCH = {"norm_eps": 1e-7, "act": "gelu_tanh"}


@dataclass
class Converted:
    """Weights in our key names plus what the source says about the model and its preprocessing."""

    state_dict: dict[str, torch.Tensor]
    format: str
    arch: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)  # the file's statements over its format's defaults
    class_names: list[str] | None = None
    notes: list[str] = field(default_factory=list)
    data_stated: frozenset[str] = frozenset()  # keys of `data` the file itself stated (the rest: format_data)


# -- the preprocessing each format's publisher uses (module docstring) -------------------------------------------

# (width, patch) of timm's vit_{tiny,small,base,large,huge}_patch* models: the registered names with a timm name.
_TIMM_SHAPES = {(registry.get_spec(n).arch.embed_dim, registry.get_spec(n).arch.patch_size)
                for n in registry.list_models() if registry.timm_name(n)}


def _prefix_tokens(sd: Mapping[str, torch.Tensor]) -> int:
    """Class token plus register tokens of a state dict in our names."""
    reg = sd.get("reg_token")
    return (1 if "cls_token" in sd else 0) + (int(reg.shape[1]) if reg is not None and reg.ndim == 3 else 0)


def weights_img_size(sd: Mapping[str, torch.Tensor]) -> int | None:
    """The input size the position embedding was made for (patch grid x patch size), None if it cannot be told.
    The table has a row for each prefix token (class + registers), or none (`no_embed_class`: DeiT III, DINOv2)."""
    pos, proj = sd.get("pos_embed"), sd.get("patch_embed.proj.weight")
    if pos is None or proj is None or pos.ndim != 3 or proj.ndim != 4:
        return None
    for prefix in dict.fromkeys((_prefix_tokens(sd), 0)):
        tokens = pos.shape[1] - prefix
        grid = math.isqrt(max(tokens, 0))
        if tokens > 0 and grid * grid == tokens:
            return grid * int(proj.shape[-1])
    return None


def format_data(fmt: str, sd: Mapping[str, torch.Tensor], *, timm_hub: bool = False) -> dict[str, Any]:
    """The eval preprocessing the publisher of `fmt` weights uses, read off the tensors (`sd`, our key names)
    where it depends on the model (input size, width); {} for vitkit checkpoints and for timm-named tensors
    that are not shaped like any timm ViT (vitkit's own small models), unless they came from a timm hub
    folder (`timm_hub`)."""
    img = weights_img_size(sd)
    proj = sd.get("patch_embed.proj.weight")
    width, patch = (int(proj.shape[0]), int(proj.shape[-1])) if proj is not None and proj.ndim == 4 else (0, 0)
    data: dict[str, Any]
    if fmt in ("timm", "jax"):
        if not _plain_vit(sd):
            return {}  # a backbone family's (SigLIP's MAP head too): its registered preprocessing decides
        if fmt == "timm" and not timm_hub and (width, patch) not in _TIMM_SHAPES:
            return {}
        data = {"mean": INCEPTION_MEAN, "std": INCEPTION_STD, "interpolation": "bicubic",
                "crop_pct": 1.0 if (img or 0) >= 384 else 0.9}
    elif fmt == "torchvision":
        swag = (img or 0) > 224 or width == 1280  # SWAG E2E fine-tunes at 384/512/518; vit_h_14 has SWAG only
        data = {"mean": IMAGENET_MEAN, "std": IMAGENET_STD, "interpolation": "bicubic" if swag else "bilinear",
                "crop_pct": 1.0 if swag else 224 / (242 if (width, patch) == (1024, 16) else 256)}
    elif fmt == "transformers":
        data = {"mean": INCEPTION_MEAN, "std": INCEPTION_STD, "interpolation": "bilinear", "crop_pct": 1.0}
    elif fmt == "mindcv":
        data = {"mean": IMAGENET_MEAN, "std": IMAGENET_STD, "interpolation": "bicubic", "crop_pct": 0.875}
    else:
        return {}
    if img:
        data["input_size"] = img
    return data


def _converted(sd: dict[str, torch.Tensor], fmt: str, stated: Mapping[str, Any] | None = None, *,
               timm_hub: bool = False, **kw: Any) -> Converted:
    """A Converted whose `data` is the file's statements (`stated`) over `format_data`."""
    stated = dict(stated or {})
    data = {**format_data(fmt, sd, timm_hub=timm_hub), **stated}
    return Converted(sd, fmt, data=data, data_stated=frozenset(stated), **kw)


# -- generic helpers ------------------------------------------------------------------------------------------

def _rename(sd: Mapping[str, torch.Tensor], rules: list[tuple[str, str]]) -> dict[str, torch.Tensor]:
    """Apply the first matching (regex, replacement) rule to each key; keys no rule matches keep their name."""
    compiled = [(re.compile(p), r) for p, r in rules]
    out = {}
    for key, value in sd.items():
        for pattern, repl in compiled:
            if pattern.fullmatch(key):
                key = pattern.sub(repl, key)
                break
        out[key] = value
    return out


def infer_arch(sd: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """Structure flags readable from timm-named keys (class token, registers, pooling, qkv bias, head size, SwiGLU,
    ...; ARCH_FIELDS says which fields the keys cannot tell)."""
    arch: dict[str, Any] = {"num_classes": int(sd["head.weight"].shape[0]) if "head.weight" in sd else 0}
    arch["class_token"] = "cls_token" in sd
    reg = sd.get("reg_token")
    arch["reg_tokens"] = int(reg.shape[1]) if reg is not None and reg.ndim == 3 else 0
    if "attn_pool.latent" in sd:
        arch["global_pool"] = "map"  # SigLIP's attention pool (timm AttentionPoolLatent)
    elif "fc_norm.weight" in sd:
        arch["global_pool"] = "avg"  # timm: fc_norm exists exactly when pooling by average
    elif not arch["class_token"]:
        arch["global_pool"], arch["fc_norm"] = "avg", False  # big_vision 'gap': final norm, then mean
    if "blocks.0.attn.qkv.weight" in sd:
        arch["qkv_bias"] = "blocks.0.attn.qkv.bias" in sd
    arch["qk_norm"] = "blocks.0.attn.q_norm.weight" in sd
    arch["pre_norm"] = "norm_pre.weight" in sd  # CLIP; its patch embedding then has no bias (timm, vit.py)
    if "blocks.0.ls1.gamma" in sd:
        arch["init_values"] = 1e-5  # only switches layer scale on; the loaded gammas replace the init value
    fc1, fc2 = sd.get("blocks.0.mlp.fc1.weight"), sd.get("blocks.0.mlp.fc2.weight")
    if fc1 is not None and fc2 is not None and fc1.ndim == fc2.ndim == 2:
        # SwiGLU's fc1 makes the gate and the value (timm SwiGLUPacked): twice the width fc2 reads
        arch["mlp"] = "swiglu" if fc1.shape[0] == 2 * fc2.shape[1] else "mlp"
        arch["scale_mlp_norm"] = "blocks.0.mlp.norm.weight" in sd
    return arch


def _plain_vit(sd: Mapping[str, torch.Tensor]) -> bool:
    """Tensors of a plain timm VisionTransformer, none of the backbone families' structure (`format_data`)."""
    arch, img = infer_arch(sd), weights_img_size(sd)
    if "pos_embed" not in sd or img is None:
        return False  # no position embedding: ROPE-ViT, DINOv3 (or no patch embedding at all)
    grid = (img // int(sd["patch_embed.proj.weight"].shape[-1])) ** 2
    no_embed_class = "cls_token" in sd and int(sd["pos_embed"].shape[1]) == grid  # DeiT III, DINOv2
    return not (no_embed_class or arch["reg_tokens"] or arch["pre_norm"] or "init_values" in arch
                or arch.get("global_pool") == "map" or arch.get("mlp") == "swiglu" or arch.get("scale_mlp_norm"))


def _strip_prefixes(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop wrappers' prefixes: DistributedDataParallel's 'module.', torch.compile's '_orig_mod.'."""
    for prefix in ("module.", "_orig_mod."):
        if sd and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
    return sd


def _unwrap(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    """The tensor dict inside a training checkpoint ({'state_dict': ...}, {'model': ...}, ...)."""
    for key in ("state_dict", "model", "model_state", "module", "net"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict):
        raise WeightsError(f"{path} holds a {type(obj).__name__}, not a state dict of tensors")
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise WeightsError(f"{path} has no tensors at the top level or under 'state_dict'/'model'")
    return _strip_prefixes(tensors)


# -- torchvision ---------------------------------------------------------------------------------------------

_TORCHVISION_RULES = [
    (r"class_token", "cls_token"),
    (r"conv_proj\.(weight|bias)", r"patch_embed.proj.\1"),
    (r"encoder\.pos_embedding", "pos_embed"),
    (r"encoder\.layers\.encoder_layer_(\d+)\.ln_1\.(weight|bias)", r"blocks.\1.norm1.\2"),
    (r"encoder\.layers\.encoder_layer_(\d+)\.self_attention\.in_proj_(weight|bias)", r"blocks.\1.attn.qkv.\2"),
    (r"encoder\.layers\.encoder_layer_(\d+)\.self_attention\.out_proj\.(weight|bias)", r"blocks.\1.attn.proj.\2"),
    (r"encoder\.layers\.encoder_layer_(\d+)\.ln_2\.(weight|bias)", r"blocks.\1.norm2.\2"),
    # torchvision renamed linear_1/linear_2 to mlp.0/mlp.3 (MLPBlock._load_from_state_dict, version 2)
    (r"encoder\.layers\.encoder_layer_(\d+)\.mlp\.(?:0|linear_1)\.(weight|bias)", r"blocks.\1.mlp.fc1.\2"),
    (r"encoder\.layers\.encoder_layer_(\d+)\.mlp\.(?:3|linear_2)\.(weight|bias)", r"blocks.\1.mlp.fc2.\2"),
    (r"encoder\.ln\.(weight|bias)", r"norm.\1"),
    (r"heads\.head\.(weight|bias)", r"head.\1"),
]


def from_torchvision(sd: Mapping[str, torch.Tensor]) -> Converted:
    """torchvision's VisionTransformer: nn.MultiheadAttention's in_proj rows are [q; k; v], as timm's qkv."""
    out = _rename(sd, _TORCHVISION_RULES)
    notes = ["heads.pre_logits (representation layer) has no counterpart; reported as unexpected"] \
        if "heads.pre_logits.weight" in sd else []
    return _converted(out, "torchvision", arch=infer_arch(out), notes=notes)


# -- Hugging Face transformers ----------------------------------------------------------------------------------

# One table for both directions: `from_transformers` (convert, pretrained loading) reads it, `to_transformers`
# (`vitkit export --format hf`) writes it, so the two cannot drift. Each row: vitkit's key, transformers'
# ViTForImageClassification key as every published checkpoint stores it; `{i}` a block index, `{p}` weight|bias.
# attn.qkv's rows are the three HF_QKV tensors ([q; k; v], as timm).
HF_KEYS = [
    ("cls_token", "vit.embeddings.cls_token"),
    ("pos_embed", "vit.embeddings.position_embeddings"),
    ("patch_embed.proj.{p}", "vit.embeddings.patch_embeddings.projection.{p}"),
    ("blocks.{i}.norm1.{p}", "vit.encoder.layer.{i}.layernorm_before.{p}"),
    ("blocks.{i}.norm2.{p}", "vit.encoder.layer.{i}.layernorm_after.{p}"),
    ("blocks.{i}.attn.proj.{p}", "vit.encoder.layer.{i}.attention.output.dense.{p}"),
    ("blocks.{i}.mlp.fc1.{p}", "vit.encoder.layer.{i}.intermediate.dense.{p}"),
    ("blocks.{i}.mlp.fc2.{p}", "vit.encoder.layer.{i}.output.dense.{p}"),
    ("norm.{p}", "vit.layernorm.{p}"),
    ("head.{p}", "classifier.{p}"),
]
HF_QKV = ("blocks.{i}.attn.qkv.{p}", "vit.encoder.layer.{i}.attention.attention.{part}.{p}")  # query|key|value
_HF_PARTS = ("query", "key", "value")
# Read only: transformers>=5's in-memory names (a state dict taken from a live model).
_HF5_KEYS = [
    ("blocks.{i}.norm1.{p}", "vit.layers.{i}.layernorm_before.{p}"),
    ("blocks.{i}.norm2.{p}", "vit.layers.{i}.layernorm_after.{p}"),
    ("blocks.{i}.attn.proj.{p}", "vit.layers.{i}.attention.o_proj.{p}"),
    ("blocks.{i}.mlp.fc1.{p}", "vit.layers.{i}.mlp.fc1.{p}"),
    ("blocks.{i}.mlp.fc2.{p}", "vit.layers.{i}.mlp.fc2.{p}"),
]
_HF5_QKV = "vit.layers.{i}.attention.{part}_proj.{p}"  # part: q|k|v


def _key_pattern(template: str, *, optional_vit: bool = False) -> re.Pattern[str]:
    """A table template as a regex: {i} -> a block index, {p} -> weight|bias, {part} -> a q/k/v name; with
    `optional_vit`, the leading 'vit.' (ViTModel's checkpoints lack it) may be absent."""
    rx = re.escape(template)
    rx = rx.replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{p\}", r"(?P<p>weight|bias)")
    rx = rx.replace(r"\{part\}", r"(?P<part>query|key|value|q|k|v)")
    if optional_vit and rx.startswith(r"vit\."):
        rx = r"(?:vit\.)?" + rx[len(r"vit\."):]
    return re.compile(rx)


_HF_READ = [(_key_pattern(theirs, optional_vit=True), ours) for ours, theirs in HF_KEYS + _HF5_KEYS]
_HF_READ_QKV = [_key_pattern(HF_QKV[1], optional_vit=True), _key_pattern(_HF5_QKV, optional_vit=True)]
_HF_WRITE = [(_key_pattern(ours), theirs) for ours, theirs in HF_KEYS]
# The settings' names in the other toolkits, for both directions like HF_KEYS: the readers here and the
# writers of `vitkit export --format hf|timm` (tools/hub.py) use these tables and their inverses.
HF_ACTS = {"gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh", "quick_gelu": "quick_gelu"}  # vitkit -> hidden_act
_HF_ACT = {theirs: ours for ours, theirs in HF_ACTS.items()} | {"gelu_new": "gelu_tanh"}  # read: an alias too
PIL_CODES = {"nearest": 0, "lanczos": 1, "bilinear": 2, "bicubic": 3, "area": 4}  # vitkit -> PIL.Image.Resampling
TIMM_INTERPOLATIONS = {"area": "box"}  # vitkit's names that timm's pretrained_cfg spells otherwise (PIL's box filter)


def to_transformers(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """vitkit (timm) key names -> ViTForImageClassification's, by HF_KEYS; a key the table has no row for is a
    WeightsError naming it (the caller refuses architectures HF ViT cannot compute before this)."""
    out: dict[str, torch.Tensor] = {}
    qkv = _key_pattern(HF_QKV[0])
    for key, value in sd.items():
        if m := qkv.fullmatch(key):
            for part, chunk in zip(_HF_PARTS, value.chunk(3, dim=0)):
                out[HF_QKV[1].format(i=m["i"], p=m["p"], part=part)] = chunk.contiguous()
            continue
        for pattern, theirs in _HF_WRITE:
            if m := pattern.fullmatch(key):
                out[theirs.format(**m.groupdict())] = value
                break
        else:
            raise WeightsError(f"{key} has no counterpart in transformers' ViTForImageClassification")
    return out


def from_transformers(sd: Mapping[str, torch.Tensor], config: Mapping[str, Any] | None = None) -> Converted:
    """HF ViT: separate query/key/value projections are stacked into one qkv ([q; k; v] rows, as timm)."""
    parts: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    rest = {}
    for key, value in sd.items():
        if m := next((m for rx in _HF_READ_QKV if (m := rx.fullmatch(key))), None):
            parts.setdefault((m["i"], m["p"]), {})[m["part"][0]] = value  # 'q' | 'k' | 'v'
        else:
            rest[key] = value
    out = {}
    for key, value in rest.items():
        m, ours = next(((m, ours) for rx, ours in _HF_READ if (m := rx.fullmatch(key))), (None, key))
        out[ours.format(**m.groupdict()) if m else key] = value
    for (block, kind), qkv in parts.items():
        if set(qkv) != {"q", "k", "v"}:
            raise WeightsError(f"layer {block}: {kind} of query/key/value incomplete ({sorted(qkv)} present)")
        out[f"blocks.{block}.attn.qkv.{kind}"] = torch.cat([qkv["q"], qkv["k"], qkv["v"]], dim=0)
    arch = infer_arch(out)
    data: dict[str, Any] = {}
    class_names = None
    if config:
        act = config.get("hidden_act", "gelu")
        if act not in _HF_ACT:
            raise WeightsError(f"hidden_act {act!r} in config.json is not supported (vitkit has {sorted(_HF_ACT)})")
        arch.update(norm_eps=float(config.get("layer_norm_eps", 1e-12)), act=_HF_ACT[act],
                    num_heads=int(config.get("num_attention_heads", 12)), qkv_bias=bool(config.get("qkv_bias", True)))
        if "image_size" in config:
            data["input_size"] = int(config["image_size"])
        id2label = config.get("id2label") or {}
        if arch["num_classes"] and len(id2label) == arch["num_classes"]:
            labels = [id2label[str(i)] if str(i) in id2label else id2label.get(i) for i in range(len(id2label))]
            if not all(str(x).startswith("LABEL_") for x in labels):  # HF's placeholder names carry nothing
                class_names = [str(x) for x in labels]
    notes = ["pooler (ViTModel's tanh pooler) is not part of ViTForImageClassification; reported as unexpected"] \
        if any("pooler." in k for k in sd) else []
    return _converted(out, "transformers", data, arch=arch, class_names=class_names, notes=notes)


_PIL_RESAMPLE = {code: name for name, code in PIL_CODES.items()}  # preprocessor_config.json's resample -> ours


def _hf_preprocessor(path: Path) -> dict[str, Any]:
    """Preprocessing from preprocessor_config.json. ViTImageProcessor resizes straight to `size` (crop_pct 1);
    processors with do_center_crop resize to `size` and crop `crop_size` (crop_pct = crop / resize)."""
    file = path / "preprocessor_config.json"
    if not file.is_file():
        return {}
    try:
        cfg = json.loads(file.read_text())
    except (OSError, ValueError) as e:
        raise WeightsError(f"{file} is not readable JSON ({e})") from None
    data: dict[str, Any] = {}
    if cfg.get("do_normalize") is False:
        data["mean"], data["std"] = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    elif "image_mean" in cfg:
        data["mean"], data["std"] = tuple(cfg["image_mean"]), tuple(cfg["image_std"])
    size = cfg.get("size")
    side = size if isinstance(size, int) else (size.get("height") or size.get("shortest_edge")) \
        if isinstance(size, dict) else None
    if side:
        data["input_size"], data["crop_pct"] = int(side), 1.0
        crop = cfg.get("crop_size")
        crop = crop if isinstance(crop, int) else crop.get("height") if isinstance(crop, dict) else None
        if cfg.get("do_center_crop") and crop:
            data["input_size"], data["crop_pct"] = int(crop), int(crop) / int(side)
    resample = _PIL_RESAMPLE.get(cfg.get("resample"))
    if resample:
        data["interpolation"] = resample
    return data


# -- Google JAX .npz ------------------------------------------------------------------------------------------

def _jax_array(a: np.ndarray) -> torch.Tensor:
    if a.dtype.kind == "V" and a.dtype.itemsize == 2:  # bfloat16 saved through ml_dtypes
        return torch.from_numpy(a.view(np.int16).copy()).view(torch.bfloat16).float()
    return torch.from_numpy(np.ascontiguousarray(a)).float()


def from_jax(w: Mapping[str, np.ndarray]) -> Converted:
    """Google's ViT checkpoints, with the key layout of timm's `_load_weights` (timm/models/vision_transformer.py).

    Original ViT / AugReg name the sub-layers MultiHeadDotProductAttention_1, MlpBlock_3, LayerNorm_0/_2;
    big_vision names them _0, _0, LayerNorm_0/_1, keeps `pos_embedding` at the top, and with `scan` stacks all
    blocks in one 'Transformer/encoderblock/' whose arrays carry the block index first.
    """
    prefix = next((p for p in ("", "opt/target/", "params/", "params/img/") if f"{p}embedding/kernel" in w), None)
    if prefix is None:
        raise WeightsError("no 'embedding/kernel' array: not a Google ViT .npz checkpoint")
    big_vision = prefix.startswith("params/") or f"{prefix}pos_embedding" in w \
        or f"{prefix}Transformer/encoderblock/LayerNorm_0/scale" in w
    scan = f"{prefix}Transformer/encoderblock/LayerNorm_0/scale" in w
    t = lambda k: _jax_array(w[prefix + k])  # noqa: E731
    out: dict[str, torch.Tensor] = {}
    kernel = t("embedding/kernel")
    if kernel.ndim != 4:
        raise WeightsError(f"embedding/kernel has shape {tuple(kernel.shape)}; only conv patch embeddings load")
    out["patch_embed.proj.weight"] = kernel.permute(3, 2, 0, 1)  # (kh, kw, in, out) -> (out, in, kh, kw)
    out["patch_embed.proj.bias"] = t("embedding/bias")
    if prefix + "cls" in w:
        out["cls_token"] = t("cls")
    out["pos_embed"] = t("pos_embedding" if big_vision else "Transformer/posembed_input/pos_embedding")
    out["norm.weight"], out["norm.bias"] = t("Transformer/encoder_norm/scale"), t("Transformer/encoder_norm/bias")
    if prefix + "head/kernel" in w and w[prefix + "head/kernel"].size:
        out["head.weight"], out["head.bias"] = t("head/kernel").T, t("head/bias")
    mha, mlp, ln2 = ("MultiHeadDotProductAttention_0", "MlpBlock_0", "LayerNorm_1") if big_vision else \
        ("MultiHeadDotProductAttention_1", "MlpBlock_3", "LayerNorm_2")
    if scan:
        depth = w[f"{prefix}Transformer/encoderblock/LayerNorm_0/scale"].shape[0]
    else:
        block = re.compile(rf"{re.escape(prefix)}Transformer/encoderblock_(\d+)/")
        depth = len({m.group(1) for k in w if (m := block.match(k))})
    num_heads = None
    for i in range(depth):
        base = "Transformer/encoderblock/" if scan else f"Transformer/encoderblock_{i}/"
        g = (lambda k, i=i, base=base: t(base + k)[i]) if scan else (lambda k, base=base: t(base + k))
        b = f"blocks.{i}."
        out[b + "norm1.weight"], out[b + "norm1.bias"] = g("LayerNorm_0/scale"), g("LayerNorm_0/bias")
        q = g(f"{mha}/query/kernel")  # (D, heads, head_dim)
        num_heads = q.shape[1]
        out[b + "attn.qkv.weight"] = torch.cat(
            [g(f"{mha}/{n}/kernel").flatten(1).T for n in ("query", "key", "value")])  # (3D, D)
        out[b + "attn.qkv.bias"] = torch.cat([g(f"{mha}/{n}/bias").reshape(-1) for n in ("query", "key", "value")])
        out[b + "attn.proj.weight"] = g(f"{mha}/out/kernel").permute(2, 0, 1).flatten(1)  # (heads, hd, D) -> (D, D)
        out[b + "attn.proj.bias"] = g(f"{mha}/out/bias")
        out[b + "norm2.weight"], out[b + "norm2.bias"] = g(f"{ln2}/scale"), g(f"{ln2}/bias")
        for r in (0, 1):
            out[b + f"mlp.fc{r + 1}.weight"] = g(f"{mlp}/Dense_{r}/kernel").T
            out[b + f"mlp.fc{r + 1}.bias"] = g(f"{mlp}/Dense_{r}/bias")
    if prefix + "MAPHead_0/probe" in w:  # SigLIP's attention-pool head (big_vision MAPHead; timm AttentionPoolLatent)
        head, attn = "MAPHead_0/", "MAPHead_0/MultiHeadDotProductAttention_0/"
        out["attn_pool.latent"] = t(head + "probe")
        out["attn_pool.q.weight"] = t(attn + "query/kernel").flatten(1).T
        out["attn_pool.q.bias"] = t(attn + "query/bias").reshape(-1)
        out["attn_pool.kv.weight"] = torch.cat([t(f"{attn}{n}/kernel").flatten(1).T for n in ("key", "value")])
        out["attn_pool.kv.bias"] = torch.cat([t(f"{attn}{n}/bias").reshape(-1) for n in ("key", "value")])
        out["attn_pool.proj.weight"] = t(attn + "out/kernel").permute(2, 0, 1).flatten(1)
        out["attn_pool.proj.bias"] = t(attn + "out/bias")
        out["attn_pool.norm.weight"], out["attn_pool.norm.bias"] = t(head + "LayerNorm_0/scale"), \
            t(head + "LayerNorm_0/bias")
        for r in (0, 1):
            out[f"attn_pool.mlp.fc{r + 1}.weight"] = t(f"{head}MlpBlock_0/Dense_{r}/kernel").T
            out[f"attn_pool.mlp.fc{r + 1}.bias"] = t(f"{head}MlpBlock_0/Dense_{r}/bias")
    arch = infer_arch(out)
    if num_heads:
        arch["num_heads"] = int(num_heads)
    notes = ["pre_logits (representation layer) dropped, as timm does"] if prefix + "pre_logits/kernel" in w else []
    return _converted(out, "jax", arch=arch, notes=notes)


# -- MindCV (MindSpore) -----------------------------------------------------------------------------------------

# MindCV has published ViT checkpoints in three layouts (mindspore-lab/mindcv, mindcv/models/vit.py history):
#  - current (vit_b_32_224-4a1c9d8e.ckpt, ...-a2165e72-910v2.ckpt): timm names, LayerNorm gamma/beta;
#  - 2023 (vit_b_32_224-f50866e8.ckpt ...): the same but the head is `head.classifier`;
#  - first (vit_b_32_224-7553218f.ckpt ...): BaseClassifier(backbone=ViT, head=DenseHead) with SequentialCell
#    blocks; names follow MindSpore's attribute-path naming. Mapped from the source, no file of it was at hand.
_MINDCV_RULES = [
    (r"head\.classifier\.(weight|bias)", r"head.\1"),
    (r"backbone\.cls_token", "cls_token"),
    (r"backbone\.pos_embedding", "pos_embed"),
    (r"backbone\.patch_embedding\.conv\.(weight|bias)", r"patch_embed.proj.\1"),
    (r"backbone\.transformer\.layers\.(\d+)\.0\.cell\.0\.(gamma|beta)", r"blocks.\1.norm1.\2"),
    (r"backbone\.transformer\.layers\.(\d+)\.0\.cell\.1\.qkv\.(weight|bias)", r"blocks.\1.attn.qkv.\2"),
    (r"backbone\.transformer\.layers\.(\d+)\.0\.cell\.1\.out\.(weight|bias)", r"blocks.\1.attn.proj.\2"),
    (r"backbone\.transformer\.layers\.(\d+)\.1\.cell\.0\.(gamma|beta)", r"blocks.\1.norm2.\2"),
    (r"backbone\.transformer\.layers\.(\d+)\.1\.cell\.1\.dense([12])\.(weight|bias)", r"blocks.\1.mlp.fc\2.\3"),
    (r"backbone\.norm\.(gamma|beta)", r"norm.\1"),
]
_NORM_PARAM = re.compile(r"(.*(?:norm\d?|norm_pre|fc_norm|q_norm|k_norm))\.(gamma|beta)")
# Optimizer / loss-scale / step state that MindSpore training checkpoints carry beside the weights.
_MINDSPORE_STATE = re.compile(
    r"(adam_m|adam_v|moments|accum|mean_grad|mean_square|global_step|learning_rate|beta[12]_power|"
    r"scale_sense|current_iterator_step|last_overflow_iterator_step|epoch_num|step_num)(\..*)?")


def from_mindcv(sd: Mapping[str, torch.Tensor]) -> Converted:
    state = [k for k in sd if _MINDSPORE_STATE.fullmatch(k)]
    weights = {k: v for k, v in sd.items() if k not in state}
    out = {}
    for key, value in _rename(weights, _MINDCV_RULES).items():
        m = _NORM_PARAM.fullmatch(key)
        out[f"{m.group(1)}.{'weight' if m.group(2) == 'gamma' else 'bias'}" if m else key] = value
    notes = [f"{len(state)} optimizer/training-state tensors ignored"] if state else []
    arch = {**infer_arch(out), **MINDCV_ARCH}
    return _converted(out, "mindcv", arch=arch, notes=notes)


# -- timm Eva (EVA-02, ROPE-ViT, DINOv3) --------------------------------------------------------------------------

# Keys only timm's `Eva` (models/eva.py) has; its other names are VisionTransformer's.
_EVA_KEY = re.compile(r"blocks\.\d+\.(gamma_[12]|attn\.(q_bias|v_bias|[qkv]_proj\.weight)|mlp\.fc1_[gx]\.weight)")
_EVA_MOVED = re.compile(r"blocks\.\d+\.(attn\.(q_bias|v_bias|[qkv]_proj\..*)|mlp\.fc1_[gx]\..*)")


def is_eva(sd: Mapping[str, Any]) -> bool:
    """Whether a timm state dict is in `Eva`'s layout (one of the keys `eva_to_vitkit` renames)."""
    return any(_EVA_KEY.fullmatch(k) for k in sd)


def eva_to_vitkit(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A timm `Eva` state dict (models/eva.py: EVA-02, ROPE-ViT, DINOv3) in vitkit's (= timm VisionTransformer's)
    names; the model docstring (vitkit/models/vit.py) says which ViTConfig each option is.

    - blocks.i.gamma_1 / gamma_2 -> blocks.i.ls1.gamma / ls2.gamma (layer scale)
    - fused qkv with separate biases: attn.q_bias, attn.v_bias -> attn.qkv.bias = [q_bias, 0, v_bias]
      (Eva's k bias is a zero, non-persistent buffer; qkv.weight keeps its name)
    - unfused (qkv_fused=False, EVA-02 B/L): attn.q_proj / k_proj / v_proj .weight -> attn.qkv.weight (concatenated
      q, k, v), .bias -> attn.qkv.bias (k_proj has no bias: zeros)
    - SwiGLU with separate fc1 (scale_mlp or swiglu_align_to: EVA-02 B/L, DINOv3 S+/H+/7B): mlp.fc1_g / fc1_x
      -> mlp.fc1 = [fc1_g; fc1_x] (gate first, as SwiGLUPacked); mlp.norm and mlp.fc2 keep their names
    - everything else (cls_token, reg_token, pos_embed, patch_embed, norm1/2, attn.proj, mlp.fc1/fc2 of the packed
      GluMlp, norm, fc_norm, head) keeps its name; RoPE tables are buffers on both sides, not weights.
    A block with only some of q/k/v, or a gate without its value half, is a WeightsError naming the key.
    """
    out: dict[str, torch.Tensor] = {}
    blocks = sorted({m.group(1) for k in sd if (m := re.match(r"(blocks\.\d+\.)", k))})
    for key, value in sd.items():
        if not _EVA_MOVED.fullmatch(key):
            out[re.sub(r"\.gamma_([12])$", r".ls\1.gamma", key)] = value
    for b in blocks:
        a = b + "attn."
        try:
            if a + "q_proj.weight" in sd:
                out[a + "qkv.weight"] = torch.cat([sd[a + f"{n}_proj.weight"] for n in "qkv"])
            q_bias = sd.get(a + "q_bias", sd.get(a + "q_proj.bias"))
            if q_bias is not None:
                v_bias = sd[a + "v_bias"] if a + "q_bias" in sd else sd[a + "v_proj.bias"]
                k_bias = sd.get(a + "k_proj.bias", torch.zeros_like(q_bias))
                out[a + "qkv.bias"] = torch.cat([q_bias, k_bias, v_bias])
            for p in ("weight", "bias"):
                if f"{b}mlp.fc1_g.{p}" in sd:
                    out[f"{b}mlp.fc1.{p}"] = torch.cat([sd[f"{b}mlp.fc1_g.{p}"], sd[f"{b}mlp.fc1_x.{p}"]])
        except KeyError as e:
            raise WeightsError(f"timm Eva weights: {e.args[0]} is missing beside the other parts of its "
                               f"layer") from None
    return out


def vitkit_to_eva(sd: Mapping[str, torch.Tensor], like: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The inverse of `eva_to_vitkit` into the layout of `like` (a timm Eva model's state dict or its keys): what
    loads vitkit weights into timm's own model (the `vitkit benchmark --compare timm` twin). Eva has no k bias,
    so qkv.bias's k third is dropped (it is zero for weights that came from Eva)."""
    out: dict[str, torch.Tensor] = {}
    for key in like:
        m = re.fullmatch(r"(blocks\.\d+\.)(.*)", key)
        b, rest = (m.group(1), m.group(2)) if m else ("", key)
        if m and (g := re.fullmatch(r"gamma_([12])", rest)):
            out[key] = sd[f"{b}ls{g.group(1)}.gamma"]
        elif m and rest in ("attn.q_bias", "attn.v_bias"):
            out[key] = sd[f"{b}attn.qkv.bias"].chunk(3)[0 if rest == "attn.q_bias" else 2]
        elif m and (g := re.fullmatch(r"attn\.([qkv])_proj\.(weight|bias)", rest)):
            out[key] = sd[f"{b}attn.qkv.{g.group(2)}"].chunk(3)["qkv".index(g.group(1))]
        elif m and (g := re.fullmatch(r"mlp\.fc1_([gx])\.(weight|bias)", rest)):
            out[key] = sd[f"{b}mlp.fc1.{g.group(2)}"].chunk(2)[0 if g.group(1) == "g" else 1]
        else:
            out[key] = sd[key]
    return out


# -- timm and vitkit ---------------------------------------------------------------------------------------------

def from_timm(sd: Mapping[str, torch.Tensor], config: Mapping[str, Any] | None = None) -> Converted:
    """timm's names are ours (its `Eva` layout renamed by `eva_to_vitkit`). A timm hub config.json adds pooling,
    model args and the eval preprocessing."""
    out = {k: v for k, v in sd.items()}
    notes = []
    if "pre_logits.fc.weight" in out:  # timm's own filter drops the old representation layer
        notes.append("pre_logits (representation layer) dropped, as timm does")
        out = {k: v for k, v in out.items() if not k.startswith("pre_logits.")}
    if is_eva(out):
        notes.append("timm Eva layout (EVA-02 / ROPE-ViT / DINOv3) renamed to vitkit's")
        out = eva_to_vitkit(out)
    arch, data = infer_arch(out), {}
    if config:
        args = dict(config.get("model_args") or {})
        if config.get("global_pool") in _GLOBAL_POOLS:
            args.setdefault("global_pool", config["global_pool"])
        arch.update({k: v for k, v in args.items() if k in ARCH_FIELDS})
        pcfg = config.get("pretrained_cfg") or {}
        for key in ("mean", "std"):
            if key in pcfg:
                data[key] = tuple(pcfg[key])
        if "crop_pct" in pcfg:
            data["crop_pct"] = pcfg["crop_pct"]
        if "interpolation" in pcfg:
            data["interpolation"] = {t: v for v, t in TIMM_INTERPOLATIONS.items()}.get(pcfg["interpolation"],
                                                                                      pcfg["interpolation"])
        if "input_size" in pcfg:
            data["input_size"] = int(pcfg["input_size"][-1])
    return _converted(out, "timm", data, timm_hub=bool(config), arch=arch, notes=notes)


# -- the families' own repositories ------------------------------------------------------------------------------

def from_original(sd: Mapping[str, torch.Tensor], source: str) -> Converted:
    """A family's file as its own repository publishes it, renamed into timm's layout by timm's own converters
    (timm/models/vision_transformer.py, which timm's checkpoint_filter_fn applies to the same files): "dinov2" is
    facebookresearch/dinov2's torch.hub state dict (register_tokens, mask_token, the class token's position row,
    ViT-g's w12/w3), "openclip" an OpenAI CLIP / OpenCLIP state dict (`visual.*`; the text tower is left out).
    big_vision's SigLIP .npz goes through `from_jax`. The preprocessing is the family's registered one."""
    from timm.models import vision_transformer as timm_vit

    if source == "dinov2":
        out, note = timm_vit._convert_dinov2(dict(sd), None), "facebookresearch/dinov2 layout renamed as timm does"
    else:
        out = timm_vit._convert_openai_clip(dict(sd), None)  # `module.` is stripped before (`_strip_prefixes`)
        note = "OpenAI CLIP / OpenCLIP image tower renamed as timm does (the text tower is not part of it)"
    conv = from_timm(out)
    return _converted(conv.state_dict, source, arch=conv.arch, notes=[note, *conv.notes])


def _detect_and_convert(sd: dict[str, torch.Tensor], origin: str) -> Converted:
    """Pick the format from the key names of a plain tensor dict."""
    keys = set(sd)
    if "mask_token" in keys and "patch_embed.proj.weight" in keys:
        return from_original(sd, "dinov2")
    if "visual.class_embedding" in keys:
        return from_original(sd, "openclip")
    if "conv_proj.weight" in keys or "encoder.pos_embedding" in keys:
        return from_torchvision(sd)
    if any(k.endswith("embeddings.patch_embeddings.projection.weight") for k in keys):
        return from_transformers(sd)
    if "backbone.patch_embedding.conv.weight" in keys or "head.classifier.weight" in keys \
            or any(_NORM_PARAM.fullmatch(k) for k in keys):
        return from_mindcv(sd)
    if "patch_embed.proj.weight" in keys:
        return from_timm(sd)
    sample = ", ".join(sorted(keys)[:5])
    raise WeightsError(f"{origin}: unrecognised weights (first keys: {sample}); vitkit reads timm, torchvision, "
                       f"Hugging Face transformers, Google / big_vision .npz, MindCV .ckpt, DINOv2 and OpenCLIP "
                       f"ViT weights")


# -- files and folders -------------------------------------------------------------------------------------------

def _torch_load(path: Path) -> dict[str, torch.Tensor]:
    import pickle

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        lines = [ln.strip() for ln in str(e).splitlines() if "Unsupported" in ln or "global" in ln.lower()]
        what = lines[0][:200] if lines else type(e).__name__
        raise WeightsError(f"{path} refused: it holds pickled Python objects beyond plain tensors ({what}). "
                           f"vitkit never unpickles code from a weights file; re-save only the state dict "
                           f"(torch.save(model.state_dict(), ...)) or use safetensors") from None
    except (RuntimeError, OSError, EOFError, ValueError) as e:
        raise WeightsError(f"{path} could not be read by torch.load ({type(e).__name__}: {str(e)[:200]}); "
                           f"is the file complete?") from None
    return _unwrap(obj, path)


def _safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, (f.metadata() or {})
    except (SafetensorError, OSError) as e:
        raise WeightsError(f"{path} is not a readable safetensors file ({e}); is the file complete?") from None


def _from_vitkit(sd: dict[str, torch.Tensor], meta: dict[str, str]) -> Converted:
    arch_all = json.loads(meta["arch"])
    weights = {k: v for k, v in sd.items() if not k.startswith(EMA_PREFIX)}
    data = json.loads(meta.get("data_config") or "{}")
    notes = ["EMA weights present; the raw weights were loaded"] if len(weights) < len(sd) else []
    return _converted(weights, "vitkit", {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()},
                      arch={k: arch_all[k] for k in ARCH_FIELDS if k in arch_all},
                      class_names=json.loads(meta.get("class_names") or "null"), notes=notes)


def _sniff(path: Path) -> str:
    with open(path, "rb") as f:
        head = f.read(16)
    if head[:2] == b"PK":
        try:
            with zipfile.ZipFile(path) as z:
                names = z.namelist()
        except zipfile.BadZipFile:
            raise WeightsError(f"{path} is a damaged zip archive (truncated download or copy?); "
                               f"is the file complete?") from None
        return "npz" if names and all(n.endswith(".npy") for n in names) else "torch"
    if len(head) >= 9 and head[8:9] == b"{":  # safetensors: u64 header length, then the JSON header
        return "safetensors"
    if head[:1] == b"\x0a":  # protobuf field 1, length-delimited: MindSpore's Checkpoint.value
        return "mindspore"
    return "torch"  # legacy (non-zip) torch.save files; torch.load(weights_only=True) judges them


def read_file(path: str | Path) -> Converted:
    """Read one weights file of any supported format (detected from its content, not its name). The boundary
    for weights files: whatever a damaged or hostile file makes a reader raise is a one-line WeightsError."""
    path = Path(path)
    if (why := path_problem(path)) is not None:
        raise WeightsError(f"{path} {why}; give a weights file")
    try:
        return _read_file(path)
    except WeightsError:
        raise
    except Exception as e:  # noqa: BLE001 - numpy, protobuf, safetensors, torch: each has its own errors
        first = (str(e).splitlines() or [""])[0][:200]
        raise WeightsError(f"{path} could not be read as weights ({type(e).__name__}: {first}); is it a complete "
                           f"weights file of a supported format?") from None


def _read_file(path: Path) -> Converted:
    kind = _sniff(path)
    if kind == "npz":
        with np.load(path, allow_pickle=False) as npz:
            return from_jax({k: npz[k] for k in npz.files})
    if kind == "mindspore":
        return from_mindcv(read_mindspore_ckpt(path))
    if kind == "safetensors":
        sd, meta = _safetensors(path)
        if meta.get("format") == "vitkit":
            return _from_vitkit(sd, meta)
        return _detect_and_convert(_strip_prefixes(sd), str(path))
    return _detect_and_convert(_torch_load(path), str(path))


def _folder_weights(path: Path) -> Path:
    for name in ("model.safetensors", "open_clip_model.safetensors", "pytorch_model.bin"):
        if (path / name).is_file():
            return path / name
    raise WeightsError(f"{path} has no model.safetensors or pytorch_model.bin (sharded checkpoints are not supported)")


def read_folder(path: str | Path) -> Converted:
    """A saved Hugging Face model folder: transformers ViT or a timm hub snapshot (config.json + weights)."""
    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise WeightsError(f"{path} is a folder without config.json; give the weights file itself")
    config = json.loads(cfg_file.read_text())
    weights = _folder_weights(path)
    if weights.suffix == ".safetensors":
        sd = _strip_prefixes(_safetensors(weights)[0])
    else:
        sd = _torch_load(weights)
    if config.get("model_type") == "vit":
        conv = from_transformers(sd, config)
        stated = _hf_preprocessor(path)  # preprocessor_config.json beside the weights wins over the defaults
        conv.data.update(stated)
        conv.data_stated = conv.data_stated | frozenset(stated)
        return conv
    if "architecture" in config:
        return from_timm(sd, config)
    raise WeightsError(f"{cfg_file}: model_type {config.get('model_type')!r} is neither a transformers ViT nor "
                       f"a timm model")
