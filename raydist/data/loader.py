"""A loader that keeps a whole split on the device and shards it across data-parallel ranks.

For CIFAR-sized data a DataLoader with worker processes is the bottleneck; holding the split as one
uint8 tensor on the accelerator and slicing batches out of it (airbench style) costs nothing per batch.
Sharding follows DistributedSampler's contract — the same permutation on every rank, rank r takes
perm[r::world_size] — but every rank yields the same number of batches with no padding or dropping, so
DDP's collectives line up and each sample is seen exactly once per epoch.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch

from raydist.data.augment import augment_batch, validate_augment
from raydist.data.common import mix_seed


class DeviceLoader:
    """Iterate (x float32 in [0, 1] [B, C, H, W], y int64) batches of a device-resident uint8 split.

    Call ``set_epoch(epoch)`` before each epoch: shuffling and augmentation are seeded by
    (seed, epoch) and (seed, epoch, rank), so a resumed run replays the same batches.
    When a rank's shard is smaller than the batch count (only with batch_size 1 or fewer samples than
    ranks) some of its batches are empty rather than missing.
    """

    def __init__(
        self,
        x_uint8: torch.Tensor,
        y: torch.Tensor,
        *,
        batch_size: int,
        device: str | torch.device = "cpu",
        shuffle: bool = True,
        augment: dict[str, Any] | None = None,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        channels_last: bool = False,
    ) -> None:
        if x_uint8.dtype != torch.uint8 or x_uint8.ndim != 4:
            shape = tuple(x_uint8.shape)
            raise ValueError(f"expected uint8 images [N, C, H, W], got {x_uint8.dtype} {shape}")
        if y.ndim != 1 or y.shape[0] != x_uint8.shape[0]:
            raise ValueError(f"labels {tuple(y.shape)} do not match {x_uint8.shape[0]} images")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} out of range for world_size {world_size}")
        self.device = torch.device(device)
        self.x = x_uint8.to(self.device).contiguous()  # once per run: the whole split lives on the device
        self.y = y.to(self.device, dtype=torch.int64)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.augment = validate_augment(augment)
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.channels_last = channels_last
        self.epoch = 0
        n = self.x.shape[0]
        self.num_batches = math.ceil(math.ceil(n / world_size) / batch_size)
        self._cache: tuple[int, torch.Tensor] | None = None

    @property
    def dataset_size(self) -> int:
        """Samples in the whole split (all ranks together)."""
        return int(self.x.shape[0])

    @property
    def num_samples(self) -> int:
        """Samples this rank yields per epoch: ceil or floor of N / world_size."""
        return len(range(self.rank, self.dataset_size, self.world_size))

    def __len__(self) -> int:
        return self.num_batches

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose permutation and augmentation the next iteration uses."""
        self.epoch = int(epoch)

    def _device_indices(self) -> torch.Tensor:
        """This rank's indices for the current epoch on the device, computed once per epoch."""
        if self._cache is None or self._cache[0] != self.epoch:
            n = self.dataset_size
            if self.shuffle:
                gen = torch.Generator().manual_seed(mix_seed(self.seed, self.epoch))
                order = torch.randperm(n, generator=gen)  # CPU: identical on every rank and backend
            else:
                order = torch.arange(n)
            self._cache = (self.epoch, order[self.rank :: self.world_size].to(self.device))
        return self._cache[1]

    def epoch_indices(self) -> torch.Tensor:
        """This rank's sample indices for the current epoch, in batch order (CPU int64; for tests/logs)."""
        return self._device_indices().cpu()

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        idx = self._device_indices()
        gen = None
        if self.augment["crop"] or self.augment["flip"]:
            gen = torch.Generator(device=self.device)
            gen.manual_seed(mix_seed(self.seed, self.epoch, self.rank))
        memory_format = torch.channels_last if self.channels_last else torch.contiguous_format
        for chunk in torch.tensor_split(idx, self.num_batches) if self.num_batches else ():
            xb = self.x.index_select(0, chunk)
            if gen is not None:
                xb = augment_batch(xb, self.augment, gen)  # on uint8: a quarter of the bytes of float
            xb = xb.to(dtype=torch.float32, memory_format=memory_format).div_(255.0)
            yield xb, self.y.index_select(0, chunk)
