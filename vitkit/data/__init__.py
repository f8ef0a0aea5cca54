"""Data: datasets, transforms, augmentation (auto-augment strings, mixup/cutmix) and the loader."""
from vitkit.data.augment import Mixup, build_auto_augment, build_mixup
from vitkit.data.datasets import ImageDataset, build_dataset
from vitkit.data.loader import Loader, build_loader
from vitkit.data.preprocess import DataConfig, resolve_data_config
from vitkit.data.transforms import build_transform

__all__ = ["DataConfig", "ImageDataset", "Loader", "Mixup", "build_auto_augment", "build_dataset", "build_loader",
           "build_mixup", "build_transform", "resolve_data_config"]
