"""The GPU kit's stages (issue 13); `benchmarks/gpu/run.sh` is the command that runs them.

    python benchmarks/gpu/kit.py --out OUT --data CIFAR10_ROOT [--dry-run]    # all stages, then the report
    python benchmarks/gpu/kit.py --out OUT --data CIFAR10_ROOT --stage B      # one stage (what the driver runs)

Each stage runs in its own process under its own time limit (BUDGET_S), so a stage that fails or runs out of
time does not stop the next one; it writes what it has measured to OUT/stage_<X>.json after every figure, so
a stage killed at its limit still reports what it finished. Then OUT/report.md (every figure beside its
target, verdicts) and OUT/results.json, and the report is printed last.

    A  environment and ceilings: nvidia-smi, versions, bf16 8192^3 matmul TFLOP/s, device copy GB/s, pytest -m gpu
    B  throughput against timm in the same process: train and inference, bf16, eager and compiled
    C  data: GPU-decode loader images/s on CIFAR JPEGs and on ~500x375 re-encodes, end-to-end training on them
    D  time to accuracy: configs/vit/cifar10_gpu.yaml from scratch under a wall-clock budget

With --dry-run every stage runs on the CPU at tiny sizes (what the default test suite checks).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from multiprocessing import Pool
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
BUDGET_S = {"A": 90, "B": 165, "C": 55, "D": 200}  # 510 s: with install and unpack, under 9 minutes
DRY_BUDGET_S = {"A": 90, "B": 90, "C": 90, "D": 120}
# Targets of the performance issue (images/s, bf16, one GPU) and of this kit.
TARGETS = {
    ("vit_b_32_224", "train"): 12_000, ("vit_b_16_224", "train"): 3_500, ("vit_l_16_224", "train"): 1_000,
    ("vit_b_16_224", "infer"): 12_000,
}
TIMM_RATIO_TARGET = 1.15
REAL_JPEG_TARGET = 0.80  # end-to-end on real JPEGs over the synthetic figure
CIFAR_TARGET, CIFAR_GOAL = 90.0, 93.0
CIFAR_TRAIN_IMAGES = 50_000


# -- helpers ---------------------------------------------------------------------------------------------------

class Record:
    """One stage's findings, written to OUT/stage_<X>.json after every change."""

    def __init__(self, out: Path, stage: str):
        self.path, self.data = out / f"stage_{stage}.json", {"stage": stage, "status": "running"}
        self.save()

    def __setitem__(self, key: str, value: Any) -> None:
        self.data[key] = value
        self.save()

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=str))
        os.replace(tmp, self.path)


def load_stage(out: Path, stage: str) -> dict[str, Any]:
    path = out / f"stage_{stage}.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def run_cmd(cmd: list[str], timeout: float, log: Path | None = None, env: dict[str, str] | None = None
            ) -> tuple[int | None, str]:
    """Run `cmd` in its own process group; (exit code or None when killed at `timeout`, its output)."""
    try:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
                                start_new_session=True, env=env)
    except OSError as e:
        return 127, f"{cmd[0]}: {e}"
    try:
        text, _ = proc.communicate(timeout=timeout)
        rc: int | None = proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        text, _ = proc.communicate()
        rc = None
    if log is not None:
        log.write_text(text)
    return rc, text


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_info() -> tuple[str, str]:
    import torch

    if torch.cuda.is_available():
        return "cuda", torch.cuda.get_device_name(0)
    return "cpu", f"CPU: {cpu_model()} ({os.cpu_count()} cores)"


def sync(dev: str) -> None:
    import torch

    if dev == "cuda":
        torch.cuda.synchronize()


def timed(fn: Any, dev: str, reps: int, warmup: int = 3) -> float:
    """Median-free mean seconds per call after `warmup` calls (enough for the large, steady kernels here)."""
    for _ in range(warmup):
        fn()
    sync(dev)
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    sync(dev)
    return (time.perf_counter() - t0) / reps


# -- A: environment and ceilings ---------------------------------------------------------------------------------

