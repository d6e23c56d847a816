"""Random but learnable images of any shape and class count, for benchmarks and tests.

Each class has a fixed smooth random template (low-resolution noise upsampled to the image size, so it
survives crops and flips); a sample is its class template plus per-pixel Gaussian noise. A small network
learns it in a few steps, which makes it a meaningful smoke test, while ImageNet-sized shapes cost
nothing to download.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from raydist.data.common import DataError, DatasetSplits, make_splits, mix_seed

DEFAULT_VAL_SIZE = 256
TEMPLATE_RES = 4
NOISE_STD = 40.0
CHUNK = 512


def _templates(num_classes: int, channels: int, image_size: int, gen: torch.Generator) -> torch.Tensor:
    """One smooth [C, H, W] template per class, values in roughly 32..223 so noise rarely clips."""
    coarse = torch.rand((num_classes, channels, TEMPLATE_RES, TEMPLATE_RES), generator=gen)
    smooth = F.interpolate(coarse, size=(image_size, image_size), mode="bilinear", align_corners=False)
    return smooth.mul_(191.0).add_(32.0)


def _sample(templates: torch.Tensor, n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` noisy samples with balanced labels in random order."""
    num_classes = templates.shape[0]
    y = (torch.arange(n) % num_classes)[torch.randperm(n, generator=gen)]
    x = torch.empty((n, *templates.shape[1:]), dtype=torch.uint8)
    for start in range(0, n, CHUNK):  # chunked: float copies of ImageNet-sized sets would be large
        yc = y[start : start + CHUNK]
        noisy = torch.randn((yc.numel(), *templates.shape[1:]), generator=gen).mul_(NOISE_STD)
        noisy.add_(templates.index_select(0, yc)).add_(0.5).clamp_(0, 255)  # +0.5 then truncate = round
        x[start : start + CHUNK] = noisy.to(torch.uint8)
    return x, y


def load_synthetic_splits(
    *,
    image_size: int = 32,
    num_classes: int = 10,
    channels: int = 3,
    train_size: int = 2048,
    val_size: int | None = None,
    test_size: int = 512,
    split_seed: int = 0,
) -> DatasetSplits:
    """Synthetic train/val/test splits; everything is a function of the arguments and ``split_seed``."""
    val_size = DEFAULT_VAL_SIZE if val_size is None else val_size
    if num_classes < 2 or channels < 1 or image_size < 1:
        raise DataError(
            f"synthetic needs num_classes >= 2, channels >= 1, image_size >= 1; "
            f"got {num_classes}, {channels}, {image_size}"
        )
    if min(train_size, val_size, test_size) < 0 or train_size == 0:
        sizes = f"{train_size}, {val_size}, {test_size}"
        raise DataError(f"synthetic split sizes must be >= 0 and train > 0, got {sizes}")
    gen = torch.Generator().manual_seed(mix_seed(split_seed, 0))
    templates = _templates(num_classes, channels, image_size, gen)
    # Each split draws from its own generator so changing one size does not reshuffle the others.
    splits = [
        _sample(templates, n, torch.Generator().manual_seed(mix_seed(split_seed, k + 1)))
        for k, n in enumerate((train_size, val_size, test_size))
    ]
    return make_splits("synthetic", *splits, num_classes=num_classes)
