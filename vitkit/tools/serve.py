"""`vitkit serve CKPT|MODEL.onnx [--host 127.0.0.1 --port 8000]`: an HTTP service answering top-k classes.

  POST /predict[?topk=5]  body: the image bytes (any Content-Type), or multipart/form-data with one file
                          -> {"model", "predictions": [{"index", "label", "probability"}, ...]}
  GET  /health            -> {"status": "ok", request counts, errors by kind and by status, ...}
  GET  /metadata          -> model name, classes, preprocessing, batching and limits

Server stack: Starlette + uvicorn. Both are small, well-kept ASGI projects (Starlette is the core FastAPI is
built on; uvicorn is the reference ASGI server), and an asyncio server is what dynamic batching needs:
waiting requests are futures on one event loop, not blocked threads. A checkpoint runs in PyTorch; an
exported `.onnx` runs in onnxruntime with the preprocessing recorded in `<model>.onnx.json` by `vitkit export`.

Dynamic batching: each request's image is decoded and preprocessed on its own in a bounded thread pool
(`--decode_threads`), then queued; one batcher takes up to `--max_batch_size` of them, waiting at most
`--max_wait_ms` after the first for others to arrive, and runs them as one batch in a worker thread.

Hostile clients:
- uploads above `--max_upload_mb` get 413 as soon as the stream passes the limit (never held in memory
  beyond it); a body that does not arrive whole within `--body_timeout` seconds gets 408 and its connection
  is closed (a stalled upload holds no thread and no slot);
- images above `--max_pixels` get 413 from their header, before any pixel is decoded; anything that is not
  a usable image gets 400/415 whatever the decoder raised on it (one ImageError kind per answer), and a bad
  image never fails the batch it would have joined nor another client's connection;
- decode budget: the pixels being decoded at once (from the headers, weighted by the mode's memory cost,
  `inference.decode_cost`) stay under `--max_decode_pixels`; a request that does not fit waits up to
  `--decode_wait_ms` for room, then gets 503 with Retry-After, as does a full queue;
- `--token` (or env VITKIT_SERVE_TOKEN): /predict and /metadata need `Authorization: Bearer TOKEN` (401
  otherwise); listening beyond loopback without a token is refused unless `--insecure`. /health stays open
  (load balancers) and counts every answer by status and by kind.

Output (stderr): one line when it listens (URL, model, backend), then one access line per request (time,
client, method, path, status, milliseconds); `--quiet` keeps the first and drops the access lines. An
internal error (a bug, never a bad image) is one `error:` line and a 500 answer; the service keeps serving.
"""
from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import hmac
import ipaddress
import json
import os
import socket
import sys
import time
import warnings
from collections import Counter
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from vitkit.args import VerbParser, at_least
from vitkit.data.preprocess import DataConfig
from vitkit.data.transforms import build_transform
from vitkit.errors import VitkitError, path_problem
from vitkit.tools import inference
from vitkit.tools.export import metadata_path, onnx_session, run_sliced

IMAGE_ERROR_STATUS = {"empty": 400, "corrupt": 400, "unsupported": 415, "too_large": 413}
TOKEN_ENV = "VITKIT_SERVE_TOKEN"
LOOPBACK_NAMES = ("localhost",)


