"""Data at scale (issue 14): `vitkit data pack` into WebDataset tar shards, `--dataset wds` reading them
map-style, exact where it matters.

The data: a subset of the bundled CIFAR-10 sample (8 training JPEGs per class; 23 test JPEGs, 5 of the first
class and 2 of each other, so 2 and 3 processes get uneven shares), packed into ~16 KB shards (a handful of
images each, so every epoch crosses many shard boundaries). Training here is real `vitkit train` runs of
vit_n_4_32 (in this process, or as processes for the kill test, with the driver of tests/test_reliability.py).
"""
from __future__ import annotations

import dataclasses
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from PIL import Image

from vitkit.cli import main as cli_main
from vitkit.data import pack as P
from vitkit.data.check import main as data_check
from vitkit.data.datasets import ArrayDataset, build_dataset
from vitkit.data.loader import build_loader
from vitkit.data.preprocess import DataConfig
from vitkit.data.shards import ShardDataset, expand_braces, open_shards
from vitkit.engine.checkpoint import load_checkpoint, load_train_state
from vitkit.engine.config import Config
from vitkit.engine.data_args import data_config_from_config, dataset_from_config, loader_from_config
from vitkit.errors import DataError

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "data" / "cifar10_sample"
SHARD_SIZE = "16KB"  # ~6 CIFAR JPEGs per shard
VAL_IMAGES = 23
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cifar_subset")
    for split, n in (("train", 8), ("test", 2)):
        for c, cls in enumerate(sorted(p.name for p in (SAMPLE / split).iterdir())):
            (root / split / cls).mkdir(parents=True)
            for f in sorted((SAMPLE / split / cls).iterdir())[: n + 3 * (split == "test" and c == 0)]:
                shutil.copy2(f, root / split / cls / f.name)
    return root


