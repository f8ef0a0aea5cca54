"""Images/s per CPU core of the ImageNet-style training pipeline: vitkit's loader beside timm's create_loader
and a torchvision ImageFolder pipeline, on the same files, in the same run.

Pipeline (all three): JPEG decode -> RandomResizedCrop 224 (bilinear) -> horizontal flip -> RandAugment
(vitkit/timm: randaug-m9-mstd0.5; torchvision: its own RandAugment(num_ops=2, magnitude=9)) -> to float
tensor -> normalize, batch 32. Two image sets: the CIFAR-10 JPEGs (32x32) as they are, and "ImageNet-sized"
JPEGs made by upscaling the same CIFAR images to 500x375 (bicubic) and re-encoding them at JPEG quality 90
into a temporary folder. Per core: with --workers 0 everything runs in this one process with one torch
thread; with --workers N the figure is divided by N.

    .venv/bin/python benchmarks/bench_loader.py --num-images 512            # ~1-2 minutes on one core
    .venv/bin/python benchmarks/bench_loader.py --num-images 5000 --workers 2 --rounds 3
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


def vitkit_loader(root: Path, batch: int, workers: int):
    from vitkit.data import DataConfig, build_transform
    from vitkit.data.loader import Loader, ShardPlan
    from vitkit.engine.config import load_config
    from vitkit.engine.data_args import augment_from_config, dataset_from_config

    cfg = load_config(["--dataset", "imagefolder", "--data_dir", str(root.parent), "--train_split", root.name,
                       "--image_resize", "224", "--auto_augment", "randaug-m9-mstd0.5", "--interpolation",
                       "bilinear", "--batch_size", str(batch), "--num_parallel_workers", str(workers)], notices=[])
    ds = dataset_from_config(cfg, root.name, train=True)
    dc = DataConfig(input_size=224, mean=MEAN, std=STD, interpolation="bilinear")
    # small_data=False: the ImageNet pipeline (RandomResizedCrop) even on 32x32 files, as the others run it.
    tf = build_transform(dc, train=True, **augment_from_config(cfg), small_data=False, normalize=False)
    plan = ShardPlan(len(ds), batch_size=batch, train=True, seed=0, drop_remainder=True)
    loader = Loader(ds, plan, transform=tf, seed=0, num_workers=workers, normalize=dc)
    loader.set_epoch(0)
    return loader


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


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--src", default="/work/data/cifar10/train", help="CIFAR-10 JPEG folder <class>/*.jpg")
    p.add_argument("--num-images", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=0, help="loader workers (0 = this process, one core)")
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds; the best of each is kept")
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

    say(f"command: `python {' '.join(sys.argv)}`  ")
    say(time.strftime("date: %Y-%m-%d %H:%M UTC  ", time.gmtime()))
    say(f"bench_loader: {len(files)} images from {src}, batch {a.batch_size}, workers {a.workers}, "
          f"best of {a.rounds} interleaved rounds; torch {torch.__version__}, torchvision {torchvision.__version__}, "
          f"timm {timm.__version__}, Pillow {Image.__version__}, python {platform.python_version()}, "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs visible  ")
    say("ImageNet-sized set: the same CIFAR images upscaled to 500x375 (bicubic), re-encoded at JPEG quality 90 "
          "into a temp dir")
    makers = {"vitkit": vitkit_loader, "timm create_loader": timm_loader, "torchvision ImageFolder": torchvision_loader}
    with tempfile.TemporaryDirectory() as tmp:
        sets = {"CIFAR-10 JPEG 32x32": make_set(files, Path(tmp) / "cifar" / "train", None),
                "ImageNet-sized JPEG 500x375": make_set(files, Path(tmp) / "big" / "train", (500, 375))}
        best = {(s, m): 0.0 for s in sets for m in makers}
        for _ in range(a.rounds):
            for s, root in sets.items():
                for m, make in makers.items():
                    best[s, m] = max(best[s, m], images_per_s(make, root, a.batch_size, a.workers))
    say()
    say("| images | loader | images/s per core | vs timm |")
    say("|---|---|---|---|")
    for s in sets:
        ref = best[s, "timm create_loader"]
        for m in makers:
            say(f"| {s} | {m} | {best[s, m] / cores:.0f} | {best[s, m] / ref:.2f}x |")
    if a.out:
        Path(a.out).write_text("# bench_loader: the training input pipeline, images/s per CPU core\n\n"
                               + "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
