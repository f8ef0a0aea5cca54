"""`vitkit serve CKPT|MODEL.onnx [--host 127.0.0.1 --port 8000]`: an HTTP service answering top-k classes.

  POST /predict[?topk=5]  body: the image bytes (any Content-Type), or multipart/form-data with one file
                          -> {"model", "predictions": [{"index", "label", "probability"}, ...]}
  GET  /health            -> {"status": "ok", ...}
  GET  /metadata          -> model name, classes, preprocessing, batching and limits

Server stack: Starlette + uvicorn. Both are small, well-kept ASGI projects (Starlette is the core FastAPI is
built on; uvicorn is the reference ASGI server), and an asyncio server is what dynamic batching needs:
waiting requests are futures on one event loop, not blocked threads. A checkpoint runs in PyTorch; an
exported `.onnx` runs in onnxruntime with the preprocessing recorded in `<model>.onnx.json` by `vitkit export`.

Dynamic batching: requests are decoded and preprocessed in a thread pool, then queued; one batcher takes up to
`--max_batch_size` of them, waiting at most `--max_wait_ms` after the first for others to arrive, and runs
them as one batch in a worker thread. Safety: uploads above `--max_upload_mb` get 413 without being held in
memory, images above `--max_pixels` get 413 before any pixel is decoded (a decompression bomb is refused from
its header), anything that is not a usable image gets 400/415, a full queue gets 503; the service keeps serving.

Output (stderr): one line when it listens (URL, model, backend), then one access line per request (time,
client, method, path, status, milliseconds); `--quiet` keeps the first and drops the access lines.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from vitkit.args import VerbParser
from vitkit.data.preprocess import DataConfig
from vitkit.data.transforms import build_transform
from vitkit.errors import VitkitError
from vitkit.tools import inference
from vitkit.tools.export import metadata_path

IMAGE_ERROR_STATUS = {"empty": 400, "corrupt": 400, "unsupported": 415, "too_large": 413}


class HTTPError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


# -- backends: bytes -> preprocessed array (any thread), stacked arrays -> probabilities (the worker thread) --

class TorchBackend:
    """A vitkit checkpoint (or registered name) in eager PyTorch."""

    def __init__(self, im: inference.InferenceModel):
        self.im, self._transform, self.class_names = im, im.transform(), im.class_names
        self.device = next(im.model.parameters()).device

    def preprocess(self, data: bytes, max_pixels: int) -> np.ndarray:
        return inference.image_to_tensor(data, self._transform, max_pixels=max_pixels).numpy()

    @torch.no_grad()
    def infer(self, batch: np.ndarray) -> np.ndarray:
        return self.im.model(torch.from_numpy(batch).to(self.device)).float().softmax(-1).cpu().numpy()

    def metadata(self) -> dict[str, Any]:
        return {**self.im.metadata(), "backend": f"pytorch {torch.__version__} on {self.device}"}


class OnnxBackend:
    """An exported ONNX model in onnxruntime; preprocessing from the metadata `vitkit export` wrote beside it."""

    def __init__(self, path: Path, threads: int = 0):
        import onnxruntime as ort

        meta_file = metadata_path(path)
        if not meta_file.is_file():
            raise VitkitError(f"{meta_file} is missing: serve needs the metadata `vitkit export` writes beside the "
                              f"model (classes and preprocessing)")
        self.meta = json.loads(meta_file.read_text())
        self.class_names: list[str] = self.meta["classes"]
        self.with_preprocess = bool(self.meta.get("with_preprocess"))
        dc = DataConfig.from_dict({**self.meta, "input_size": self.meta["input_size"][-1]})
        # uint8 crop when the graph normalizes itself, else the normalized tensor validate uses
        self._transform = build_transform(dc, train=False, normalize=not self.with_preprocess)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        self._version = ort.__version__

    def preprocess(self, data: bytes, max_pixels: int) -> np.ndarray:
        x = inference.image_to_tensor(data, self._transform, max_pixels=max_pixels)
        return x.permute(1, 2, 0).contiguous().numpy() if self.with_preprocess else x.numpy()  # HWC uint8 / CHW

    def infer(self, batch: np.ndarray) -> np.ndarray:
        out = self.session.run(None, {self.input_name: batch})[0]
        if self.with_preprocess:
            return out
        out = out - out.max(axis=-1, keepdims=True)  # softmax of the logits, stable
        e = np.exp(out)
        return e / e.sum(axis=-1, keepdims=True)

    def metadata(self) -> dict[str, Any]:
        keep = ("model_name", "num_classes", "classes", "input_size", "mean", "std", "interpolation", "crop_pct",
                "resize_size", "with_preprocess", "dynamic_size", "check")
        return {**{k: self.meta[k] for k in keep if k in self.meta}, "backend": f"onnxruntime {self._version}"}


def load_backend(source: str, *, model_name: str | None = None, use_ema: bool = False, device: str = "cpu",
                 threads: int = 0) -> TorchBackend | OnnxBackend:
    if source.endswith(".onnx"):
        if not Path(source).is_file():
            raise VitkitError(f"{source} does not exist")
        return OnnxBackend(Path(source), threads)
    if threads:
        torch.set_num_threads(threads)
    return TorchBackend(inference.load_inference_model(source, model_name=model_name, use_ema=use_ema, device=device))


# -- dynamic batching ----------------------------------------------------------------------------------------

@dataclass
class _Job:
    x: np.ndarray
    future: asyncio.Future


class Batcher:
    """Gathers queued inputs into batches of up to `max_batch_size`, waiting at most `max_wait_ms`."""

    def __init__(self, infer: Callable[[np.ndarray], np.ndarray], max_batch_size: int, max_wait_ms: float,
                 max_queue: int):
        self.infer, self.max_batch_size, self.max_wait = infer, max_batch_size, max_wait_ms / 1000.0
        self.queue: asyncio.Queue[_Job] = asyncio.Queue(maxsize=max_queue)
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vitkit-infer")  # one batch at a time
        self.batches = self.images = 0

    async def submit(self, x: np.ndarray) -> np.ndarray:
        job = _Job(x, asyncio.get_running_loop().create_future())
        try:
            self.queue.put_nowait(job)
        except asyncio.QueueFull:
            raise HTTPError(503, f"server busy: {self.queue.maxsize} requests already queued; retry shortly") from None
        return await job.future

    async def _gather(self) -> list[_Job]:
        jobs = [await self.queue.get()]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.max_wait
        while len(jobs) < self.max_batch_size:
            try:
                jobs.append(self.queue.get_nowait())
                continue
            except asyncio.QueueEmpty:
                pass
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            try:
                jobs.append(await asyncio.wait_for(self.queue.get(), remaining))
            except asyncio.TimeoutError:
                break
        return jobs

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            jobs = await self._gather()
            jobs = [j for j in jobs if not j.future.done()]  # a client that went away
            if not jobs:
                continue
            try:
                probs = await loop.run_in_executor(self.executor, self.infer, np.stack([j.x for j in jobs]))
                for job, row in zip(jobs, probs):
                    if not job.future.done():
                        job.future.set_result(row)
                self.batches += 1
                self.images += len(jobs)
            except Exception as e:  # a failed batch fails its requests, never the batcher
                for job in jobs:
                    if not job.future.done():
                        job.future.set_exception(e)


# -- the app -------------------------------------------------------------------------------------------------

def _printable(text: str) -> str:
    """`text` with control characters escaped: a request path cannot forge or break log lines."""
    return "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in text)


class AccessLog:
    """ASGI middleware: one line per HTTP request to `write`, once its response is complete:
    `2025-01-31 12:00:00 127.0.0.1 POST /predict?topk=2 200 12.3 ms` (status 500 for an unhandled error,
    `-` when the client went away before any response)."""

    def __init__(self, app: ASGIApp, write: Callable[[str], None]):
        self.app, self.write = app, write

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start, status = time.perf_counter(), None

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        except Exception:
            status = status or 500
            raise
        finally:
            ms = 1000 * (time.perf_counter() - start)
            raw = scope.get("raw_path")
            path = raw.decode("latin-1") if raw else scope.get("path", "")
            query = scope.get("query_string", b"").decode("latin-1")
            client = scope.get("client")
            self.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {client[0] if client else '-'} {scope['method']} "
                       f"{_printable(path + ('?' + query if query else ''))} {status or '-'} {ms:.1f} ms")


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 once it passes `limit` bytes (never held in memory beyond that)."""
    declared = request.headers.get("content-length")
    too_large = HTTPError(413, f"upload larger than the limit of {limit:,} bytes")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


