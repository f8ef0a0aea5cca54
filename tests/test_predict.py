"""vitkit predict: class names, probabilities equal to the model's, formats, per-file errors."""
from __future__ import annotations

import csv
import io
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from vitkit.cli import main as cli_main
from vitkit.data.preprocess import DataConfig
from vitkit.data.transforms import build_transform
from vitkit.engine.checkpoint import save_checkpoint
from vitkit.models import create_model, get_spec
from vitkit.tools.inference import (
    DEFAULT_MAX_PIXELS,
    ImageError,
    default_class_names,
    image_to_tensor,
    imagenet_class_names,
)

REPO = Path(__file__).resolve().parents[1]
CIFAR = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def checkpoint(path: Path, num_classes: int = 10, class_names: list[str] | None = CIFAR) -> Path:
    torch.manual_seed(0)
    model = create_model("vit_n_4_32", depth=2, num_classes=num_classes)
    spec = get_spec("vit_n_4_32")
    return save_checkpoint(path, model, model_name="vit_n_4_32", class_names=class_names,
                           data_config=DataConfig(32, spec.mean, spec.std, spec.interpolation, spec.crop_pct))


@pytest.fixture()
def images(tmp_path: Path) -> Path:
    folder = tmp_path / "imgs"
    (folder / "sub").mkdir(parents=True)
    for i, cls in enumerate(("cat", "ship", "frog")):
        shutil.copy(REPO / "data/cifar10_sample/test" / cls / "0003.jpg",
                    folder / ("sub" if i == 2 else "") / f"{cls}.jpg")
    good = (REPO / "data/cifar10_sample/test/dog/0000.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (folder / "notes.png").write_bytes(b"this is not an image")
    (folder / "empty.jpg").write_bytes(b"")
    gray16 = Image.fromarray((np.arange(32 * 32).reshape(32, 32) * 60).astype(np.uint16))  # 16-bit grayscale
    gray16.save(folder / "gray16.png")
    Image.new("CMYK", (40, 30), (10, 200, 30, 0)).save(folder / "cmyk.jpg")
    return folder


def run_json(args: list[str], capsys: pytest.CaptureFixture) -> tuple[int, list[dict], str]:
    code = cli_main(["predict", *args, "--format", "json"])
    out = capsys.readouterr()
    return code, json.loads(out.out), out.err


def test_predictions_are_the_models_probabilities_with_checkpoint_names(tmp_path: Path, images: Path,
                                                                        capsys: pytest.CaptureFixture) -> None:
    ckpt = checkpoint(tmp_path / "c.safetensors")
    code, results, err = run_json([str(ckpt), str(images / "cat.jpg"), str(images / "sub"), "--topk", "3"], capsys)
    assert code == 0 and [Path(r["file"]).name for r in results] == ["cat.jpg", "frog.jpg"]
    # the reference: the eval transform and the eager model, by hand
    model = create_model("vit_n_4_32", depth=2)
    model.load_state_dict(load_file(str(ckpt)))
    spec = get_spec("vit_n_4_32")
    t = build_transform(DataConfig(32, spec.mean, spec.std, spec.interpolation, spec.crop_pct), train=False)
    with torch.no_grad():
        probs = model.eval()(t(Image.open(images / "cat.jpg"))[None]).softmax(-1)[0]
    top = probs.topk(3)
    got = results[0]["predictions"]
    assert [p["index"] for p in got] == top.indices.tolist()
    assert [p["label"] for p in got] == [CIFAR[i] for i in top.indices.tolist()]
    assert [p["probability"] for p in got] == pytest.approx(top.values.tolist(), abs=1e-6)


def test_bad_images_get_their_own_error_and_the_rest_still_run(tmp_path: Path, images: Path,
                                                                capsys: pytest.CaptureFixture) -> None:
    ckpt = checkpoint(tmp_path / "c.safetensors")
    code, results, err = run_json([str(ckpt), str(images)], capsys)
    by_name = {Path(r["file"]).name: r for r in results}
    assert code == 1
    assert "truncated" in by_name["truncated.jpg"]["error"]
    assert "not an image" in by_name["notes.png"]["error"]
    assert "empty" in by_name["empty.jpg"]["error"]
    for ok in ("cat.jpg", "frog.jpg", "ship.jpg", "gray16.png", "cmyk.jpg"):  # odd modes are converted, not refused
        assert len(by_name[ok]["predictions"]) == 5, ok
    assert err.count("error: ") == 3


def test_decompression_bomb_is_refused_from_its_header(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    ckpt = checkpoint(tmp_path / "c.safetensors")
    big = tmp_path / "big.png"
    Image.new("1", (8000, 6000)).save(big)  # 48 Mpx of zeros: a few KB on disk
    assert 8000 * 6000 > DEFAULT_MAX_PIXELS
    code, results, _ = run_json([str(ckpt), str(big)], capsys)
    assert code == 1 and "8000x6000 = 48000000 pixels" in results[0]["error"] and "limit" in results[0]["error"]


def test_table_and_csv_formats(tmp_path: Path, images: Path, capsys: pytest.CaptureFixture) -> None:
    ckpt = checkpoint(tmp_path / "c.safetensors")
    assert cli_main(["predict", str(ckpt), str(images / "cat.jpg"), "--topk", "2"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].endswith("cat.jpg") and len(table) == 3 and "%" in table[1]
    assert cli_main(["predict", str(ckpt), str(images / "cat.jpg"), str(images / "empty.jpg"), "--format", "csv"]) == 1
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [r["rank"] for r in rows[:5]] == ["1", "2", "3", "4", "5"] and rows[5]["error"].startswith("empty")


def test_class_names_checkpoint_first_then_imagenet(tmp_path: Path, images: Path,
                                                    capsys: pytest.CaptureFixture) -> None:
    names = imagenet_class_names()
    assert len(names) == 1000 and len(set(names)) == 1000 and names[0] == "tench" and names[999] == "toilet tissue"
    assert default_class_names(1000) == names and default_class_names(3) == ["class_0", "class_1", "class_2"]
    ckpt = checkpoint(tmp_path / "in1k.safetensors", num_classes=1000, class_names=None)
    _, results, _ = run_json([str(ckpt), str(images / "cat.jpg")], capsys)
    assert all(p["label"] == names[p["index"]] for p in results[0]["predictions"])
    own = [f"mine_{i}" for i in range(1000)]
    ckpt = checkpoint(tmp_path / "own.safetensors", num_classes=1000, class_names=own)
    _, results, _ = run_json([str(ckpt), str(images / "cat.jpg")], capsys)
    assert all(p["label"] == own[p["index"]] for p in results[0]["predictions"])


JPEG = (REPO / "data/cifar10_sample/test/cat/0001.jpg").read_bytes()


def _png_bytes() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (20, 12), (200, 10, 90)).save(buf, format="PNG")
    return buf.getvalue()


@settings(max_examples=int(os.environ.get("VITKIT_FUZZ_EXAMPLES", "150")), deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(base=st.sampled_from([JPEG, _png_bytes(), b""]), cuts=st.lists(st.integers(0, 4000), max_size=3),
       flips=st.lists(st.tuples(st.integers(0, 4000), st.integers(0, 255)), max_size=8), junk=st.binary(max_size=64))
def test_fuzzed_image_bytes_give_a_tensor_or_a_clear_image_error(base: bytes, cuts: list[int],
                                                                  flips: list[tuple[int, int]], junk: bytes) -> None:
    """Damaged JPEG/PNG bytes (bytes flipped, cut short, junk appended) never crash the decoding path."""
    data = bytearray(base)
    for pos, value in flips:
        if data:
            data[pos % len(data)] = value
    for cut in cuts:
        data = data[: cut % (len(data) + 1)]
    data += junk
    spec = get_spec("vit_n_4_32")
    transform = build_transform(DataConfig(32, spec.mean, spec.std, spec.interpolation, spec.crop_pct), train=False)
    try:
        x = image_to_tensor(bytes(data), transform)
    except ImageError as e:
        assert e.reason in ("empty", "unsupported", "corrupt", "too_large") and str(e)
    else:
        assert x.shape == (3, 32, 32) and torch.isfinite(x).all()
