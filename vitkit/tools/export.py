"""`vitkit export CKPT --format onnx|torchscript|pt2`: a deployable model that checks itself against eager.

  vitkit export runs/cifar/best.safetensors --format onnx --dynamic_size --out vit.onnx

The batch dimension is always dynamic. `--dynamic_size` makes height and width dynamic too (any multiple of
the patch size): the graph is the model's own `dynamic_img_size` path, which fits the position embedding
to each input's grid inside the graph. `--with_preprocess` bakes the normalization in: the input is
uint8 (B, H, W, 3) RGB already resized and center-cropped as the metadata says, the output probabilities.
Beside the model, `<out>.json` records classes, mean/std, input size and the self-check: max |difference| of
the outputs against eager PyTorch and top-1 agreement on real images, at two batch sizes (and a second input
size with `--dynamic_size`). The exit code is 1 when the check fails `--tolerance`. On a terminal a bar on
stderr follows the steps (export, reload, each check).
"""
from __future__ import annotations

import copy
import json
import math
import platform
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import vitkit
from vitkit.args import VerbParser
from vitkit.data.preprocess import DataConfig
from vitkit.engine.monitor import Bar
from vitkit.errors import VitkitError
from vitkit.models.vit import VisionTransformer
from vitkit.tools.inference import InferenceModel, find_images, image_to_tensor, load_inference_model

FORMATS = {"onnx": ".onnx", "torchscript": ".ts", "pt2": ".pt2"}
DEFAULT_CHECK_IMAGES = "data/cifar10_sample/test"
MAX_DIM = 4096  # upper bound of the dynamic dims torch.export reasons about (pixels / images per batch)


def dynamic_size_copy(model: VisionTransformer) -> VisionTransformer:
    """A copy of `model` on its `dynamic_img_size` path (vit.py): the position embedding fits each input's grid."""
    dynamic = copy.deepcopy(model)
    dynamic.cfg = dynamic.cfg.replace(dynamic_img_size=True)
    return dynamic


class ExportWrapper(nn.Module):
    """The graph that gets exported: [uint8 NHWC -> normalized NCHW] -> the model's forward -> [softmax]."""

    def __init__(self, model: VisionTransformer, data_config: DataConfig, *, dynamic_size: bool,
                 with_preprocess: bool):
        super().__init__()
        self.model = (dynamic_size_copy(model) if dynamic_size else model).eval()
        self.with_preprocess = with_preprocess
        mean, std = data_config.pixel_mean_std()  # 0-255 units: (1, 3, 1, 1) each
        self.register_buffer("mean", mean, persistent=False)
        self.register_buffer("std", std, persistent=False)
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.with_preprocess:  # (B, H, W, 3) uint8 -> (B, 3, H, W) normalized, as ToTensor + Normalize
            x = (x.permute(0, 3, 1, 2).float() - self.mean) / self.std
        logits = self.model(x)  # forward_head(forward_features(x))
        return logits.softmax(-1) if self.with_preprocess else logits


def example_input(size: int, patch: int, *, dynamic_size: bool, with_preprocess: bool) -> torch.Tensor:
    # batch 2 (torch.export specialises dims of size 1); with dynamic sizes a non-square, non-native size so
    # no dim gets specialised to the model's native one
    h, w = (size + patch, size + 2 * patch) if dynamic_size else (size, size)
    if with_preprocess:
        return torch.randint(0, 256, (2, h, w, 3), dtype=torch.uint8)
    return torch.randn(2, 3, h, w)