async def image_bytes(request: Request, limit: int) -> bytes:
    """Raw body, or the one file of a multipart/form-data body."""
    body = await read_body(request, limit)
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        return body

    async def replay() -> dict[str, Any]:  # hand the bytes already read (and size-checked) to the form parser
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        form = await Request(request.scope, replay).form(max_files=1, max_fields=16)
    except Exception as e:  # starlette raises MultiPartException / HTTPException on malformed forms
        raise HTTPError(400, f"malformed multipart body: {getattr(e, 'detail', e)}") from None
    files = [v for v in form.values() if hasattr(v, "read")]
    if not files:
        raise HTTPError(400, "multipart body without a file; send the image as a file field (e.g. -F file=@img.jpg)")
    return await files[0].read()


def create_app(backend: TorchBackend | OnnxBackend, *, topk: int = 5, max_batch_size: int = 16,
               max_wait_ms: float = 5.0, max_upload_bytes: int = 10 * 2**20,
               max_pixels: int = inference.DEFAULT_MAX_PIXELS, max_queue: int = 1024,
               access_log: Callable[[str], None] | None = None) -> Starlette:
    """The ASGI app around one loaded model; `access_log` gets one line per request (`AccessLog`)."""
    batcher = Batcher(backend.infer, max_batch_size, max_wait_ms, max_queue)
    class_names = backend.class_names
    model_name = backend.metadata()["model_name"]
    stats = {"started": time.time(), "requests": 0, "errors": 0}

    def error(status: int, message: str) -> JSONResponse:
        stats["errors"] += 1
        return JSONResponse({"error": message}, status_code=status)

    async def predict(request: Request) -> JSONResponse:
        stats["requests"] += 1
        try:
            k = int(request.query_params.get("topk", topk))
            if not 1 <= k <= len(class_names):
                raise ValueError
        except ValueError:
            return error(400, f"topk must be an integer from 1 to {len(class_names)}")
        try:
            data = await image_bytes(request, max_upload_bytes)
            x = await run_in_threadpool(backend.preprocess, data, max_pixels)
            probs = await batcher.submit(x)
        except HTTPError as e:
            return error(e.status, e.message)
        except inference.ImageError as e:
            return error(IMAGE_ERROR_STATUS.get(e.reason, 400), str(e))
        return JSONResponse({"model": model_name, "predictions": inference.topk_answer(probs, class_names, k)})

    async def health(request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok", "uptime_s": round(time.time() - stats["started"], 1),
                             "requests": stats["requests"], "errors": stats["errors"], "batches": batcher.batches,
                             "images": batcher.images, "queued": batcher.queue.qsize()})

    async def metadata(request: Request) -> JSONResponse:
        return JSONResponse({**backend.metadata(), "topk": topk, "max_batch_size": max_batch_size,
                             "max_wait_ms": max_wait_ms, "max_upload_bytes": max_upload_bytes,
                             "max_pixels": max_pixels})

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        task = asyncio.create_task(batcher.run())
        try:
            yield
        finally:
            task.cancel()
            batcher.executor.shutdown(wait=False)

    routes = [Route("/predict", predict, methods=["POST"]), Route("/health", health, methods=["GET"]),
              Route("/metadata", metadata, methods=["GET"])]
    middleware = [Middleware(AccessLog, write=access_log)] if access_log is not None else []
    return Starlette(routes=routes, lifespan=lifespan, middleware=middleware)


