"""`vitkit export CKPT --format onnx|torchscript|pt2|timm|hf`: a deployable model checked against eager.

  vitkit export runs/cifar/best.safetensors --format onnx --dynamic_size --out vit.onnx

The batch dimension is always dynamic. `--dynamic_size` makes height and width dynamic too (any multiple of
the patch size): the graph is the model's own `dynamic_img_size` path, which fits the position embedding
to each input's grid inside the graph. `--with_preprocess` bakes the normalization in: the input is
uint8 (B, H, W, 3) RGB already resized and center-cropped as the metadata says, the output probabilities.
Beside the model, `<out>.json` records classes, mean/std, input size and the self-check: max |difference| of
the outputs against eager PyTorch and top-1 agreement on real images, at two batch sizes (and a second input
size with `--dynamic_size`). The exit code is 1 when the check fails `--tolerance`. On a terminal a bar on
stderr follows the steps (export, reload, each check).

int8 for CPUs: `--format onnx --quantize int8` quantizes the fp32 export (after it passed its own check) with
ONNX Runtime: `--quant_mode dynamic` (the default: int8 weights, activations quantized per batch at run time)
or `--quant_mode static` (activation ranges calibrated on `--calib_count` images of `--calib_dir`, else of
the training split the checkpoint's config records, preprocessed as the model's eval DataConfig). The int8
model is checked against the fp32 (eager) model on the check images: top-1 agreement, and top-1 of both when
the images are an ImageFolder of the model's classes. The export fails (exit 2, nothing written to `--out`,
the numbers in `<out>.rejected.json`) when int8 top-1 falls more than `--max_top1_drop` points below fp32
(on unlabelled images: when more than that share of the answers differ from fp32's, which bounds the drop).

  vitkit export runs/cifar/best.safetensors --quantize int8 --quant_mode static --out vit.int8.onnx

Check images default to the eval split the checkpoint's config records (data_dir/val_split), else
data/cifar10_sample/test (this repository's sample); an int8 export checks on up to 1000 of them.

Other toolkits: `--format timm` and `--format hf` write a folder that timm (`timm.create_model("local-dir:DIR",
pretrained=True)`, `hf-hub:` once pushed) or transformers (`AutoModelForImageClassification.from_pretrained(DIR)`,
`pipeline("image-classification", model=DIR)`) loads unchanged, with a model card; the folder is loaded back by
that library and its logits compared with vitkit's before it is kept (vitkit/tools/hub.py).

  vitkit export runs/cifar/best.safetensors --format hf --out vit-hf/
"""
from __future__ import annotations

import copy
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from torch import nn

import vitkit
from vitkit.args import VerbParser, at_least
from vitkit.data.preprocess import DataConfig
from vitkit.engine.checkpoint import read_metadata
from vitkit.engine.config import SAMPLE_DIR
from vitkit.engine.monitor import Bar
from vitkit.errors import VitkitError, path_problem
from vitkit.models.vit import VisionTransformer
from vitkit.tools.hub import HUB_FORMATS, export_folder
from vitkit.tools.inference import InferenceModel, find_images, image_to_tensor, load_inference_model

FORMATS = {"onnx": ".onnx", "torchscript": ".ts", "pt2": ".pt2"}
DEFAULT_CHECK_IMAGES = str(SAMPLE_DIR / "test")  # found from any working directory
MAX_DIM = 4096  # upper bound of the dynamic dims torch.export reasons about (pixels / images per batch)
QUANT_MODES = ("dynamic", "static")
DEFAULT_MAX_TOP1_DROP = 0.5  # points of top-1 an int8 export may lose against fp32
QUANT_CHECK_COUNT = 1000  # check images of an int8 export: 0.5 points is 5 of them (of 256 it would be one)
FP32_CHECK_COUNT = 256  # of which the fp32 stage of an int8 export compares this many against eager
DEFAULT_CALIB_COUNT = 256  # calibration images of a static int8 export
SLICE_BYTES = 6 * 2**20  # MLP activations per onnxruntime call that keep a CPU's caches warm (`batch_slice`)
MIN_SLICE = 8  # never fewer images per call: below it the batch's own efficiency is lost (vit_b_32_224: 0.82x at 2)


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


