"""A long fuzz run of every input boundary (issue 17), recorded: no traceback, no 5xx, in a fixed budget.

The default suite runs each boundary's hypothesis test with a small budget; this runs the same tests with
`VITKIT_FUZZ_EXAMPLES` examples each (no example database, so every run draws afresh) and writes one table:
boundary, test, examples that passed / failed / were invalid (hypothesis' own statistics), wall time.

    .venv/bin/python benchmarks/fuzz_boundaries.py --examples 1000 --out benchmarks/results/fuzz_cpu.md

A failing example is printed by pytest in full (the input that broke the boundary) and the script exits 1.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vitkit.engine.monitor import cpu_model  # noqa: E402

BOUNDARIES = [
    ("command line", "tests/test_reliability.py::test_command_line_fuzz_raises_only_config_errors",
     "argv lists of flags, values and junk: a ConfigError or a valid config"),
    ("config (YAML / mapping)", "tests/test_reliability.py::test_yaml_and_dict_fuzz_raises_only_config_errors",
     "typed values and random mappings: a ConfigError or a config that round-trips"),
    ("config (YAML text)", "tests/test_reliability.py::test_any_yaml_text_raises_only_config_errors",
     "any text as a -c file: a ConfigError or a config"),
    ("checkpoint", "tests/test_hostile_checkpoints.py::test_fuzzed_checkpoints_load_or_fail_in_one_line",
     "metadata values, arch fields, byte cuts/overwrites of a good checkpoint: loads and builds, or one line"),
    ("training state", "tests/test_hostile_checkpoints.py::test_fuzzed_training_states_load_or_fail_in_one_line",
     "keys removed/replaced, byte cuts/overwrites of a good state: loads, or one line"),
    ("resume (state applied)", "tests/test_hostile_resume.py::test_fuzzed_states_resume_and_step_or_fail_in_one_line",
     "any nested value of the run's own state replaced, removed or its bytes cut: resumes and steps, or one line"),
    ("image decode", "tests/test_predict.py::test_fuzzed_image_bytes_give_a_tensor_or_a_clear_image_error",
     "cut, flipped and junk-extended JPEG/PNG bytes: a tensor or an ImageError"),
    ("HTTP /predict", "tests/test_serve_hostile.py::test_fuzzed_bodies_never_get_a_5xx",
     "crafted bodies (truncated, bombs, headers, junk) to the running app: 200/400/413/415, never 5xx"),
]
STATS = re.compile(r"(\d+) passing, (\d+) failing, and (\d+) invalid")  # hypothesis' statistics line
EVENTS = re.compile(r"\* ([\d.]+)%, (.+)")  # a test's own hypothesis.event() outcomes, with their share


def run_one(node: str, examples: int, seed: int) -> dict:
    env = {**os.environ, "VITKIT_FUZZ_EXAMPLES": str(examples), "OMP_NUM_THREADS": "1"}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-W", "ignore",
                           "--hypothesis-show-statistics", "--hypothesis-seed", str(seed), node],
                          cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    found = [tuple(map(int, m)) for m in STATS.findall(proc.stdout)]
    passing, failing, invalid = (sum(x[i] for x in found) for i in range(3))
    generate = proc.stdout.split("during generate phase")[1:2]  # the outcomes of the fresh draws, not the shrinks
    events = [f"{name.strip()} {float(share):.0f}%" for share, name in EVENTS.findall(generate[0] if generate else "")
              if not name.startswith(("Retried draw", "Draw for"))]  # hypothesis' own bookkeeping
    return {"rc": proc.returncode, "wall": wall, "passing": passing, "failing": failing, "invalid": invalid,
            "events": events, "tail": proc.stdout[-4000:] + proc.stderr[-2000:]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--examples", type=int, default=1000, help="examples per boundary (hypothesis max_examples)")
    p.add_argument("--seed", type=int, default=int(time.time()), help="hypothesis seed (default: the clock)")
    p.add_argument("--only", nargs="*", help="boundary names to run (default: all)")
    p.add_argument("--out", type=Path, help="write the markdown table here")
    args = p.parse_args()
    rows, bad = [], 0
    date = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    load_before = os.getloadavg()[0]
    for name, node, what in BOUNDARIES:
        if args.only and name not in args.only:
            continue
        r = run_one(node, args.examples, args.seed)
        ok = r["rc"] == 0 and r["failing"] == 0
        bad += not ok
        print(f"{name:26s} {'ok ' if ok else 'FAIL'} {r['passing']:6d} passing {r['failing']:3d} failing "
              f"{r['invalid']:5d} invalid {r['wall']:7.1f} s", flush=True)
        if not ok:
            print(r["tail"], file=sys.stderr)
        rows.append(f"| {name} | {what} | {r['passing']} | {r['failing']} | {r['invalid']} | {r['wall']:.0f} s | "
                    f"{'pass' if ok else 'FAIL (pytest rc ' + str(r['rc']) + ')'} | {'; '.join(r['events'])} |")
    if args.out:
        args.out.write_text("\n".join([
            "# Fuzz run of every input boundary (issue 17)", "",
            f"Command: `python benchmarks/fuzz_boundaries.py --examples {args.examples} --seed {args.seed}`  ",
            f"Date: {date}  ",
            f"Device: {cpu_model()}, {os.cpu_count()} logical CPUs; load average (1 min) at start "
            f"{load_before:.2f}  ",
            "Each row is one hypothesis test of the default suite run with this budget (fresh random draws, no "
            "example database); `passing` counts inputs the boundary handled as specified, `failing` any that "
            "raised something else (a traceback) or got a 5xx.", "",
            "| boundary | inputs | passing | failing | invalid | wall | result | outcomes (recorded by the test) |",
            "|---|---|---:|---:|---:|---:|---|---|", *rows, ""]))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
