"""Pieces every dataset loader shares: the result type, the error type, splitting and statistics.

Kept free of Ray (and of torchvision / scikit-learn) so config validation and tests can import it cheaply.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

ENV_ROOT = "RAYDIST_DATA"
DEFAULT_ROOT = "~/.cache/raydist/data"


class DataError(Exception):
    """A dataset cannot be provided as configured. The message is one line that says what to change."""


@dataclass
class DatasetSplits:
    """Train / validation / test splits of one dataset, held on the CPU as uint8 images.

    Images stay uint8 [N, C, H, W] so a whole split can be moved to an accelerator once and converted
    per batch (see DeviceLoader). ``mean``/``std`` are per-channel statistics of the *train* split in
    [0, 1] units, for models that normalize their input; the val split picks the best checkpoint and
    the test split never changes with the run seed.
    """

    name: str
    train_x: torch.Tensor = field(repr=False)
    train_y: torch.Tensor = field(repr=False)
    val_x: torch.Tensor = field(repr=False)
    val_y: torch.Tensor = field(repr=False)
    test_x: torch.Tensor = field(repr=False)
    test_y: torch.Tensor = field(repr=False)
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    input_size: tuple[int, int, int]

    def split(self, which: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (images, labels) of 'train', 'val' or 'test', so callers can pick a split by name."""
        if which not in ("train", "val", "test"):
            raise ValueError(f"unknown split {which!r}; choose train, val or test")
        return getattr(self, f"{which}_x"), getattr(self, f"{which}_y")

    def sizes(self) -> dict[str, int]:
        """Number of samples per split, for logs and reports."""
        return {s: int(self.split(s)[1].numel()) for s in ("train", "val", "test")}


def mix_seed(*parts: int) -> int:
    """Combine integers (seed, epoch, rank, ...) into one well-spread 63-bit seed (SplitMix64 steps).

    Plain sums like ``seed + epoch`` collide across runs (seed 1 epoch 0 == seed 0 epoch 1); this does not.
    """
    mask = (1 << 64) - 1
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h = (h ^ (int(p) & mask)) & mask
        h = (h + 0x9E3779B97F4A7C15) & mask
        h = ((h ^ (h >> 30)) * 0xBF58476D1CE4E5B9) & mask
        h = ((h ^ (h >> 27)) * 0x94D049BB133111EB) & mask
        h ^= h >> 31
    return h & ((1 << 63) - 1)


def default_root(root: str | os.PathLike[str] | None = None) -> Path:
    """Resolve the data root: the argument, else $RAYDIST_DATA, else ~/.cache/raydist/data."""
    chosen = root if root is not None else os.environ.get(ENV_ROOT) or DEFAULT_ROOT
    return Path(chosen).expanduser()


def stratified_holdout(labels: torch.Tensor, n_holdout: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split indices into (keep, holdout) with ``n_holdout`` samples held out, class-proportionally.

    Each class gives floor(share) samples and the leftover places go to the classes with the largest
    remainders, so the total is exact even for tiny holdouts (unlike scikit-learn, which refuses a
    holdout smaller than the number of classes). Deterministic in ``seed``; indices come back sorted.
    """
    labels = labels.cpu()
    n = labels.numel()
    if not 0 <= n_holdout <= n:
        raise DataError(f"cannot hold out {n_holdout} samples from {n}")
    classes, counts = torch.unique(labels, return_counts=True)
    share = counts.double() * n_holdout / max(n, 1)
    quota = share.floor().long()
    leftover = n_holdout - int(quota.sum())
    if leftover > 0:
        order = torch.argsort(share - quota.double(), descending=True, stable=True)
        quota[order[:leftover]] += 1
    gen = torch.Generator().manual_seed(seed)
    held = []
    for cls, q in zip(classes.tolist(), quota.tolist()):
        members = torch.nonzero(labels == cls).flatten()
        held.append(members[torch.randperm(members.numel(), generator=gen)[:q]])
    mask = torch.zeros(n, dtype=torch.bool)
    if held:
        mask[torch.cat(held)] = True
    return torch.nonzero(~mask).flatten(), torch.nonzero(mask).flatten()


def channel_stats(x: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and (population) std of uint8 images in [0, 1] units.

    Computed from a 256-bin histogram per channel: exact, and an order of magnitude faster than a float
    pass over a 50k-image split (which would also need a float copy of it).
    """
    levels = torch.arange(256, dtype=torch.float64) / 255.0
    means, stds = [], []
    for c in range(x.shape[1]):
        hist = torch.bincount(x[:, c].reshape(-1), minlength=256).double()
        count = max(float(hist.sum()), 1.0)
        mean = float((hist * levels).sum()) / count
        var = max(float((hist * levels.square()).sum()) / count - mean * mean, 0.0)
        means.append(mean)
        stds.append(math.sqrt(var))
    return tuple(means), tuple(stds)


def resize_uint8(x: torch.Tensor, size: int, chunk: int = 2048) -> torch.Tensor:
    """Resize uint8 [N, C, H, W] images to size x size (bilinear, antialiased), chunked to bound memory."""
    if x.shape[-2:] == (size, size):
        return x
    out = torch.empty((x.shape[0], x.shape[1], size, size), dtype=torch.uint8)
    for start in range(0, x.shape[0], chunk):
        part = x[start : start + chunk].float()
        part = F.interpolate(part, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        out[start : start + chunk] = part.round_().clamp_(0, 255).to(torch.uint8)
    return out


def make_splits(
    name: str,
    train: tuple[torch.Tensor, torch.Tensor],
    val: tuple[torch.Tensor, torch.Tensor],
    test: tuple[torch.Tensor, torch.Tensor],
    num_classes: int,
) -> DatasetSplits:
    """Assemble a DatasetSplits, computing the train statistics and checking dtypes once for all loaders."""
    for x, y in (train, val, test):
        assert x.dtype == torch.uint8 and x.ndim == 4, (x.dtype, x.shape)
        assert y.dtype == torch.int64 and y.shape == (x.shape[0],), (y.dtype, y.shape)
    mean, std = channel_stats(train[0])
    c, h, w = train[0].shape[1:]
    return DatasetSplits(
        name=name,
        train_x=train[0].contiguous(),
        train_y=train[1],
        val_x=val[0].contiguous(),
        val_y=val[1],
        test_x=test[0].contiguous(),
        test_y=test[1],
        num_classes=num_classes,
        mean=mean,
        std=std,
        input_size=(int(c), int(h), int(w)),
    )