def cpu_count() -> int:
    """The CPUs this process may run on (its affinity mask: a container's or taskset's share, not the host's)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def onnx_session(path: str | Path, *, threads: int = 0) -> Any:
    """An onnxruntime CPU session of `path` (fp32 or int8) with `threads` intra-op threads; 0 means one per
    CPU this process may use (its affinity mask: a container's share, not the host's), set explicitly: 0.97-1.23x
    onnxruntime's own default (0) at batch 1 to 128 on a 2-CPU AMD EPYC, 1.04-1.37x on an Intel Xeon
    (benchmarks/results/int8_cpu.md, knob tables). The graph optimization level and the memory arena stay
    onnxruntime's (ORT_ENABLE_ALL, arena on): EXTENDED measured 0.72-1.29x, the arena off 0.96-1.29x, neither
    a gain that holds; BASIC does not fuse int8 QDQ pairs (static int8 0.24-0.62x)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or cpu_count()
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def batch_slice(cfg: Any) -> int:
    """Images per onnxruntime call on a CPU: the largest power of two whose MLP hidden activations (images x
    tokens x MLP width x 4 bytes) fit in SLICE_BYTES, at least MIN_SLICE; a larger batch runs in slices of it.
    Measured (int8_cpu.md, knob tables, AMD EPYC): vit_n_4_32 at batch 128 in slices of 32 1.08x (fp32), 1.12x
    (int8 dynamic) and 1.13x (static) the whole batch in one call, every slice of 8-64 1.04-1.22x; an Intel Xeon
    gave 1.3x / 1.6x; vit_b_32_224 (slice 8) runs batches up to 8 in one call."""
    tokens = (cfg.img_size // cfg.patch_size) ** 2 + int(cfg.class_token) + cfg.reg_tokens
    per_image = tokens * int(cfg.embed_dim * cfg.mlp_ratio) * 4
    fits = max(1, SLICE_BYTES // per_image)
    return max(MIN_SLICE, 1 << (fits.bit_length() - 1))


def run_sliced(session: Any, x: np.ndarray, size: int | None) -> np.ndarray:
    """`session` on `x` in slices of `size` images (None or 0: the whole batch at once)."""
    name = session.get_inputs()[0].name
    if not size or len(x) <= size:
        return session.run(None, {name: x})[0]
    return np.concatenate([session.run(None, {name: x[i:i + size]})[0] for i in range(0, len(x), size)])


def load_runner(fmt: str, path: Path, slice_size: int | None = None) -> Callable[[torch.Tensor], np.ndarray]:
    """The exported file, loaded the way a deployment would, as a function of one input batch (an ONNX model
    run in slices of `slice_size` images, as `OnnxModel` runs it)."""
    if fmt == "onnx":
        session = onnx_session(path)
        return lambda x: run_sliced(session, x.numpy(), slice_size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load's deprecation notice
        module = torch.export.load(str(path)).module() if fmt == "pt2" else torch.jit.load(str(path))

    def run(x: torch.Tensor) -> np.ndarray:
        with torch.no_grad():
            return module(x).numpy()

    return run


class OnnxModel(nn.Module):
    """An exported `.onnx` (fp32 or int8) in onnxruntime behind a PyTorch module, so what runs a model runs it
    unchanged (validate's `evaluate`, predict's `predict_files`): normalized NCHW float in, logits out. An
    export with the preprocessing baked in gets its uint8 NHWC input back from the normalized one (exact: the
    normalized values came from uint8) and returns log-probabilities, which rank and score as logits do.
    Batches run in slices of the metadata's `runtime.batch_slice` images (`batch_slice`)."""

    def __init__(self, path: str | Path, *, threads: int = 0):
        super().__init__()
        path = Path(path)
        meta_file = metadata_path(path)
        if (why := path_problem(path)) is not None:
            raise VitkitError(f"{path} {why}")
        if not meta_file.is_file():
            raise VitkitError(f"{meta_file} is missing: an exported model needs the metadata `vitkit export` "
                              f"writes beside it (classes and preprocessing)")
        self.meta: dict[str, Any] = json.loads(meta_file.read_text())
        self.data_config = DataConfig.from_dict({**self.meta, "input_size": self.meta["input_size"][-1]})
        self.class_names: list[str] = list(self.meta["classes"])
        self.num_classes = len(self.class_names)
        self.with_preprocess = bool(self.meta.get("with_preprocess"))
        self.cfg = SimpleNamespace(img_size=self.data_config.input_size, patch_size=self.meta.get("size_multiple_of"))
        # a zero-size parameter: callers that find the device from the parameters (predict_files) find the CPU
        self.anchor = nn.Parameter(torch.zeros(0), requires_grad=False)
        mean, std = self.data_config.pixel_mean_std()
        self.register_buffer("mean", mean, persistent=False)
        self.register_buffer("std", std, persistent=False)
        self.session = onnx_session(path, threads=threads)
        self.slice_size: int | None = self.meta.get("runtime", {}).get("batch_slice")  # what export measured

    def set_input_size(self, size: int) -> None:
        if size != self.cfg.img_size and not self.meta.get("dynamic_size"):
            raise VitkitError(f"this export takes {self.cfg.img_size}x{self.cfg.img_size} inputs only (export it "
                              f"with --dynamic_size for {size})")
        self.cfg.img_size = size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.detach().float().cpu()
        if self.with_preprocess:
            u8 = (x * self.std.float().cpu() + self.mean.float().cpu()).round().clamp(0, 255).to(torch.uint8)
            probs = run_sliced(self.session, u8.permute(0, 2, 3, 1).contiguous().numpy(), self.slice_size)
            out = torch.from_numpy(probs).clamp_min(torch.finfo(torch.float32).tiny).log()
        else:
            out = torch.from_numpy(run_sliced(self.session, x.numpy(), self.slice_size))
        return out.to(self.anchor.device)


def load_exported(path: str | Path, *, threads: int = 0) -> InferenceModel:
    """An exported `.onnx` (fp32 or int8) as an InferenceModel, with the preprocessing and classes of its
    metadata: `predict_files` and serve's TorchBackend take it as they take a checkpoint's."""
    model = OnnxModel(path, threads=threads)
    return InferenceModel(model, model.meta["model_name"], model.data_config,  # type: ignore[arg-type]
                          model.class_names, str(path))


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


def image_labels(folder: str | Path, files: list[Path], class_names: list[str]) -> list[int] | None:
    """The label of each of `files` when `folder` is an ImageFolder of the model's classes (`<folder>/<class>/
    <file>`, class folders named as the model's classes, or as many folders as classes when the model's names
    are the `class_<i>` placeholders: sorted folder order, as training's); None when they are not labelled."""
    root = Path(folder)
    try:
        folders = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    except OSError:
        return None
    placeholders = list(class_names) == [f"class_{i}" for i in range(len(class_names))]
    if placeholders and len(folders) == len(class_names):
        index = {name: i for i, name in enumerate(folders)}
    elif folders and set(folders) <= set(class_names):
        index = {name: class_names.index(name) for name in folders}
    else:
        return None
    labels = []
    for f in files:
        parts = f.relative_to(root).parts if f.is_relative_to(root) else ()
        if len(parts) != 2 or parts[0] not in index:
            return None
        labels.append(index[parts[0]])
    return labels


def input_batches(im: InferenceModel, files: list[Path], *, with_preprocess: bool, batch_size: int = 50
                  ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(eager model's input, exported graph's input) of `files` in batches, preprocessed as validate does."""
    for start in range(0, len(files), batch_size):
        u8, x, _ = load_inputs(im, files[start:start + batch_size], im.data_config.input_size)
        yield x, (u8.permute(0, 2, 3, 1).contiguous() if with_preprocess else x)


@torch.no_grad()
def quantized_check(im: InferenceModel, run: Callable[[torch.Tensor], np.ndarray], files: list[Path],
                    labels: list[int] | None, *, with_preprocess: bool, max_top1_drop: float) -> dict[str, Any]:
    """The int8 export against the fp32 (eager) model on `files`: top-1 agreement, max |difference|, and with
    `labels` top-1 of both and the drop. `passed`: the drop (without labels: the disagreement, which bounds
    it) is at most `max_top1_drop` points."""
    n = agree = correct_fp32 = correct_int8 = 0
    max_diff = 0.0
    for x, inp in input_batches(im, files, with_preprocess=with_preprocess):
        ref = im.model(x).float()
        ref = ref.softmax(-1) if with_preprocess else ref
        out = torch.from_numpy(np.asarray(run(inp))).float()
        p_fp32, p_int8 = ref.argmax(-1), out.argmax(-1)
        agree += int((p_fp32 == p_int8).sum())
        max_diff = max(max_diff, float((out - ref).abs().max()))
        if labels is not None:
            y = torch.tensor(labels[n:n + len(x)])
            correct_fp32 += int((p_fp32 == y).sum())
            correct_int8 += int((p_int8 == y).sum())
        n += len(x)
    result: dict[str, Any] = {"inputs": f"{n} images from {files[0].parents[1]}", "num_images": n,
                              "labelled": labels is not None, "top1_agreement": 100.0 * agree / n,
                              "max_abs_diff": max_diff}
    if labels is not None:
        result.update(top1_fp32=100.0 * correct_fp32 / n, top1_int8=100.0 * correct_int8 / n,
                      top1_drop=100.0 * (correct_fp32 - correct_int8) / n)
        guarded = result["top1_drop"]
        result["guard"] = "top-1 drop on the images' labels"
    else:
        guarded = 100.0 - result["top1_agreement"]
        result["guard"] = "top-1 disagreement with fp32 (unlabelled images; it bounds the drop)"
    result["max_top1_drop"] = max_top1_drop
    result["passed"] = guarded <= max_top1_drop
    return result


def weight_matmuls(path: Path) -> tuple[list[str], list[str]]:
    """Names of the MatMul/Gemm nodes of an ONNX file that multiply by a weight (an initializer: the linear
    layers), and of those that multiply two activations (attention's q @ k and attn @ v)."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    weights = {t.name for t in graph.initializer}
    mm = [n for n in graph.node if n.op_type in ("MatMul", "Gemm")]
    return ([n.name for n in mm if any(i in weights for i in n.input)],
            [n.name for n in mm if not any(i in weights for i in n.input)])


def quantize_onnx(fp32: Path, out: Path, mode: str, calibration: list[torch.Tensor] | None = None
                  ) -> dict[str, Any]:
    """`out`: the int8 model of the fp32 ONNX file `fp32`, by onnxruntime.quantization; returns its settings.

    Both modes quantize the linear layers (MatMul/Gemm by a weight) to int8 weights, per tensor, and leave the
    attention's activation x activation MatMuls in fp32: `dynamic` computes each activation's uint8 range per
    batch at run time (so an image's answer depends slightly on its batch-mates); `static` calibrates the
    ranges (MinMax) of the linear layers' inputs on the `calibration` batches (graph inputs) and writes
    QuantizeLinear/DequantizeLinear pairs that onnxruntime fuses into int8 kernels (uint8 activations, int8
    weights: the x86 VNNI pairing) with float outputs. Measured choices (int8_cpu.md): re-quantizing the linear
    layers' outputs (onnxruntime's default) made the logits 256 levels, so 24 of 1000 CIFAR images had tied
    top classes, and was 0.76-0.84x as fast; quant_pre_process changed neither speed nor top-1 and is skipped;
    quantizing the attention MatMuls too was slower (0.88-0.95x) and agreed less with fp32; per-channel weights,
    Percentile/Entropy calibration and int8 activations gave the same top-1 within 0.3 points."""
    import logging

    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )

    linear, attention = weight_matmuls(fp32)
    settings: dict[str, Any] = {"runtime": "onnxruntime.quantization", "mode": mode, "weights": "int8, per tensor",
                                "quantized_nodes": len(linear), "fp32_matmuls": len(attention)}
    logging.disable(logging.WARNING)  # its "please run pre-processing" (measured not to help) and the like
    try:
        if mode == "dynamic":
            quantize_dynamic(str(fp32), str(out), nodes_to_quantize=linear, weight_type=QuantType.QInt8)
            settings["activations"] = "uint8, range computed per batch at run time"
        else:
            if not calibration:
                raise VitkitError("--quant_mode static needs calibration images: pass --calib_dir DIR")

            class Reader(CalibrationDataReader):
                def __init__(self) -> None:
                    self.batches = iter(calibration or [])

                def get_next(self) -> dict[str, np.ndarray] | None:
                    batch = next(self.batches, None)
                    return None if batch is None else {"x": batch.numpy()}

            quantize_static(str(fp32), str(out), Reader(), quant_format=QuantFormat.QDQ, nodes_to_quantize=linear,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            calibrate_method=CalibrationMethod.MinMax,
                            extra_options={"OpTypesToExcludeOutputQuantization": ["MatMul", "Gemm"]})
            settings.update(activations="uint8 inputs of the linear layers, ranges calibrated (MinMax); their "
                            "outputs stay float", format="QDQ")
    finally:
        logging.disable(logging.NOTSET)
    return settings


def build_parser() -> VerbParser:
    p = VerbParser("export", __doc__)
    p.add_source("vitkit checkpoint, registered model name, or weights file with --model")
    p.add_argument("--format", choices=list(FORMATS) + list(HUB_FORMATS), default="onnx",
                   help="onnx, torchscript, pt2: one file; timm, hf: a folder timm / transformers load unchanged "
                   "(config.json, model.safetensors, model card)")
    p.add_argument("--out", default=None, help="output file, or folder for timm|hf (default: beside the checkpoint, "
                   "or ./<model>.<ext> / ./<model>-<format>)")
    p.add_argument("--dynamic_size", action="store_true", help="dynamic height/width (multiples of the patch)")
    p.add_argument("--with_preprocess", action="store_true", help="uint8 NHWC in, probabilities out")
    p.add_argument("--model", default=None, help="architecture of a foreign weights file")
    p.add_argument("--use_ema", action="store_true", help="export the checkpoint's EMA weights")
    p.add_argument("--check_images", default=None, help="folder of real images for the check (default: the "
                   f"checkpoint's eval split, else {DEFAULT_CHECK_IMAGES})")
    p.add_argument("--check_count", type=at_least(1), default=None,
                   help=f"how many of them (default 256; {QUANT_CHECK_COUNT} with --quantize)")
    p.add_argument("--tolerance", type=at_least(0, float), default=1e-4, help="max |difference| the check accepts")
    p.add_argument("--quantize", choices=("int8",), default=None, help="int8 ONNX model for CPUs (--format onnx)")
    p.add_argument("--quant_mode", choices=QUANT_MODES, default="dynamic",
                   help="dynamic: activation ranges per batch; static: calibrated on --calib_dir")
    p.add_argument("--calib_dir", default=None, help="calibration images of --quant_mode static (default: the "
                   "checkpoint's training split)")
    p.add_argument("--calib_count", type=at_least(1), default=DEFAULT_CALIB_COUNT, help="how many of them")
    p.add_argument("--max_top1_drop", type=at_least(-100, float), default=DEFAULT_MAX_TOP1_DROP,
                   help="points of top-1 int8 may lose against fp32 on the check images, else the export fails "
                        "(negative: int8 must gain that much, e.g. to see the guard fail)")
    return p


def default_out(source: str, model_name: str, fmt: str, quantize: str | None = None) -> Path:
    src = Path(source)
    ext = f"-{fmt}" if fmt in HUB_FORMATS else (f".{quantize}" if quantize else "") + FORMATS[fmt]
    if src.is_file():
        return src.with_name(src.name.removesuffix(".safetensors") + ext)
    return Path(model_name + ext)


def saved_config(source: str) -> dict[str, Any]:
    """The run config a vitkit checkpoint recorded ({} for anything else); read from the header only."""
    meta = read_metadata(source) if Path(source).is_file() else None
    if not meta or meta.get("format") != "vitkit":
        return {}
    try:
        config = json.loads(meta.get("config") or "{}")
    except ValueError:
        return {}
    return config if isinstance(config, dict) else {}


def recorded_split(config: dict[str, Any], key: str, default: str) -> Path | None:
    """`data_dir/<config[key]>` of a saved run config (None without a data_dir)."""
    data_dir = config.get("data_dir")
    return Path(data_dir) / str(config.get(key) or default) if data_dir else None


def calibration_files(calib_dir: str | None, config: dict[str, Any], count: int) -> list[Path]:
    """`count` images of `calib_dir`, else of the training split `config` records; a one-line error when
    there are none."""
    folder = Path(calib_dir) if calib_dir else recorded_split(config, "train_split", "train")
    if folder is None:
        raise VitkitError("--quant_mode static needs calibration images: pass --calib_dir DIR (a few hundred "
                          "images like the training data; the checkpoint records no training data)")
    if not folder.is_dir():
        given = "--calib_dir" if calib_dir else "the checkpoint's training data"
        raise VitkitError(f"--quant_mode static needs calibration images: {given} {folder} is not a folder here; "
                          f"pass --calib_dir DIR")
    files = check_images(str(folder), count)
    if not files:
        raise VitkitError(f"--quant_mode static needs calibration images: no image files in {folder}")
    return files


def check_writable(out: Path, *, folder: bool) -> None:
    """Fail now, in one line, when `out` (a file, or with `folder` a folder) cannot be written: a folder where
    a file goes, a parent that is a file, a read-only place. Checked before the export, which takes minutes;
    creates nothing (a probe file in the nearest existing folder, removed at once)."""
    if not folder and out.is_dir():
        raise VitkitError(f"--out {out} is a folder; give the file to write, e.g. --out {out / 'model'}")
    if folder and out.exists() and not out.is_dir():
        raise VitkitError(f"--out {out} {path_problem(out, want='folder')}; give a folder to write into")
    where = out if folder else out.parent
    existing = next(p for p in (where, *where.parents) if p.exists())
    if not existing.is_dir():
        raise VitkitError(f"cannot write --out {out}: {existing} is a file, not a folder; choose another --out")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:
        raise VitkitError(f"cannot write --out {out}: {e.strerror or e} ({existing}); choose another --out") \
            from None


def check_folder_given(folder: str) -> None:
    """--check_images, when given, must be a folder holding images: never a silent fallback to random ones."""
    if (why := path_problem(folder, want="folder")) is not None:
        raise VitkitError(f"--check_images {folder} {why}; give a folder of images like the model's")
    if not check_images(folder, 1):
        raise VitkitError(f"--check_images {folder} holds no image files; give a folder of images like the model's")


def metadata_path(out: Path) -> Path:
    return out.with_name(out.name + ".json")


def spread(files: list[Path], count: int) -> list[Path]:
    """`count` of `files`, evenly spread (every class of a sorted ImageFolder listing)."""
    return files[::max(1, len(files) // count)][:count] if count > 0 else []


def run_export(im: InferenceModel, fmt: str, out: Path, *, dynamic_size: bool = False,
               with_preprocess: bool = False, check_folder: str | None = DEFAULT_CHECK_IMAGES,
               check_count: int = 256, tolerance: float = 1e-4, progress: Bar | None = None,
               quantize: str | None = None, quant_mode: str = "dynamic", calib_files: list[Path] | None = None,
               max_top1_drop: float = DEFAULT_MAX_TOP1_DROP) -> dict[str, Any]:
    """Export, reload, check; writes `<out>.json` and returns its content. `progress` (a `Bar`, drawn only on
    a terminal) follows the steps: export, reload, one check per input size.

    With `quantize="int8"` (ONNX only) the fp32 export is made and checked (on up to FP32_CHECK_COUNT of the
    check images) in a scratch folder beside `out`, then quantized (`quant_mode`; static calibrates on
    `calib_files`) and checked against the fp32 model on all `check_count` check images (`quantized_check`).
    Only an int8 model that passes lands at `out`, with `<out>.json`; one that fails leaves `out` as it was
    and writes its metadata to `<out>.rejected.json` (`meta["rejected"]`)."""
    dc, patch = im.data_config, im.model.cfg.patch_size
    im.model.eval()
    files = check_images(check_folder, check_count)
    if quantize:
        if fmt != "onnx":
            raise VitkitError(f"--quantize {quantize} is an ONNX Runtime model: use --format onnx (PyTorch's own "
                              f"dynamic int8, torch.ao.quantization, is deprecated in torch {torch.__version__})")
        if quant_mode not in QUANT_MODES:
            raise VitkitError(f"--quant_mode must be one of {', '.join(QUANT_MODES)} (got {quant_mode!r})")
        if not files:
            raise VitkitError(f"an int8 export is checked on real images: no image files in --check_images "
                              f"{check_folder}; pass a folder of images like the model's")
        if quant_mode == "static" and not calib_files:
            raise VitkitError("--quant_mode static needs calibration images: pass --calib_dir DIR")
    bar = progress or Bar("export", enabled=False)
    steps = (4 if dynamic_size else 3) + (3 if quantize else 0)  # export, reload, check(s) [, int8: 3 more]
    done = iter(range(steps))

    def step(label: str) -> None:  # a step starts: the bar shows how many are done and which one runs
        bar.update(completed=next(done, steps), info=label)

    if quantize:
        out.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent)) if quantize else None
    fp32_out = scratch / "fp32.onnx" if scratch else out
    int8_out = scratch / "int8.onnx" if scratch else out
    settings: dict[str, Any] = {}
    try:
        with bar.start(steps):
            step(f"exporting to {fmt}")
            wrapper = ExportWrapper(im.model, dc, dynamic_size=dynamic_size, with_preprocess=with_preprocess)
            example = example_input(dc.input_size, patch, dynamic_size=dynamic_size, with_preprocess=with_preprocess)
            start = time.perf_counter()
            export_model(wrapper, fmt, fp32_out, example, dynamic_shapes(patch, dynamic_size=dynamic_size,
                                                                         with_preprocess=with_preprocess))
            export_s = time.perf_counter() - start
            step("reloading the export")
            runner = load_runner(fmt, fp32_out)
            check = self_check(im, runner, spread(files, FP32_CHECK_COUNT) if quantize else files,
                               with_preprocess=with_preprocess, dynamic_size=dynamic_size, on_step=step)
            results = [check["native_size"]] + ([check["other_size"]] if dynamic_size else [])
            check["tolerance"] = tolerance
            check["passed"] = all(r["max_abs_diff"] <= tolerance and r["top1_agreement"] == 100.0 for r in results)
            if quantize and check["passed"]:  # quantize only an fp32 export that matches eager
                step(f"quantizing to {quantize} ({quant_mode})")
                start = time.perf_counter()
                calibration = ([inp for _, inp in input_batches(im, calib_files or [], batch_size=32,
                                                                with_preprocess=with_preprocess)]
                               if quant_mode == "static" else None)
                settings = quantize_onnx(fp32_out, int8_out, quant_mode, calibration)
                if calib_files:
                    settings["calibration"] = {"images": len(calib_files), "from": str(calib_files[0].parents[1]),
                                               "preprocessing": "the model's eval DataConfig"}
                settings["seconds"] = round(time.perf_counter() - start, 2)
                settings["size_bytes"] = {"fp32": fp32_out.stat().st_size, "int8": int8_out.stat().st_size}
                step(f"reloading the {quantize} model")
                q_runner = load_runner("onnx", int8_out, batch_slice(im.model.cfg))
                step(f"checking {quantize} against fp32 on {len(files)} images")
                check["quantized"] = quantized_check(im, q_runner, files,
                                                     image_labels(check_folder or "", files, im.class_names),
                                                     with_preprocess=with_preprocess, max_top1_drop=max_top1_drop)
                check["passed"] = check["quantized"]["passed"]
            bar.update(completed=steps, info="done")
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
            "output": {"name": "probabilities" if with_preprocess else "logits",
                       "shape": ["batch", len(im.class_names)]},
            "dynamic_size": dynamic_size,
            "size_multiple_of": patch,
            "with_preprocess": with_preprocess,
            "export_seconds": round(export_s, 2),
            **({"quantization": {"dtype": quantize, **settings}} if quantize else {}),
            **({"runtime": {"batch_slice": batch_slice(im.model.cfg), "intra_op_num_threads": "one per CPU"}}
               if fmt == "onnx" else {}),
            "versions": versions(),
            "check": check,
        }
        text = json.dumps(meta, indent=2)
        rejected = out.with_name(out.name + ".rejected.json")
        if quantize and not check["passed"]:  # `out` stays as it was: nothing there claims this model is good
            meta["rejected"] = str(rejected)
            rejected.write_text(text)
        else:
            if quantize:
                os.replace(int8_out, out)
                rejected.unlink(missing_ok=True)
            metadata_path(out).write_text(text)
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
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
    if args.quantize and args.format != "onnx":
        raise VitkitError(f"--quantize {args.quantize} is an ONNX Runtime model: use --format onnx (PyTorch's own "
                          f"dynamic int8, torch.ao.quantization, is deprecated in torch {torch.__version__})")
    config = saved_config(args.source)
    calib = (calibration_files(args.calib_dir, config, args.calib_count)
             if args.quantize and args.quant_mode == "static" else None)  # before the slow steps
    if args.check_images:
        check_folder_given(args.check_images)
        check_folder = args.check_images
    else:
        recorded = recorded_split(config, "val_split", "val")
        check_folder = str(recorded) if recorded is not None and recorded.is_dir() else DEFAULT_CHECK_IMAGES
    check_count = args.check_count if args.check_count is not None else (QUANT_CHECK_COUNT if args.quantize else 256)
    im = load_inference_model(args.source, model_name=args.model, use_ema=args.use_ema)
    out = Path(args.out) if args.out else default_out(args.source, im.model_name, args.format, args.quantize)
    check_writable(out, folder=args.format in HUB_FORMATS)
    if args.format in HUB_FORMATS:
        files = check_images(check_folder, min(check_count, 256))
        _, x, where = load_inputs(im, files, im.data_config.input_size)
        record = export_folder(im, args.format, out, inputs=(x, where), tolerance=args.tolerance)
        c = record["check"]
        print(f"wrote {out}/ ({record['architecture']}: config.json, model.safetensors, README.md); loaded back by "
              f"{'timm' if args.format == 'timm' else 'transformers'}: max |logits - vitkit's| = "
              f"{c['max_abs_diff']:.2e}, top-1 agreement {c['top1_agreement']:.2f}% on {c['inputs']}")
        return 0
    if args.format == "onnx":
        try:
            import onnxruntime  # noqa: F401  (needed for the check, fail before the slow export)
        except ImportError:
            raise VitkitError("ONNX export needs onnx, onnxscript and onnxruntime: pip install 'vitkit[deploy]'") \
                from None
    meta = run_export(im, args.format, out, dynamic_size=args.dynamic_size, with_preprocess=args.with_preprocess,
                      check_folder=check_folder, check_count=check_count, tolerance=args.tolerance,
                      progress=Bar("export", eta=False), quantize=args.quantize, quant_mode=args.quant_mode,
                      calib_files=calib, max_top1_drop=args.max_top1_drop)
    check = meta["check"]
    q = check.get("quantized")
    if "rejected" in meta:
        if q is None:
            reason = f"the fp32 export does not match eager within {args.tolerance:g} / 100% top-1"
        elif q["labelled"]:
            reason = (f"int8 top-1 {q['top1_int8']:.2f}% vs fp32 {q['top1_fp32']:.2f}% on {q['num_images']} images: "
                      f"a drop of {q['top1_drop']:.2f} points, above --max_top1_drop {args.max_top1_drop:g}")
        else:
            reason = (f"int8 agrees with fp32 on {q['top1_agreement']:.2f}% of {q['num_images']} unlabelled "
                      f"images, more than --max_top1_drop {args.max_top1_drop:g} points apart")
        raise VitkitError(f"{reason}; nothing written to {out} (the check: {meta['rejected']})")
    print(f"wrote {out} and {metadata_path(out).name} ({meta['export_seconds']} s)")
    for key in ("native_size", "other_size"):
        if key in check:
            r = check[key]
            size = r["input_size"]
            stage = "fp32 " if q else ""
            print(f"{stage}check at {size}x{size} on {r['inputs']}: "
                  f"max |{check['compared']} - eager| = {r['max_abs_diff']:.2e}, "
                  f"top-1 agreement {r['top1_agreement']:.2f}%")
    if q is not None:
        qs = meta["quantization"]
        top1 = (f", top-1 {q['top1_int8']:.2f}% vs fp32 {q['top1_fp32']:.2f}% "
                f"({q['top1_int8'] - q['top1_fp32']:+.2f} points)" if q["labelled"] else " (unlabelled: no top-1)")
        print(f"{args.quantize} ({args.quant_mode}) check on {q['inputs']}: top-1 agreement with fp32 "
              f"{q['top1_agreement']:.2f}%{top1}; {qs['size_bytes']['int8'] / 2**20:.1f} MB "
              f"(fp32 {qs['size_bytes']['fp32'] / 2**20:.1f} MB)")
    if not check["passed"]:
        print(f"error: the export does not match eager within {args.tolerance:g} / 100% top-1", file=sys.stderr)
        return 1
    return 0
