"""Images/s per CPU core of the ImageNet-style training pipeline: vitkit's loader beside timm's create_loader
and a torchvision ImageFolder pipeline, on the same files, in the same run; and the same images packed into
WebDataset tar shards (`vitkit data pack`), read by vitkit's map-style shard reader (`--dataset wds`), by
webdataset's own sequential reader (wds.WebDataset, feeding vitkit's transform) and by timm's `wds/` reader
(timm.data.create_dataset("wds/...") + create_loader; it needs webdataset, the `wds` extra).

Pipeline (all three): JPEG decode -> RandomResizedCrop 224 (bilinear) -> horizontal flip -> RandAugment
(vitkit/timm: randaug-m9-mstd0.5; torchvision: its own RandAugment(num_ops=2, magnitude=9)) -> to float
tensor -> normalize, batch 32. Two image sets: the CIFAR-10 JPEGs (32x32) as they are, and "ImageNet-sized"
JPEGs made by upscaling the same CIFAR images to 500x375 (bicubic) and re-encoding them at JPEG quality 90
into a temporary folder. Per core: with --workers 0 everything runs in this one process with one torch
thread; with --workers N the figure is divided by N.

The shard readers all read the same shards (--shard-size, default 8MB, so that even a small run crosses
shard boundaries); "vs folder" compares each row with vitkit's loader on the folder of the same images.

    .venv/bin/python benchmarks/bench_loader.py --num-images 512            # ~2-4 minutes on one core
    .venv/bin/python benchmarks/bench_loader.py --num-images 5000 --workers 2 --rounds 3
    .venv/bin/python benchmarks/bench_loader.py --loaders vitkit,"vitkit shards"   # some rows only
    .venv/bin/python benchmarks/bench_loader.py --loaders vitkit --paired "vitkit shards:vitkit"  # drift-proof
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def take_files(src: Path, n: int) -> list[Path]:
    """n files spread evenly over the classes of src/<class>/*.jpg."""
    classes = sorted(d for d in src.iterdir() if d.is_dir())
    per = -(-n // len(classes))
    return [f for c in classes for f in sorted(c.glob("*.jpg"))[:per]][:n]


def make_set(files: list[Path], out: Path, size: tuple[int, int] | None) -> Path:
    """Copy (or upscale to `size` and re-encode at quality 90) into out/<class>/."""
    for f in files:
        d = out / f.parent.name
        d.mkdir(parents=True, exist_ok=True)
        img = Image.open(f).convert("RGB")
        if size:
            img = img.resize(size, Image.Resampling.BICUBIC)
        img.save(d / f.name, "JPEG", quality=90 if size else 95)
    return out


def vitkit_transform(batch: int, workers: int, dataset: str = "imagefolder", data_dir: str = ".", split: str = "train"):
    """(config, vitkit's training transform, its DataConfig): RandAugment m9 mstd0.5, bilinear, uint8 output."""
    from vitkit.data import DataConfig, build_transform
    from vitkit.engine.config import load_config
    from vitkit.engine.data_args import augment_from_config

    cfg = load_config(["--dataset", dataset, "--data_dir", data_dir, "--train_split", split,
                       "--image_resize", "224", "--auto_augment", "randaug-m9-mstd0.5", "--interpolation",
                       "bilinear", "--batch_size", str(batch), "--num_parallel_workers", str(workers)], notices=[])
    dc = DataConfig(input_size=224, mean=MEAN, std=STD, interpolation="bilinear")
    # small_data=False: the ImageNet pipeline (RandomResizedCrop) even on 32x32 files, as the others run it.
    return cfg, build_transform(dc, train=True, **augment_from_config(cfg), small_data=False, normalize=False), dc


def vitkit_loader(root: Path, batch: int, workers: int, dataset: str = "imagefolder"):
    from vitkit.data.loader import Loader, ShardPlan
    from vitkit.engine.data_args import dataset_from_config

    cfg, tf, dc = vitkit_transform(batch, workers, dataset, str(root.parent), root.name)
    ds = dataset_from_config(cfg, root.name, train=True)
    plan = ShardPlan(len(ds), batch_size=batch, train=True, seed=0, drop_remainder=True)
    loader = Loader(ds, plan, transform=tf, seed=0, num_workers=workers, normalize=dc)
    loader.set_epoch(0)
    return loader


def vitkit_shards_loader(packed: Path, batch: int, workers: int):
    """`--dataset wds --data_dir PACKED`: the map-style reader (index of member offsets, os.pread)."""
    return vitkit_loader(packed / "train", batch, workers, dataset="wds")


def shard_pattern(packed: Path) -> str:
    n = len(list((packed / "train").glob("shard-*.tar")))
    return f"shard-{{000000..{n - 1:06d}}}.tar"


class _WdsTransform:
    """webdataset sample (jpg bytes, cls bytes) -> (vitkit's transform of the PIL image, target)."""

    def __init__(self, tf):
        self.tf = tf

    def __call__(self, sample):
        import io

        data, cls = sample
        with Image.open(io.BytesIO(data)) as img:
            return self.tf(img), int(cls)


def webdataset_loader(packed: Path, batch: int, workers: int):
    """webdataset's sequential reader (shards split over workers, a 1000-sample shuffle buffer) feeding vitkit's
    transform: the reader compared alone."""
    import webdataset as wds

    from vitkit.data.loader import Collate

    _, tf, dc = vitkit_transform(batch, workers)
    urls = str(packed / "train" / shard_pattern(packed))
    ds = (wds.WebDataset(urls, shardshuffle=False, empty_check=False).shuffle(1000).to_tuple("jpg", "cls")
          .map(_WdsTransform(tf)))
    collate = Collate(dc)
    return torch.utils.data.DataLoader(ds, batch_size=batch, num_workers=workers,
                                       collate_fn=lambda items: collate([(x, t, []) for x, t in items])[:2])


def timm_wds_loader(packed: Path, batch: int, workers: int):
    """timm's `wds/` reader on the same shards (split given as a brace pattern with the sample count)."""
    from timm.data import create_dataset, create_loader

    n = sum(s["samples"] for s in __import__("json").loads((packed / "dataset.json").read_text())["splits"]
            ["train"]["shards"])
    ds = create_dataset("wds/bench", root=str(packed / "train"), split=f"{shard_pattern(packed)}|{n}",
                        is_training=True, batch_size=batch)
    return create_loader(ds, input_size=(3, 224, 224), batch_size=batch, is_training=True, use_prefetcher=False,
                         auto_augment="rand-m9-mstd0.5", interpolation="bilinear", mean=MEAN, std=STD,
                         num_workers=workers, persistent_workers=False, device=torch.device("cpu"))


def pack_set(folder: Path, out: Path, shard_size: str) -> Path:
    from vitkit.data import pack as P
    from vitkit.data.datasets import build_dataset

    ds = build_dataset(str(folder.parent), name="imagefolder", split=folder.name, train=False)
    P.pack({"train": ds}, out, shard_size=P.parse_size(shard_size), source={"path": str(folder)}, progress=False,
           say=lambda line: None)
    return out


def timm_loader(root: Path, batch: int, workers: int):
    from timm.data import ImageDataset, create_loader

    ds = ImageDataset(str(root))
    return create_loader(ds, input_size=(3, 224, 224), batch_size=batch, is_training=True, use_prefetcher=False,
                         auto_augment="rand-m9-mstd0.5", interpolation="bilinear", mean=MEAN, std=STD,
                         num_workers=workers, persistent_workers=False, device=torch.device("cpu"))


def torchvision_loader(root: Path, batch: int, workers: int):
    import torchvision.transforms.v2 as v2
    from torchvision.datasets import ImageFolder

    tf = v2.Compose([v2.RandomResizedCrop(224, antialias=True), v2.RandomHorizontalFlip(),
                     v2.RandAugment(num_ops=2, magnitude=9), v2.PILToTensor(), v2.ToDtype(torch.float32, scale=True),
                     v2.Normalize(MEAN, STD)])
    ds = ImageFolder(str(root), transform=tf)
    return torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=True, num_workers=workers, drop_last=True)


def images_per_s(make, root: Path, batch: int, workers: int) -> float:
    loader = make(root, batch, workers)
    it = iter(loader)
    next(it)  # warm-up: worker start, first decode
    n, t0 = 0, time.perf_counter()
    for x, y in it:
        assert x.shape[1:] == (3, 224, 224) and x.dtype == torch.float32
        n += len(y)
    return n / (time.perf_counter() - t0)


def paired_rates(first, second, batch: int, rounds: int) -> tuple[float, float, float]:
    """Two loaders (each a zero-argument maker) read batch by batch in turn, who goes first alternating, over
    `rounds` epochs: a slow stretch of the machine hits both alike. Returns (images/s of each, from the summed
    time; the median over batch pairs of first's rate / second's)."""
    import statistics

    times: list[list[float]] = [[], []]
    counts = [0, 0]
    ratios: list[float] = []
    for _ in range(rounds):
        its = [iter(first()), iter(second())]
        for it in its:
            next(it)  # warm-up: first decode
        k = 0
        while True:
            pair: list[tuple[float, int]] = [(0.0, 0), (0.0, 0)]
            try:
                for i in ((0, 1) if k % 2 == 0 else (1, 0)):
                    t0 = time.perf_counter()
                    _, y = next(its[i])
                    pair[i] = (time.perf_counter() - t0, len(y))
            except StopIteration:
                break
            for i in (0, 1):
                times[i].append(pair[i][0])
                counts[i] += pair[i][1]
            ratios.append((pair[0][1] / pair[0][0]) / (pair[1][1] / pair[1][0]))
            k += 1
    return counts[0] / sum(times[0]), counts[1] / sum(times[1]), statistics.median(ratios)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--src", default="/work/data/cifar10/train", help="CIFAR-10 JPEG folder <class>/*.jpg")
    p.add_argument("--num-images", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=0, help="loader workers (0 = this process, one core)")
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds; the best of each is kept")
    p.add_argument("--shard-size", default="8MB", help="shard size of the packed copies (vitkit data pack)")
    p.add_argument("--loaders", default=None, help="comma-separated rows to run (default: all)")
    p.add_argument("--paired", default=None, metavar="A:B",
                   help="also read rows A and B batch by batch in turn (workers 0), e.g. 'vitkit shards:vitkit'")
    p.add_argument("--out", default=None, help="also write the report (with the command) to this markdown file")
    a = p.parse_args()
    lines: list[str] = []
    say = lambda line="": (print(line, flush=True), lines.append(line))  # noqa: E731
    torch.set_num_threads(1)
    src = Path(a.src) if Path(a.src).is_dir() else Path(__file__).resolve().parents[1] / "data/cifar10_sample/train"
    files = take_files(src, a.num_images)
    cores = max(1, a.workers)
    import timm
    import torchvision

    from vitkit.engine.monitor import cpu_model

    say(f"command: `python {' '.join(sys.argv)}`  ")
    say(time.strftime("date: %Y-%m-%d %H:%M UTC  ", time.gmtime()))
    say(f"bench_loader: {len(files)} images from {src}, batch {a.batch_size}, workers {a.workers}, "
          f"best of {a.rounds} interleaved rounds; torch {torch.__version__}, torchvision {torchvision.__version__}, "
          f"timm {timm.__version__}, Pillow {Image.__version__}, python {platform.python_version()}, "
          f"{cpu_model()}, {os.cpu_count()} CPUs visible  ")
    say("ImageNet-sized set: the same CIFAR images upscaled to 500x375 (bicubic), re-encoded at JPEG quality 90 "
          "into a temp dir")
    makers = {"vitkit": vitkit_loader, "timm create_loader": timm_loader, "torchvision ImageFolder": torchvision_loader,
              "vitkit shards": vitkit_shards_loader, "webdataset + vitkit transform": webdataset_loader,
              "timm wds/ reader": timm_wds_loader}
    on_shards = {"vitkit shards", "webdataset + vitkit transform", "timm wds/ reader"}
    if a.loaders:
        wanted = [m.strip() for m in a.loaders.split(",")]
        unknown = [m for m in wanted if m not in makers]
        if unknown:
            p.error(f"unknown loaders {unknown}; choose from {list(makers)}")
        makers = {m: makers[m] for m in wanted}
    say(f"shards: `vitkit data pack` of each set into {a.shard_size} shards (the same shards for every shard "
        "reader)")
    skipped: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as tmp:
        sets = {"CIFAR-10 JPEG 32x32": make_set(files, Path(tmp) / "cifar" / "train", None),
                "ImageNet-sized JPEG 500x375": make_set(files, Path(tmp) / "big" / "train", (500, 375))}
        packed = {s: pack_set(root, Path(tmp) / f"packed{k}", a.shard_size) for k, (s, root) in enumerate(sets.items())}
        best = {(s, m): 0.0 for s in sets for m in makers}
        for _ in range(a.rounds):
            for s, root in sets.items():
                for m, make in makers.items():
                    if m in skipped:
                        continue
                    try:
                        rate = images_per_s(make, packed[s] if m in on_shards else root, a.batch_size, a.workers)
                    except ImportError as e:  # webdataset (the `wds` extra) not installed
                        skipped[m] = f"{type(e).__name__}: {e}"
                        continue
                    best[s, m] = max(best[s, m], rate)
        paired: dict[str, tuple[float, float, float]] = {}
        if a.paired:
            names = [m.strip() for m in a.paired.split(":")]
            every = {"vitkit": vitkit_loader, "timm create_loader": timm_loader,
                     "torchvision ImageFolder": torchvision_loader, "vitkit shards": vitkit_shards_loader,
                     "webdataset + vitkit transform": webdataset_loader, "timm wds/ reader": timm_wds_loader}
            if len(names) != 2 or any(m not in every for m in names) or a.workers:
                p.error(f"--paired takes two rows A:B of {list(every)}, with --workers 0")
            for s, root in sets.items():
                makers2 = [lambda m=m, s=s, root=root: every[m](packed[s] if m in on_shards else root,
                                                                a.batch_size, 0) for m in names]
                paired[s] = paired_rates(*makers2, a.batch_size, a.rounds)
    say()
    say("| images | loader | images/s per core | vs timm | vs vitkit folder |")
    say("|---|---|---|---|---|")
    for s in sets:
        ref, folder = best.get((s, "timm create_loader"), 0.0), best.get((s, "vitkit"), 0.0)
        for m in makers:
            if m in skipped:
                continue
            vs_timm = f"{best[s, m] / ref:.2f}x" if ref else "-"
            vs_folder = f"{best[s, m] / folder:.2f}x" if folder else "-"
            say(f"| {s} | {m} | {best[s, m] / cores:.0f} | {vs_timm} | {vs_folder} |")
    if paired:
        A, B = (m.strip() for m in a.paired.split(":"))
        say()
        say(f"Paired: {A} and {B} read batch by batch in turn in this process ({a.rounds} epochs each, who goes "
            "first alternating), so the machine's drift hits both alike:")
        say()
        say(f"| images | {A} images/s | {B} images/s | ratio of rates | median over batch pairs |")
        say("|---|---:|---:|---:|---:|")
        for s, (ra, rb, med) in paired.items():
            say(f"| {s} | {ra:.0f} | {rb:.0f} | {ra / rb:.2f}x | {med:.2f}x |")
    for m, why in skipped.items():
        say(f"\n{m}: not run ({why})")
    if a.out:
        Path(a.out).write_text("# bench_loader: the training input pipeline, images/s per CPU core\n\n"
                               + "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
