"""Data subsystem: augmentation semantics against timm, mixup/cutmix, eval sizes, datasets, bad images, loader
determinism and sharding."""
from __future__ import annotations

import dataclasses
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vitkit.data import DataConfig, build_transform
from vitkit.data.augment import RAND_OPS, RAND_OPS_INCREASING, AugmentOp, build_auto_augment
from vitkit.data.loader import ShardPlan
from vitkit.data.transforms import to_rgb
from vitkit.engine.config import load_config
from vitkit.engine.data_args import augment_from_config, dataset_from_config, loader_from_config, mixup_from_config
from vitkit.errors import DataError

SAMPLE = Path(__file__).resolve().parents[1] / "data" / "cifar10_sample"


def _photo(w: int = 64, h: int = 48, seed: int = 0) -> Image.Image:
    """A smooth random color image (more JPEG-like than noise)."""
    g = np.random.default_rng(seed)
    small = g.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    return Image.fromarray(small).resize((w, h), Image.Resampling.BICUBIC)


def _folder(root: Path, classes: dict[str, int], size: int = 40) -> Path:
    for c, n in classes.items():
        (root / "train" / c).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            _photo(size, size, seed=hash((c, i)) % 1000).save(root / "train" / c / f"{i:03d}.jpg", quality=90)
    return root


def _cfg(*args: str):
    return load_config(["--num_parallel_workers", "0", *args], notices=[])


# -- augmentation semantics ------------------------------------------------------------------------------------

def test_randaug_m9_mstd05_draws_two_ops_with_gaussian_magnitude():
    ra = build_auto_augment("randaug-m9-mstd0.5", img_size=32, mean=(0.5, 0.5, 0.5), interpolation="bicubic")
    assert ra.num_ops == 2 and [op.name for op in ra.ops] == list(RAND_OPS)
    assert all(op.prob == 0.5 and op.magnitude == 9 and op.magnitude_std == 0.5 for op in ra.ops)
    # Count drawn ops by wrapping each op; the trace records applied ops with their sampled magnitude.
    drawn = []
    for op in ra.ops:
        op_call = op.__call__
        op.__class__ = type("Counted", (AugmentOp,), {"__call__": lambda self, img, trace=None, f=op_call:
                                                      (drawn.append(1), f(img, trace))[1]})
    ra.trace = []
    img = _photo(32, 32)
    random.seed(0)
    for _ in range(400):
        ra(img)
    assert len(drawn) == 800  # exactly 2 ops per image
    mags = np.array([m for _, m in ra.trace])
    assert 300 < len(mags) < 500  # each drawn op applies with probability 0.5
    assert abs(mags.mean() - 9.0) < 0.08 and abs(mags.std() - 0.5) < 0.08 and mags.min() >= 0 and mags.max() <= 10
    random.seed(1)
    clipped = [AugmentOp("Rotate", 1.0, 9.8, 0.5).sample_magnitude() for _ in range(2000)]
    assert max(clipped) == 10.0 and np.mean(np.array(clipped) == 10.0) > 0.25  # N(9.8, .5) clipped at 10


@pytest.mark.parametrize("name", sorted(set(RAND_OPS + RAND_OPS_INCREASING + ("PosterizeOriginal",))))
def test_each_op_matches_timm(name):
    """Same op, magnitude and Python RNG state -> the same pixels as timm's AugmentOp."""
    ta = pytest.importorskip("timm.data.auto_augment")
    img = _photo(40, 30, seed=3)
    hp = {"fill": (124, 116, 104), "resample": Image.Resampling.BICUBIC}
    for m in (3.0, 9.0):
        ours = AugmentOp(name, 1.0, m, 0.0, 10.0, hp)
        theirs = ta.AugmentOp(name, prob=1.0, magnitude=m, hparams={"img_mean": (124, 116, 104), "translate_pct": 0.45,
                                                                     "interpolation": Image.Resampling.BICUBIC})
        for seed in (0, 1):
            random.seed(seed)
            a = np.asarray(ours(img))
            random.seed(seed)
            b = np.asarray(theirs(img))
            assert np.array_equal(a, b), (name, m, seed)


@pytest.mark.parametrize("text", ["randaug-m9-n2-mstd0.5-inc1", "rand-m7-mstd101", "autoaug", "autoaugr-mstd0.5",
                                  "3a", "trivialaugwide", "augmix-m3-w3", "randaug-m9-mstd0.5", "autoaugr", "augmix"])
