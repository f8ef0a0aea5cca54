"""CPU inference images/s: timm fp32 eager, vitkit fp32 eager, vitkit ONNX fp32 and int8 (issue 19).

Same process, same weights, same batch, interleaved repeats (the order alternating), median, as bench_model.py.
The ONNX rows run as vitkit runs them (`vitkit.tools.export.onnx_session`: intra-op threads set to the CPUs
this process may use; `batch_slice`: a large batch of a small model in slices); the `ORT defaults` rows run
the same files with onnxruntime's own defaults (threads 0, the whole batch in one call), so the knobs are
measured in the same run. `--knobs` adds a table of the knobs one by one. `--ckpt` adds top-1 of fp32 vs int8
(dynamic and static) on `--test_dir` (every image there), from `vitkit export --quantize int8`'s own check.

    python benchmarks/bench_int8.py --out benchmarks/results/int8_cpu.md --knobs \\
        --ckpt runs/cifar10_cpu/best.safetensors --test_dir /path/to/cifar10/test

Static int8 (speed rows) is calibrated on 64 images of `--calib_dir` (default data/cifar10_sample/train).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from vitkit.data.preprocess import resolve_data_config
from vitkit.engine.runtime import keep_large_blocks
from vitkit.models import create_model, get_spec
from vitkit.tools.benchmark import timm_twin
from vitkit.tools.export import (
    DEFAULT_CALIB_COUNT,
    ExportWrapper,
    batch_slice,
    calibration_files,
    check_images,
    cpu_count,
    dynamic_shapes,
    example_input,
    export_model,
    input_batches,
    quantize_onnx,
    run_export,
    run_sliced,
    saved_config,
    versions,
)
from vitkit.tools.inference import InferenceModel, default_class_names, load_inference_model

DEFAULT_CASES = ["vit_b_32_224:1", "vit_b_32_224:8", "vit_n_4_32:128"]
NOTES = """
### how vitkit runs an ONNX model on a CPU (vitkit/tools/export.py), and why

- int8: the linear layers (MatMul/Gemm by a weight) get int8 weights; attention's activation x activation
  MatMuls stay fp32. Dynamic: uint8 activations ranged per batch at run time. Static: the linear layers' input
  ranges calibrated (MinMax) on training images, QDQ format, their outputs left float (re-quantized outputs made
  the logits 256 levels with tied top classes). No quant_pre_process (it changed neither speed nor top-1).
- threads: `intra_op_num_threads` set to the CPUs the process may use (its affinity mask) instead of 0 (the knob
  tables' "threads N" vs "threads 0"); graph optimization stays ORT_ENABLE_ALL and the memory arena on (BASIC does
  not fuse QDQ: static int8 collapses; EXTENDED and the arena off move both ways from run to run).
- slices: a batch runs in slices of `batch_slice(cfg)` images (the largest power of two whose MLP activations,
  images x tokens x MLP width x 4 bytes, fit in 6 MiB, at least 8): 32 for vit_n_4_32, 8 for vit_b_32_224.
- `threads 1` beats 2 threads while other processes keep the cores busy; on a quiet machine it loses, so it is
  not a default (`vitkit serve --threads 1` sets it).
- allocator: CPU inference in batches of 32 or more (validate, predict of many files) keeps glibc's large blocks
  (`vitkit.engine.runtime.cpu_inference_allocator`, by mallopt: the "vitkit's rule" rows); smaller batches and
  `vitkit serve` keep glibc's defaults, which won at batch 1.
