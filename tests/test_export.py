"""vitkit export: ONNX / TorchScript / pt2 match eager PyTorch, with dynamic batch and dynamic size."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from vitkit.cli import main as cli_main
from vitkit.data.preprocess import DataConfig
from vitkit.engine.checkpoint import save_checkpoint
from vitkit.models import create_model, get_spec
from vitkit.tools.export import metadata_path, run_export
from vitkit.tools.inference import load_inference_model

ort = pytest.importorskip("onnxruntime")
REPO = Path(__file__).resolve().parents[1]
CHECK_IMAGES = str(REPO / "data/cifar10_sample/test")


def checkpoint(path: Path, name: str = "vit_n_4_32", **overrides: object) -> Path:
    torch.manual_seed(0)
    model = create_model(name, **overrides)
    spec = get_spec(name)
    dc = DataConfig(model.cfg.img_size, spec.mean, spec.std, spec.interpolation, spec.crop_pct)
    return save_checkpoint(path, model, model_name=name, data_config=dc,
                           class_names=[f"c{i}" for i in range(model.num_classes)])


def eager_dynamic(source: Path) -> torch.nn.Module:
    """The eager model on its own dynamic_img_size path (vit.py), the reference for other sizes."""
    model = load_inference_model(str(source)).model
    model.cfg = model.cfg.replace(dynamic_img_size=True)
    return model


@pytest.fixture(scope="module")
def cifar_onnx(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """vit_n_4_32 (the full CIFAR model) exported with dynamic batch and size, checked on 256 real images."""
    tmp = tmp_path_factory.mktemp("onnx")
    ckpt = checkpoint(tmp / "n.safetensors")
    out = tmp / "n.onnx"
    meta = run_export(load_inference_model(str(ckpt)), "onnx", out, dynamic_size=True, check_folder=CHECK_IMAGES)
    return ckpt, meta


def test_onnx_of_the_cifar_model_matches_eager_on_256_real_images(cifar_onnx: tuple[Path, dict]) -> None:
    ckpt, meta = cifar_onnx
    native = meta["check"]["native_size"]
    assert native["inputs"].startswith("256 images") and native["input_size"] == 32
    assert native["max_abs_diff"] <= 1e-4 and native["top1_agreement"] == 100.0
    assert native["batch_sizes"] == [1, 50]  # the dynamic batch, exercised
    other = meta["check"]["other_size"]
    assert other["input_size"] == 48 and other["max_abs_diff"] <= 1e-4 and other["top1_agreement"] == 100.0
    assert meta["check"]["passed"]
    stored = json.loads(metadata_path(ckpt.with_suffix(".onnx")).read_text())
    assert stored["check"] == meta["check"] and stored["classes"][:2] == ["c0", "c1"]
    assert stored["mean"] == list(get_spec("vit_n_4_32").mean) and stored["input_size"] == [3, 32, 32]


@pytest.mark.parametrize("shape", [(1, 3, 32, 32), (7, 3, 32, 32), (3, 3, 24, 24), (2, 3, 40, 64), (1, 3, 96, 96)])
def test_onnxruntime_dynamic_batch_and_size(cifar_onnx: tuple[Path, dict], shape: tuple[int, ...]) -> None:
    ckpt, _ = cifar_onnx
    session = ort.InferenceSession(str(ckpt.with_suffix(".onnx")), providers=["CPUExecutionProvider"])
    x = torch.randn(shape, generator=torch.Generator().manual_seed(sum(shape)))
    with torch.no_grad():
        ref = eager_dynamic(ckpt)(x).numpy()
    out = session.run(None, {"x": x.numpy()})[0]
    assert out.shape == (shape[0], 10)
    assert np.abs(out - ref).max() <= 1e-4


def test_static_size_export_keeps_batch_dynamic_only(tmp_path: Path) -> None:
    ckpt = checkpoint(tmp_path / "s.safetensors", depth=2)
    out = tmp_path / "s.onnx"
    meta = run_export(load_inference_model(str(ckpt)), "onnx", out, check_folder=CHECK_IMAGES, check_count=64)
    assert meta["check"]["passed"] and "other_size" not in meta["check"]
    dims = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).get_inputs()[0].shape
    assert isinstance(dims[0], str) and dims[1:] == [3, 32, 32]


def test_with_preprocess_takes_uint8_nhwc_and_returns_probabilities(tmp_path: Path) -> None:
    ckpt = checkpoint(tmp_path / "p.safetensors", depth=2)
    out = tmp_path / "p.onnx"
    im = load_inference_model(str(ckpt))
    meta = run_export(im, "onnx", out, dynamic_size=True, with_preprocess=True, check_folder=CHECK_IMAGES,
                      check_count=64)
    assert meta["check"]["passed"] and meta["check"]["compared"] == "probabilities"
    assert meta["input"]["dtype"] == "uint8" and meta["input"]["shape"] == ["batch", "H", "W", 3]
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    u8 = torch.randint(0, 256, (3, 40, 40, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    probs = session.run(None, {"x": u8.numpy()})[0]
    dc = im.data_config
    mean, std = torch.tensor(dc.mean).view(1, 3, 1, 1), torch.tensor(dc.std).view(1, 3, 1, 1)
    x = (u8.permute(0, 3, 1, 2).float() / 255 - mean) / std
    with torch.no_grad():
        ref = eager_dynamic(ckpt)(x).softmax(-1).numpy()
    assert np.allclose(probs.sum(-1), 1.0, atol=1e-5) and np.abs(probs - ref).max() <= 1e-5


@pytest.mark.parametrize("fmt", ["torchscript", "pt2"])
def test_torchscript_and_pt2_match_eager_at_other_batches_and_sizes(tmp_path: Path, fmt: str) -> None:
    ckpt = checkpoint(tmp_path / "t.safetensors", depth=2)
    out = tmp_path / f"t.{fmt}"
    meta = run_export(load_inference_model(str(ckpt)), fmt, out, dynamic_size=True, check_folder=CHECK_IMAGES,
                      check_count=32)
    assert meta["check"]["passed"], meta["check"]
    assert meta["check"]["native_size"]["max_abs_diff"] <= 1e-5


def test_cli_prints_the_check_and_writes_metadata(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    ckpt = checkpoint(tmp_path / "cli.safetensors", depth=1)
    out = tmp_path / "exported" / "m.pt2"
    code = cli_main(["export", str(ckpt), "--format", "pt2", "--out", str(out), "--check_images", CHECK_IMAGES,
                     "--check_count", "20"])
    printed = capsys.readouterr().out
    assert code == 0 and out.is_file() and "top-1 agreement 100.00%" in printed
    meta = json.loads(metadata_path(out).read_text())
    assert meta["model_name"] == "vit_n_4_32" and meta["format"] == "pt2" and meta["versions"]["torch"]


def test_default_check_images_are_found_from_any_working_directory(tmp_path: Path, monkeypatch,
                                                                     capsys: pytest.CaptureFixture) -> None:
    """A checkpoint that records no data and no --check_images: the bundled sample's real images, not random ones,
    whatever folder the command runs in."""
    ckpt = checkpoint(tmp_path / "c.safetensors", depth=1)
    monkeypatch.chdir(tmp_path)
    assert cli_main(["export", str(ckpt), "--format", "pt2", "--out", "m.pt2", "--check_count", "8"]) == 0
    meta = json.loads(metadata_path(tmp_path / "m.pt2").read_text())
    assert "random" not in json.dumps(meta["check"]) and "8 images" in capsys.readouterr().out


@pytest.mark.slow
def test_onnx_of_vit_b_32_224_matches_eager_on_256_cifar_images(tmp_path: Path) -> None:
    ckpt = checkpoint(tmp_path / "b32.safetensors", "vit_b_32_224", num_classes=10)
    meta = run_export(load_inference_model(str(ckpt)), "onnx", tmp_path / "b32.onnx", dynamic_size=True,
                      check_folder=CHECK_IMAGES)
    native = meta["check"]["native_size"]
    assert native["inputs"].startswith("256 images") and native["max_abs_diff"] <= 1e-4
    assert native["top1_agreement"] == 100.0 and meta["check"]["other_size"]["top1_agreement"] == 100.0


@pytest.mark.parametrize("pos_embed", ["learn", "sincos2d", "none"])
def test_every_pos_embed_variant_exports_to_onnx_with_the_check_passing(tmp_path: Path, pos_embed: str) -> None:
    """A position embedding is a `ViTConfig.pos_embed` value: vit.py alone; export and checkpoints follow."""
    ckpt = checkpoint(tmp_path / "v.safetensors", depth=1, pos_embed=pos_embed)
    im = load_inference_model(str(ckpt))
    assert im.model.cfg.pos_embed == pos_embed
    assert ("pos_embed" in im.model.state_dict()) == (pos_embed == "learn")  # fixed values are not weights
    meta = run_export(im, "onnx", tmp_path / "v.onnx", dynamic_size=True, check_folder=CHECK_IMAGES, check_count=32)
    assert meta["check"]["passed"], meta["check"]
    assert meta["check"]["other_size"]["input_size"] == 48
