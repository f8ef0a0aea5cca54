"""A path given to any verb that is the wrong kind of thing (issue 17): a FIFO or a device where a file goes
(opening a FIFO blocks until something writes to it, /dev/zero never ends), a folder where a file goes, a file
where a folder goes, an --out nothing can be written to. Each is one `error:` line naming the path and what it
is, exit code 2, within seconds, and nothing is written. Found by trying every verb's path arguments with each:
before, four of them hung (--pretrained, validate --ckpt_path, convert and predict's images given a FIFO),
predict of /dev/zero raised MemoryError, export --out a folder raised torch's RuntimeError, a file as
--ckpt_save_dir or pack's DST raised FileExistsError, and export --check_images FIFO fell back to random images
with exit 0.
"""
from __future__ import annotations

import os
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vitkit.cli import main
from vitkit.data.datasets import build_dataset
from vitkit.data.loader import build_loader
from vitkit.data.preprocess import DataConfig
from vitkit.engine.checkpoint import save_checkpoint
from vitkit.errors import path_problem
from vitkit.models import create_model, get_spec

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "data" / "cifar10_sample"
IMAGE = sorted((SAMPLE / "test" / "cat").iterdir())[0]


@pytest.fixture(scope="module")
def places(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("places")
    os.mkfifo(root / "fifo")
    (root / "shards").mkdir()
    os.mkfifo(root / "shards" / "shard-000000.tar")
    (root / "empty").mkdir()
    (root / "file.txt").write_text("not a folder\n")
    torch.manual_seed(0)
    spec = get_spec("vit_n_4_32")
    names = sorted(p.name for p in (SAMPLE / "test").iterdir())
    ckpt = save_checkpoint(root / "ckpt.safetensors", create_model("vit_n_4_32", depth=1, num_classes=10),
                           model_name="vit_n_4_32", class_names=names,
                           data_config=DataConfig(32, spec.mean, spec.std, spec.interpolation, spec.crop_pct))
    return {"fifo": str(root / "fifo"), "zero": "/dev/zero", "dir": str(root / "empty"),
            "file": str(root / "file.txt"), "ckpt": str(ckpt), "img": str(IMAGE), "data": str(SAMPLE),
            "shard": str(root / "shards" / "shard-000000.tar"),
            "shards": str(root / "shards" / "shard-{000000..000000}.tar")}


class Hung(BaseException):
    """Not an Exception: the code under test catches those per file (a bad image is listed and skipped)."""


@pytest.fixture
def deadline():
    """A hang (the bug this file is about) fails the test after 60 s instead of holding the suite; the alarm
    repeats every second after that, so a second blocking open is interrupted too."""
    def fail(*_: object) -> None:
        raise Hung("the verb hung on the path")

    old = signal.signal(signal.SIGALRM, fail)
    signal.setitimer(signal.ITIMER_REAL, float(os.environ.get("VITKIT_TEST_DEADLINE", 60)), 1.0)
    yield
    signal.setitimer(signal.ITIMER_REAL, 0)
    signal.signal(signal.SIGALRM, old)


SMOKE = ["train", "--smoke", "--device", "cpu"]
CASES = [
    (SMOKE + ["--pretrained", "{fifo}", "--ckpt_save_dir", "{out}"], "{fifo} is a FIFO (named pipe), not a regular"),
    (SMOKE + ["--pretrained", "{zero}", "--ckpt_save_dir", "{out}"], "/dev/zero is a character device"),
    (SMOKE + ["--resume", "{fifo}"], "--resume {fifo} is a FIFO"),
    (SMOKE + ["--resume", "{dir}"], "--resume {dir} is a folder, not a file"),
    (SMOKE + ["--data_dir", "{file}", "--dataset", "imagefolder", "--ckpt_save_dir", "{out}"],
     "data_dir '{file}' is a file, not a folder"),
    (SMOKE + ["--ckpt_save_dir", "{file}"], "'{file}' is a file, not a folder"),
    (["validate", "--ckpt_path", "{fifo}", "--data_dir", "{data}", "--dataset", "imagefolder"],
     "ckpt_path {fifo} is a FIFO"),
    (["validate", "--ckpt_path", "{zero}", "--data_dir", "{data}", "--dataset", "imagefolder"],
     "ckpt_path /dev/zero is a character device"),
    (["validate", "--ckpt_path", "{ckpt}", "--dataset", "wds", "--data_dir", "{shard}"], "shard {shard} is a FIFO"),
    (["validate", "--ckpt_path", "{ckpt}", "--dataset", "wds", "--data_dir", "{shards}"], "shard {shard} is a FIFO"),
    (["predict", "{fifo}", "{img}"], "{fifo} is a FIFO"),
    (["predict", "{ckpt}", "{fifo}"], "{fifo} is a FIFO"),
    (["predict", "{ckpt}", "{zero}"], "/dev/zero is a character device"),
    (["export", "{ckpt}", "--format", "torchscript", "--out", "{dir}"], "--out {dir} is a folder; give the file"),
    (["export", "{ckpt}", "--format", "torchscript", "--out", "{file}/m.ts"], "{file} is a file, not a folder"),
    (["export", "{ckpt}", "--format", "torchscript", "--out", "{out}/m.ts", "--check_images", "{fifo}"],
     "--check_images {fifo} is a FIFO (named pipe), not a folder"),
    (["export", "{ckpt}", "--format", "torchscript", "--out", "{out}/m.ts", "--check_images", "{dir}"],
     "--check_images {dir} holds no image files"),
    (["serve", "{fifo}"], "{fifo} is a FIFO"),
    (["convert", "{fifo}", "{out}/c.safetensors"], "{fifo} is a FIFO"),
    (["convert", "{zero}", "{out}/c.safetensors"], "/dev/zero is a character device"),
    (["data", "pack", "{data}", "{file}"], "'{file}' is a file, not a folder"),
    (["push", "{fifo}", "user/repo"], "{fifo} is a FIFO"),
]


@pytest.mark.parametrize("argv, said", CASES, ids=[" ".join(a[:1] + a[-2:]) for a, _ in CASES])
def test_a_path_of_the_wrong_kind_is_one_line_in_every_verb(argv, said, places, deadline, tmp_path, capsys,
                                                            monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    values = {**places, "out": str(tmp_path / "out")}
    before = sorted(Path(places["ckpt"]).parent.iterdir())
    rc = main([a.format(**values) for a in argv])
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.startswith("error:")]
    assert rc == 2 and "Traceback" not in err and len(lines) == 1, err[-2000:]
    assert said.format(**values) in lines[0], lines[0]
    assert not (tmp_path / "out").exists() and not [p for p in tmp_path.iterdir()]  # nothing was written
    assert sorted(Path(places["ckpt"]).parent.iterdir()) == before


@pytest.mark.parametrize("want, path, expected", [
    ("file", "{fifo}", "is a FIFO (named pipe), not a regular file"),
    ("folder", "{fifo}", "is a FIFO (named pipe), not a folder"),
    ("file", "{zero}", "is a character device, not a regular file"),
    ("file", "{dir}", "is a folder, not a file"),
    ("folder", "{file}", "is a file, not a folder"),
    ("file or folder", "{dir}", None),
    ("file or folder", "{file}", None),
    ("file", "{file}/x", "cannot be used (Not a directory)"),
    ("folder", "{dir}/missing", "does not exist"),
])
def test_path_problem_names_what_the_path_is(want: str, path: str, expected: str | None, places) -> None:
    assert path_problem(path.format(**places), want=want) == expected


# -- found inside a dataset: a FIFO named x.jpg, a link to /dev/zero named y.jpg -----------------------------------

@pytest.fixture
def planted(tmp_path: Path) -> Path:
    """An ImageFolder of 2 classes x 3 real images, with a FIFO and a /dev/zero link planted in class `b` of
    both splits (they sort last)."""
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for cls in ("a", "b"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(3):
                Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(tmp_path / split / cls /
                                                                                         f"{i}.png")
        os.mkfifo(tmp_path / split / "b" / "x_fifo.jpg")
        os.symlink("/dev/zero", tmp_path / split / "b" / "y_zero.jpg")
    return tmp_path


def test_data_check_names_planted_special_files_and_ends(planted: Path, deadline, capsys) -> None:
    assert main(["data", "check", str(planted)]) == 1
    out = capsys.readouterr().out
    for split in ("train", "test"):
        assert f"unreadable: {planted / split / 'b' / 'x_fifo.jpg'} (OSError: " in out
        assert f"{planted / split / 'b' / 'y_zero.jpg'} is a character device, not a regular file" in out
    assert "4 problem(s) found" in out


def test_the_loader_replaces_and_names_planted_special_files(planted: Path, deadline) -> None:
    ds = build_dataset(str(planted), name="imagefolder", split="train", train=False)
    loader = build_loader(ds, data_config=DataConfig(input_size=32, crop_pct=1.0), train=False, batch_size=4)
    assert sum(len(y) for _, y in loader) == 8  # every slot filled: the two replaced by readable images
    assert sorted(Path(p).name for p in loader.stats()["bad_paths"]) == ["x_fifo.jpg", "y_zero.jpg"]


def test_predict_answers_the_readable_files_and_names_the_others(planted: Path, places, deadline, capsys) -> None:
    assert main(["predict", places["ckpt"], str(planted / "test"), "--format", "csv"]) == 1  # 1: some failed
    captured = capsys.readouterr()
    rows = captured.out.strip().splitlines()[1:]
    answered = {r.split(",")[0] for r in rows if ",,,,," not in r}  # one row per top-k class
    failed = {r.split(",")[0] for r in rows if ",,,,," in r}
    assert len(answered) == 6 and {Path(f).name for f in failed} == {"x_fifo.jpg", "y_zero.jpg"}
    assert f"error: {planted / 'test' / 'b' / 'x_fifo.jpg'}: " in captured.err and "is a FIFO" in captured.err


def test_pack_refuses_a_planted_fifo_in_one_line_and_keeps_finished_shards(planted: Path, deadline, tmp_path_factory,
                                                                          capsys) -> None:
    dst = tmp_path_factory.mktemp("packed")
    assert main(["data", "pack", str(planted), str(dst)]) == 2
    err = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error:")]
    assert len(err) == 1 and f"{planted / 'test' / 'b' / 'x_fifo.jpg'} is a FIFO" in err[0], err
    assert "then run the same pack again" in err[0]