def print_line(line: str) -> None:
    """One line to stderr, now (a service's log is read while it runs)."""
    print(line, file=sys.stderr, flush=True)


def listening_url(sockets: list[Any], ssl: bool = False) -> str:
    """The URL of the first listening socket (the real port, also for --port 0)."""
    host, port = sockets[0].getsockname()[:2]
    return f"{'https' if ssl else 'http'}://{f'[{host}]' if ':' in host else host}:{port}"


def build_server(app: Starlette, host: str, port: int, on_started: Callable[[str], None] | None = None) -> Any:
    """A uvicorn server for `app` (uvicorn's own access log off: `AccessLog` writes ours) that calls
    `on_started(url)` once it listens."""
    import uvicorn

    class Server(uvicorn.Server):
        async def startup(self, sockets: list[Any] | None = None) -> None:
            await super().startup(sockets=sockets)
            if self.started and on_started is not None:
                on_started(listening_url([s for server in self.servers for s in server.sockets],
                                         ssl=self.config.ssl is not None))

    return Server(uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False))


def build_parser() -> VerbParser:
    p = VerbParser("serve", __doc__)
    p.add_source("vitkit checkpoint, registered model name, weights file with --model, or an exported .onnx "
                 "(with its .onnx.json beside it)")
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on (0.0.0.0 exposes it to the network)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--model", default=None, help="architecture of a foreign weights file")
    p.add_argument("--use_ema", action="store_true", help="serve the checkpoint's EMA weights")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (PyTorch backend)")
    p.add_argument("--threads", type=int, default=0, help="intra-op threads (0: the runtime's default)")
    p.add_argument("--topk", type=int, default=5, help="default classes per answer (?topk= overrides)")
    p.add_argument("--max_batch_size", type=int, default=16, help="most requests run as one batch")
    p.add_argument("--max_wait_ms", type=float, default=5.0, help="how long a batch waits for more requests")
    p.add_argument("--max_upload_mb", type=float, default=10.0, help="larger uploads get 413")
    p.add_argument("--max_pixels", type=int, default=inference.DEFAULT_MAX_PIXELS, help="larger images get 413")
    p.add_argument("--max_queue", type=int, default=1024, help="requests waiting beyond this get 503")
    p.add_argument("--quiet", action="store_true", help="no access line per request (the start-up line stays)")
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_with_source(argv)
    if args.max_batch_size < 1 or args.max_wait_ms < 0 or args.max_upload_mb <= 0:
        raise VitkitError("--max_batch_size must be >= 1, --max_wait_ms >= 0 and --max_upload_mb > 0")
    backend = load_backend(args.source, model_name=args.model, use_ema=args.use_ema, device=args.device,
                           threads=args.threads)
    app = create_app(backend, topk=args.topk, max_batch_size=args.max_batch_size, max_wait_ms=args.max_wait_ms,
                     max_upload_bytes=int(args.max_upload_mb * 2**20), max_pixels=args.max_pixels,
                     max_queue=args.max_queue, access_log=None if args.quiet else print_line)
    meta = backend.metadata()

    def started(url: str) -> None:
        print_line(f"serving {meta['model_name']} ({meta['backend']}) at {url} "
                   f"(POST /predict, GET /health, GET /metadata; Ctrl+C stops)")

    build_server(app, args.host, args.port, started).run()
    return 0