def dynamic_shapes(patch: int, *, dynamic_size: bool, with_preprocess: bool) -> dict[str, dict[int, Any]]:
    Dim = torch.export.Dim
    dims: dict[int, Any] = {0: Dim("batch", min=1, max=MAX_DIM)}
    if dynamic_size:  # height and width are patch * grid, so the patch grid stays whole
        h_axis, w_axis = (1, 2) if with_preprocess else (2, 3)
        dims[h_axis] = patch * Dim("grid_h", min=1, max=MAX_DIM // patch)
        dims[w_axis] = patch * Dim("grid_w", min=1, max=MAX_DIM // patch)
    return {"x": dims}


def export_model(wrapper: ExportWrapper, fmt: str, out: Path, example: torch.Tensor,
                 shapes: dict[str, dict[int, Any]]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    output_name = "probabilities" if wrapper.with_preprocess else "logits"
    with torch.no_grad():
        if fmt == "onnx":
            program = torch.onnx.export(wrapper, (example,), dynamo=True, dynamic_shapes=shapes,
                                        input_names=["x"], output_names=[output_name], verbose=False)
            program.save(str(out))
        elif fmt == "pt2":
            torch.export.save(torch.export.export(wrapper, (example,), dynamic_shapes=shapes), str(out))
        else:  # torch.jit is deprecated upstream but still the format C++ and mobile runtimes load;
            with warnings.catch_warnings():  # the trace's shape warnings are answered by the check below
                warnings.simplefilter("ignore")
                torch.jit.trace(wrapper, example).save(str(out))


def load_runner(fmt: str, path: Path) -> Callable[[torch.Tensor], np.ndarray]:
    """The exported file, loaded the way a deployment would, as a function of one input batch."""
    if fmt == "onnx":
        import onnxruntime as ort

        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        return lambda x: session.run(None, {name: x.numpy()})[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load's deprecation notice
        module = torch.export.load(str(path)).module() if fmt == "pt2" else torch.jit.load(str(path))

    def run(x: torch.Tensor) -> np.ndarray:
        with torch.no_grad():
            return module(x).numpy()

    return run


def check_images(folder: str | None, count: int) -> list[Path]:
    """`count` image files spread evenly over the sorted files of `folder` (so every class is present)."""
    if not folder or not Path(folder).is_dir():
        return []
    files = find_images([folder])
    step = max(1, len(files) // count) if count else 1
    return files[::step][:count]


def load_inputs(im: InferenceModel, files: list[Path], input_size: int, count: int = 64
                ) -> tuple[torch.Tensor, torch.Tensor, str]:
    """(uint8 (B, 3, S, S) crops, the same normalized as float, description) of `files` preprocessed at
    `input_size` exactly as validate does; random images when there are no files (an installed package)."""
    sized = replace(im, data_config=replace(im.data_config, input_size=input_size))
    if files:
        u8 = torch.stack([image_to_tensor(f, sized.transform(normalize=False)) for f in files])
        x = torch.stack([image_to_tensor(f, sized.transform()) for f in files])
        return u8, x, f"{len(files)} images from {files[0].parents[1]}"
    u8 = torch.randint(0, 256, (count, 3, input_size, input_size), dtype=torch.uint8,
                       generator=torch.Generator().manual_seed(0))
    mean, std = im.data_config.pixel_mean_std()
    x = (u8.float() - mean) / std
    return u8, x, f"{count} random images (no check images found)"


@torch.no_grad()
def self_check(im: InferenceModel, run: Callable[[torch.Tensor], np.ndarray], files: list[Path], *,
               with_preprocess: bool, dynamic_size: bool, batch_size: int = 50,
               on_step: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Exported vs eager on real images: max |difference| of the outputs and top-1 agreement. `on_step` is
    told each comparison before it starts (a progress display)."""

    def compare(input_size: int, eager: nn.Module, files: list[Path], sizes: list[int]) -> dict[str, Any]:
        if on_step is not None:
            on_step(f"checking at {input_size}x{input_size}")
        u8, x, source = load_inputs(im, files, input_size)
        ref = eager(x).float()
        ref = ref.softmax(-1) if with_preprocess else ref
        inp = u8.permute(0, 2, 3, 1).contiguous() if with_preprocess else x  # NHWC uint8 / NCHW float
        got, start = [], 0
        for bs in sizes:  # several batch sizes exercise the dynamic batch dimension
            if start < len(inp):
                got.append(torch.from_numpy(np.asarray(run(inp[start:start + bs]))).float())
                start += bs
        out = torch.cat(got)
        return {"inputs": source, "input_size": input_size, "batch_sizes": sorted(set(sizes)),
                "max_abs_diff": float((out - ref).abs().max()),
                "top1_agreement": float(100.0 * (out.argmax(-1) == ref.argmax(-1)).float().mean())}

    dc = im.data_config
    n = len(files) or 64
    result: dict[str, Any] = {"compared": "probabilities" if with_preprocess else "logits",
                              "native_size": compare(dc.input_size, im.model, files,
                                                     [1] + [batch_size] * math.ceil(n / batch_size))}
    if dynamic_size:
        # a second input size, preprocessed for real at that size; the reference is the eager model's own
        # dynamic_img_size path (vit.py), independent of the exported resampling
        patch = im.model.cfg.patch_size
        other = (dc.input_size * 3 // 2) // patch * patch
        result["other_size"] = compare(other, dynamic_size_copy(im.model), files[:64], [1, 16] * 4)
    return result


def build_parser() -> VerbParser:
    p = VerbParser("export", __doc__)
    p.add_source("vitkit checkpoint, registered model name, or weights file with --model")
    p.add_argument("--format", choices=list(FORMATS), default="onnx")
    p.add_argument("--out", default=None, help="output file (default: beside the checkpoint, or ./<model>.<ext>)")
    p.add_argument("--dynamic_size", action="store_true", help="dynamic height/width (multiples of the patch)")
    p.add_argument("--with_preprocess", action="store_true", help="uint8 NHWC in, probabilities out")
    p.add_argument("--model", default=None, help="architecture of a foreign weights file")
    p.add_argument("--use_ema", action="store_true", help="export the checkpoint's EMA weights")
    p.add_argument("--check_images", default=DEFAULT_CHECK_IMAGES, help="folder of real images for the check")
    p.add_argument("--check_count", type=int, default=256, help="how many of them")
    p.add_argument("--tolerance", type=float, default=1e-4, help="max |difference| the check accepts")
    return p


def default_out(source: str, model_name: str, fmt: str) -> Path:
    src = Path(source)
    if src.is_file():
        return src.with_name(src.name.removesuffix(".safetensors") + FORMATS[fmt])
    return Path(model_name + FORMATS[fmt])


def metadata_path(out: Path) -> Path:
    return out.with_name(out.name + ".json")


def run_export(im: InferenceModel, fmt: str, out: Path, *, dynamic_size: bool = False,
               with_preprocess: bool = False, check_folder: str | None = DEFAULT_CHECK_IMAGES,
               check_count: int = 256, tolerance: float = 1e-4, progress: Bar | None = None) -> dict[str, Any]:
    """Export, reload, check; writes `<out>.json` and returns its content. `progress` (a `Bar`, drawn only on
    a terminal) follows the steps: export, reload, one check per input size."""
    dc, patch = im.data_config, im.model.cfg.patch_size
    im.model.eval()
    bar = progress or Bar("export", enabled=False)
    steps = 4 if dynamic_size else 3  # export, reload, check at the native size [, at another size]
    done = iter(range(steps))

    def step(label: str) -> None:  # a step starts: the bar shows how many are done and which one runs
        bar.update(completed=next(done), info=label)

    with bar.start(steps):
        step(f"exporting to {fmt}")
        wrapper = ExportWrapper(im.model, dc, dynamic_size=dynamic_size, with_preprocess=with_preprocess)
        example = example_input(dc.input_size, patch, dynamic_size=dynamic_size, with_preprocess=with_preprocess)
        start = time.perf_counter()
        export_model(wrapper, fmt, out, example, dynamic_shapes(patch, dynamic_size=dynamic_size,
                                                                with_preprocess=with_preprocess))
        export_s = time.perf_counter() - start
        step("reloading the export")
        runner = load_runner(fmt, out)
        check = self_check(im, runner, check_images(check_folder, check_count), with_preprocess=with_preprocess,
                           dynamic_size=dynamic_size, on_step=step)
        bar.update(completed=steps, info="done")
    results = [check["native_size"]] + ([check["other_size"]] if dynamic_size else [])
    check["tolerance"] = tolerance
    check["passed"] = all(r["max_abs_diff"] <= tolerance and r["top1_agreement"] == 100.0 for r in results)
    hw = "H" if dynamic_size else str(dc.input_size)
    ww = "W" if dynamic_size else str(dc.input_size)
    meta = {
        **im.metadata(),
        "format": fmt,
        "file": out.name,
        "input": {"name": "x", "dtype": "uint8" if with_preprocess else "float32",
                  "shape": ["batch", hw, ww, 3] if with_preprocess else ["batch", 3, hw, ww],
                  "layout": "NHWC RGB 0-255, resized and center-cropped" if with_preprocess
                  else "NCHW RGB, resized, center-cropped and normalized with mean/std"},
        "output": {"name": "probabilities" if with_preprocess else "logits", "shape": ["batch", len(im.class_names)]},
        "dynamic_size": dynamic_size,
        "size_multiple_of": patch,
        "with_preprocess": with_preprocess,
        "export_seconds": round(export_s, 2),
        "versions": versions(),
        "check": check,
    }
    metadata_path(out).write_text(json.dumps(meta, indent=2))
    return meta


def versions() -> dict[str, str]:
    out = {"vitkit": vitkit.__version__, "torch": torch.__version__, "python": platform.python_version()}
    for mod in ("onnx", "onnxruntime"):
        try:
            out[mod] = __import__(mod).__version__
        except ImportError:
            pass
    return out


def main(argv: list[str]) -> int:
    args = build_parser().parse_with_source(argv)
    im = load_inference_model(args.source, model_name=args.model, use_ema=args.use_ema)
    out = Path(args.out) if args.out else default_out(args.source, im.model_name, args.format)
    if args.format == "onnx":
        try:
            import onnxruntime  # noqa: F401  (needed for the check, fail before the slow export)
        except ImportError:
            raise VitkitError("ONNX export needs onnx, onnxscript and onnxruntime: pip install 'vitkit[deploy]'") \
                from None
    meta = run_export(im, args.format, out, dynamic_size=args.dynamic_size, with_preprocess=args.with_preprocess,
                      check_folder=args.check_images, check_count=args.check_count, tolerance=args.tolerance,
                      progress=Bar("export", eta=False))
    check = meta["check"]
    print(f"wrote {out} and {metadata_path(out).name} ({meta['export_seconds']} s)")
    for key in ("native_size", "other_size"):
        if key in check:
            r = check[key]
            size = r["input_size"]
            print(f"check at {size}x{size} on {r['inputs']}: "
                  f"max |{check['compared']} - eager| = {r['max_abs_diff']:.2e}, "
                  f"top-1 agreement {r['top1_agreement']:.2f}%")
    if not check["passed"]:
        print(f"error: the export does not match eager within {args.tolerance:g} / 100% top-1", file=sys.stderr)
        return 1
    return 0
