"""Each backbone family against timm's own model of the same name, in the same process (issue 15).

One registry name per family (the smallest published shape), `vitkit benchmark`'s measurement
(`vitkit.tools.benchmark.run`: same weights, same batch, interleaved repeats, median) in inference and in a
train step. The train step gives both sides torch's fused AdamW (`same_optimizer`), so the ratio compares the
models alone. timm's reference is `timm.create_model(<timm name>, pretrained=False)`: VisionTransformer or Eva
with timm's own layers, holding vitkit's weights.

    python benchmarks/bench_families.py --out benchmarks/results/families_cpu.md
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import torch

from vitkit.engine.monitor import cpu_model
from vitkit.models import get_spec
from vitkit.models.registry import timm_model_name
from vitkit.tools.benchmark import run

# family -> (registry name, image size used here: the published one, DINOv2's 518 at the 224 it is finetuned at)
FAMILIES = {
    "DeiT III": ("deit3_s_16_224", None),
    "DINOv2 + registers": ("vit_s_14_reg4_dinov2", 224),
    "DINOv3 (RoPE, 4 registers)": ("vit_s_16_dinov3", None),
    "SigLIP (MAP head)": ("vit_b_16_siglip_224", None),
    "CLIP (pre-norm, quick-GELU)": ("vit_b_32_clip_224", None),
    "EVA-02 (SwiGLU, RoPE)": ("eva02_ti_14_224", None),
    "ROPE-ViT": ("vit_s_16_rope_224", None),
}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--families", nargs="+", default=list(FAMILIES), help="subset of: " + ", ".join(FAMILIES))
    p.add_argument("--out", default=None)
    a = p.parse_args()
    import timm

    load = os.getloadavg()
    lines = ["# Backbone families against timm on the CPU (bench_families)", "",
             f"command: `python benchmarks/bench_families.py {' '.join(sys.argv[1:])}`  ",
             f"date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}  ",
             f"CPU: {cpu_model()}, {torch.get_num_threads()} torch threads  ",
             f"versions: torch {torch.__version__}, timm {timm.__version__}, python {platform.python_version()}  ",
             f"load average (1, 5, 15 min) at the start: {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f}  ",
             f"batch {a.batch_size}, fp32, median of {a.repeats} interleaved repeats x {a.steps} steps; train: "
             f"forward, cross-entropy, backward, torch's fused AdamW on both sides", "",
             "ratio: of the medians; paired: the median over repeats of the two back-to-back timings' ratio "
             "(cancels the machine's drift)", "",
             "| family | name (timm's) | input | infer vitkit/timm | infer paired | train vitkit/timm | train paired |",
             "|---|---|---|---:|---:|---:|---:|"]
    worst = worst_paired = float("inf")
    for family in a.families:
        name, size = FAMILIES[family]
        res = run(name, a.batch_size, mode="both", compare="timm", steps=a.steps, warmup=1, repeats=a.repeats,
                  device="cpu", img_size=size, same_optimizer=True)
        cells = []
        for mode in ("infer", "train"):
            ours = next(r for r in res if r.mode == mode and r.impl == "vitkit")
            ref = next(r for r in res if r.mode == mode and r.impl != "vitkit")
            ratio = ours.images_per_s / ref.images_per_s
            worst = min(worst, ratio)
            worst_paired = min(worst_paired, ours.paired_ratio or 0.0)
            cells.append(f"{ratio:.3f} ({ours.images_per_s:.1f} vs {ref.images_per_s:.1f} img/s)")
            cells.append(f"{ours.paired_ratio:.3f}")
        spec = get_spec(name)
        px = size or spec.arch.img_size
        row = f"| {family} | {name} ({timm_model_name(name)}) | {px} px | " + " | ".join(cells) + " |"
        lines.append(row)
        print(row, flush=True)
    lines += ["", f"lowest ratio of medians: {worst:.3f}; lowest paired ratio: {worst_paired:.3f} (target >= 0.97)"]
    text = "\n".join(lines) + "\n"
    print(text)
    if a.out:
        Path(a.out).write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
