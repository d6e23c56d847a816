"""The full dataset registry: the in-memory datasets of ``datasets`` plus the class-folder ones (``imagenet``).

``raydist.data`` exports these ``DATASETS`` / ``check_dataset`` / ``load_dataset``; they behave exactly as the
``datasets`` module's for its names and add:

- ``tiny_imagenet``: checked under ``root/tiny-imagenet-200`` (or ``root``), class folders or parquet copy;
  ``load_dataset`` decodes it into memory (uint8 DatasetSplits, ``image_size`` square, default 10 val images
  per class), so it runs on DeviceLoader like CIFAR;
- ``imagenet``: checked under ``root/imagenet`` (or ``root``); ``load_dataset`` raises a DataError that says to
  stream it (``folder_to_parquet``, then ``streaming.image_dataset`` or ``parquet.ParquetLoader``).
"""

from __future__ import annotations

import os

from raydist.data import datasets as _memory
from raydist.data.common import DataError, DatasetSplits, default_root
from raydist.data.imagenet import FOLDERS, check_image_dataset, load_image_dataset

IMAGE_DATASETS: tuple[str, ...] = tuple(FOLDERS)
DATASETS: tuple[str, ...] = _memory.DATASETS + IMAGE_DATASETS


def _canonical(name: str) -> str:
    key = str(name).strip().lower()
    if key not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}")
    return key


def check_dataset(name: str, root: str | os.PathLike[str] | None = None, download: bool = False) -> None:
    """Raise DataError (one line, naming the path) if ``name`` needs files that are not there.

    Digits and synthetic need none; CIFAR with ``download`` will be fetched; imagenet and tiny_imagenet are
    never downloaded, so their class folders (or parquet copy) must be present whatever ``download`` says.
    """
    key = _canonical(name)
    if key in IMAGE_DATASETS:
        check_image_dataset(key, default_root(root), download)
    else:
        _memory.check_dataset(key, root, download)


def load_dataset(
    name: str,
    *,
    root: str | os.PathLike[str] | None = None,
    download: bool = False,
    val_size: int | None = None,
    image_size: int = 32,
    num_classes: int = 10,
    channels: int = 3,
    train_size: int = 2048,
    test_size: int = 512,
    split_seed: int = 0,
) -> DatasetSplits:
    """Load ``name`` as uint8 CPU splits; the arguments are those of ``raydist.data.datasets.load_dataset``.

    tiny_imagenet uses ``root``, ``val_size`` (None: 10 per class), ``image_size`` (its native size is 64) and
    ``split_seed``, and needs ``channels`` 3; imagenet raises DataError: it is streamed, never loaded.
    """
    key = _canonical(name)
    if key not in IMAGE_DATASETS:
        return _memory.load_dataset(
            key, root=root, download=download, val_size=val_size, image_size=image_size, num_classes=num_classes,
            channels=channels, train_size=train_size, test_size=test_size, split_seed=split_seed,
        )
    if channels != 3:
        raise DataError(f"{key} images have 3 channels, not {channels}")
    if image_size < 1:
        raise DataError(f"image_size must be positive, got {image_size}")
    return load_image_dataset(key, default_root(root), val_size=val_size, image_size=image_size,
                              split_seed=split_seed)
