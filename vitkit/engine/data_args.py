"""The one place that maps run-config fields (`vitkit.engine.config.Config`) to the data builders' keywords."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from vitkit.data.augment import Mixup, build_mixup
from vitkit.data.datasets import ImageDataset, build_dataset
from vitkit.data.loader import Loader, build_loader
from vitkit.data.preprocess import DataConfig, resolve_data_config
from vitkit.engine.config import Config, ConfigError


def dataset_from_config(cfg: Config, split: str, *, train: bool) -> ImageDataset:
    return build_dataset(cfg.data_dir, name=cfg.dataset, split=split, train=train, download=cfg.dataset_download,
                         num_samples=cfg.num_samples, seed=cfg.seed, train_split=cfg.train_split,
                         image_column=cfg.image_column, label_column=cfg.label_column)


def data_config_from_config(cfg: Config, spec: Any, weights_data: Mapping[str, Any] | None = None) -> DataConfig:
    """Eval preprocessing: the config's values where set, then what the pretrained weights' source states
    (`weights_data`: timm's mean/std 0.5 and crop 0.9, torchvision's ImageNet statistics, ...), then the
    model's (`spec`)."""
    stated = weights_data or {}

    def pick(key: str) -> Any:
        value = getattr(cfg, key)
        return stated.get(key) if value is None else value
    try:
        return resolve_data_config(spec, input_size=cfg.image_resize, mean=pick("mean"), std=pick("std"),
                                   interpolation=pick("interpolation"), crop_pct=pick("crop_pct"))
    except (TypeError, ValueError) as e:  # the weights' statements: the config's own values were checked
        raise ConfigError(f"the pretrained weights' preprocessing cannot be used ({e}); pass --mean, --std, "
                          f"--interpolation or --crop_pct to set it") from None


def augment_from_config(cfg: Config) -> dict[str, Any]:
    """`build_transform`'s training keywords."""
    return dict(scale=cfg.scale, ratio=cfg.ratio, hflip=cfg.hflip, vflip=cfg.vflip, auto_augment=cfg.auto_augment,
                color_jitter=cfg.color_jitter, re_prob=cfg.re_prob, re_scale=cfg.re_scale, re_ratio=cfg.re_ratio,
                re_value=cfg.re_value)


def loader_from_config(cfg: Config, ds: ImageDataset, *, train: bool, data_config: DataConfig, rank: int = 0,
                       world_size: int = 1) -> Loader:
    return build_loader(ds, data_config=data_config, train=train, batch_size=cfg.batch_size, seed=cfg.seed,
                        shuffle=cfg.shuffle, drop_remainder=cfg.drop_remainder, aug_repeats=cfg.aug_repeats,
                        num_workers=cfg.num_parallel_workers, bad_image_limit=cfg.bad_image_limit,
                        in_memory=cfg.in_memory, gpu_decode=cfg.gpu_decode, rank=rank, world_size=world_size,
                        **augment_from_config(cfg))


def mixup_from_config(cfg: Config, num_classes: int) -> Mixup | None:
    return build_mixup(num_classes, mixup=cfg.mixup, cutmix=cfg.cutmix, prob=cfg.cutmix_prob,
                       switch_prob=cfg.mixup_switch_prob, label_smoothing=cfg.label_smoothing, seed=cfg.seed)
