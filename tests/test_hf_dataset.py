"""`--dataset hf` (issue 14): Hugging Face `datasets` read offline from a local folder.

A DatasetDict is built here from CIFAR-10 sample JPEGs (8 per class for train; 23 test images, uneven over
the classes), saved with save_to_disk, then trained on and validated through the CLI with the hub switched
off, and compared with the same images as an ImageFolder.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

datasets = pytest.importorskip("datasets")  # the optional extra vitkit[hf]; in the test extra, so CI runs this

from vitkit.cli import main as cli_main  # noqa: E402
from vitkit.data.datasets import build_dataset  # noqa: E402
from vitkit.data.hf import HFImageDataset  # noqa: E402
from vitkit.data.shards import open_shards  # noqa: E402
from vitkit.engine.checkpoint import load_checkpoint  # noqa: E402
from vitkit.errors import DataError  # noqa: E402

SAMPLE = Path(__file__).resolve().parents[1] / "data" / "cifar10_sample"
CLASSES = sorted(p.name for p in (SAMPLE / "train").iterdir())


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cifar_subset")
    for split, n in (("train", 8), ("test", 2)):
        for c, cls in enumerate(CLASSES):
            (root / split / cls).mkdir(parents=True)
            for f in sorted((SAMPLE / split / cls).iterdir())[: n + 3 * (split == "test" and c == 0)]:
                shutil.copy2(f, root / split / cls / f.name)
    return root


def _split(folder: Path, split: str, image: str = "image", label: str = "label", names: bool = False) -> object:
    files = [f for c in CLASSES for f in sorted((folder / split / c).iterdir())]
    labels = [f.parent.name if names else CLASSES.index(f.parent.name) for f in files]
    features = datasets.Features({image: datasets.Image(),
                                  label: datasets.Value("string") if names else datasets.ClassLabel(names=CLASSES)})
    # the bytes are embedded (as a dataset on the hub holds them), not paths into the folder
    return datasets.Dataset.from_dict({image: [{"bytes": f.read_bytes(), "path": None} for f in files],
                                       label: labels}, features=features)


@pytest.fixture(scope="module")
def saved(folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("hf") / "cifar"
    datasets.DatasetDict({"train": _split(folder, "train"), "test": _split(folder, "test")}).save_to_disk(str(out))
    return out


@pytest.fixture(autouse=True)
def offline(monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


def test_hf_dataset_reads_classes_targets_and_bytes(folder: Path, saved: Path) -> None:
    for split in ("train", "test"):
        src = build_dataset(str(folder), name="imagefolder", split=split, train=False)
        ds = build_dataset(str(saved), name="hf", split=split, train=False)
        assert isinstance(ds, HFImageDataset) and len(ds) == len(src) and ds.classes == src.classes == CLASSES
        assert ds.targets == src.targets
        assert all(ds.raw(i) == (Path(src.path(i)).read_bytes(), "jpg") for i in range(len(ds)))
        with ds.load(0) as img:
            assert img.format == "JPEG" and img.size == (32, 32)
    assert ds.path(3) == f"{saved}:test[3]"


def test_train_and_validate_offline_through_dataset_hf(folder: Path, saved: Path, tmp_path: Path) -> None:
    """`vitkit train --dataset hf` gives the folder run's weights bit for bit (the same images in the same
    order); `vitkit validate` of its checkpoint validates on the HF test split (dataset and data_dir come
    from the checkpoint) and counts the 23 images."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    deterministic = torch.are_deterministic_algorithms_enabled()
    try:
        def args(dataset: str, data: Path, run: Path) -> list[str]:
            return ["train", "--model", "vit_n_4_32", "--dataset", dataset, "--data_dir", str(data), "--val_split",
                    "test", "--image_resize", "32", "--batch_size", "16", "--epoch_size", "1", "--warmup_epochs", "0",
                    "--opt", "momentum", "--lr", "0.05", "--seed", "7", "--deterministic", "--num_parallel_workers",
                    "0", "--val_while_train", "--ckpt_save_dir", str(run), "--log_interval", "1"]

        assert cli_main(args("hf", saved, tmp_path / "hf")) == 0
        assert cli_main(args("imagefolder", folder, tmp_path / "folder")) == 0
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)
    a, b = (load_checkpoint(tmp_path / d / "last.safetensors") for d in ("hf", "folder"))
    assert a.step == b.step == 5 and all(torch.equal(a.state_dict[k], b.state_dict[k]) for k in a.state_dict)
    assert a.class_names == CLASSES
    ours, ref = [json.loads((tmp_path / d / "metrics.jsonl").read_text().splitlines()[0]) for d in ("hf", "folder")]
    assert ours["val_images"] == ref["val_images"] == 23 and ours["val_top1"] == ref["val_top1"]
    results = tmp_path / "val.json"
    assert cli_main(["validate", "--ckpt_path", str(tmp_path / "hf" / "last.safetensors"), "--results_file",
                     str(results)]) == 0
    got = json.loads(results.read_text())
    assert got["num_images"] == 23 and got["top1"] == ours["val_top1"]


