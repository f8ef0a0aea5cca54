"""vitkit serve, driven over real HTTP on 127.0.0.1: answers equal predict's, bad requests get a 4xx and the
service keeps serving, concurrent requests are batched, an exported ONNX model serves the same answers."""
from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch
import uvicorn

from vitkit.data.preprocess import DataConfig
from vitkit.engine.checkpoint import save_checkpoint
from vitkit.models import create_model, get_spec
from vitkit.tools.inference import load_inference_model
from vitkit.tools.predict import predict_files
from vitkit.tools.serve import create_app, load_backend

REPO = Path(__file__).resolve().parents[1]
IMAGES = [REPO / "data/cifar10_sample/test" / c / "0005.jpg" for c in ("cat", "ship", "truck", "frog")]
CIFAR = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
UPLOAD_LIMIT = 1 << 20  # 1 MiB in these tests, so a "huge" upload is cheap to make


@contextlib.contextmanager
def running(app: object) -> Iterator[str]:
    """Serve `app` with uvicorn in a thread on a free loopback port; yields the base URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))  # the OS picks a free port; uvicorn serves on this very socket (no race)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def checkpoint(path: Path) -> Path:
    torch.manual_seed(0)
    spec = get_spec("vit_n_4_32")
    return save_checkpoint(path, create_model("vit_n_4_32", depth=2), model_name="vit_n_4_32", class_names=CIFAR,
                           data_config=DataConfig(32, spec.mean, spec.std, spec.interpolation, spec.crop_pct))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return checkpoint(tmp_path_factory.mktemp("serve") / "c.safetensors")


@pytest.fixture(scope="module")
def url(ckpt: Path) -> Iterator[str]:
    app = create_app(load_backend(str(ckpt)), max_batch_size=8, max_wait_ms=20, max_upload_bytes=UPLOAD_LIMIT)
    with running(app) as base:
        yield base


@pytest.fixture(scope="module")
def client(url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=url, timeout=30) as c:
        yield c


def png_bomb(width: int, height: int) -> bytes:
    """A valid 1-bit PNG of width x height zero pixels: ~50 KB for 20000x20000 (400 Mpx once decoded)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\0" * (1 + (width + 7) // 8)  # filter byte + packed bits
    z = zlib.compressobj(9)
    idat = b"".join(z.compress(row) for _ in range(height)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # bit depth 1, grayscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def test_answers_equal_predicts(client: httpx.Client, ckpt: Path) -> None:
    expected = predict_files(load_inference_model(str(ckpt)), IMAGES, topk=5)
    for path, want in zip(IMAGES, expected):
        r = client.post("/predict", content=path.read_bytes(), headers={"content-type": "image/jpeg"})
        assert r.status_code == 200, r.text
        got = r.json()["predictions"]
        assert [p["label"] for p in got] == [p["label"] for p in want["predictions"]]
        assert [p["probability"] for p in got] == pytest.approx([p["probability"] for p in want["predictions"]],
                                                                abs=1e-5)


def test_multipart_upload_and_topk(client: httpx.Client) -> None:
    raw = client.post("/predict", content=IMAGES[0].read_bytes()).json()
    form = client.post("/predict?topk=2", files={"file": ("cat.jpg", IMAGES[0].read_bytes(), "image/jpeg")})
    assert form.status_code == 200 and form.json()["predictions"] == raw["predictions"][:2]
    assert client.post("/predict?topk=0", content=IMAGES[0].read_bytes()).status_code == 400
    assert client.post("/predict?topk=abc", content=IMAGES[0].read_bytes()).status_code == 400


def _bad_requests() -> dict[str, tuple[bytes, int, str]]:
    jpeg = IMAGES[0].read_bytes()
    return {
        "empty body": (b"", 400, "empty"),
        "non-image bytes": (b"GIF? no: just some text, definitely not an image" * 3, 415, "not an image"),
        "truncated jpeg": (jpeg[: len(jpeg) // 2], 400, "truncated"),
        "20000x20000 png": (png_bomb(20000, 20000), 413, "400000000 pixels"),
        "huge upload": (b"\xff" * (3 * UPLOAD_LIMIT), 413, "upload larger than"),
    }


@pytest.mark.parametrize("case", list(_bad_requests()))
def test_bad_requests_get_a_4xx_and_the_service_keeps_serving(client: httpx.Client, case: str) -> None:
    body, status, message = _bad_requests()[case]
    r = client.post("/predict", content=body)
    assert r.status_code == status and message in r.json()["error"], r.text
    assert client.get("/health").json()["status"] == "ok"
    assert client.post("/predict", content=IMAGES[1].read_bytes()).status_code == 200


def test_huge_streamed_upload_without_content_length_gets_413(client: httpx.Client) -> None:
    def chunks() -> Iterator[bytes]:
        for _ in range(4):
            yield b"\0" * (UPLOAD_LIMIT // 2)

    r = client.post("/predict", content=chunks())  # chunked transfer encoding: no Content-Length to trust
    assert r.status_code == 413 and client.get("/health").status_code == 200


def test_concurrent_requests_are_batched(url: str, client: httpx.Client) -> None:
    before = client.get("/health").json()
    bodies = [p.read_bytes() for p in IMAGES] * 6

    async def fire() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=url, timeout=60) as ac:
            return await asyncio.gather(*(ac.post("/predict", content=b) for b in bodies))

    responses = asyncio.run(fire())
    assert all(r.status_code == 200 for r in responses)
    # the same image gets the same answer whichever batch it landed in
    first = {b: r.json()["predictions"][0]["label"] for b, r in zip(bodies, responses)}
    assert all(r.json()["predictions"][0]["label"] == first[b] for b, r in zip(bodies, responses))
    after = client.get("/health").json()
    images, batches = after["images"] - before["images"], after["batches"] - before["batches"]
    assert images == len(bodies) and batches < images  # several requests shared a forward pass


def test_metadata(client: httpx.Client) -> None:
    meta = client.get("/metadata").json()
    assert meta["model_name"] == "vit_n_4_32" and meta["classes"] == CIFAR and meta["input_size"] == [3, 32, 32]
    assert meta["max_upload_bytes"] == UPLOAD_LIMIT and meta["backend"].startswith("pytorch")


def test_onnx_model_serves_the_same_answers(ckpt: Path, client: httpx.Client, tmp_path: Path) -> None:
    from vitkit.tools.export import run_export

    onnx_path = tmp_path / "m.onnx"
    run_export(load_inference_model(str(ckpt)), "onnx", onnx_path, with_preprocess=True, check_folder=None)
    with running(create_app(load_backend(str(onnx_path)))) as onnx_url, httpx.Client(base_url=onnx_url) as oc:
        assert oc.get("/metadata").json()["backend"].startswith("onnxruntime")
        for path in IMAGES:
            want = client.post("/predict", content=path.read_bytes()).json()["predictions"]
            got = oc.post("/predict", content=path.read_bytes()).json()["predictions"]
            assert [p["label"] for p in got] == [p["label"] for p in want]
            assert [p["probability"] for p in got] == pytest.approx([p["probability"] for p in want], abs=1e-5)
        assert oc.post("/predict", content=b"not an image").status_code == 415
