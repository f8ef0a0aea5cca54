"""Downloads with local files only: file:// URLs and a bounded http.server on 127.0.0.1."""
from __future__ import annotations

import functools
import hashlib
import http.server
import shutil
import threading
from pathlib import Path

import pytest
import torch

from vitkit import create_model
from vitkit.errors import WeightsError
from vitkit.weights import load_weights
from vitkit.weights.download import cache_path, download_url, sha256_prefix_from_name

FIXTURE = Path(__file__).parent / "data" / "mindcv_vit_tiny.ckpt"
FIXTURE_SHA = "9309c5d265ec1b0beb1eb874a66e66398666b33f57a3a920ed2dff93944caeb9"  # tests/data/mindcv_vit_tiny.json


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("VITKIT_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("VITKIT_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    return tmp_path / "home"


@pytest.fixture
def http_dir(tmp_path):
    """Serve a folder on 127.0.0.1 for the test; the server stops at teardown or after 60 s at the latest."""
    root = tmp_path / "www"
    root.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a: None  # type: ignore[method-assign]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    watchdog = threading.Timer(60, server.shutdown)
    watchdog.start()
    try:
        yield root, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        watchdog.cancel()
        server.shutdown()
        server.server_close()


def test_sha256_prefix_from_file_names():
    assert sha256_prefix_from_name("vit_b_32-d86f8d99.pth") == "d86f8d99"  # torchvision
    assert sha256_prefix_from_name("vit_b_32_224-a2165e72-910v2.ckpt") == "a2165e72"  # MindCV 910v2
    assert sha256_prefix_from_name("B_32-i21k-300ep-lr_0.001-aug_medium1-wd_0.03-do_0.0-sd_0.0.npz") is None


def test_file_url_download_then_cache_hit(home, tmp_path):
    src = tmp_path / "mindcv_vit_tiny.ckpt"
    shutil.copy(FIXTURE, src)
    url = src.as_uri()
    path = download_url(url)
    assert path == home / "weights" / "mindcv_vit_tiny.ckpt" == cache_path(url)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == FIXTURE_SHA
    assert not list(path.parent.glob("*.tmp"))  # the atomic write left no temporary file
    src.unlink()  # the second call must not touch the source again
    assert download_url(url) == path
    model = create_model("vit_n_4_32", pretrained=url, embed_dim=64, depth=2, num_heads=2)
    assert model.pretrained_cfg["origin"] == url


def test_http_download_checks_the_hash_in_the_file_name(home, http_dir):
    root, base = http_dir
    good = f"tiny-{FIXTURE_SHA[:8]}.ckpt"
    bad = "tiny-deadbeef.ckpt"
    shutil.copy(FIXTURE, root / good)
    shutil.copy(FIXTURE, root / bad)
    assert download_url(f"{base}/{good}").read_bytes() == FIXTURE.read_bytes()
    with pytest.raises(WeightsError, match="checksum mismatch.*deadbeef"):
        download_url(f"{base}/{bad}")
    assert not (home / "weights" / bad).exists()  # nothing corrupt enters the cache
    shutil.copy(FIXTURE, root / "tiny.ckpt")
    with pytest.raises(WeightsError, match="checksum mismatch"):  # a digest given by the sources table
        download_url(f"{base}/tiny.ckpt", sha256="0" * 64)
    assert download_url(f"{base}/tiny.ckpt", sha256=FIXTURE_SHA).is_file()


def test_http_missing_file_is_a_clear_error(home, http_dir):
    _, base = http_dir
    with pytest.raises(WeightsError, match=r"download failed .*put it at .*weights/absent\.pth"):
        download_url(f"{base}/absent.pth")


def test_offline_error_names_url_and_cache_path(home, monkeypatch):
    monkeypatch.setenv("VITKIT_OFFLINE", "1")
    url = "https://download.pytorch.org/models/vit_b_32-d86f8d99.pth"
    with pytest.raises(WeightsError) as e:
        create_model("vit_b_32_224", pretrained=url)
    msg = str(e.value)
    assert url in msg and str(home / "weights" / "vit_b_32-d86f8d99.pth") in msg and "offline" in msg


def test_offline_hub_id_with_nothing_cached(home, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(WeightsError, match=r"offline.*timm/vit_base_patch32_224\.augreg_in21k_ft_in1k.*hf download"):
        load_weights("timm/vit_base_patch32_224.augreg_in21k_ft_in1k")


def test_hub_snapshot_folder_loads_like_a_hub_id(tmp_path):
    """A timm hub snapshot (config.json + model.safetensors): pooling and preprocessing come from config.json."""
    import json

    from safetensors.torch import save_file

    src = create_model("vit_n_4_32", depth=2, global_pool="avg")
    folder = tmp_path / "snap"
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({
        "architecture": "vit_n_4_32", "num_classes": 10, "global_pool": "avg",
        "pretrained_cfg": {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "crop_pct": 0.95,
                           "interpolation": "bilinear", "input_size": [3, 32, 32]}}))
    model = create_model("vit_n_4_32", depth=2, pretrained=str(folder))
    assert model.cfg.global_pool == "avg" and model.pretrained_cfg["data"]["crop_pct"] == 0.95
    assert torch.equal(model.fc_norm.weight, src.fc_norm.weight)
