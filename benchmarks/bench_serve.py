"""Load test of `vitkit serve` on loopback: a bounded number of requests from concurrent clients.

  .venv/bin/python benchmarks/bench_serve.py        # a seeded vit_n_4_32 checkpoint and its ONNX export, made here
  .venv/bin/python benchmarks/bench_serve.py --source ckpt.safetensors --source model.onnx --requests 500

Each source is served by `vitkit serve` in its own process (so the clients here do not share its GIL); after
a warm-up, `--concurrency` clients send `--requests` POST /predict requests in total, cycling through real
CIFAR-10 test images. Reported: requests/s over the whole load, latency percentiles per request, errors, and
the server's mean batch size (dynamic batching). Results go to `--out` as markdown with the command,
versions and device.

  .venv/bin/python benchmarks/bench_serve.py --mixed [--requests 2000 --concurrency 32]   # hostile soak

`--mixed` is a soak of one server (the seeded checkpoint, or the first --source) with a seeded mix of good
images (CIFAR-10 JPEGs and a 640x480 JPEG), bad files (the crafted corpus of tests/test_serve_hostile.py:
truncated, random, corrupt TIFF/GIF/DDS, ...) and bombs (a 20000x20000 PNG refused from its header, 39.7 Mpx
1-bit PNGs and a 16-bit PNG that are decoded). Reported: 5xx other than 503 (must be 0), good requests not
answered 200 (must be 0), 503s (the decode budget, by request kind), requests/s, and the server's RSS at the
start (after a warm-up), its peak, and after the load (must be back within 10% of the start). Results go
to benchmarks/results/serve_soak_cpu.md unless --out says otherwise.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import os
import platform
import random
import shlex
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
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


# -- --mixed: a soak with hostile requests ----------------------------------------------------------------------

def soak_bodies() -> dict[str, list[tuple[str, bytes]]]:
    """kind -> [(name, bytes)]: good images, bad files (the test corpus) and bombs."""
    sys.path.insert(0, str(REPO / "tests"))
    from PIL import Image
    from test_serve_hostile import hostile_corpus, png_bomb

    files = sorted((REPO / "data/cifar10_sample/test").glob("*/000[0-9].jpg"))
    good = [(f"{f.parent.name}/{f.name}", f.read_bytes()) for f in files]
    buf = io.BytesIO()
    Image.open(files[0]).convert("RGB").resize((640, 480), Image.BICUBIC).save(buf, "JPEG", quality=90)
    good.append(("640x480.jpg", buf.getvalue()))
    corpus = hostile_corpus()
    bad = [(name, data) for name, (data, _, kind) in corpus.items() if "bomb" not in name]
    buf = io.BytesIO()
    Image.fromarray(np.zeros((2390, 2390), np.uint16)).save(buf, "PNG")  # 5.7 Mpx at 7x: ~150 MB to decode
    bombs = [("png 20000x20000 (refused from its header)", corpus["png bomb 20000x20000"][0]),
             ("png 1-bit 6300x6300 = 39.7 Mpx", png_bomb(6300, 6300)), ("png 16-bit 2390x2390", buf.getvalue())]
    return {"good": good, "bad": bad, "bomb": bombs}


def rss_mb(pid: int, field: str = "VmRSS") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


class RssSampler(threading.Thread):
    """The server's RSS every 20 ms (its peak; VmHWM would include start-up)."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid, self.peak, self.stop = pid, 0.0, threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            with contextlib.suppress(OSError, ValueError):
                self.peak = max(self.peak, rss_mb(self.pid))
            time.sleep(0.02)


async def mixed_load(url: str, work: list[tuple[str, str, bytes]], concurrency: int) -> tuple[list, float]:
    """[(kind, name, status or 'connection error: ...')] for every request, and the wall time."""
    results: list[tuple[str, str, int | str]] = []
    queue = iter(work)

    async def client(ac: httpx.AsyncClient) -> None:
        for kind, name, body in queue:
            try:
                r = await ac.post("/predict", content=body)
                results.append((kind, name, r.status_code))
            except httpx.HTTPError as e:
                results.append((kind, name, f"connection error: {type(e).__name__}"))

    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as ac:
        start = time.perf_counter()
        await asyncio.gather(*(client(ac) for _ in range(concurrency)))
        return results, time.perf_counter() - start