- torch.ao's dynamic int8 (deprecated in torch 2.14) is a row for comparison, not a vitkit path.
"""
REPO = Path(__file__).resolve().parents[1]


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def session(path: Path, threads: int, level: str = "all", arena: bool = True) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.enable_cpu_mem_arena = arena  # onnxruntime's own memory arena (on by default)
    options.graph_optimization_level = {"basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                                        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
                                        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}[level]
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def build_files(name: str, folder: Path, calib_dir: str) -> tuple[torch.nn.Module, dict[str, Path]]:
    """The model (random weights, seed 0, 10 classes) and its fp32 / int8 dynamic / int8 static ONNX files."""
    torch.manual_seed(0)
    model = create_model(name, num_classes=10).eval()
    spec = get_spec(name)
    dc = resolve_data_config(spec, input_size=model.cfg.img_size)
    patch = model.cfg.patch_size
    files = {"fp32": folder / f"{name}.onnx", "dynamic": folder / f"{name}.dyn.onnx",
             "static": folder / f"{name}.static.onnx"}
    export_model(ExportWrapper(model, dc, dynamic_size=False, with_preprocess=False), "onnx", files["fp32"],
                 example_input(dc.input_size, patch, dynamic_size=False, with_preprocess=False),
                 dynamic_shapes(patch, dynamic_size=False, with_preprocess=False))
    quantize_onnx(files["fp32"], files["dynamic"], "dynamic")
    im = InferenceModel(model, name, dc, default_class_names(10), "random weights")  # type: ignore[arg-type]
    calib = [x for _, x in input_batches(im, check_images(calib_dir, 64), with_preprocess=False, batch_size=32)]
    quantize_onnx(files["fp32"], files["static"], "static", calib)
    return model, files


def runners(name: str, batch: int, folder: Path, calib_dir: str, knobs: bool
            ) -> tuple[dict[str, Callable[[], Any]], dict[str, Callable[[], Any]], int]:
    """(the main table's callables, the knobs table's, the slice vitkit uses), each running one batch."""
    model, files = build_files(name, folder, calib_dir)
    timm = timm_twin(model.cfg).eval()
    timm.load_state_dict(model.state_dict())  # same weights: same work
    size = model.cfg.img_size
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))
    xn = x.numpy()
    threads, cut = cpu_count(), batch_slice(model.cfg)

    def eager(m: torch.nn.Module) -> Callable[[], Any]:
        def run() -> Any:
            with torch.inference_mode():
                return m(x)
        return run

    def ort_run(path: Path, threads: int, slice_size: int | None, level: str = "all", arena: bool = True
                ) -> Callable[[], Any]:
        s = session(path, threads, level, arena)
        return lambda: run_sliced(s, xn, slice_size)

    def eager_threads(m: torch.nn.Module, n: int) -> Callable[[], Any]:
        def run() -> Any:
            before = torch.get_num_threads()
            torch.set_num_threads(n)
            try:
                with torch.inference_mode():
                    return m(x)
            finally:
                torch.set_num_threads(before)
        return run

    main: dict[str, Callable[[], Any]] = {
        "timm fp32 eager": eager(timm),
        "vitkit fp32 eager": eager(model),
        "vitkit ONNX fp32": ort_run(files["fp32"], threads, cut),
        "vitkit int8 dynamic": ort_run(files["dynamic"], threads, cut),
        "vitkit int8 static": ort_run(files["static"], threads, cut),
        "ONNX fp32, ORT defaults": ort_run(files["fp32"], 0, None),
        "int8 dynamic, ORT defaults": ort_run(files["dynamic"], 0, None),
    }
    try:  # PyTorch's own dynamic int8 of the nn.Linear layers: deprecated (torch.ao.quantization), for comparison
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ao = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
        main["torch.ao int8 dynamic (deprecated)"] = eager(ao)
    except (AttributeError, RuntimeError):
        pass
    extra: dict[str, Callable[[], Any]] = {}
    if knobs:
        slices = sorted({s for s in (cut, 8, 16, 32, 64) if s < batch})
        for kind in ("fp32", "dynamic", "static"):
            rows = {"threads 0 (ORT default)": (0, "all", None, True),
                    f"threads {threads}": (threads, "all", None, True),
                    "threads 1": (1, "all", None, True),
                    f"threads {threads}, EXTENDED": (threads, "extended", None, True),
                    f"threads {threads}, BASIC": (threads, "basic", None, True),
                    f"threads {threads}, no memory arena": (threads, "all", None, False),
                    **{f"threads {threads}, slices of {sl}": (threads, "all", sl, True) for sl in slices}}
            for label, (t, level, sl, arena) in rows.items():
                extra[f"{kind}: {label}"] = ort_run(files[kind], t, sl, level, arena)
        for n in sorted({torch.get_num_threads(), 1}, reverse=True):  # PyTorch's backend: intra-op threads
            extra[f"eager: vitkit fp32, torch threads {n}"] = eager_threads(model, n)
    return main, extra, cut


# glibc malloc, set for a whole process at its start: large blocks from the heap (mmap only above 32 MiB, the most
# glibc allows) and freed memory kept (trim above 1 GiB), instead of a fresh mmap + page faults per large tensor
MALLOC_TUNABLES = "glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=1073741824"
ALLOCATORS = {"glibc default": {}, "glibc, large blocks kept": {"GLIBC_TUNABLES": MALLOC_TUNABLES},
              "vitkit's rule (mallopt at start)": {"VITKIT_BENCH_MALLOPT": "1"}}


def allocator_child(job: str) -> int:
    """One timing in a fresh process (its allocator set by its environment): vitkit fp32 eager and int8
    dynamic ONNX as vitkit runs them; prints {runtime: median seconds per call} as JSON."""
    j = json.loads(job)
    if os.environ.get("VITKIT_BENCH_MALLOPT") == "1" and not keep_large_blocks():
        raise SystemExit("mallopt failed")
    model = create_model(j["name"], num_classes=10).eval()
    model.load_state_dict(torch.load(j["state"], weights_only=True))
    size = model.cfg.img_size
    x = torch.randn(j["batch"], 3, size, size, generator=torch.Generator().manual_seed(0))
    s = session(Path(j["onnx"]), cpu_count())
    cut = batch_slice(model.cfg)

    def eager() -> Any:
        with torch.inference_mode():
            return model(x)

    med = measure({"vitkit fp32 eager": eager, "vitkit int8 dynamic": lambda: run_sliced(s, x.numpy(), cut)},
                  j["steps"], j["repeats"])
    print(json.dumps(med))
    return 0


def allocator_table(name: str, batch: int, folder: Path, calib_dir: str, steps: int, rounds: int) -> str:
    """ALLOCATORS against each other: `rounds` fresh processes each, alternating, so drift hits both alike."""
    model, files = build_files(name, folder, calib_dir)
    state = folder / f"{name}.pt"
    torch.save(model.state_dict(), state)
    job = json.dumps({"name": name, "batch": batch, "state": str(state), "onnx": str(files["dynamic"]),
                      "steps": steps, "repeats": 3})
    runs: dict[str, list[dict[str, float]]] = {k: [] for k in ALLOCATORS}
    order = list(ALLOCATORS)
    for r in range(rounds):
        for label in (order if r % 2 == 0 else order[::-1]):
            env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "VITKIT_BENCH_MALLOPT")} \
                | ALLOCATORS[label]
            out = subprocess.run([sys.executable, __file__, "--allocator_child", job], env=env, check=True,
                                 capture_output=True, text=True).stdout
            runs[label].append(json.loads(out.strip().splitlines()[-1]))
    base = order[0]
    lines = [f"\n#### memory allocator, {name}, batch {batch} ({rounds} processes each, alternating; median)\n",
             "| allocator | runtime | images/s | x glibc default |", "|---|---|---:|---:|"]
    for label in order:
        for rt in runs[label][0]:
            t = statistics.median(m[rt] for m in runs[label])
            t0 = statistics.median(m[rt] for m in runs[base])
            lines.append(f"| {label} | {rt} | {batch / t:.1f} | {t0 / t:.2f} |")
    return "\n".join(lines)


def measure(fns: dict[str, Callable[[], Any]], steps: int, repeats: int, warmup: int = 2) -> dict[str, float]:
    """Median seconds per call of each function, repeats interleaved, the order alternating."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    order = list(fns.items())
    for r in range(repeats):
        for name, fn in (order if r % 2 == 0 else order[::-1]):
            t0 = time.perf_counter()
            for _ in range(steps):
                fn()
            times[name].append((time.perf_counter() - t0) / steps)
    return {k: statistics.median(v) for k, v in times.items()}