def test_auto_augment_strings_run(text):
    aug = build_auto_augment(text, img_size=32, mean=(0.5, 0.5, 0.5), interpolation="bilinear")
    random.seed(0)
    torch.manual_seed(0)
    out = aug(_photo(32, 32))
    assert out.size == (32, 32) and out.mode == "RGB"
    # An identity transform must fail: for most seeds the image changes, and not always in the same way.
    img = _photo(32, 32, seed=5)
    outs = []
    for seed in range(8):
        random.seed(seed)
        torch.manual_seed(seed)
        outs.append(np.asarray(aug(img)))
    changed = [not np.array_equal(o, np.asarray(img)) for o in outs]
    assert sum(changed) >= 4, f"{text}: changed the image for only {sum(changed)} of 8 seeds"
    assert len({o.tobytes() for o in outs}) >= 2, f"{text}: the same output for every seed"


# AutoContrast, Equalize and Invert take no magnitude by design; every other op's argument comes from it.
MAGNITUDE_FREE_OPS = {"AutoContrast", "Equalize", "Invert"}


@pytest.mark.parametrize("inc", [0, 1])
def test_each_rand_op_at_m9_changes_the_image(inc):
    """Every RandAugment op at magnitude 9 changes an image that gives it something to act on, and (unless it
    takes no magnitude) acts differently at magnitude 3. The image has gradients from 10 to 250 (AutoContrast
    stretches them, Solarize at m9 inverts only pixels >= 230, SolarizeAdd lifts pixels < 128) and a checkerboard
    (Sharpness acts on edges, not on a linear ramp)."""
    y, x = np.mgrid[0:32, 0:32]
    img = Image.fromarray(np.stack([10 + x * 240 // 31, 250 - y * 240 // 31,
                                    np.where((x // 4 + y // 4) % 2, 200, 60)], -1).astype(np.uint8))
    base = np.asarray(img)
    strong, weak = (build_auto_augment(f"randaug-m{m}-p1-inc{inc}", img_size=32, mean=(0.5, 0.5, 0.5),
                                       interpolation="bilinear") for m in (9, 3))
    assert [op.name for op in strong.ops] == list(RAND_OPS_INCREASING if inc else RAND_OPS)
    for op9, op3 in zip(strong.ops, weak.ops):
        for seed in (0, 1):
            random.seed(seed)
            out9 = np.asarray(op9(img))
            random.seed(seed)
            out3 = np.asarray(op3(img))
            assert out9.shape == base.shape and not np.array_equal(out9, base), (op9.name, seed)
            if op9.name not in MAGNITUDE_FREE_OPS:
                assert not np.array_equal(out9, out3), (op9.name, seed)
            else:
                assert np.array_equal(out9, out3), (op9.name, seed)


def test_unknown_auto_augment_is_a_config_error():
    from vitkit.errors import ConfigError

    with pytest.raises(ConfigError, match="randaug"):
        build_auto_augment("randaugment-x9", img_size=32, mean=(0.5,) * 3, interpolation="bilinear")


def test_mixup_and_cutmix_targets():
    x = torch.arange(4 * 3 * 16 * 16, dtype=torch.float32).view(4, 3, 16, 16)
    y = torch.tensor([0, 1, 2, 3])
    cutmix = mixup_from_config(_cfg("--cutmix", "1.0", "--label_smoothing", "0.1"), 5)
    for step in range(20):
        xm, ym = cutmix(x, y, step)
        assert torch.allclose(ym.sum(1), torch.ones(4))
        if cutmix.last["mode"] != "cutmix":
            continue
        y0, y1, x0, x1 = cutmix.last["box"]
        pasted = torch.zeros(16, 16, dtype=torch.bool)
        pasted[y0:y1, x0:x1] = True
        assert torch.equal(xm[..., pasted], x.flip(0)[..., pasted]) and torch.equal(xm[..., ~pasted], x[..., ~pasted])
        lam = 1 - pasted.float().mean().item()
        assert cutmix.last["lam"] == pytest.approx(lam)
        # targets: lam of own (smoothed) one-hot + (1 - lam) of the flipped sample's
        assert ym[0, 0].item() == pytest.approx(lam * (0.9 + 0.02) + 0.02 * (1 - lam))
        assert ym[0, 3].item() == pytest.approx((1 - lam) * (0.9 + 0.02) + 0.02 * lam)
    mixup = mixup_from_config(_cfg("--mixup", "0.8"), 5)
    xm, ym = mixup(x, y, 7)
    lam = mixup.last["lam"]
    assert torch.allclose(xm, lam * x + (1 - lam) * x.flip(0)) and torch.allclose(ym.sum(1), torch.ones(4))
    assert mixup(x, y, 7)[1].equal(ym)  # a function of (seed, step)
    assert mixup_from_config(_cfg(), 5) is None


@pytest.mark.parametrize("crop_pct,resize", [(0.875, 256), (1.0, 224)])
def test_eval_crop_sizes(crop_pct, resize):
    dc = DataConfig(input_size=224, crop_pct=crop_pct)
    assert dc.resize_size == resize
    tf = build_transform(dc, train=False)
    _photo(300, 200).save("/tmp/_vitkit_eval.jpg", quality=95)
    assert tf.transforms[0](Image.open("/tmp/_vitkit_eval.jpg")).size == (int(resize * 300 / 200), resize)
    assert tf(Image.open("/tmp/_vitkit_eval.jpg")).shape == (3, 224, 224)


def test_train_transform_normalizes_with_mean_std_in_255_units():
    from vitkit.data.preprocess import to_unit_range

    assert to_unit_range((127.5, 127.5, 127.5)) == (0.5, 0.5, 0.5)
    dc = DataConfig(input_size=32, mean=(0.5,) * 3, std=(0.5,) * 3)
    flat = Image.new("RGB", (32, 32), (255, 0, 255))
    out = build_transform(dc, train=True, **augment_from_config(_cfg("--hflip", "0")), small_data=True)(flat)
    assert out.shape == (3, 32, 32) and out[1].max() == -1.0 and out[0].max() == 1.0


def test_mode_conversions_to_rgb():
    gray = Image.new("L", (8, 8), 200)
    cmyk = Image.new("CMYK", (8, 8), (0, 0, 0, 0))
    pal = Image.new("RGB", (8, 8), (10, 20, 30)).convert("P", palette=Image.Palette.ADAPTIVE)
    rgba = Image.new("RGBA", (8, 8), (10, 20, 30, 0))
    deep = Image.fromarray(np.full((8, 8), 65535, dtype=np.uint16))
    dark = Image.fromarray(np.full((8, 8), 200, dtype=np.uint16))  # a dark 16-bit image stays dark: 200/257 -> 1
    assert deep.mode.startswith("I;16") and dark.mode.startswith("I;16")
    out = {k: np.asarray(to_rgb(v))
           for k, v in dict(gray=gray, cmyk=cmyk, pal=pal, rgba=rgba, deep=deep, dark=dark).items()}
    assert all(v.shape == (8, 8, 3) for v in out.values())
    assert (out["gray"] == 200).all() and (out["cmyk"] == 255).all() and (out["deep"] == 255).all()
    assert (out["dark"] == 1).all()
    assert tuple(out["pal"][0, 0]) == (10, 20, 30) and tuple(out["rgba"][0, 0]) == (10, 20, 30)


# -- datasets --------------------------------------------------------------------------------------------------

def test_data_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        dataset_from_config(_cfg("--data_dir", str(tmp_path / "nope")), "train", train=True)
    with pytest.raises(DataError, match="empty"):
        dataset_from_config(_cfg("--data_dir", str(tmp_path)), "train", train=True)
    _folder(tmp_path, {"a": 2, "b": 1})
    with pytest.raises(DataError, match="split folder .*val"):
        dataset_from_config(_cfg("--data_dir", str(tmp_path)), "val", train=False)
    (tmp_path / "train" / "c_empty").mkdir()
    with pytest.raises(DataError, match="c_empty"):
        dataset_from_config(_cfg("--data_dir", str(tmp_path)), "train", train=True)
    with pytest.raises(DataError, match="dataset_download"):
        dataset_from_config(_cfg("--data_dir", str(tmp_path), "--dataset", "cifar10"), "test", train=False)


def test_imagefolder_any_split_and_cifar_jpeg_copy():
    ds = dataset_from_config(_cfg("--data_dir", str(SAMPLE)), "test", train=False)
    assert ds.classes[:2] == ["airplane", "automobile"] and len(ds.classes) == 10 and len(ds) == 1000
    cif = dataset_from_config(_cfg("--data_dir", str(SAMPLE), "--dataset", "cifar10"), "test", train=False)
    assert cif.classes == ds.classes and len(cif) == len(ds)
    # the default val_split ("val") on a CIFAR JPEG copy evaluates on its test/ folder, as the python format does
    cif_val = dataset_from_config(_cfg("--data_dir", str(SAMPLE), "--dataset", "cifar10"), "val", train=False)
    assert cif_val.samples == cif.samples and len(cif_val) == 1000


def test_num_samples_is_stratified_and_seeded(tmp_path):
    _folder(tmp_path, {"a": 30, "b": 20, "c": 10}, size=8)
    ds = dataset_from_config(_cfg("--data_dir", str(tmp_path), "--num_samples", "30"), "train", train=True)
    assert len(ds) == 30 and np.bincount(ds.targets).tolist() == [15, 10, 5]
    again = dataset_from_config(_cfg("--data_dir", str(tmp_path), "--num_samples", "30"), "train", train=True)
    other = dataset_from_config(_cfg("--data_dir", str(tmp_path), "--num_samples", "30", "--seed", "7"), "train",
                                train=True)
    assert again.indices == ds.indices and other.indices != ds.indices


# -- bad images ------------------------------------------------------------------------------------------------

def _with_bad_files(root: Path, n_bad: int) -> Path:
    _folder(root, {"a": 12, "b": 12})
    good = (root / "train" / "a" / "000.jpg").read_bytes()
    for i in range(n_bad):
        kind = i % 3
        data = b"" if kind == 0 else (b"not an image" if kind == 1 else good[: len(good) // 2])
        (root / "train" / "b" / f"bad{i}.jpg").write_bytes(data)
    return root


@pytest.mark.parametrize("in_memory", [False, True])
def test_corrupt_images_are_reported_and_replaced(tmp_path, in_memory, caplog):
    root = _with_bad_files(tmp_path, 3)
    cfg = _cfg("--data_dir", str(root), "--batch_size", "9", "--in_memory", str(in_memory).lower(),
               "--image_resize", "32", "--no-drop_remainder")
    ds = dataset_from_config(cfg, "train", train=True)
    loader = loader_from_config(cfg, ds, train=True, data_config=DataConfig(input_size=32))
    loader.set_epoch(0)
    n = sum(len(t) for _, t in loader)
    st = loader.stats()
    assert n == 27 and st["images"] == 27
    assert st["bad_images"] >= 3 and {Path(p).name for p in st["bad_paths"]} == {"bad0.jpg", "bad1.jpg", "bad2.jpg"}
    assert "bad0.jpg" in caplog.text


def test_too_many_bad_images_stop_the_run(tmp_path):
    root = _with_bad_files(tmp_path, 14)
    cfg = _cfg("--data_dir", str(root), "--batch_size", "8", "--image_resize", "32", "--in_memory", "false",
               "--bad_image_limit", "0.0")
    ds = dataset_from_config(cfg, "train", train=True)
    loader = loader_from_config(cfg, ds, train=True, data_config=DataConfig(32))
    with pytest.raises(DataError, match="unreadable images"):
        for _ in loader:
            pass


# -- loader determinism and sharding ---------------------------------------------------------------------------

def _epoch(loader, epoch, start=0):
    loader.set_epoch(epoch, start_batch=start)
    return [(x.clone(), y.clone()) for x, y in loader]


@pytest.mark.parametrize("in_memory", ["false", "true"])
def test_same_batches_for_any_workers_and_resume_mid_epoch(in_memory):
    cfg = _cfg("--data_dir", str(SAMPLE), "--batch_size", "8", "--num_samples", "40", "--image_resize", "32",
               "--auto_augment", "randaug-m9-mstd0.5", "--re_prob", "0.5", "--in_memory", in_memory)
    ds = dataset_from_config(cfg, "train", train=True)
    dc = DataConfig(input_size=32)
    ref = loader_from_config(cfg, ds, train=True, data_config=dc)
    cfg = dataclasses.replace(cfg, num_parallel_workers=2)
    two = loader_from_config(cfg, ds, train=True, data_config=dc)
    assert two._loader.num_workers == 2
    a, b = _epoch(ref, 1), _epoch(two, 1)
    assert len(a) == len(ref) == 5
    assert all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(a, b))
    tail = _epoch(two, 1, start=3)
    assert len(tail) == 2 and all(torch.equal(x1, x2) for (x1, _), (x2, _) in zip(a[3:], tail))
    assert not torch.equal(_epoch(ref, 2)[0][0], a[0][0])  # a new epoch, a new order and new augmentations
    torch.manual_seed(5)
    before = torch.rand(1)
    torch.manual_seed(5)
    _epoch(ref, 0)
    assert torch.equal(torch.rand(1), before)  # no-worker loading leaves the caller's RNG alone


def test_in_memory_batches_are_deterministic_and_resumable():
    cfg = _cfg("--data_dir", str(SAMPLE), "--batch_size", "16", "--num_samples", "64", "--image_resize", "32")
    ds = dataset_from_config(cfg, "train", train=True)
    loader = loader_from_config(cfg, ds, train=True, data_config=DataConfig(input_size=32))
    assert loader.batch_fn is not None
    full = _epoch(loader, 3)
    tail = _epoch(loader, 3, start=2)
    assert all(torch.equal(x1, x2) for (x1, _), (x2, _) in zip(full[2:], tail))
    # each image of the batch is its stored pixels, zero-padded, shifted and maybe flipped
    x, _ = full[0]
    assert x.shape == (16, 3, 32, 32) and x.dtype == torch.float32


def test_pad_crop_flip_batch_op():
    from vitkit.data.batch_augment import BatchAugment

    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.uint8).view(2, 3, 4, 4)
    p = torch.tensor([[0, 2, 0, 0], [1, 1, 1, 0]])
    out = BatchAugment._pad_crop_flip(x, p, 1)
    padded = torch.nn.functional.pad(x, (1, 1, 1, 1))
    assert torch.equal(out[0], padded[0, :, 0:4, 2:6])
    assert torch.equal(out[1], padded[1, :, 1:5, 1:5].flip(-1))


@pytest.mark.parametrize("world", [2, 3])
def test_eval_sharding_counts_every_image_once(world):
    n = 10
    seen = []
    for r in range(world):
        plan = ShardPlan(n, batch_size=3, train=False, rank=r, world_size=world)
        seen += [i for b in plan.batches(0) for i, _ in b]
    assert sorted(seen) == list(range(n))


@pytest.mark.parametrize("drop,repeats", [(True, 0), (False, 0), (True, 3)])
def test_train_sharding_is_one_permutation_split_over_ranks(drop, repeats):
    n, world = 11, 3
    plans = [ShardPlan(n, batch_size=2, train=True, seed=1, drop_remainder=drop, aug_repeats=repeats, rank=r,
                       world_size=world) for r in range(world)]
    assert len({len(p) for p in plans}) == 1  # ranks stay in step
    idx = [p.epoch(4)[0] for p in plans]
    allidx = np.concatenate(idx)
    if repeats:
        # repeated augmentation: copies of an image go to different ranks
        assert len(allidx) == 9 and all(len(set(i)) == len(i) for i in idx)
    elif drop:
        assert len(allidx) == 9 and len(set(allidx.tolist())) == 9
    else:
        assert len(allidx) == 12 and set(allidx.tolist()) == set(range(n))
    single = ShardPlan(n, batch_size=2, train=True, seed=1, drop_remainder=False).epoch(4)[0]
    assert sorted(single.tolist()) == list(range(n)) and not np.array_equal(single, np.arange(n))


def test_data_check_lists_problems(tmp_path, capsys):
    from vitkit.cli import main as cli

    root = _with_bad_files(tmp_path, 2)
    (root / "train" / "empty").mkdir()
    _folder(tmp_path / "x", {"big": 7, "small": 2})
    (tmp_path / "x" / "train").rename(root / "val")
    assert cli(["data", "check", str(root)]) == 1
    out = capsys.readouterr().out
    assert "unreadable: " in out and "bad0.jpg" in out and "bad1.jpg" in out
    assert f"empty class: {root / 'train' / 'empty'}" in out and "imbalance: val" in out
    assert cli(["data", "check", str(SAMPLE / "test")]) == 0
    assert cli(["data", "check", str(tmp_path / "missing")]) == 2


def test_gpu_decode_path_runs_on_cpu_and_matches_eval_crop(tmp_path, caplog):
    """The nvJPEG path with device=cpu: same shapes, deterministic, and its eval crop close to the PIL path."""
    for i in range(4):
        (tmp_path / "val" / "a").mkdir(parents=True, exist_ok=True)
        _photo(120, 90, seed=i).save(tmp_path / "val" / "a" / f"{i}.jpg", quality=95)
    cfg = _cfg("--data_dir", str(tmp_path), "--batch_size", "4", "--gpu_decode", "--in_memory", "false")
    dc = DataConfig(input_size=64, crop_pct=1.0, interpolation="bilinear")
    ds = dataset_from_config(cfg, "val", train=False)
    with caplog.at_level("WARNING"):
        (x, y), = _epoch(loader_from_config(cfg, ds, train=False, data_config=dc), 0)
    if not torch.cuda.is_available():  # the recovery is said, not silent
        assert "no CUDA GPU; decoding on the CPU instead" in caplog.text
    ref = torch.stack([build_transform(dc, train=False, small_data=False)(ds.load(i)) for i in range(4)])
    assert x.shape == ref.shape == (4, 3, 64, 64) and (x - ref).abs().mean() < 0.05
    cfg = dataclasses.replace(cfg, val_split="val", train_split="val")
    train = loader_from_config(cfg, ds, train=True, data_config=dc)
    (a, _), (b, _) = _epoch(train, 2)[0], _epoch(train, 2)[0]
    assert a.shape == (4, 3, 64, 64) and torch.equal(a, b)