class HTTPError(Exception):
    """An answer other than 200: status, one-line message, the kind /health counts it under, extra headers."""

    def __init__(self, status: int, message: str, kind: str = "bad_request", headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.headers = status, message, kind, headers or {}


class ClientGone(Exception):
    """The client closed its connection before its request was read."""


# -- backends: opened image -> preprocessed array (decode threads), stacked arrays -> probabilities (the worker) --

class TorchBackend:
    """A vitkit checkpoint (or registered name) in eager PyTorch."""

    def __init__(self, im: inference.InferenceModel):
        self.im, self._transform, self.class_names = im, im.transform(), im.class_names
        self.device = next(im.model.parameters()).device
        size = im.data_config.input_size
        self.input_shape, self.input_dtype = (3, size, size), np.dtype(np.float32)

    def decode(self, img: Image.Image) -> np.ndarray:
        return inference.decode_image(img, self._transform).numpy()

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
        size = int(self.meta["input_size"][-1])
        dc = DataConfig.from_dict({**self.meta, "input_size": size})
        # uint8 crop when the graph normalizes itself, else the normalized tensor validate uses
        self._transform = build_transform(dc, train=False, normalize=not self.with_preprocess)
        self.input_shape = (size, size, 3) if self.with_preprocess else (3, size, size)
        self.input_dtype = np.dtype(np.uint8 if self.with_preprocess else np.float32)
        # the session and batch slicing `vitkit export` measured and recorded (export.onnx_session, run_sliced)
        self.session = onnx_session(path, threads=threads)
        self.slice_size: int | None = self.meta.get("runtime", {}).get("batch_slice")
        self._version = ort.__version__

    def decode(self, img: Image.Image) -> np.ndarray:
        x = inference.decode_image(img, self._transform)
        return x.permute(1, 2, 0).contiguous().numpy() if self.with_preprocess else x.numpy()  # HWC uint8 / CHW

    def preprocess(self, data: bytes, max_pixels: int) -> np.ndarray:
        with inference.open_image(data, max_pixels=max_pixels) as img:
            return self.decode(img)

    def infer(self, batch: np.ndarray) -> np.ndarray:
        out = run_sliced(self.session, batch, self.slice_size)
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
        if (why := path_problem(source)) is not None:
            raise VitkitError(f"{source} {why}")
        return OnnxBackend(Path(source), threads)
    if threads:
        torch.set_num_threads(threads)
    return TorchBackend(inference.load_inference_model(source, model_name=model_name, use_ema=use_ema, device=device))


# -- decoding: one request at a time, bounded threads, bounded pixels in flight ---------------------------------

def _malloc_trim() -> Callable[[], Any] | None:
    """glibc's malloc_trim(0), which hands freed heap pages of every thread's arena back to the OS (or None)."""
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return lambda: trim(0)


class Decoder:
    """Image bytes -> one model input, each request on its own, in `threads` threads.

    The header is read first (`inference.open_image`); the image's decode cost (`inference.decode_cost`,
    pixels weighted by mode) must then fit in `max_decode_pixels` together with the images being decoded:
    a request that does not fit waits up to `wait_s` for room, then gets 503. Whatever a decoder raises is an
    ImageError, and an output of the wrong shape or dtype is one too, so a bad image can never fail the batch
    it would join. After a burst of large images, freed memory is handed back to the OS (`malloc_trim`).
    """

    TRIM_AFTER = 4_000_000  # decoded cost since the last trim that makes one worth its few milliseconds

    def __init__(self, backend: TorchBackend | OnnxBackend, max_pixels: int, max_decode_pixels: int, threads: int,
                 wait_s: float, max_waiting: int):
        self.backend, self.max_pixels, self.budget = backend, max_pixels, max_decode_pixels
        self.wait_s, self.max_waiting, self.threads = wait_s, max_waiting, threads
        self.in_flight = 0  # decode cost admitted and not yet released (event-loop thread only)
        self.waiting = 0
        self._since_trim, self._trim = 0, _malloc_trim()
        self.start()

    def start(self) -> None:
        """Fresh threads and wake-up event (at each start of the app: asyncio objects belong to one loop)."""
        self.executor = ThreadPoolExecutor(max_workers=self.threads, thread_name_prefix="vitkit-decode")
        self._room = asyncio.Event()  # replaced on every release: set wakes the requests waiting for room

    def _open(self, data: bytes) -> tuple[Image.Image, int]:
        img = inference.open_image(data, max_pixels=self.max_pixels)
        try:
            return img, inference.decode_cost(img)
        except Exception as e:
            img.close()
            raise inference.image_error(e) from None

    def _decode(self, img: Image.Image) -> np.ndarray:
        try:
            with img:
                x = self.backend.decode(img)
        except Exception as e:  # the backend's own steps after decode_image (permute, numpy) included
            raise inference.image_error(e) from None
        want, dtype = self.backend.input_shape, self.backend.input_dtype
        if x.shape != want or x.dtype != dtype:
            raise inference.ImageError(f"image decoded to an unusable array ({x.dtype} {tuple(x.shape)}, expected "
                                       f"{dtype} {want})", "corrupt")
        return x

    def _release(self, cost: int) -> None:
        self.in_flight -= cost
        self._since_trim += cost
        room, self._room = self._room, asyncio.Event()
        room.set()
        if self.in_flight == 0 and self._since_trim >= self.TRIM_AFTER and self._trim is not None:
            self._since_trim = 0
            with contextlib.suppress(RuntimeError):  # executor already shut down
                self.executor.submit(self._trim)

    async def _admit(self, cost: int) -> None:
        if cost > self.budget:
            raise inference.ImageError(f"image would cost {cost:,} pixels to decode (its size times its mode's "
                                       f"cost), above this server's decode budget of {self.budget:,}; downscale it "
                                       f"or send 8-bit RGB", "too_large")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.wait_s
        while self.in_flight + cost > self.budget:
            remaining = deadline - loop.time()
            if remaining <= 0 or self.waiting >= self.max_waiting:
                raise HTTPError(503, f"server busy decoding other images ({self.in_flight:,} of {self.budget:,} "
                                     f"pixels in flight); retry shortly", "decode_busy", {"Retry-After": "1"})
            self.waiting += 1
            try:
                await asyncio.wait_for(self._room.wait(), remaining)
            except asyncio.TimeoutError:
                pass
            finally:
                self.waiting -= 1
        self.in_flight += cost

    async def __call__(self, data: bytes) -> np.ndarray:
        loop = asyncio.get_running_loop()
        img, cost = await loop.run_in_executor(self.executor, self._open, data)
        try:
            await self._admit(cost)
        except BaseException:
            img.close()
            raise

        def job() -> np.ndarray:
            try:
                return self._decode(img)
            finally:  # released when the pixels are gone, even if the request awaiting it was cancelled
                loop.call_soon_threadsafe(self._release, cost)

        return await loop.run_in_executor(self.executor, job)


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
        self.max_queue = max_queue
        self.batches = self.images = 0
        self.start()

    def start(self) -> None:
        """A fresh queue and worker thread (at each start of the app: asyncio objects belong to one loop)."""
        self.queue: asyncio.Queue[_Job] = asyncio.Queue(maxsize=self.max_queue)
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vitkit-infer")  # one batch at a time

    async def submit(self, x: np.ndarray) -> np.ndarray:
        job = _Job(x, asyncio.get_running_loop().create_future())
        try:
            self.queue.put_nowait(job)
        except asyncio.QueueFull:
            raise HTTPError(503, f"server busy: {self.queue.maxsize} requests already queued; retry shortly",
                            "queue_full", {"Retry-After": "1"}) from None
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

    async def _run_batch(self, jobs: list[_Job]) -> None:
        loop = asyncio.get_running_loop()
        try:
            probs = await loop.run_in_executor(self.executor, self.infer, np.stack([j.x for j in jobs]))
        except Exception as e:
            if len(jobs) > 1:  # one input must not fail the others: run each alone
                for job in jobs:
                    await self._run_batch([job])
                return
            if not jobs[0].future.done():
                jobs[0].future.set_exception(e)
            return
        for job, row in zip(jobs, probs):
            if not job.future.done():
                job.future.set_result(row)
        self.batches += 1
        self.images += len(jobs)

    async def run(self) -> None:
        while True:
            jobs = await self._gather()
            jobs = [j for j in jobs if not j.future.done()]  # a client that went away
            if jobs:
                try:
                    await self._run_batch(jobs)
                except Exception as e:  # never the batcher: whatever went wrong fails these requests only
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


class Stats:
    """What /health reports: every answer (but /health's own) counted, errors by kind and by status."""

    def __init__(self) -> None:
        self.started = time.time()
        self.requests = self.ok = 0
        self.by_kind: Counter[str] = Counter()
        self.by_status: Counter[str] = Counter()

    def record(self, status: int | None, kind: str | None) -> None:
        self.requests += 1
        if status is not None and status < 400:
            self.ok += 1
            return
        self.by_status[str(status) if status is not None else "no_answer"] += 1
        self.by_kind[kind or (f"http_{status}" if status is not None else "no_answer")] += 1

    def report(self) -> dict[str, Any]:
        return {"requests": self.requests, "ok": self.ok, "errors": self.requests - self.ok,
                "errors_by_kind": dict(sorted(self.by_kind.items())),
                "errors_by_status": dict(sorted(self.by_status.items()))}


class Guard:
    """ASGI middleware just outside the routes: counts every answer in `stats` (the kind a route put in
    scope["state"]["error_kind"]), and turns an exception that escapes a route into a one-line `error:` log
    line and a JSON 500 answer on the same connection, so no exception ever reaches uvicorn (which would
    close the connection) and /health counts it."""

    def __init__(self, app: ASGIApp, stats: Stats, log: Callable[[str], None]):
        self.app, self.stats, self.log = app, stats, log

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state = scope.setdefault("state", {})
        status = None

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        except Exception as e:
            state["error_kind"] = "internal"
            self.log(f"error: internal error in {scope['method']} {_printable(scope.get('path', ''))}: "
                     f"{type(e).__name__}: {inference.one_line(str(e))}")
            if status is None:
                response = JSONResponse({"error": f"internal error ({type(e).__name__}); see the server log"},
                                        status_code=500)
                with contextlib.suppress(Exception):  # the client may be gone
                    await response(scope, receive, send_status)
        finally:
            if scope.get("path") != "/health":
                self.stats.record(status, state.get("error_kind"))


async def read_body(request: Request, limit: int, timeout: float = float("inf")) -> bytes:
    """The request body, refused with 413 once it passes `limit` bytes (never held in memory beyond that), and
    with 408 unless it arrives whole within `timeout` seconds."""
    declared = request.headers.get("content-length")
    too_large = HTTPError(413, f"upload larger than the limit of {limit:,} bytes", "upload_too_large")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_large
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    chunks, size = [], 0
    while True:
        remaining = deadline - loop.time()
        try:
            if remaining <= 0:
                raise asyncio.TimeoutError
            message = await asyncio.wait_for(request.receive(), remaining)
        except asyncio.TimeoutError:
            raise HTTPError(408, f"upload not received within {timeout:g} s ({size:,} bytes arrived); the "
                                 f"connection is closed", "body_timeout", {"Connection": "close"}) from None
        if message["type"] == "http.disconnect":
            raise ClientGone
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    request.state.body_done = True
    return b"".join(chunks)


LINGER_S = 2.0  # how long an answer given before the end of its upload waits for (and discards) the rest


async def linger(request: Request, seconds: float, max_bytes: int) -> bool:
    """Read and discard what is left of the request body, for at most `seconds` and `max_bytes`; True if it
    ended (the connection can serve the next request). An answer sent while the client is still sending,
    then a close, would reset the connection before the client reads the answer; and left open, uvicorn
    would drain an endless upload forever (every chunk re-arms its keep-alive timer)."""
    declared = request.headers.get("content-length")
    chunked = "chunked" in request.headers.get("transfer-encoding", "").lower()
    if getattr(request.state, "body_done", False) or not (chunked or (declared and declared != "0")):
        return True
    loop = asyncio.get_running_loop()
    deadline, size = loop.time() + seconds, 0
    while size <= max_bytes and (remaining := deadline - loop.time()) > 0:
        try:
            message = await asyncio.wait_for(request.receive(), remaining)
        except asyncio.TimeoutError:
            return False
        if message["type"] == "http.disconnect":
            return False
        size += len(message.get("body", b""))
        if not message.get("more_body", False):
            return True
    return False


async def image_bytes(request: Request, limit: int, timeout: float = float("inf")) -> bytes:
    """Raw body, or the one file of a multipart/form-data body."""
    body = await read_body(request, limit, timeout)
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
               max_decode_pixels: int | None = None, decode_threads: int | None = None,
               decode_wait_ms: float = 1000.0, body_timeout: float = 10.0, token: str | None = None,
               access_log: Callable[[str], None] | None = None,
               error_log: Callable[[str], None] | None = None) -> Starlette:
    """The ASGI app around one loaded model; `access_log` gets one line per request (`AccessLog`), `error_log`
    (default stderr) one line per internal error. `max_decode_pixels` defaults to 3 x `max_pixels`,
    `decode_threads` to min(4, CPUs); `token` set: /predict and /metadata need `Authorization: Bearer token`."""
    batcher = Batcher(backend.infer, max_batch_size, max_wait_ms, max_queue)
    max_decode_pixels = 3 * max_pixels if max_decode_pixels is None else max_decode_pixels
    decode_threads = decode_threads or min(4, os.cpu_count() or 1)
    decoder = Decoder(backend, max_pixels, max_decode_pixels, decode_threads, decode_wait_ms / 1000.0, max_queue)
    class_names = backend.class_names
    if not 1 <= topk <= len(class_names):  # else every request without ?topk= would get 400
        raise VitkitError(f"--topk must be from 1 to {len(class_names)} (the model's classes), not {topk}")
    model_name = backend.metadata()["model_name"]
    stats = Stats()
    expected = token.encode() if token else None

    async def error(request: Request, status: int, message: str, kind: str,
                    headers: dict[str, str] | None = None) -> JSONResponse:
        """The answer to a refused request; one given before the end of its upload closes the connection
        unless the rest arrives within LINGER_S (408: never waited for)."""
        request.state.error_kind = kind
        headers = dict(headers or {})
        if "Connection" not in headers and not await linger(request, LINGER_S, 4 * max_upload_bytes):
            headers["Connection"] = "close"
        return JSONResponse({"error": message}, status_code=status, headers=headers)

    async def unauthorized(request: Request) -> JSONResponse | None:
        if expected is None:
            return None
        scheme, _, credentials = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(credentials.strip().encode("latin-1"), expected):
            return None
        why = "missing" if not scheme else "wrong"
        return await error(request, 401, f"unauthorized: {why} token; send the header 'Authorization: Bearer TOKEN'",
                     "unauthorized", {"WWW-Authenticate": "Bearer"})

    async def predict(request: Request) -> JSONResponse:
        if (refused := await unauthorized(request)) is not None:
            return refused
        try:
            k = int(request.query_params.get("topk", topk))
            if not 1 <= k <= len(class_names):
                raise ValueError
        except ValueError:
            return await error(request, 400, f"topk must be an integer from 1 to {len(class_names)}", "bad_request")
        try:
            data = await image_bytes(request, max_upload_bytes, body_timeout)
            x = await decoder(data)
            del data
            probs = await batcher.submit(x)
        except HTTPError as e:
            return await error(request, e.status, e.message, e.kind, e.headers)
        except inference.ImageError as e:
            return await error(request, IMAGE_ERROR_STATUS.get(e.reason, 400), str(e), e.reason)
        except ClientGone:
            request.state.error_kind = "disconnected"
            return JSONResponse({"error": "client went away"}, status_code=400)  # nobody reads it
        return JSONResponse({"model": model_name, "predictions": inference.topk_answer(probs, class_names, k)})

    async def health(request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok", "uptime_s": round(time.time() - stats.started, 1), **stats.report(),
                             "batches": batcher.batches, "images": batcher.images, "queued": batcher.queue.qsize(),
                             "decoding_pixels": decoder.in_flight, "decode_waiting": decoder.waiting})

    async def metadata(request: Request) -> JSONResponse:
        if (refused := await unauthorized(request)) is not None:
            return refused
        return JSONResponse({**backend.metadata(), "topk": topk, "max_batch_size": max_batch_size,
                             "max_wait_ms": max_wait_ms, "max_upload_bytes": max_upload_bytes,
                             "max_pixels": max_pixels, "max_decode_pixels": max_decode_pixels,
                             "decode_threads": decode_threads, "body_timeout_s": body_timeout,
                             "auth": expected is not None})

    started: list[bool] = []

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        if started:  # served again (e.g. tests): the previous start's threads are shut down
            batcher.start()
            decoder.start()
        started.append(True)
        task = asyncio.create_task(batcher.run())
        try:
            yield
        finally:
            task.cancel()
            batcher.executor.shutdown(wait=False)
            decoder.executor.shutdown(wait=False)

    routes = [Route("/predict", predict, methods=["POST"]), Route("/health", health, methods=["GET"]),
              Route("/metadata", metadata, methods=["GET"])]
    middleware = [Middleware(AccessLog, write=access_log)] if access_log is not None else []
    middleware.append(Middleware(Guard, stats=stats, log=error_log or print_line))
    return Starlette(routes=routes, lifespan=lifespan, middleware=middleware)