def speed_table(title: str, batch: int, med: dict[str, float], base: str) -> str:
    lines = [title.rstrip("\n"), "", f"| runtime | images/s | ms / batch | x {base} |", "|---|---:|---:|---:|"]
    for name, t in med.items():
        lines.append(f"| {name} | {batch / t:.1f} | {1e3 * t:.1f} | {med[base] / t:.2f} |")
    return "\n".join(lines)


def accuracy(ckpt: str, test_dir: str, calib_dir: str | None, folder: Path) -> str:
    """fp32 vs int8 top-1 on every image of `test_dir`, by `run_export`'s own check (the guard disarmed)."""
    im = load_inference_model(ckpt)
    n = len(check_images(test_dir, 10**9))
    rows = []
    for mode in ("dynamic", "static"):
        calib = calibration_files(calib_dir, saved_config(ckpt), DEFAULT_CALIB_COUNT) if mode == "static" else None
        start = time.perf_counter()
        meta = run_export(im, "onnx", folder / f"ckpt.{mode}.onnx", check_folder=test_dir, check_count=n,
                          quantize="int8", quant_mode=mode, calib_files=calib, max_top1_drop=100.0)
        q = meta["check"]["quantized"]
        if not q["labelled"]:
            raise SystemExit(f"{test_dir} is not an ImageFolder of the checkpoint's classes: no top-1")
        source = (f"{meta['quantization']['calibration']['images']} images of "
                  f"{meta['quantization']['calibration']['from']}" if calib else "-")
        rows.append(f"| int8 {mode} | {q['num_images']} | {q['top1_fp32']:.2f} | {q['top1_int8']:.2f} | "
                    f"{q['top1_int8'] - q['top1_fp32']:+.2f} | {q['top1_agreement']:.2f} | {source} | "
                    f"{time.perf_counter() - start:.0f} |")
    return "\n".join([f"### top-1 on {test_dir}: {ckpt} ({im.model_name})", "",
                      "| model | images | fp32 top-1 % | int8 top-1 % | change (points) | agreement with fp32 % "
                      "| calibration | export s |", "|---|---:|---:|---:|---:|---:|---|---:|", *rows])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", nargs="*", default=DEFAULT_CASES, help="MODEL:BATCH ... (none: --ckpt alone)")
    p.add_argument("--steps", type=int, default=None, help="calls per timing (default: about 32 images, >= 3)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--knobs", action="store_true", help="also onnxruntime's knobs one by one")
    p.add_argument("--calib_dir", default=str(REPO / "data/cifar10_sample/train"))
    p.add_argument("--ckpt", default=None, help="a checkpoint: top-1 of fp32 vs int8 on --test_dir")
    p.add_argument("--test_dir", default=str(REPO / "data/cifar10_sample/test"))
    p.add_argument("--ckpt_calib_dir", default=None, help="static calibration images for --ckpt (default: the "
                   "training split its config records)")
    p.add_argument("--allocator", type=int, default=0, metavar="ROUNDS",
                   help="also glibc malloc settings against the default, in ROUNDS fresh processes each")
    p.add_argument("--allocator_child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help="also write the tables to this markdown file")
    a = p.parse_args()
    if a.allocator_child:
        return allocator_child(a.allocator_child)
    v = versions()
    try:
        load = " / ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        load = "-"
    blocks = [f"command: `python {' '.join(sys.argv)}`  ",
              time.strftime("date: %Y-%m-%d %H:%M UTC  ", time.gmtime()),
              f"CPU: {cpu_model()}, {cpu_count()} CPUs for this process; torch threads {torch.get_num_threads()}  ",
              f"versions: vitkit {v['vitkit']}, torch {v['torch']}, onnxruntime {v.get('onnxruntime', '-')}, "
              f"onnx {v.get('onnx', '-')}, python {v['python']}  ",
              f"load average (1, 5, 15 min) at the start: {load}  ",
              "weights: random (seed 0), 10 classes; median of the repeats, repeats interleaved"]
    print("\n".join(blocks), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for case in a.cases:
            name, batch_s = case.split(":")
            batch = int(batch_s)
            steps = a.steps or max(3, 32 // batch)
            main_fns, knob_fns, cut = runners(name, batch, Path(tmp), a.calib_dir, a.knobs)
            med = measure({**main_fns, **knob_fns}, steps, a.repeats)
            sliced = f"in slices of {cut}" if cut < batch else "in one call"
            table = speed_table(f"\n### {name}, batch {batch} (vitkit's ONNX rows: {cpu_count()} threads, {sliced}; "
                                f"{a.repeats} x {steps} calls)\n", batch, {k: med[k] for k in main_fns},
                                "timm fp32 eager")
            print(table, flush=True)
            blocks.append(table)
            for kind in ("fp32", "dynamic", "static", "eager"):  # one table per model file, against the first row
                rows = {k: med[k] for k in knob_fns if k.startswith(kind + ":")}
                if rows:
                    label = {"fp32": "onnxruntime knobs, fp32", "eager": "PyTorch knobs, fp32 eager"}.get(
                        kind, f"onnxruntime knobs, int8 {kind}")
                    ktable = speed_table(f"\n#### {label}, {name}, batch {batch}\n", batch, rows,
                                         next(iter(rows)))
                    print(ktable, flush=True)
                    blocks.append(ktable)
            if a.allocator:
                atable = allocator_table(name, batch, Path(tmp), a.calib_dir, steps, a.allocator)
                print(atable, flush=True)
                blocks.append(atable)
        if a.ckpt:
            acc = "\n" + accuracy(a.ckpt, a.test_dir, a.ckpt_calib_dir, Path(tmp))
            print(acc, flush=True)
            blocks.append(acc)
    blocks.append(NOTES)
    if a.out:
        Path(a.out).write_text("# int8 and onnxruntime on the CPU (bench_int8)\n\n" + "\n".join(blocks) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
