"""Data you can trust (issue 17): symlink loops, an odd first image, EXIF orientation, `vitkit data check`."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vitkit.data.check import main as data_check
from vitkit.data.datasets import build_dataset, image_size_hint, list_images, open_image, scan_image_folder
from vitkit.data.loader import build_loader
from vitkit.data.preprocess import DataConfig


def _folder(root: Path, counts: dict[str, int], size: tuple[int, int] = (32, 32)) -> Path:
    rng = np.random.default_rng(0)
    for cls, n in counts.items():
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / cls / f"{i:03d}.png")
    return root


def test_a_symlink_loop_in_a_class_folder_counts_each_image_once(tmp_path: Path) -> None:
    root = _folder(tmp_path / "train", {"cat": 3, "dog": 2})
    os.symlink(".", root / "cat" / "loop")  # `loop -> .`: an unguarded walk lists cat 41 times over
    assert len(list_images(root / "cat")) == 3
    ds = scan_image_folder(root)
    assert [ds.targets.count(c) for c in range(2)] == [3, 2]


def test_two_links_into_each_other_end(tmp_path: Path) -> None:
    root = _folder(tmp_path / "train", {"cat": 2})
    (root / "cat" / "a").mkdir()
    (root / "cat" / "b").mkdir()
    os.symlink("../b", root / "cat" / "a" / "to_b")
    os.symlink("../a", root / "cat" / "b" / "to_a")  # a -> b -> a -> ... without end when unguarded
    assert len(list_images(root / "cat")) == 2
    # `vitkit data check` on the same tree ends, in a subprocess with a deadline (a hang fails the test)
    proc = subprocess.run([sys.executable, "-m", "vitkit.cli", "data", "check", str(root)], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0 and "1 classes, 2 images" in proc.stdout and "no problems found" in proc.stdout


def test_an_odd_first_image_does_not_decide_the_dataset_size(tmp_path: Path, caplog) -> None:
    root = _folder(tmp_path / "train", {"a": 6, "b": 6})
    Image.new("RGB", (1, 1), (255, 0, 0)).save(root / "a" / "000.png")  # sorts first
    ds = build_dataset(str(tmp_path), name="imagefolder", split="train", train=True)
    with caplog.at_level("WARNING"):
        assert image_size_hint(ds) == (32, 32)
    assert "image sizes vary" in caplog.text
    loader = build_loader(ds, data_config=DataConfig(input_size=32, crop_pct=1.0), train=False, batch_size=4)
    images, _ = next(iter(loader))
    assert images.shape == (4, 3, 32, 32)
    assert images[1:].std() > 0.5  # the real images kept their pixels (not shrunk to 1x1 and back)


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    # 40x20 stored pixels, left half black, right half white, tagged "rotate 90 clockwise to view" (6)
    stored = np.zeros((20, 40, 3), dtype=np.uint8)
    stored[:, 20:] = 255
    img = Image.fromarray(stored)
    exif = img.getexif()
    exif[0x0112] = 6
    img.save(tmp_path / "rotated.jpg", exif=exif.tobytes(), quality=95)
    Image.fromarray(stored).save(tmp_path / "plain.jpg", quality=95)
    with open_image(tmp_path / "rotated.jpg") as up:
        pixels = np.asarray(up.convert("L"), dtype=np.float32)
    assert up.size == (20, 40)  # upright: 20 wide, 40 high
    assert pixels[:15].mean() < 40 and pixels[25:].mean() > 215  # the black half is on top once upright
    with open_image(tmp_path / "plain.jpg") as plain:
        assert plain.size == (40, 20) and plain.format == "JPEG"  # untagged: untouched and not decoded yet


def test_data_check_lists_files_that_break_the_decoder_and_goes_on(tmp_path: Path, capsys) -> None:
    root = _folder(tmp_path / "train", {"a": 2, "b": 2})
    (root / "a" / "text.png").write_text("not an image")
    (root / "b" / "cut.png").write_bytes((root / "b" / "000.png").read_bytes()[:60])
    assert data_check(["check", str(root)]) == 1
    out = capsys.readouterr().out
    assert "unreadable: " + str(root / "a" / "text.png") in out and "unreadable: " + str(root / "b" / "cut.png") in out
    assert "2 problem(s) found" in out


@pytest.mark.parametrize("bad", ["missing", "file"])
def test_data_check_of_a_missing_folder_is_one_error(tmp_path: Path, bad: str) -> None:
    target = tmp_path / "nothing"
    if bad == "file":
        target.write_text("x")
    proc = subprocess.run([sys.executable, "-m", "vitkit.cli", "data", "check", str(target)], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [f"error: {target} is not a folder"]