def test_columns_labels_parquet_and_errors(folder: Path, tmp_path: Path) -> None:
    # other column names, string labels (classes sorted by name), a folder of parquet files
    dd = datasets.DatasetDict({"train": _split(folder, "train", "img", "fine", names=True),
                               "validation": _split(folder, "test", "img", "fine", names=True)})
    (tmp_path / "pq" / "data").mkdir(parents=True)
    for name, split in dd.items():
        split.to_parquet(str(tmp_path / "pq" / "data" / f"{name}-00000-of-00001.parquet"))
    src = build_dataset(str(folder), name="imagefolder", split="test", train=False)
    ds = build_dataset(str(tmp_path / "pq"), name="hf", split="val", train=False, image_column="img",
                       label_column="fine")  # val -> validation
    assert ds.classes == CLASSES and ds.targets == src.targets and ds.raw(5)[0] == Path(src.path(5)).read_bytes()
    with pytest.raises(DataError, match="has no column 'image'.*set --image_column"):
        build_dataset(str(tmp_path / "pq"), name="hf", split="train", train=False, label_column="fine")
    with pytest.raises(DataError, match="no split 'holdout' \\(found: train, validation\\)"):
        build_dataset(str(tmp_path / "pq"), name="hf", split="holdout", train=False, image_column="img",
                      label_column="fine")
    with pytest.raises(DataError, match="could not load 'nobody/no-such-dataset'") as e:  # offline: one line
        build_dataset("nobody/no-such-dataset", name="hf", split="train", train=False)
    assert "\n" not in str(e.value)


def test_an_unreachable_hub_is_said_at_once_and_offline_mode_is_not_probed(monkeypatch) -> None:
    import socket

    from vitkit.data import hf

    calls = []

    def no_network(address, timeout):
        calls.append((address, timeout))
        raise socket.gaierror(-2, "Name or service not known")

    for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)  # what datasets read from the environment
    monkeypatch.setenv("HF_ENDPOINT", "https://hub.example:8443")
    monkeypatch.setattr(socket, "create_connection", no_network)
    with pytest.raises(DataError, match="'user/name': it is no local folder and hub.example cannot be reached "
                                        "\\(Name or service not known\\).*HF_DATASETS_OFFLINE=1"):
        build_dataset("user/name", name="hf", split="train", train=False)
    assert calls == [(("hub.example", 8443), 5)]  # one probe, seconds at most, before any of datasets' retries
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # the cache only: datasets' own answer, no probe
    assert hf._hub_unreachable() is None and len(calls) == 1
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(socket, "create_connection", lambda address, timeout: type("C", (), {"close": lambda s: 0})())
    assert hf._hub_unreachable() is None


def test_pack_a_hf_dataset_into_shards(saved: Path, tmp_path: Path) -> None:
    assert cli_main(["data", "pack", str(saved), str(tmp_path / "shards"), "--shard_size", "64KB"]) == 0
    for split in ("train", "test"):
        hf = build_dataset(str(saved), name="hf", split=split, train=False)
        sh = open_shards(str(tmp_path / "shards"), split)
        assert sh.classes == hf.classes and sh.targets == hf.targets
        assert all(sh.raw(i) == hf.raw(i) for i in range(len(hf)))