def print_line(line: str) -> None:
    """One line to stderr, now (a service's log is read while it runs)."""
    print(line, file=sys.stderr, flush=True)


def listening_url(sockets: list[Any], ssl: bool = False) -> str:
    """The URL of the first listening socket (the real port, also for --port 0)."""
    host, port = sockets[0].getsockname()[:2]
    return f"{'https' if ssl else 'http'}://{f'[{host}]' if ':' in host else host}:{port}"


def bind_socket(host: str, port: int) -> socket.socket:
    """The service's socket, bound before the model loads: a port out of range or in use, a host name that
    does not resolve or an address this machine does not have is one line at once (uvicorn would log its own
    `ERROR:` line after the model loaded and exit 3). `Server.run(sockets=[it])` listens on it."""
    if not 0 <= port <= 65535:
        raise VitkitError(f"--port must be in 0..65535 (0: any free port), not {port}")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
    except (socket.gaierror, UnicodeError) as e:
        raise VitkitError(f"--host {host}: {getattr(e, 'strerror', None) or e}; give a name or address of this "
                          f"machine (127.0.0.1, 0.0.0.0 for every interface)") from None
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: a restart reuses the port
        sock.bind(address)
    except OSError as e:
        sock.close()
        hint = ("another process listens there: stop it or pick another --port" if e.errno == errno.EADDRINUSE
                else "give an address of this machine" if e.errno == errno.EADDRNOTAVAIL else "check --host/--port")
        raise VitkitError(f"cannot listen on {host}:{port}: {e.strerror or e}; {hint}") from None
    return sock


