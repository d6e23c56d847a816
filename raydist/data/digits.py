"""scikit-learn's embedded 8x8 digits, upscaled to look like a tiny CIFAR.

The only real dataset that needs neither files nor a network, so tests, CI and laptop demos can train
something meaningful anywhere. The split is seeded by ``split_seed`` (not the run seed) so the test set
is the same for every run.
"""

from __future__ import annotations

import torch

from raydist.data.common import (
    DataError,
    DatasetSplits,
    make_splits,
    mix_seed,
    resize_uint8,
    stratified_holdout,
)

DEFAULT_VAL_SIZE = 200
TEST_FRACTION = 0.2


def load_digits_images(image_size: int = 32, channels: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """All 1797 digits as uint8 [N, channels, image_size, image_size] and int64 labels."""
    from sklearn.datasets import load_digits  # lazy: scikit-learn is slow to import

    if channels not in (1, 3):
        raise DataError(f"digits has 1 or 3 channels, not {channels}")
    bunch = load_digits()
    # Pixel values are 0..16; scale to 0..255 before resizing so rounding loses nothing.
    x = torch.from_numpy(bunch.images).float().mul_(255.0 / 16.0).round_().to(torch.uint8)
    x = resize_uint8(x.unsqueeze(1), image_size)
    if channels == 3:
        x = x.repeat(1, 3, 1, 1)
    y = torch.from_numpy(bunch.target).long()
    return x, y


def load_digits_splits(
    *, val_size: int | None = None, image_size: int = 32, channels: int = 3, split_seed: int = 0
) -> DatasetSplits:
    """Digits with a stratified 20% test split, then ``val_size`` (default 200) held out of the rest."""
    x, y = load_digits_images(image_size, channels)
    val_size = DEFAULT_VAL_SIZE if val_size is None else val_size
    n_test = round(TEST_FRACTION * y.numel())
    pool, test = stratified_holdout(y, n_test, seed=split_seed)
    if not 0 <= val_size < pool.numel():
        raise DataError(f"digits val_size must be in [0, {pool.numel()}), got {val_size}")
    keep, val = stratified_holdout(y[pool], val_size, seed=mix_seed(split_seed, 1))
    train, val = pool[keep], pool[val]
    return make_splits("digits", (x[train], y[train]), (x[val], y[val]), (x[test], y[test]), num_classes=10)
