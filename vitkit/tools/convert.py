"""`vitkit convert SRC DST`: any supported weights -> a self-describing vitkit safetensors checkpoint.

    vitkit convert timm/vit_base_patch32_224.augreg_in21k_ft_in1k vit_b32.safetensors
    vitkit convert vit_b_32_224-4a1c9d8e.ckpt vit_b32_mindcv.safetensors --model vit_b_32_224
    vitkit convert mindcv_vit_tiny.ckpt tiny.safetensors --model vit_n_4_32 \
        --override embed_dim=64 --override depth=2 --override num_heads=2

Without --model the registered name is found from the weights' sizes (patch, width, depth, input size).
The output holds the architecture (with the source's numerics), the eval preprocessing the source states and
its class names, so `load_checkpoint(DST).build_model()` gives the very same network.
"""
from __future__ import annotations

import ast
import math
from collections.abc import Sequence
from typing import Any

from vitkit.args import VerbParser
from vitkit.engine.checkpoint import save_checkpoint
from vitkit.errors import WeightsError
from vitkit.models.registry import get_spec, list_models
from vitkit.weights import create_model, load_weights


def _parse_override(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise WeightsError(f"--override expects key=value, got {text!r}")
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key, value  # a bare string such as gelu_tanh


def infer_model_name(state_dict: dict) -> str:
    """The registered name whose patch size, width, depth and input size match the weights."""
    try:
        embed_dim, _, patch, _ = state_dict["patch_embed.proj.weight"].shape
        tokens = state_dict["pos_embed"].shape[1] - (1 if "cls_token" in state_dict else 0)
    except KeyError as e:
        raise WeightsError(f"cannot tell the model from these weights ({e.args[0]} missing); pass --model") from None
    depth = len({k.split(".")[1] for k in state_dict if k.startswith("blocks.")})
    img = math.isqrt(tokens) * patch
    for name in list_models():
        a = get_spec(name).arch
        if (a.patch_size, a.embed_dim, a.depth, a.img_size) == (patch, embed_dim, depth, img):
            return name
    raise WeightsError(f"no registered model has patch {patch}, width {embed_dim}, depth {depth} at {img} px; "
                       f"pass --model NAME with --override embed_dim=.. depth=.. num_heads=..")


def main(argv: Sequence[str] | None = None) -> int:
    parser = VerbParser("convert", __doc__)
    parser.add_argument("src", help="weights file, folder, URL or hub id (any supported format)")
    parser.add_argument("dst", help="output vitkit checkpoint (.safetensors)")
    parser.add_argument("--model", help="registered name (default: inferred from the weights' sizes)")
    parser.add_argument("--num_classes", type=int, help="new head size (a fresh head if it differs)")
    parser.add_argument("--img_size", type=int, help="new input size (position embedding resampled)")
    parser.add_argument("--override", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                        help="architecture fields, e.g. --override depth=2 num_heads=2 (or the flag repeated)")
    args = parser.parse_args(list(argv) if argv is not None else None)

    weights = load_weights(args.src, model_name=args.model)
    name = args.model or infer_model_name(weights.state_dict)
    try:
        get_spec(name)
    except KeyError as e:
        raise WeightsError(str(e.args[0])) from None
    overrides = dict(_parse_override(o) for o in args.override)
    try:
        model = create_model(name, pretrained=weights, num_classes=args.num_classes, img_size=args.img_size,
                             **overrides)
    except (TypeError, ValueError) as e:
        raise WeightsError(f"cannot build {name}: {e}") from None
    spec = get_spec(name)
    provenance = {"source": weights.origin, "format": weights.format,
                  "tag": weights.source.tag if weights.source else None,
                  "report": (model.pretrained_cfg or {})["report"], "notes": weights.notes}
    save_checkpoint(args.dst, model, model_name=name, data_config=weights.data_config(spec, model.cfg.img_size),
                    class_names=weights.class_names, config={"converted_from": provenance})
    print(f"{weights.origin} ({weights.format}) -> {args.dst} as {name}: {provenance['report']}")
    return 0