# What vitkit uses from its libraries beyond their oldest APIs: on an older image (the device's torch 2.11) a
# missing one is named here, instead of surfacing as a traceback in a later stage.
FEATURES = ["torch.nn.attention:sdpa_kernel", "torch.distributed.fsdp:fully_shard",
            "torch.distributed.checkpoint.state_dict:get_model_state_dict", "torch.distributed.tensor:DTensor",
            "torch.compiler:is_compiling", "torch.amp:GradScaler", "torchvision.io:decode_jpeg",
            "torchvision.transforms.v2:RandomResizedCrop", "timm.optim:Lamb", "timm.optim:Lion",
            "timm.data.auto_augment:NAME_TO_OP", "safetensors.torch:save_file", "vitkit.cli:main"]


def missing_features() -> list[str]:
    import importlib

    missing = []
    for feature in FEATURES:
        module, _, name = feature.partition(":")
        try:
            getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError) as e:
            missing.append(f"{module}.{name} ({type(e).__name__}: {e})")
    return missing


def stage_a(rec: Record, data: Path, dry: bool, out: Path) -> None:
    import timm
    import torch
    import torchvision

    rc, smi = run_cmd(["nvidia-smi"], 20)
    rec["nvidia_smi"] = smi.strip() if rc == 0 else f"nvidia-smi not available ({smi.strip()[:200]})"
    dev, name = device_info()
    rec["device"] = name
    rec["host_cpu"] = f"{cpu_model()} ({os.cpu_count()} cores)"
    rec["versions"] = {"python": platform.python_version(), "torch": torch.__version__,
                       "torchvision": torchvision.__version__, "timm": timm.__version__,
                       "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version() if dev == "cuda" else None,
                       "git": run_cmd(["git", "rev-parse", "--short", "HEAD"], 10)[1].strip()}
    rec["missing_features"] = missing_features()
    n, dtype = (1024, torch.float32) if dry else (8192, torch.bfloat16)
    a = torch.randn(n, n, device=dev, dtype=dtype)  # random data: zeros run faster than real inputs
    b = torch.randn(n, n, device=dev, dtype=dtype)
    t = timed(lambda: a @ b, dev, reps=3 if dry else 10)
    rec["matmul"] = {"n": n, "dtype": str(dtype).replace("torch.", ""), "tflops": 2 * n**3 / t / 1e12}
    nbytes = 16 * 2**20 if dry else 2 * 2**30
    x = torch.empty(nbytes // 4, device=dev, dtype=torch.float32).uniform_()
    y = torch.empty_like(x)
    t = timed(lambda: y.copy_(x), dev, reps=3 if dry else 20)
    rec["copy"] = {"bytes": nbytes, "gb_per_s": 2 * nbytes / t / 1e9}  # bytes read plus bytes written
    rc, text = run_cmd([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "tests/test_gpu.py", "-p",
                        "no:cacheprovider"], 75, log=out / "pytest_gpu.log")
    lines = [line for line in text.strip().splitlines() if line.strip()]
    rec["pytest_gpu"] = {"rc": rc, "summary": lines[-1] if lines else "", "failures":
                         [line for line in lines if line.startswith(("FAILED", "ERROR"))][:20]}


# -- B: throughput against timm -----------------------------------------------------------------------------------

def stage_b(rec: Record, data: Path, dry: bool, out: Path) -> None:
    from vitkit.tools import benchmark

    ceiling = load_stage(out, "A").get("matmul", {}).get("tflops")
    precision = "fp32" if dry else "bf16"
    cases = [("vit_n_4_32", 8)] if dry else [("vit_b_32_224", 512), ("vit_b_16_224", 256), ("vit_l_16_224", 128)]
    steps = dict(steps=1, warmup=1, repeats=1) if dry else dict(steps=10, warmup=3, repeats=3)
    rows: list[dict[str, Any]] = []

    def add(model: str, batch: int, results: list[Any], compiled: bool) -> None:
        for r in results:
            rows.append({"model": model, "batch": batch, "compiled": compiled, **r.__dict__})
        rec["results"] = rows

    rec["precision"], rec["mfu_ceiling_tflops"] = precision, ceiling
    for model, batch in cases:
        add(model, batch, benchmark.run(model, batch, mode="both", precision=precision, compare="timm",
                                        peak_tflops=ceiling, **steps), compiled=False)
    # the CIFAR recipe's model, for stage D's epoch plan (eager; compiled runs faster, so the plan is safe)
    cifar = benchmark.run("vit_s_4_32", 8 if dry else 512, mode="train", precision=precision, **steps)
    rec["cifar_model_train_images_per_s"] = cifar[0].images_per_s
    if dry:
        rec["compiled"] = "skipped in the dry run (compilation on a CPU takes minutes)"
        return
    add("vit_b_16_224", 256, benchmark.run("vit_b_16_224", 256, mode="train", precision=precision, compare="timm",
                                           compile=True, peak_tflops=ceiling, **steps), compiled=True)


# -- C: data ------------------------------------------------------------------------------------------------------

def _reencode(job: tuple[str, str]) -> None:
    from PIL import Image

    src, dst = job
    with Image.open(src) as img:
        img.convert("RGB").resize((500, 375), Image.BICUBIC).save(dst, quality=90)


def make_large_jpegs(src_root: Path, dst_root: Path, count: int) -> int:
    """`count` training JPEGs of `src_root` upscaled to 500x375 (ImageNet's typical size), class folders kept."""
    files = sorted(src_root.glob("train/*/*.jpg"))
    step = max(1, len(files) // count)
    jobs = []
    for f in files[::step][:count]:
        (dst_root / "train" / f.parent.name).mkdir(parents=True, exist_ok=True)
        jobs.append((str(f), str(dst_root / "train" / f.parent.name / f.name)))
    with Pool(min(16, os.cpu_count() or 1)) as pool:
        pool.map(_reencode, jobs, chunksize=32)
    return len(jobs)


def loader_images_per_s(root: Path, *, batch: int, batches: int, workers: int) -> float:
    """Images/s of the GPU-decode training loader (decode, random resized crop, flip, normalize at 224 px)."""
    from vitkit.data.datasets import build_dataset
    from vitkit.data.loader import build_loader
    from vitkit.data.preprocess import DataConfig

    ds = build_dataset(str(root), name="imagefolder", split="train", train=True)
    loader = build_loader(ds, data_config=DataConfig(input_size=224), train=True, batch_size=batch, seed=0,
                          num_workers=workers, in_memory=False, gpu_decode=True)
    dev, _ = device_info()
    it = iter(loader)
    next(it)  # workers start, first batch: outside the timing
    sync(dev)
    t0, n = time.perf_counter(), 0
    for _ in range(batches):
        try:
            images, _ = next(it)
        except StopIteration:
            break
        n += images.shape[0]
    sync(dev)
    return n / (time.perf_counter() - t0)


def stage_c(rec: Record, data: Path, dry: bool, out: Path) -> None:
    from vitkit.engine.config import resolve
    from vitkit.engine.loop import Trainer

    workers = 2 if dry else min(12, os.cpu_count() or 1)
    batch, batches = (16, 3) if dry else (256, 30)
    rec["cifar_jpeg_loader_images_per_s"] = loader_images_per_s(data, batch=batch, batches=batches, workers=workers)
    tmp = Path(tempfile.mkdtemp(prefix="vitkit_kit_"))
    try:
        t0 = time.perf_counter()
        n = make_large_jpegs(data, tmp / "large", 64 if dry else 5120)
        rec["large_jpegs"] = {"count": n, "size": "500x375", "made_in_s": time.perf_counter() - t0}
        rec["large_jpeg_loader_images_per_s"] = loader_images_per_s(tmp / "large", batch=batch, batches=batches,
                                                                    workers=workers)
        # End to end: the real trainer on those JPEGs (GPU decode, bf16); epoch 2's figure is past the warm-up.
        model, size = ("vit_n_4_32", 32) if dry else ("vit_b_16_224", 224)
        argv = ["--dataset", "imagefolder", "--data_dir", str(tmp / "large"), "--train_split", "train",
                "--model", model, "--image_resize", str(size), "--batch_size", str(batch), "--epoch_size", "2",
                "--warmup_epochs", "0", "--gpu_decode", "true", "--num_parallel_workers", str(workers),
                "--amp_level", "O0" if dry else "O2", "--ckpt_save_dir", str(tmp / "run"), "--log_interval", "100",
                "--device", "cpu" if dry else "cuda"]
        rec["e2e_command"] = "vitkit train " + " ".join(argv)
        cfg = resolve(argv, notices=[])
        Trainer(cfg).fit()
        lines = [json.loads(x) for x in (tmp / "run" / "metrics.jsonl").read_text().splitlines()]
        rec["e2e_model"], rec["e2e_train_images_per_s"] = model, lines[-1]["images_per_s"]
        rec["e2e_data_wait"] = lines[-1]["data_wait"]
        synthetic = [r for r in load_stage(out, "B").get("results", [])
                     if r["model"] == model and r["mode"] == "train" and r["impl"] == "vitkit" and not r["compiled"]]
        if synthetic:
            rec["synthetic_train_images_per_s"] = synthetic[0]["images_per_s"]
            rec["e2e_over_synthetic"] = lines[-1]["images_per_s"] / synthetic[0]["images_per_s"]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# -- D: time to accuracy -------------------------------------------------------------------------------------------

def plan_epochs(train_images_per_s: float | None, budget_s: float) -> int:
    """Epochs of CIFAR-10 that fit the budget at the measured (eager) speed, after data loading, compilation
    and validation (about 75 s together), with 15% to spare; the cosine schedule then ends inside the budget."""
    if not train_images_per_s:
        return 10
    return max(5, min(100, int((budget_s - 75) * 0.85 * train_images_per_s / CIFAR_TRAIN_IMAGES)))


def stage_d(rec: Record, data: Path, dry: bool, out: Path) -> None:
    run_dir = out / "cifar10_run"
    shutil.rmtree(run_dir, ignore_errors=True)
    budget = (DRY_BUDGET_S if dry else BUDGET_S)["D"] - 10  # leaves time to read the metrics
    argv = [sys.executable, "-m", "vitkit.cli", "train", "-c", "configs/vit/cifar10_gpu.yaml", "--data_dir", str(data),
            "--ckpt_save_dir", str(run_dir)]
    if dry:
        argv += ["--smoke", "--device", "cpu", "--compile", "false", "--amp_level", "O0"]
    else:
        epochs = plan_epochs(load_stage(out, "B").get("cifar_model_train_images_per_s"), budget)
        argv += ["--epoch_size", str(epochs), "--warmup_epochs", str(max(1, epochs // 20)),
                 "--val_interval", str(max(1, epochs // 10)), "--ckpt_save_interval", str(epochs)]
        rec["epochs"] = epochs
    rec["command"] = " ".join(argv[2:]).replace("vitkit.cli", "vitkit", 1)
    t0 = time.perf_counter()
    rc, _ = run_cmd(argv, budget, log=out / "cifar10_train.log")
    rec["rc"], rec["wall_s"] = rc, time.perf_counter() - t0
    metrics = run_dir / "metrics.jsonl"
    points = [json.loads(x) for x in metrics.read_text().splitlines()] if metrics.is_file() else []
    rec["points"] = [{"epoch": p["epoch"], "elapsed_s": p.get("elapsed_s"), "top1": p.get("val_top1"),
                      "top1_ema": p.get("val_top1_ema"), "images_per_s": p.get("images_per_s")}
                     for p in points if p.get("val_top1") is not None]
    best = [max(v for v in (p["top1"], p["top1_ema"]) if v is not None) for p in rec.data["points"]]
    rec["best_top1"] = max(best) if best else None
    reached = [p["elapsed_s"] for p, b in zip(rec.data["points"], best) if b >= CIFAR_TARGET]
    rec["seconds_to_target"] = reached[0] if reached else None


STAGES = {"A": stage_a, "B": stage_b, "C": stage_c, "D": stage_d}


# -- the report ---------------------------------------------------------------------------------------------------

def verdict(ok: bool | None) -> str:
    return "not measured" if ok is None else ("PASS" if ok else "MISS")


def report(out: Path, dry: bool, command: str) -> tuple[str, dict[str, Any]]:
    st = {s: load_stage(out, s) for s in STAGES}
    a, b, c, d = st["A"], st["B"], st["C"], st["D"]
    dry_note = " (DRY RUN on the CPU: tiny sizes, no figure counts)" if dry else ""
    lines = [f"# vitkit GPU kit: {a.get('device', '?')}{dry_note}",
             "", f"command: `{command}`", f"date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
             f"host CPU: {a.get('host_cpu', '?')}", f"versions: {json.dumps(a.get('versions', {}))}", ""]
    for s in STAGES:
        error = f": {st[s]['error']}" if st[s].get("error") else ""
        lines.append(f"stage {s}: {st[s].get('status', 'did not run')} ({st[s].get('seconds', 0):.0f} s of "
                     f"{(DRY_BUDGET_S if dry else BUDGET_S)[s]} s){error}")
    lines += ["", "## A. Environment and ceilings", ""]
    if "matmul" in a:
        m = a["matmul"]
        lines.append(f"- {m['dtype']} {m['n']}^3 matmul: {m['tflops']:.3g} TFLOP/s (the MFU ceiling below)")
    if "copy" in a:
        lines.append(f"- device copy: {a['copy']['gb_per_s']:.0f} GB/s (bytes read + written)")
    if "missing_features" in a:
        lines.append(f"- library features vitkit needs: {'all present' if not a['missing_features'] else 'MISSING'}")
        lines += [f"  - {f}" for f in a["missing_features"]]
    if "pytest_gpu" in a:
        p = a["pytest_gpu"]
        lines.append(f"- `pytest -m gpu`: {p['summary']} (rc {p['rc']})")
        lines += [f"  - {f}" for f in p["failures"]]
    if a.get("nvidia_smi"):
        lines += ["", "```", *a["nvidia_smi"].splitlines()[:20], "```"]
    lines += ["", f"## B. Throughput against timm, same process ({b.get('precision', '?')}, images/s)", "",
              "| model | mode | batch | compiled | vitkit | timm | vitkit/timm | MFU | peak MB | warm-up s | target |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    verdicts: list[tuple[str, bool | None]] = []
    rows = b.get("results", [])
    keys = sorted({(r["model"], r["mode"], r["compiled"]) for r in rows}, key=lambda k: [str(x) for x in k])
    best: dict[tuple[str, str], tuple[float, float]] = {}
    for model, mode, compiled in keys:
        pair = {r["impl"]: r for r in rows if (r["model"], r["mode"], r["compiled"]) == (model, mode, compiled)}
        ours, ref = pair.get("vitkit"), pair.get("timm")
        if ours is None:
            continue
        ratio = ours["images_per_s"] / ref["images_per_s"] if ref else None
        target = TARGETS.get((model, mode))
        goal = f">= {target:,}, >= {TIMM_RATIO_TARGET}x timm" if target else "-"
        if ratio is not None and ours["images_per_s"] > best.get((model, mode), (0.0, 0.0))[0]:
            best[(model, mode)] = (ours["images_per_s"], ratio)
        mfu = f"{ours['mfu']:.1%}" if ours.get("mfu") is not None else "-"
        mem = f"{ours['peak_mem_mb']:.0f}" if ours.get("peak_mem_mb") is not None else "-"
        lines.append(f"| {model} | {mode} | {ours['batch']} | {'yes' if compiled else 'no'} | "
                     f"{ours['images_per_s']:.0f} | {ref['images_per_s']:.0f} | {ratio:.2f}x | {mfu} | {mem} | "
                     f"{ours.get('warmup_s', 0):.1f} | {goal} |"
                     if ref else f"| {model} | {mode} | {ours['batch']} | {compiled} | {ours['images_per_s']:.0f} "
                     f"| - | - | {mfu} | {mem} | - | - |")
    for (model, mode), target in TARGETS.items():
        got = best.get((model, mode))
        verdicts.append((f"{model} {mode} >= {target:,} images/s", None if got is None or dry else got[0] >= target))
        verdicts.append((f"{model} {mode} >= {TIMM_RATIO_TARGET}x timm",
                         None if got is None or dry else got[1] >= TIMM_RATIO_TARGET))
    if isinstance(b.get("compiled"), str):
        lines.append(f"\ncompiled: {b['compiled']}")
    lines += ["", "## C. Data (GPU decode: nvJPEG, crop, flip, normalize at 224 px)", ""]
    for key, label in (("cifar_jpeg_loader_images_per_s", "CIFAR-10 JPEGs (32x32)"),
                       ("large_jpeg_loader_images_per_s", "re-encoded 500x375 JPEGs")):
        if key in c:
            lines.append(f"- loader, {label}: {c[key]:.0f} images/s")
    if "e2e_train_images_per_s" in c:
        lines.append(f"- end to end, {c['e2e_model']} training on the 500x375 JPEGs: {c['e2e_train_images_per_s']:.0f} "
                     f"images/s (data wait {100 * c['e2e_data_wait']:.0f}%)")
    if "e2e_over_synthetic" in c:
        lines.append(f"- over its synthetic figure in B ({c['synthetic_train_images_per_s']:.0f}): "
                     f"{c['e2e_over_synthetic']:.0%} (target >= {REAL_JPEG_TARGET:.0%})")
    verdicts.append((f"real-JPEG end-to-end >= {REAL_JPEG_TARGET:.0%} of synthetic",
                     None if "e2e_over_synthetic" not in c or dry else c["e2e_over_synthetic"] >= REAL_JPEG_TARGET))
    lines += ["", "## D. Time to accuracy: CIFAR-10 from scratch (configs/vit/cifar10_gpu.yaml)", ""]
    if "command" in d:
        lines.append(f"`{d['command']}` (rc {d.get('rc')}, {d.get('wall_s', 0):.0f} s; killed at the budget "
                     f"when rc is None)")
        lines += ["", "| epoch | elapsed s | test top-1 | EMA top-1 | train images/s |", "|---|---|---|---|---|"]
        for p in d.get("points", []):
            ema = f"{p['top1_ema']:.2f}" if p.get("top1_ema") is not None else "-"
            lines.append(f"| {p['epoch']} | {p['elapsed_s']} | {p['top1']:.2f} | {ema} | {p['images_per_s']:.0f} |")
        lines.append(f"\nbest top-1 {d.get('best_top1')}; seconds to {CIFAR_TARGET:.0f}%: {d.get('seconds_to_target')}"
                     f" (goal on the way: {CIFAR_GOAL:.0f}%)")
    verdicts.append((f"CIFAR-10 >= {CIFAR_TARGET:.0f}% test top-1 within stage D's budget",
                     None if dry or "best_top1" not in d else (d["best_top1"] or 0) >= CIFAR_TARGET))
    lines += ["", "## Targets", ""] + [f"- {name}: {verdict(ok)}" for name, ok in verdicts]
    results = {"dry_run": dry, "stages": st, "targets": {name: verdict(ok) for name, ok in verdicts}}
    return "\n".join(lines) + "\n", results


# -- driver ---------------------------------------------------------------------------------------------------------

def run_stage(stage: str, out: Path, data: Path, dry: bool) -> None:
    rec = Record(out, stage)
    t0 = time.perf_counter()
    try:
        STAGES[stage](rec, data, dry, out)
        rec.data["status"] = "ok"
    except Exception as e:  # the report says which stage failed and why; the next stage still runs
        import traceback

        rec.data["status"], rec.data["error"] = "failed", f"{type(e).__name__}: {e}"
        (out / f"stage_{stage}.traceback.txt").write_text(traceback.format_exc())
    rec["seconds"] = time.perf_counter() - t0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--data", type=Path, required=True, help="CIFAR-10 root with train/ and test/ class folders")
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("--stage", choices=tuple(STAGES))
    a = p.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    data = a.data.resolve()
    if a.stage:
        run_stage(a.stage, a.out, data, a.dry_run)
        return 0
    budgets = DRY_BUDGET_S if a.dry_run else BUDGET_S
    for stage in STAGES:
        (a.out / f"stage_{stage}.json").unlink(missing_ok=True)
        cmd = [sys.executable, __file__, "--out", str(a.out), "--data", str(data), "--stage", stage]
        rc, _ = run_cmd(cmd + (["--dry-run"] if a.dry_run else []), budgets[stage], log=a.out / f"stage_{stage}.log")
        if rc is None or rc != 0:  # killed at its limit (its JSON keeps what it finished) or crashed
            rec = load_stage(a.out, stage) or {"stage": stage}
            rec["status"] = "timed out" if rc is None else f"crashed (rc {rc})"
            rec.setdefault("seconds", budgets[stage])
            (a.out / f"stage_{stage}.json").write_text(json.dumps(rec, indent=1, default=str))
    command = "bash benchmarks/gpu/run.sh" + (" --dry-run" if a.dry_run else "")
    text, results = report(a.out, a.dry_run, command)
    (a.out / "report.md").write_text(text)
    (a.out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
