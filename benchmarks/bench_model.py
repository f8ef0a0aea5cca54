"""Forward and train-step images/s of vitkit's model beside timm's same architecture (issues 2 and 7).

Same process, same batch, same weights, interleaved repeats, median. Prints a markdown table with the ratio
vitkit/timm; `--out FILE` also writes it with the command and versions.

    python benchmarks/bench_model.py                       # CPU: vit_b_32_224 @ 8 and vit_ti_4_32 @ 128
    python benchmarks/bench_model.py --compile             # both sides torch.compile'd
    python benchmarks/bench_model.py --same_optimizer      # train both with torch's fused AdamW: models alone
    python benchmarks/bench_model.py --cases vit_b_16_224:256 --precision bf16   # on a GPU

The train step is forward, cross-entropy, backward and an AdamW step, each toolkit's AdamW as its trainer
builds it (vitkit: torch's fused kernel; timm's create_optimizer_v2: torch's default, a for-loop on the CPU).
"""
from __future__ import annotations

import argparse
import sys
import time

from vitkit.tools.benchmark import environment, format_table, run

DEFAULT_CASES = ["vit_b_32_224:8", "vit_ti_4_32:128"]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", nargs="+", default=DEFAULT_CASES, help="MODEL:BATCH ...")
    p.add_argument("--precision", default="fp32")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--same_optimizer", action="store_true", help="torch's fused AdamW for both sides")
    p.add_argument("--out", default=None, help="also write the tables to this markdown file")
    a = p.parse_args()
    blocks = [f"command: `python {' '.join(sys.argv)}`", environment(),
              time.strftime("date: %Y-%m-%d %H:%M UTC", time.gmtime())]
    for case in a.cases:
        name, batch = case.split(":")
        results = run(name, int(batch), precision=a.precision, compile=a.compile, compare="timm",
                      steps=a.steps, repeats=a.repeats, same_optimizer=a.same_optimizer)
        flags = (", compiled" if a.compile else "") + (", same optimizer" if a.same_optimizer else "")
        table = format_table(results, f"\n### {name}, batch {batch}, {a.precision}{flags}\n")
        print(table, flush=True)
        blocks.append(table)
    if a.out:
        with open(a.out, "w") as f:
            f.write("# bench_model\n\n" + "\n".join(blocks) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