def start_server(source: str, args: argparse.Namespace, extra: list[str]) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "vitkit.cli", "serve", source, "--port", str(port),
           "--max_batch_size", str(args.max_batch_size), "--max_wait_ms", str(args.max_wait_ms),
           "--threads", str(args.threads), *extra]
    server = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        if server.poll() is not None:
            raise RuntimeError(f"server exited: {server.stderr.read() if server.stderr else ''}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return server, url
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            server.terminate()
            raise RuntimeError("server did not start within 120 s")
        time.sleep(0.2)


def soak(source: str, args: argparse.Namespace) -> dict[str, Any]:
    bodies = soak_bodies()
    rng = random.Random(args.seed)
    work = []
    for _ in range(args.requests):
        r = rng.random()
        kind = "bomb" if r < args.bomb_share else "bad" if r < args.bomb_share + args.bad_share else "good"
        work.append((kind, *rng.choice(bodies[kind])))
    server, url = start_server(source, args, ["--quiet"])
    try:
        asyncio.run(mixed_load(url, [("good", n, b) for n, b in bodies["good"]] * 8, args.concurrency))  # warm-up
        time.sleep(1)
        rss_start = rss_mb(server.pid)
        sampler = RssSampler(server.pid)
        sampler.start()
        before = httpx.get(url + "/health").json()
        results, wall = asyncio.run(mixed_load(url, work, args.concurrency))
        deadline = time.monotonic() + 60
        while (h := httpx.get(url + "/health").json())["decoding_pixels"] or h["queued"]:
            assert time.monotonic() < deadline, "server still busy 60 s after the load"
            time.sleep(0.1)
        time.sleep(args.settle)
        rss_after = rss_mb(server.pid)
        sampler.stop.set()
        sampler.join()
        after = httpx.get(url + "/health").json()
        meta = httpx.get(url + "/metadata").json()
    finally:
        server.terminate()  # the process we started, by its handle
        try:
            _, err = server.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            _, err = server.communicate()
    statuses = Counter((kind, status) for kind, _, status in results)
    kinds = Counter(kind for kind, _, _ in results)
    server_errors = sum(n for (_, s), n in statuses.items() if isinstance(s, int) and s >= 500 and s != 503)
    lost = sum(n for (k, s), n in statuses.items() if k == "good" and s != 200)
    lost_why = Counter(s for k, _, s in results if k == "good" and s != 200)
    delta = Counter(after["errors_by_kind"]) - Counter(before["errors_by_kind"])
    return {"source": source, "model": meta["model_name"], "backend": meta["backend"], "requests": len(results),
            "kinds": kinds, "statuses": statuses, "server_errors": server_errors,
            "connection_errors": sum(n for (_, s), n in statuses.items() if isinstance(s, str)),
            "lost": lost, "lost_why": lost_why, "rps": len(results) / wall, "wall": wall,
            "rss_start": rss_start, "rss_peak": max(sampler.peak, rss_start), "rss_after": rss_after,
            "errors_by_kind": dict(sorted(delta.items())), "meta": meta,
            "error_lines": [line for line in err.splitlines() if line.startswith("error")]}


def write_soak_report(path: Path, row: dict[str, Any], args: argparse.Namespace) -> bool:
    argv = [a for i, a in enumerate(sys.argv[1:]) if a != "--note" and (i == 0 or sys.argv[i] != "--note")]
    cmd = shlex.join(["python", "benchmarks/bench_serve.py", *argv])
    by_kind = {kind: ", ".join(f"{n} x {s}" for (k, s), n in sorted(row["statuses"].items(), key=str) if k == kind)
               for kind in ("good", "bad", "bomb")}
    back = row["rss_after"] / row["rss_start"] - 1
    ok = row["server_errors"] == 0 and row["connection_errors"] == 0 and row["lost"] == 0 and back <= 0.10
    meta = row["meta"]
    lines = [
        "# vitkit serve: hostile soak on loopback (CPU)",
        "",
        f"Command: `{cmd}`  ",
        f"Date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC  ",
        f"Device: {cpu_name()}, {os.cpu_count()} logical CPUs, no GPU; server and clients on the same machine  ",
        f"Versions: {versions()}  ",
        f"Load average (1 min) before / after: {args.load_before:.2f} / {os.getloadavg()[0]:.2f}  ",
        f"Server: {row['model']} ({row['backend']}), max_batch_size {args.max_batch_size}, max_wait_ms "
        f"{args.max_wait_ms}, max_pixels {meta['max_pixels']:,}, max_decode_pixels {meta['max_decode_pixels']:,}, "
        f"decode_threads {meta['decode_threads']}, body_timeout {meta['body_timeout_s']} s  ",
        f"Load: {row['requests']} POST /predict from {args.concurrency} concurrent keep-alive clients (after a "
        f"warm-up of good images), seed {args.seed}: {row['kinds']['good']} good (CIFAR-10 JPEGs, a 640x480 JPEG), "
        f"{row['kinds']['bad']} bad files (tests/test_serve_hostile.py corpus), {row['kinds']['bomb']} bombs "
        f"(20000x20000 PNG, 39.7 Mpx 1-bit PNG, 5.7 Mpx 16-bit PNG).",
        "",
        "| figure | value | must be |",
        "|---|---|---|",
        f"| 5xx other than 503 | {row['server_errors']} | 0 |",
        f"| connection errors (reset, timeout) | {row['connection_errors']} | 0 |",
        f"| good requests lost (not 200) | {row['lost']} | 0 |",
        f"| requests/s (all kinds) | {row['rps']:.1f} | |",
        f"| server RSS at start (after warm-up) | {row['rss_start']:.0f} MB | |",
        f"| server RSS peak | {row['rss_peak']:.0f} MB | |",
        f"| server RSS after ({args.settle:g} s idle) | {row['rss_after']:.0f} MB ({back:+.1%}) | within +10% |",
        "",
        f"Answers by request kind: good: {by_kind['good']}; bad: {by_kind['bad']}; bombs: {by_kind['bomb']}.  ",
        f"Server /health, errors by kind during the load: {row['errors_by_kind']}.  ",
        f"Server `error:` log lines: {len(row['error_lines'])}.  ",
        f"Verdict: {'PASS' if ok else 'FAIL'}.",
    ]
    if row["lost_why"]:
        lines.append(f"Good requests lost, by answer: {dict(row['lost_why'])}.")
    if args.note:
        lines += ["", args.note]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return ok


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
    p.add_argument("--mixed", action="store_true", help="hostile soak: good, bad and bomb requests (see above)")
    p.add_argument("--bad_share", type=float, default=0.15, help="--mixed: share of bad files")
    p.add_argument("--bomb_share", type=float, default=0.04, help="--mixed: share of bombs")
    p.add_argument("--seed", type=int, default=0, help="--mixed: seed of the request mix")
    p.add_argument("--settle", type=float, default=3.0, help="--mixed: idle seconds before the RSS after")
    args = p.parse_args()
    args.load_before = os.getloadavg()[0]  # the machine may be shared: record how busy it was
    if args.mixed:
        defaults = {"requests": 2000, "concurrency": 32, "out": str(REPO / "benchmarks/results/serve_soak_cpu.md")}
        for name, value in defaults.items():
            if getattr(args, name) == p.get_default(name):
                setattr(args, name, value)
        with tempfile.TemporaryDirectory() as tmp:
            row = soak((args.source or make_sources(Path(tmp)))[0], args)
        ok = write_soak_report(Path(args.out), row, args)
        print(f"{row['model']} ({row['backend']}): {row['requests']} requests ({dict(row['kinds'])}), "
              f"{row['server_errors']} 5xx other than 503, {row['connection_errors']} connection errors, "
              f"{row['lost']} good lost, {row['rps']:.1f} requests/s, RSS {row['rss_start']:.0f} -> peak "
              f"{row['rss_peak']:.0f} -> {row['rss_after']:.0f} MB; {'PASS' if ok else 'FAIL'}")
        print(f"wrote {args.out}")
        return 0 if ok else 1
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
