"""Load test of `vitkit serve` on loopback: a bounded number of requests from concurrent clients.

  .venv/bin/python benchmarks/bench_serve.py        # a seeded vit_n_4_32 checkpoint and its ONNX export, made here
  .venv/bin/python benchmarks/bench_serve.py --source ckpt.safetensors --source model.onnx --requests 500

Each source is served by `vitkit serve` in its own process (so the clients here do not share its GIL); after
a warm-up, `--concurrency` clients send `--requests` POST /predict requests in total, cycling through real
CIFAR-10 test images. Reported: requests/s over the whole load, latency percentiles per request, errors, and
the server's mean batch size (dynamic batching). Results go to `--out` as markdown with the command,
versions and device.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import platform
import shlex
import socket
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import httpx
import numpy as np

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_sources(folder: Path) -> list[str]:
    """A seeded vit_n_4_32 (the CIFAR-size model) checkpoint and its ONNX export: the numbers measure serving,
    not accuracy."""
    import torch

    from vitkit.data.preprocess import DataConfig
    from vitkit.engine.checkpoint import save_checkpoint
    from vitkit.models import create_model, get_spec
    from vitkit.tools.export import run_export
    from vitkit.tools.inference import load_inference_model

    torch.manual_seed(0)
    spec = get_spec("vit_n_4_32")
    ckpt = save_checkpoint(folder / "vit_n_4_32.safetensors", create_model("vit_n_4_32"), model_name="vit_n_4_32",
                           data_config=DataConfig(32, spec.mean, spec.std, spec.interpolation, spec.crop_pct))
    onnx_path = folder / "vit_n_4_32.onnx"
    run_export(load_inference_model(str(ckpt)), "onnx", onnx_path, check_folder=str(REPO / "data/cifar10_sample/test"))
    return [str(ckpt), str(onnx_path)]


async def load(url: str, bodies: list[bytes], requests: int, concurrency: int) -> tuple[list[float], int, float]:
    """(latencies in s, errors, wall time) of `requests` requests from `concurrency` clients."""
    latencies: list[float] = []
    errors = 0
    next_index = iter(range(requests))

    async def client(ac: httpx.AsyncClient) -> None:
        nonlocal errors
        for i in next_index:  # a shared iterator: exactly `requests` requests in all
            t0 = time.perf_counter()
            try:
                r = await ac.post("/predict", content=bodies[i % len(bodies)])
                ok = r.status_code == 200
            except httpx.HTTPError:
                ok = False
            latencies.append(time.perf_counter() - t0)
            errors += not ok

    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as ac:
        start = time.perf_counter()
        await asyncio.gather(*(client(ac) for _ in range(concurrency)))
        return latencies, errors, time.perf_counter() - start


def bench_one(source: str, args: argparse.Namespace, bodies: list[bytes]) -> dict[str, Any]:
    port = free_port()
    cmd = [sys.executable, "-m", "vitkit.cli", "serve", source, "--port", str(port),
           "--max_batch_size", str(args.max_batch_size), "--max_wait_ms", str(args.max_wait_ms),
           "--threads", str(args.threads)]
    server = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if server.poll() is not None:
                raise RuntimeError(f"server exited: {server.stderr.read() if server.stderr else ''}")
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("server did not start within 120 s")
            time.sleep(0.2)
        asyncio.run(load(url, bodies, args.warmup, args.concurrency))
        before = httpx.get(url + "/health").json()
        latencies, errors, wall = asyncio.run(load(url, bodies, args.requests, args.concurrency))
        after = httpx.get(url + "/health").json()
        meta = httpx.get(url + "/metadata").json()
    finally:
        server.terminate()  # the process we started, by its handle
        server.wait(30)
    ms = np.array(latencies) * 1000
    batches = after["batches"] - before["batches"]
    return {"source": source, "model": meta["model_name"], "backend": meta["backend"], "requests": len(latencies),
            "errors": errors, "rps": len(latencies) / wall, "p50": float(np.percentile(ms, 50)),
            "p90": float(np.percentile(ms, 90)), "p99": float(np.percentile(ms, 99)), "max": float(ms.max()),
            "mean_batch": (after["images"] - before["images"]) / batches if batches else float("nan")}


def versions() -> str:
    import onnxruntime
    import starlette
    import torch
    import uvicorn

    import vitkit

    return (f"vitkit {vitkit.__version__}, torch {torch.__version__}, onnxruntime {onnxruntime.__version__}, "
            f"starlette {starlette.__version__}, uvicorn {uvicorn.__version__}, httpx {httpx.__version__}, "
            f"Python {platform.python_version()}")


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def write_report(path: Path, rows: list[dict[str, Any]], args: argparse.Namespace, note: str) -> None:
    argv = [a for i, a in enumerate(sys.argv[1:]) if a != "--note" and (i == 0 or sys.argv[i] != "--note")]
    cmd = shlex.join(["python", "benchmarks/bench_serve.py", *argv])  # the --note text is commentary, left out
    lines = [
        "# vitkit serve: load test on loopback (CPU)",
        "",
        f"Command: `{cmd}`  ",
        f"Date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC  ",
        f"Device: {cpu_name()}, {os.cpu_count()} logical CPUs, no GPU; server and clients on the same machine  ",
        f"Versions: {versions()}  ",
        f"Load average (1 min) before / after: {args.load_before:.2f} / {os.getloadavg()[0]:.2f}  ",
        f"Load: {args.requests} POST /predict requests (after {args.warmup} warm-up) from {args.concurrency} "
        f"concurrent clients, JPEG bodies from data/cifar10_sample/test; server batching: up to "
        f"{args.max_batch_size} requests or {args.max_wait_ms} ms.",
        "",
        "| model | backend | requests | errors | requests/s | p50 ms | p90 ms | p99 ms | max ms | mean batch |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['model']} | {r['backend']} | {r['requests']} | {r['errors']} | {r['rps']:.1f} | "
                     f"{r['p50']:.1f} | {r['p90']:.1f} | {r['p99']:.1f} | {r['max']:.1f} | {r['mean_batch']:.1f} |")
    if note:
        lines += ["", note]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", action="append", help="checkpoint / model name / .onnx to serve (repeatable)")
    p.add_argument("--requests", type=int, default=500)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--warmup", type=int, default=32)
    p.add_argument("--max_batch_size", type=int, default=16)
    p.add_argument("--max_wait_ms", type=float, default=5.0)
    p.add_argument("--threads", type=int, default=0, help="server intra-op threads (0: runtime default)")
    p.add_argument("--out", default=str(REPO / "benchmarks/results/serve_cpu.md"))
    p.add_argument("--note", default="", help="a line added to the report (e.g. machine load)")
    args = p.parse_args()
    args.load_before = os.getloadavg()[0]  # the machine may be shared: record how busy it was
    files = sorted((REPO / "data/cifar10_sample/test").glob("*/000[0-9].jpg"))
    bodies = [f.read_bytes() for f in files]
    with tempfile.TemporaryDirectory() as tmp:
        sources = args.source or make_sources(Path(tmp))
        rows = []
        for source in sources:
            row = bench_one(source, args, bodies)
            rows.append(row)
            print(f"{row['model']} ({row['backend']}): {row['requests']} requests, {row['errors']} errors, "
                  f"{row['rps']:.1f} requests/s, p50 {row['p50']:.1f} ms, p90 {row['p90']:.1f} ms, "
                  f"p99 {row['p99']:.1f} ms, mean batch {row['mean_batch']:.1f}")
    write_report(Path(args.out), rows, args, args.note)
    print(f"wrote {args.out}")
    return 1 if any(r["errors"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
