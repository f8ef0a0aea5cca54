"""`vitkit predict CKPT IMAGE|DIR ...`: top-k classes of images, as a table, JSON or CSV.

A file that cannot be used (corrupt, truncated, not an image, too large) gets a one-line error of its own
and the other files are still answered; the exit code is 1 when any file failed. Over several files a
progress bar runs on stderr when it is a terminal (stdout carries only the results). Weights holding NaN or
inf are an error naming the tensor unless `--allow_nonfinite` (to inspect a broken run; JSON then says null
for a non-finite probability, never the invalid NaN).
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from pathlib import Path
from typing import Any

import torch

from vitkit.args import VerbParser, at_least
from vitkit.engine.checkpoint import is_vitkit_checkpoint, load_checkpoint
from vitkit.engine.monitor import Bar
from vitkit.engine.runtime import cpu_inference_allocator
from vitkit.errors import VitkitError, WeightsError
from vitkit.models.registry import get_spec, resolve_model_name
from vitkit.tools import inference
from vitkit.tools.export import load_exported
from vitkit.tools.validate import finite_or_null, model_with_weights
from vitkit.weights import load_weights


def build_parser() -> VerbParser:
    p = VerbParser("predict", __doc__)
    p.add_source("vitkit checkpoint, registered model name (its default weights), a weights file with --model, "
                 "or an exported .onnx (fp32 or int8, with its .onnx.json beside it)")
    p.add_argument("inputs", nargs="*", help="image files and/or folders (searched recursively)")
    p.add_argument("--topk", type=int, default=5, help="classes per image (default 5)")
    p.add_argument("--format", choices=("table", "json", "csv"), default="table")
    p.add_argument("--model", default=None, help="architecture of a foreign weights file (see `vitkit models`)")
    p.add_argument("--use_ema", action="store_true", help="use the checkpoint's EMA weights")
    p.add_argument("--batch_size", type=at_least(1), default=32)
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--max_pixels", type=at_least(1), default=inference.DEFAULT_MAX_PIXELS, help="refuse larger images")
    p.add_argument("--allow_nonfinite", action="store_true",
                   help="load weights holding NaN or inf anyway (to inspect a diverged run)")
    return p


def load_model(args: argparse.Namespace) -> inference.InferenceModel:
    """`inference.load_inference_model`; with --allow_nonfinite, a checkpoint or weights file is loaded the
    same way but without refusing NaN or inf (published weights, by model name, are finite)."""
    source = args.source
    if source.endswith(".onnx"):  # an export (fp32 or int8) in onnxruntime, with its .onnx.json beside it
        if args.model or args.use_ema:
            raise VitkitError(f"{source} is an exported model: its architecture and weights are fixed; drop "
                              f"{'--model' if args.model else '--use_ema'}")
        return load_exported(source)
    if not args.allow_nonfinite or not Path(source).is_file():
        return inference.load_inference_model(source, model_name=args.model, use_ema=args.use_ema,
                                              device=args.device)
    if is_vitkit_checkpoint(source):
        ckpt = load_checkpoint(source, allow_nonfinite=True)
        if args.model and resolve_model_name(args.model) != ckpt.model_name:
            raise WeightsError(f"{source} is a {ckpt.model_name} checkpoint, not {args.model}; drop --model")
        model = ckpt.build_model(use_ema=args.use_ema)
        names = inference.default_class_names(ckpt.arch.num_classes, ckpt.class_names)
        return inference.InferenceModel(model.to(args.device), ckpt.model_name, ckpt.data_config, names, source)
    if args.use_ema or not args.model:  # errors only: load_inference_model says what is missing
        return inference.load_inference_model(source, model_name=args.model, use_ema=args.use_ema,
                                              device=args.device)
    loaded = load_weights(source, model_name=args.model)
    model = model_with_weights(args.model, loaded, allow_nonfinite=True).eval()
    dc = loaded.data_config(get_spec(args.model), model.cfg.img_size)
    names = inference.default_class_names(model.cfg.num_classes, loaded.class_names)
    return inference.InferenceModel(model.to(args.device), resolve_model_name(args.model), dc, names, source)


@torch.no_grad()
def predict_files(im: inference.InferenceModel, files: list[Path], *, topk: int = 5, batch_size: int = 32,
                  max_pixels: int = inference.DEFAULT_MAX_PIXELS, progress: Bar | None = None
                  ) -> list[dict[str, Any]]:
    """[{file, predictions}] or [{file, error}] per file, in order. `progress` advances once per file
    answered (a bar over `len(files)`, drawn only on a terminal)."""
    transform = im.transform()
    device = next(im.model.parameters()).device
    results: list[dict[str, Any]] = [{"file": str(f)} for f in files]
    pending: list[tuple[int, torch.Tensor]] = []

    def flush() -> None:
        if not pending:
            return
        batch = torch.stack([t for _, t in pending]).to(device)
        probs = im.model(batch).float().softmax(-1).cpu()
        for (i, _), row in zip(pending, probs):
            results[i]["predictions"] = inference.topk_answer(row, im.class_names, topk)
        bar.advance(len(pending))
        pending.clear()

    bar = progress or Bar("predict", enabled=False)
    with bar.start(len(files)):
        for i, f in enumerate(files):
            try:
                pending.append((i, inference.image_to_tensor(f, transform, max_pixels=max_pixels)))
            except inference.ImageError as e:
                results[i]["error"] = str(e)
                bar.advance()
            if len(pending) >= batch_size:
                flush()
        flush()
    return results


def format_results(results: list[dict[str, Any]], fmt: str) -> str:
    if fmt == "json":  # strict JSON: a NaN probability (--allow_nonfinite) is null
        return json.dumps(finite_or_null(results), indent=2, allow_nan=False)
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(["file", "rank", "index", "label", "probability", "error"])
        for r in results:
            for rank, p in enumerate(r.get("predictions", []), 1):
                w.writerow([r["file"], rank, p["index"], p["label"], f"{p['probability']:.6f}", ""])
            if "error" in r:
                w.writerow([r["file"], "", "", "", "", r["error"]])
        return buf.getvalue().rstrip("\n")
    lines = []
    for r in results:
        if "error" in r:
            lines.append(f"{r['file']}: error: {r['error']}")
            continue
        lines.append(r["file"])
        lines += [f"  {p['probability']:7.2%}  {p['label']} ({p['index']})" for p in r["predictions"]]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    args = build_parser().parse_with_source(argv, more="inputs")
    if args.topk < 1:
        raise VitkitError(f"--topk must be >= 1 (got {args.topk})")
    files = inference.find_images(args.inputs)
    if not files:
        print("error: no image files found in " + ", ".join(args.inputs), file=sys.stderr)
        return 2
    im = load_model(args)
    cpu_inference_allocator(args.device, min(len(files), args.batch_size))
    results = predict_files(im, files, topk=args.topk, batch_size=args.batch_size, max_pixels=args.max_pixels,
                            progress=Bar("predict", enabled=len(files) > 1))
    print(format_results(results, args.format))
    failed = [r for r in results if "error" in r]
    for r in failed:
        print(f"error: {r['file']}: {r['error']}", file=sys.stderr)
    return 1 if failed else 0