@pytest.fixture(scope="module")
def packed(folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    dst = tmp_path_factory.mktemp("packed") / "cifar"
    assert cli_main(["data", "pack", str(folder), str(dst), "--shard_size", SHARD_SIZE]) == 0
    return dst


def copy_packed(packed: Path, to: Path) -> Path:
    shutil.copytree(packed, to)
    return to


def shard_files(root: Path, split: str = "train") -> list[Path]:
    return sorted((root / split).glob("shard-*.tar"))


# -- pack and read back -----------------------------------------------------------------------------------------

def test_pack_reads_back_classes_counts_and_bytes(folder: Path, packed: Path) -> None:
    meta = json.loads((packed / "dataset.json").read_text())
    assert meta["format"] == "vitkit-shards" and sorted(meta["splits"]) == ["test", "train"]
    assert meta["source"] == {"path": str(folder.resolve()), "dataset": "imagefolder"}
    for split, n in (("train", 80), ("test", VAL_IMAGES)):
        info = meta["splits"][split]
        src = build_dataset(str(folder), name="imagefolder", split=split, train=False)
        ds = build_dataset(str(packed), name="wds", split=split, train=False)
        assert isinstance(ds, ShardDataset) and len(ds) == len(src) == n == info["num_samples"]
        assert ds.classes == src.classes == info["classes"] and ds.targets == src.targets
        assert sum(s["samples"] for s in info["shards"]) == n and len(info["shards"]) == len(shard_files(packed, split))
        assert all(s["bytes"] <= 16_000 for s in info["shards"]) and len(info["shards"]) >= 4
        # the original bytes, in the folder's sorted order (index i here is index i there)
        for i in range(n):
            data, ext = ds.raw(i)
            assert data == Path(src.path(i)).read_bytes() and ext == "jpg"
            assert ds.path(i).endswith(f".tar:{i:08d}.jpg")
        with ds.load(3) as a, src.load(3) as b:
            assert a.format == b.format == "JPEG" and np.array_equal(np.asarray(a), np.asarray(b))


def test_shards_are_plain_webdataset_tars(folder: Path, packed: Path) -> None:
    """webdataset's own reader sees the same samples (key, image bytes, .cls) in the same order."""
    wds = pytest.importorskip("webdataset")
    src = build_dataset(str(folder), name="imagefolder", split="train", train=False)
    n = len(shard_files(packed))
    seen = [(s["__key__"], s["jpg"], int(s["cls"])) for s in
            wds.WebDataset(str(packed / "train" / f"shard-{{000000..{n - 1:06d}}}.tar"), shardshuffle=False)]
    assert [k for k, _, _ in seen] == [f"{i:08d}" for i in range(80)]
    assert all(b == Path(src.path(i)).read_bytes() and t == src.targets[i] for i, (_, b, t) in enumerate(seen))
    with tarfile.open(shard_files(packed)[0]) as tar:
        m = tar.getmembers()[0]
        assert (m.name, m.mtime, m.uid) == ("00000000.jpg", 0, 0)


def test_pattern_url_and_scanned_forms_read_the_same_samples(packed: Path, tmp_path: Path) -> None:
    full = open_shards(str(packed), "train")
    n = len(shard_files(packed))
    # a brace pattern with {split}: the dataset.json beside the shards supplies classes and offsets
    pat = open_shards(str(packed / "{split}" / f"shard-{{000000..{n - 1:06d}}}.tar"), "train")
    assert len(pat) == 80 and pat.targets == full.targets and pat.classes == full.classes
    part = open_shards(str(packed / "train" / "shard-{000001..000002}.tar"), "train")
    first = int(json.loads((packed / "dataset.json").read_text())["splits"]["train"]["shards"][1]["first"])
    assert [part.raw(i)[0] for i in range(len(part))] == [full.raw(first + i)[0] for i in range(len(part))]
    assert part.path(0).endswith(f"shard-000001.tar:{first:08d}.jpg")
    # fsspec (file:// here; s3:// and gs:// go the same way when their backends are installed)
    url = open_shards(f"file://{packed}", "train")
    assert url.path(0).startswith("file://") and [url.raw(i) for i in (0, 79)] == [full.raw(i) for i in (0, 79)]
    # tars with no dataset.json at all are scanned: same bytes, labels from .cls, classes "0".."K-1"
    for f in shard_files(packed):
        shutil.copy(f, tmp_path / f.name)
    scanned = open_shards(str(tmp_path / f"shard-{{000000..{n - 1:06d}}}.tar"), "train")
    assert scanned.targets == full.targets and scanned.classes == [str(c) for c in range(10)]
    assert all(scanned.raw(i) == full.raw(i) for i in range(80))


def test_brace_patterns_and_sizes() -> None:
    assert expand_braces("s-{000..002}.tar") == ["s-000.tar", "s-001.tar", "s-002.tar"]
    assert expand_braces("{a,b}/x-{8..10}.tar") == ["a/x-8.tar", "a/x-9.tar", "a/x-10.tar", "b/x-8.tar",
                                                    "b/x-9.tar", "b/x-10.tar"]
    assert expand_braces("plain.tar") == ["plain.tar"]
    assert [P.parse_size(s) for s in ("256MB", "1GiB", "65536", "16 KB")] == [256 * 10**6, 2**30, 65536, 16_000]
    with pytest.raises(DataError, match="--shard_size"):
        P.parse_size("lots")


def test_pack_is_deterministic_and_resumes_keeping_verified_shards(folder: Path, packed: Path, tmp_path: Path,
                                                                     monkeypatch, capsys) -> None:
    """Interrupted after 3 shards (a shard half-written by a kill left beside them, one finished shard damaged
    afterwards): the same command keeps the 2 intact ones untouched and ends with the clean pack's bytes."""
    dst = tmp_path / "p"
    real, calls = P._write_shard, [0]

    def interrupted(*args, **kwargs):
        calls[0] += 1
        if calls[0] == 4:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(P, "_write_shard", interrupted)
    assert cli_main(["data", "pack", str(folder), str(dst), "--shard_size", SHARD_SIZE, "--splits", "train"]) == 130
    monkeypatch.setattr(P, "_write_shard", real)
    done = sorted((dst / "train").glob("shard-*.tar"))
    assert len(done) == 3 and (dst / P.JOURNAL).is_file() and not (dst / "dataset.json").exists()
    (dst / "train" / ".shard-000003.tar.abc.tmp").write_bytes(b"half a shard")  # what a SIGKILL leaves
    data = bytearray(done[1].read_bytes())
    data[700] ^= 0xFF  # damaged on disk after it was finished: its sha256 no longer matches
    done[1].write_bytes(bytes(data))
    before = {f.name: f.stat().st_mtime_ns for f in done}
    time.sleep(0.01)
    capsys.readouterr()
    assert cli_main(["data", "pack", str(folder), str(dst), "--shard_size", SHARD_SIZE, "--splits", "train"]) == 0
    assert "(2 kept from an earlier run," in capsys.readouterr().out
    after = sorted((dst / "train").glob("shard-*.tar"))
    assert [f.stat().st_mtime_ns == before.get(f.name) for f in after[:3]] == [True, False, True]
    assert not list((dst / "train").glob(".*.tmp")) and not (dst / P.JOURNAL).exists()
    ref = json.loads((packed / "dataset.json").read_text())["splits"]["train"]
    got = json.loads((dst / "dataset.json").read_text())["splits"]["train"]
    assert [s["sha256"] for s in got["shards"]] == [s["sha256"] for s in ref["shards"]]  # byte for byte
    assert got["index"]["sha256"] == ref["index"]["sha256"]
    # a finished pack run again only verifies
    assert cli_main(["data", "pack", str(folder), str(dst), "--shard_size", SHARD_SIZE, "--splits", "train"]) == 0
    assert f"({len(after)} kept from an earlier run, 0 written)" in capsys.readouterr().out


def test_repack_from_shards_and_from_decoded_only_images(packed: Path, tmp_path: Path) -> None:
    """Any dataset vitkit reads packs: shards into another shard size (the same bytes), and images held only
    decoded (CIFAR's python format: an ArrayDataset) as lossless PNG."""
    assert cli_main(["data", "pack", str(packed), str(tmp_path / "big"), "--shard_size", "1MB"]) == 0
    a, b = open_shards(str(packed), "test"), open_shards(str(tmp_path / "big"), "test")
    assert len(open_shards(str(tmp_path / "big"), "train").shards) == 1
    assert [a.raw(i) for i in range(len(a))] == [b.raw(i) for i in range(len(b))]
    g = torch.Generator().manual_seed(0)
    arrays = ArrayDataset(torch.randint(0, 256, (12, 32, 32, 3), dtype=torch.uint8, generator=g), [0, 1, 2] * 4,
                          ["x", "y", "z"])
    P.pack({"train": arrays}, tmp_path / "arr", shard_size=P.parse_size("8KB"), source={"path": "arrays"},
           progress=False)
    ds = open_shards(str(tmp_path / "arr"), "train")
    assert ds.targets == arrays.targets and ds.classes == ["x", "y", "z"] and ds.raw(0)[1] == "png"
    assert all(torch.equal(torch.from_numpy(np.array(ds[i][0])), arrays.images[i]) for i in range(12))


def test_data_check_understands_packed_folders(packed: Path, tmp_path: Path, capsys) -> None:
    dst = copy_packed(packed, tmp_path / "p")
    assert data_check(["check", str(dst), "--imbalance", "3"]) == 0
    out = capsys.readouterr().out
    assert "train: 10 classes, 80 images in" in out and "no problems found" in out
    ds = open_shards(str(dst), "train")
    shards = shard_files(dst)
    # one sample's JPEG bytes garbled in place (sizes unchanged), one shard cut short, one gone
    index = np.load(dst / "train" / "index.npy")
    i = int(np.flatnonzero(index["shard"] == 0)[2])
    with open(shards[0], "r+b") as f:
        f.seek(int(index["offset"][i]) + 20)
        f.write(b"\x00" * (int(index["size"][i]) - 40))
    with open(shards[1], "r+b") as f:
        f.truncate(shards[1].stat().st_size - 3000)
    shards[2].unlink()
    assert data_check(["check", str(dst), "--imbalance", "3"]) == 1
    out = capsys.readouterr().out
    assert f"checksum mismatch: {shards[0]}" in out and f"unreadable: {ds.path(i)}" in out
    assert f"truncated shard: {shards[1]}" in out and f"missing shard: {shards[2]}" in out
    assert "4 problem(s) found" in out


# -- exact where it matters --------------------------------------------------------------------------------------

def train_args(data: str, dataset: str, run_dir: Path, *extra: str, validate: bool = True) -> list[str]:
    """80 images, batch 16: 5 steps per epoch, 2 epochs; validation on the 23 test images after each."""
    return ["--model", "vit_n_4_32", "--dataset", dataset, "--data_dir", data, "--val_split", "test",
            "--image_resize", "32", "--batch_size", "16", "--epoch_size", "2", "--warmup_epochs", "0",
            "--opt", "momentum", "--lr", "0.05", "--weight_decay", "1e-4", "--seed", "7", "--deterministic",
            "--val_while_train" if validate else "--no-val_while_train", "--ckpt_save_dir", str(run_dir),
            "--keep_checkpoint_max", "10", "--log_interval", "1", *extra]


@pytest.fixture
def in_process():
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(deterministic)


def assert_same_run(a: Path, b: Path) -> None:
    ca, cb = load_checkpoint(a), load_checkpoint(b)
    assert ca.step == cb.step and ca.state_dict.keys() == cb.state_dict.keys()
    assert all(torch.equal(ca.state_dict[k], cb.state_dict[k]) for k in ca.state_dict)
    sa, sb = load_train_state(a)["optimizer"]["state"], load_train_state(b)["optimizer"]["state"]
    assert all(torch.equal(sa[i][k], sb[i][k]) for i in sa for k in sa[i])


@pytest.mark.parametrize("reader", ["in_memory", "per_sample_workers"])
def test_training_on_shards_equals_training_on_the_folder(folder: Path, packed: Path, tmp_path: Path, reader: str,
                                                          in_process) -> None:
    """Same seed, same weights (bit for bit) and the same validation: the in-memory path (32 px images are
    decoded once) and per-sample decoding in 2 worker processes reading the tars."""
    from vitkit.engine.train import run

    extra = ("--max_steps", "7") + (("--in_memory", "false", "--num_parallel_workers", "2")
                                    if reader == "per_sample_workers" else ("--num_parallel_workers", "0"))
    run(train_args(str(folder), "imagefolder", tmp_path / "folder", *extra))
    run(train_args(str(packed), "wds", tmp_path / "shards", *extra))
    assert_same_run(tmp_path / "shards" / "last.safetensors", tmp_path / "folder" / "last.safetensors")
    ours, ref = [json.loads((tmp_path / d / "metrics.jsonl").read_text().splitlines()[0]) for d in ("shards", "folder")]
    assert ours["val_images"] == ref["val_images"] == VAL_IMAGES and ours["val_top1"] == ref["val_top1"]
    assert ours["train_loss"] == ref["train_loss"]


DRIVER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from vitkit.engine.loop import Trainer
    from vitkit.cli import main

    n, marker, argv = int(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:]
    real_step = Trainer.train_step
    def train_step(self, batches):
        out = real_step(self, batches)
        if self.step == n:
            marker.write_text(f"step {self.step}")
            time.sleep(120)  # the test kills us here
        return out
    Trainer.train_step = train_step
    sys.exit(main(["train", *argv]))
""")


def train_proc(argv: list[str]) -> None:
    proc = subprocess.run([sys.executable, "-m", "vitkit.cli", "train", *argv], env=ENV, capture_output=True,
                          text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_kill_and_resume_on_shards_equals_the_unbroken_run(packed: Path, tmp_path: Path) -> None:
    """Stopped mid-epoch at step 3 (max_steps) and resumed there; SIGKILLed at step 8 (mid-epoch 2, the last
    save is step 5) and resumed: the same weights and optimizer state as one unbroken run, bit for bit."""
    args = lambda run_dir, *extra: train_args(str(packed), "wds", run_dir, "--in_memory", "false",  # noqa: E731
                                               "--num_parallel_workers", "0", *extra, validate=False)
    train_proc(args(tmp_path / "ref"))
    run_dir = tmp_path / "run"
    train_proc(args(run_dir, "--max_steps", "3"))
    assert load_checkpoint(run_dir / "last.safetensors").step == 3
    driver, marker = tmp_path / "driver.py", tmp_path / "reached"
    driver.write_text(DRIVER)
    proc = subprocess.Popen([sys.executable, str(driver), "8", str(marker), *args(run_dir, "--resume")], env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not marker.exists():
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() < deadline, "training did not reach step 8"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    assert load_checkpoint(run_dir / "last.safetensors").step == 5
    train_proc(args(run_dir, "--resume"))
    assert_same_run(run_dir / "last.safetensors", tmp_path / "ref" / "last.safetensors")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _eval_cfg(data: str, dataset: str) -> Config:
    return Config(model="vit_n_4_32", device="cpu", seed=7, batch_size=4, image_resize=32, num_parallel_workers=0,
                  dataset=dataset, data_dir=data, val_split="test", in_memory=False)


def _evaluate(cfg: Config, rank: int, world: int) -> tuple[dict, list[int]]:
    from vitkit.engine.evaluate import evaluate
    from vitkit.engine.runtime import seed_all
    from vitkit.models.registry import create_model, get_spec

    seed_all(cfg.seed)
    model = create_model("vit_n_4_32", depth=2, num_classes=10)
    ds = dataset_from_config(cfg, "test", train=False)
    loader = loader_from_config(cfg, ds, train=False, data_config=data_config_from_config(cfg, get_spec(cfg.model)),
                                rank=rank, world_size=world)
    return evaluate(model, loader, device="cpu", collect=True), loader.plan.epoch(0)[0].tolist()


def spawn_eval(rank: int, world: int, port: int, data: str, out: str) -> None:
    from vitkit.engine import launch as L

    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.set_num_threads(1)
    with L.distributed_session(distribute=True, device="cpu") as info:
        result, indices = _evaluate(_eval_cfg(data, "wds"), info.rank, info.world_size)
        shares = L.gather_objects(indices)
        if info.is_main:
            torch.save({"result": result, "shares": shares}, Path(out) / f"eval{world}.pt")


@pytest.mark.parametrize("world", [1, 2, 3])
def test_validation_over_shards_counts_every_image_once(folder: Path, packed: Path, tmp_path: Path,
                                                        world: int) -> None:
    """1, 2 and 3 processes (gloo) over the shards: 23 images, uneven shares, no padding, each image once, and
    the single-process folder's counts."""
    ref, _ = _evaluate(_eval_cfg(str(folder), "imagefolder"), 0, 1)
    if world == 1:
        got, shares = _evaluate(_eval_cfg(str(packed), "wds"), 0, 1)
        shares = [shares]
    else:
        mp.spawn(spawn_eval, args=(world, _free_port(), str(packed), str(tmp_path)), nprocs=world, join=True)
        saved = torch.load(tmp_path / f"eval{world}.pt", weights_only=False)
        got, shares = saved["result"], saved["shares"]
    assert sorted(i for s in shares for i in s) == list(range(VAL_IMAGES))  # every image, once
    assert len({len(s) for s in shares}) == (1 if world == 1 else 2)  # 23 does not split evenly: no padding
    for key in ("num_images", "correct1", "correct5"):
        assert got[key] == ref[key], key
    assert got["num_images"] == VAL_IMAGES and got["loss"] == pytest.approx(ref["loss"], rel=1e-6)
    assert sorted(got["targets"].tolist()) == sorted(ref["targets"].tolist())


# -- bad samples and bad shards -----------------------------------------------------------------------------

def _loader(ds, *, train: bool, workers: int = 0, **kw):
    return build_loader(ds, data_config=DataConfig(input_size=32, crop_pct=1.0), train=train, batch_size=8,
                        in_memory=False, num_workers=workers, **kw)


def test_a_corrupt_sample_is_replaced_and_named(packed: Path, tmp_path: Path, caplog) -> None:
    dst = copy_packed(packed, tmp_path / "p")
    index = np.load(dst / "train" / "index.npy")
    i = 17
    shard = shard_files(dst)[int(index["shard"][i])]
    with open(shard, "r+b") as f:
        f.seek(int(index["offset"][i]))
        f.write(b"garbage!" * (int(index["size"][i]) // 8))
    ds = open_shards(str(dst), "train")
    for workers in (0, 2):
        loader = _loader(ds, train=True, workers=workers, drop_remainder=False)
        with caplog.at_level("WARNING"):
            n = sum(len(y) for _, y in loader)
        assert n == 80 and loader.stats()["bad_images"] == 1  # replaced: the epoch keeps its size
        assert loader.stats()["bad_paths"] == [f"{shard}:{i:08d}.jpg"]
    assert f"unreadable image {shard}:{i:08d}.jpg" in caplog.text
    # more broken samples than bad_image_limit allows (10 at least): the epoch stops with the loader's error
    for i in range(20, 32):
        with open(ds.shards[int(index["shard"][i])], "r+b") as f:
            f.seek(int(index["offset"][i]))
            f.write(b"\x00" * int(index["size"][i]))
    with pytest.raises(DataError, match="unreadable images this epoch"):
        list(_loader(ds, train=False))


def test_a_sample_missing_from_a_shard_is_counted_and_named(tmp_path: Path) -> None:
    """A foreign tar with a key that has a label but no image: read as an unreadable sample, not dropped."""
    path = tmp_path / "foreign-000000.tar"
    with tarfile.open(path, "w") as tar:
        for key, members in (("a", {"jpg": None, "cls": b"0"}), ("b", {"cls": b"1"}), ("c", {"png": None,
                                                                                             "cls": b"1"})):
            for ext, payload in members.items():
                if payload is None:
                    buf = io.BytesIO()
                    Image.new("RGB", (32, 32), (200, 10, 10)).save(buf, "JPEG" if ext == "jpg" else "PNG")
                    payload = buf.getvalue()
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    ds = open_shards(str(path), "train")
    assert len(ds) == 3 and ds.classes == ["0", "1"] and ds.targets == [0, 1, 1]
    loader = _loader(ds, train=False)
    assert sum(len(y) for _, y in loader) == 3 and loader.stats()["bad_paths"] == [f"{path}:b.cls"]


def test_missing_or_truncated_shards_are_one_line_errors(packed: Path, tmp_path: Path, capsys) -> None:
    dst = copy_packed(packed, tmp_path / "p")
    shards = shard_files(dst)
    shards[3].unlink()
    run = tmp_path / "run"
    argv = ["train", *train_args(str(dst), "wds", run, "--num_parallel_workers", "0")]
    assert cli_main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: shard {shards[3]} is missing; copy it back or re-run `vitkit data pack`"]
    shutil.copy(packed / "train" / shards[3].name, shards[3])
    with open(shards[5], "r+b") as f:
        f.truncate(shards[5].stat().st_size - 512)
    assert cli_main(argv) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"error: shard {shards[5]} is truncated: ") and "dataset.json says" in line
    # a pattern naming a shard that is not there, an unreachable URL
    with pytest.raises(DataError, match=r"shard .*/train/shard-0000[0-9][0-9].tar is missing"):
        open_shards(str(dst / "train" / "shard-{000000..000099}.tar"), "train")
    with pytest.raises(DataError, match="memory://nowhere/x/dataset.json|has no dataset.json"):
        open_shards("memory://nowhere/x", "train")


def test_a_shard_cut_short_during_an_epoch_stops_it_with_one_line(packed: Path, tmp_path: Path) -> None:
    """Truncated after the dataset opened (a copy still running, a disk fault): the read that finds it is a
    DataError naming the shard, from the main process and from a worker alike; never a shorter epoch."""
    dst = copy_packed(packed, tmp_path / "p")
    ds = open_shards(str(dst), "train")
    last = shard_files(dst)[-1]
    with open(last, "r+b") as f:
        f.truncate(1024)
    for workers in (0, 2):
        with pytest.raises(DataError) as e:
            list(_loader(ds, train=False, workers=workers))
        assert "\n" not in str(e.value) and str(e.value).startswith(f"shard {last} is truncated: ")
    # the in-memory path (the default for small images) decodes everything up front: the same one line, not a
    # dataset with black images counted as bad ones
    with pytest.raises(DataError) as e:
        build_loader(ds, data_config=DataConfig(input_size=32, crop_pct=1.0), train=False, batch_size=8,
                     in_memory=True)
    assert "\n" not in str(e.value) and str(e.value).startswith(f"shard {last} is truncated: ")


def test_an_object_store_that_fails_is_one_line_naming_the_shard(packed: Path, monkeypatch) -> None:
    """Shards behind an fsspec URL (the in-memory filesystem here stands for s3:// or gs://): a backend that
    fails when the dataset opens, or on every retry of a read during the epoch, is one DataError naming the
    unreachable shard, in the folder path and the in-memory path alike; never a shorter epoch."""
    fsspec = pytest.importorskip("fsspec")
    from fsspec.implementations.memory import MemoryFileSystem

    from vitkit.data import shards as S

    fs = fsspec.filesystem("memory")
    root = "memory://vitkit-test/cifar"
    for f in sorted(packed.rglob("*")):
        if f.is_file():
            fs.pipe_file(f"/vitkit-test/cifar/{f.relative_to(packed).as_posix()}", f.read_bytes())
    try:
        ds = open_shards(root, "train")
        assert len(ds) == 80 and sum(len(y) for _, y in _loader(ds, train=False)) == 80  # reachable: all of it
        bad = ds.shards[4]
        real_cat, real_size = MemoryFileSystem.cat_file, MemoryFileSystem.size

        def flaky_cat(self, path, *a, **kw):
            if path.endswith(bad.rsplit("/", 1)[1]):
                raise ConnectionError("connection reset by peer")
            return real_cat(self, path, *a, **kw)

        monkeypatch.setattr(MemoryFileSystem, "cat_file", flaky_cat)
        monkeypatch.setattr(S.time, "sleep", lambda s: None)  # the retries' back-off
        for in_memory in (False, True):
            with pytest.raises(DataError) as e:
                list(build_loader(ds, data_config=DataConfig(input_size=32, crop_pct=1.0), train=False,
                                  batch_size=8, in_memory=in_memory))
            assert str(e.value).startswith(f"shard {bad} is unreachable (ConnectionError: connection reset")
            assert "\n" not in str(e.value)

        def down_size(self, path, *a, **kw):
            if path.endswith(".tar"):
                raise ConnectionError("name or service not known")
            return real_size(self, path, *a, **kw)

        monkeypatch.setattr(MemoryFileSystem, "size", down_size)  # unreachable when the dataset opens
        with pytest.raises(DataError, match=r"^shard memory://vitkit-test/cifar/train/shard-\d+\.tar is unreachable"):
            open_shards(root, "train")
    finally:
        fs.rm("/vitkit-test", recursive=True)


# -- the same paths as folders ---------------------------------------------------------------------------------

def test_gpu_decode_path_reads_shard_samples(tmp_path: Path) -> None:
    """JpegCropPlan takes the shard member's bytes: the batch equals the folder's (device cpu here)."""
    rng = np.random.default_rng(0)
    for i in range(6):
        (tmp_path / "src" / "val" / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        small = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
        Image.fromarray(small).resize((120, 90), Image.Resampling.BICUBIC).save(
            tmp_path / "src" / "val" / f"c{i % 2}" / f"{i}.jpg", quality=95)
    assert cli_main(["data", "pack", str(tmp_path / "src"), str(tmp_path / "dst"), "--shard_size", "20KB"]) == 0
    dc = DataConfig(input_size=64, crop_pct=1.0, interpolation="bilinear")
    batches = {}
    for name, ds in {"folder": build_dataset(str(tmp_path / "src"), name="imagefolder", split="val", train=False),
                     "shards": open_shards(str(tmp_path / "dst"), "val")}.items():
        for train in (False, True):
            loader = build_loader(ds, data_config=dc, train=train, batch_size=6, gpu_decode=True, seed=3,
                                  drop_remainder=False)
            loader.set_epoch(1)
            batches[name, train] = next(iter(loader))
    for train in (False, True):
        (a, ya), (b, yb) = batches["folder", train], batches["shards", train]
        assert a.shape == (6, 3, 64, 64) and torch.equal(a, b) and torch.equal(ya, yb)


def test_config_accepts_wds_and_hf_fields() -> None:
    cfg = dataclasses.replace(Config(), dataset="wds", data_dir="s3://bucket/ds", image_column="img",
                              label_column="fine_label")
    assert (cfg.image_column, cfg.label_column) == ("img", "fine_label")