def build_server(app: Starlette, host: str, port: int, on_started: Callable[[str], None] | None = None) -> Any:
    """A uvicorn server for `app` (uvicorn's own access log off: `AccessLog` writes ours) that calls
    `on_started(url)` once it listens; `.run(sockets=[bind_socket(host, port)])` serves."""
    import uvicorn

    class Server(uvicorn.Server):
        async def startup(self, sockets: list[Any] | None = None) -> None:
            await super().startup(sockets=sockets)
            if self.started and on_started is not None:
                on_started(listening_url([s for server in self.servers for s in server.sockets],
                                         ssl=self.config.ssl is not None))

    return Server(uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False))


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and localhost: addresses only this machine can reach."""
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def resolve_token(token: str | None, host: str, insecure: bool) -> str | None:
    """The bearer token (--token, else env VITKIT_SERVE_TOKEN; empty = none), checked; refuses to expose the
    service beyond loopback without one unless `insecure`."""
    token = token if token is not None else os.environ.get(TOKEN_ENV)
    token = token or None
    if token is not None and not all(33 <= ord(c) <= 126 for c in token):
        raise VitkitError("--token must be printable ASCII without spaces (it travels in an HTTP header)")
    if token is None and not insecure and not is_loopback(host):
        raise VitkitError(f"refusing to serve on {host} without a token: anyone who can reach it could use the "
                          f"model; pass --token TOKEN (or set {TOKEN_ENV}), or --insecure to serve it open")
    return token


def build_parser() -> VerbParser:
    p = VerbParser("serve", __doc__)
    p.add_source("vitkit checkpoint, registered model name, weights file with --model, or an exported .onnx "
                 "(with its .onnx.json beside it)")
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on (0.0.0.0 exposes it to the network; "
                                                       "needs --token or --insecure)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--model", default=None, help="architecture of a foreign weights file")
    p.add_argument("--use_ema", action="store_true", help="serve the checkpoint's EMA weights")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (PyTorch backend)")
    p.add_argument("--threads", type=at_least(0), default=0,
                   help="intra-op threads (0: one per CPU this process may use; PyTorch: its own default)")
    p.add_argument("--topk", type=at_least(1), default=5, help="default classes per answer (?topk= overrides)")
    p.add_argument("--max_batch_size", type=int, default=16, help="most requests run as one batch")
    p.add_argument("--max_wait_ms", type=float, default=5.0, help="how long a batch waits for more requests")
    p.add_argument("--max_upload_mb", type=float, default=10.0, help="larger uploads get 413")
    p.add_argument("--max_pixels", type=int, default=inference.DEFAULT_MAX_PIXELS, help="larger images get 413")
    p.add_argument("--max_queue", type=at_least(1), default=1024, help="requests waiting beyond this get 503")
    p.add_argument("--max_decode_pixels", type=int, default=None,
                   help="pixels decoded at once, weighted by mode (default 3 x --max_pixels); beyond: wait, then 503")
    p.add_argument("--decode_threads", type=at_least(0), default=0, help="image decoding threads (0: min(4, CPUs))")
    p.add_argument("--decode_wait_ms", type=float, default=1000.0,
                   help="how long a request waits for room in the decode budget before its 503")
    p.add_argument("--body_timeout", type=float, default=10.0,
                   help="seconds to receive a whole upload; a slower or stalled one gets 408")
    p.add_argument("--token", default=None,
                   help=f"require 'Authorization: Bearer TOKEN' on /predict and /metadata (or set {TOKEN_ENV}, "
                        f"which other users cannot read from the process list)")
    p.add_argument("--insecure", action="store_true", help="allow a host beyond loopback without a token")
    p.add_argument("--quiet", action="store_true", help="no access line per request (the start-up line stays)")
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_with_source(argv)
    if args.max_batch_size < 1 or args.max_wait_ms < 0 or args.max_upload_mb <= 0:
        raise VitkitError("--max_batch_size must be >= 1, --max_wait_ms >= 0 and --max_upload_mb > 0")
    max_decode = 3 * args.max_pixels if args.max_decode_pixels is None else args.max_decode_pixels
    if args.max_pixels < 1 or max_decode < args.max_pixels:
        raise VitkitError("--max_pixels must be >= 1 and --max_decode_pixels at least --max_pixels")
    if args.body_timeout <= 0 or args.decode_threads < 0 or args.decode_wait_ms < 0:
        raise VitkitError("--body_timeout must be > 0, --decode_threads >= 0 and --decode_wait_ms >= 0")
    token = resolve_token(args.token, args.host, args.insecure)  # before the model loads: a refusal is instant
    sock = bind_socket(args.host, args.port)  # so is a port in use
    backend = load_backend(args.source, model_name=args.model, use_ema=args.use_ema, device=args.device,
                           threads=args.threads)
    # Hostile files make PIL warn ("Corrupt EXIF data", "Truncated File Read", bomb sizes open_image refuses
    # anyway), each a two-line message with its own text: a client could flood the log. The answer says it all.
    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL\.")
    app = create_app(backend, topk=args.topk, max_batch_size=args.max_batch_size, max_wait_ms=args.max_wait_ms,
                     max_upload_bytes=int(args.max_upload_mb * 2**20), max_pixels=args.max_pixels,
                     max_queue=args.max_queue, max_decode_pixels=max_decode, decode_threads=args.decode_threads,
                     decode_wait_ms=args.decode_wait_ms, body_timeout=args.body_timeout, token=token,
                     access_log=None if args.quiet else print_line)
    meta = backend.metadata()

    def started(url: str) -> None:
        routes = ("POST /predict and GET /metadata with the bearer token, GET /health" if token else
                  "POST /predict, GET /health, GET /metadata")
        print_line(f"serving {meta['model_name']} ({meta['backend']}) at {url} ({routes}; Ctrl+C stops)")

    with sock:
        build_server(app, args.host, args.port, started).run(sockets=[sock])
    return 0
