"""One entry point for every dataset, plus a cheap pre-flight check.

``check_dataset`` runs during config validation, before Ray starts, so a missing CIFAR directory is one
clear line at the prompt instead of a traceback from inside a remote worker minutes later.
"""

from __future__ import annotations

import os

from raydist.data.cifar import LAYOUTS, check_cifar, load_cifar_splits
from raydist.data.common import DataError, DatasetSplits, default_root
from raydist.data.digits import load_digits_splits
from raydist.data.synthetic import load_synthetic_splits

DATASETS: tuple[str, ...] = ("digits", "cifar10", "cifar100", "synthetic")
FILE_DATASETS: frozenset[str] = frozenset(LAYOUTS)


def _canonical(name: str) -> str:
    key = str(name).strip().lower()
    if key not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}")
    return key


def check_dataset(name: str, root: str | os.PathLike[str] | None = None, download: bool = False) -> None:
    """Raise DataError (one line, naming the path) if ``name`` needs files that are not there.

    Datasets that need no files (digits, synthetic) always pass, whatever the root. With ``download``
    the files will be fetched, so nothing is required yet.
    """
    key = _canonical(name)
    if key in FILE_DATASETS:
        check_cifar(key, default_root(root), download)


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
    """Load ``name`` as uint8 CPU splits (see DatasetSplits).

    ``split_seed`` (not the run seed) fixes which samples are validation / test, so every run of a
    sweep is judged on the same data. ``image_size`` resizes real datasets when it differs from their
    native size; ``num_classes``, ``train_size`` and ``test_size`` only shape the synthetic dataset
    (real datasets have their own); ``channels`` may be 1 or 3 for digits and must be 3 for CIFAR.
    ``val_size=None`` means the dataset's default (digits 200, CIFAR 1000, synthetic 256).
    """
    key = _canonical(name)
    if image_size < 1:
        raise DataError(f"image_size must be positive, got {image_size}")
    if key == "digits":
        return load_digits_splits(
            val_size=val_size, image_size=image_size, channels=channels, split_seed=split_seed
        )
    if key == "synthetic":
        return load_synthetic_splits(
            image_size=image_size,
            num_classes=num_classes,
            channels=channels,
            train_size=train_size,
            val_size=val_size,
            test_size=test_size,
            split_seed=split_seed,
        )
    if channels != 3:
        raise DataError(f"{key} images have 3 channels, not {channels}")
    return load_cifar_splits(
        key,
        default_root(root),
        download=download,
        val_size=val_size,
        image_size=image_size,
        split_seed=split_seed,
    )
