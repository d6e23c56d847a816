"""Stream a converted parquet dataset into Ray Train workers with Ray Data, decoding on Ray Data's CPUs.

Recommended wiring (driver, then each worker)::

    train_ds = image_dataset(path, "train", image_size=224)          # shuffled files, random crop + flip
    val_ds = image_dataset(path, "val", image_size=224)              # resize + center crop
    trainer = TorchTrainer(loop, datasets={"train": train_ds, "val": val_ds}, dataset_config=data_config(), ...)
    # in the loop, on every worker:
    loader = StreamingLoader(ray.train.get_dataset_shard("train"), batch_size=256, device=device,
                             num_rows=shard_rows(info.counts["train"], world_size))
    for x, y in loader: ...                                          # x float [0, 1] NCHW, y int64, on device

Ray Train splits the datasets it is given with ``streaming_split``; pass ``dataset_config=data_config()`` so
that the train split is equal (every worker the same number of rows, up to world_size - 1 dropped, so DDP's
per-step collectives line up) while the evaluation splits are not (``equal=False``: every row is read by
exactly one worker, none dropped; evaluation sums its counts over workers once, at the end). Decoding and
augmentation run in ``map_batches`` tasks that Ray Data schedules on the cluster's spare CPUs, and the pipeline
is re-executed every epoch (fresh augmentation, nothing materialized); the train split's file order is reshuffled
each epoch too.

Ray is imported inside the functions, so importing this module (and raydist.data) stays Ray-free.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from raydist.data.parquet import parquet_files
from raydist.data.transforms import DEFAULT_CROP_FRACTION, ImageTransform, decode_rows, to_device_batch

if TYPE_CHECKING:
    import ray.data

DECODE_BATCH_SIZE = 64


def parquet_dataset(
    path: str | os.PathLike[str],
    split: str,
    *,
    shuffle_files: bool = False,
    columns: tuple[str, ...] = ("image", "label"),
) -> ray.data.Dataset:
    """The raw rows (encoded ``image`` bytes, int64 ``label``) of one split as a lazy Ray Dataset.

    ``shuffle_files`` reads the part files in a new random order on every execution (every epoch).
    Raises DataError naming the path when the split has no part files.
    """
    import ray.data

    files = [str(f) for f in parquet_files(path, split)]
    ds = ray.data.read_parquet(files, shuffle="files" if shuffle_files else None)
    return ds.select_columns(list(columns))  # projected into the read by Ray Data's optimizer


def decode_images(batch: dict[str, np.ndarray], transform: ImageTransform) -> dict[str, np.ndarray]:
    """Ray Data ``map_batches`` step: encoded ``image`` bytes -> uint8 [B, S, S, 3]; labels become int64. A row
    whose image cannot be decoded is dropped with a warning naming its source ``path`` (when the batch has it)."""
    names = [str(p) for p in batch["path"]] if "path" in batch else None
    images, keep = decode_rows(list(batch["image"]), transform, names=names)  # train: fresh entropy per image
    return {"image": images, "label": np.asarray(batch["label"], dtype=np.int64)[keep]}


def image_dataset(
    path: str | os.PathLike[str],
    split: str,
    *,
    image_size: int,
    train: bool | None = None,
    crop_fraction: float = DEFAULT_CROP_FRACTION,
    scale: tuple[float, float] = (0.08, 1.0),
    flip: bool = True,
    decode_batch_size: int = DECODE_BATCH_SIZE,
    num_cpus: float = 1.0,
) -> ray.data.Dataset:
    """One split as a lazy Ray Dataset of decoded, transformed rows: ``image`` uint8 [S, S, 3], ``label`` int64.

    train (default: split == 'train'): files in random order, random resized crop (``scale``) + ``flip``;
    otherwise files in order, resize to ``image_size / crop_fraction`` + center crop. ``image_size`` is the
    model's input resolution (224; SAT's 299 and 380). Pass the result to ``TorchTrainer(datasets=...)``.
    Train augmentation is random per execution and not reproducible across runs (Ray Data's order is not).
    """
    train = split == "train" if train is None else train
    transform = ImageTransform(image_size, train=train, scale=scale, flip=flip, crop_fraction=crop_fraction)
    ds = parquet_dataset(path, split, shuffle_files=train, columns=_columns(path, split))
    return ds.map_batches(
        decode_images,
        fn_kwargs={"transform": transform},
        batch_size=decode_batch_size,
        batch_format="numpy",
        num_cpus=num_cpus,
    )


def _columns(path: str | os.PathLike[str], split: str) -> list[str]:
    """image and label, plus the source path where the files have it (to name a corrupt image)."""
    import pyarrow.parquet as pq

    names = pq.read_schema(parquet_files(path, split)[0]).names
    return ["image", "label"] + (["path"] if "path" in names else [])


EQUAL_SPLIT = ("train",)  # the datasets DDP steps through in lockstep; evaluation splits are split unequally


def shard_rows(total_rows: int, world_size: int, equal: bool = True) -> int:
    """Rows each worker gets from Ray Train's split of a ``total_rows`` dataset: exactly, for an equal split;
    for an unequal one (evaluation, see ``data_config``) the even share rounded up, as shards differ by blocks."""
    world_size = max(1, world_size)
    return total_rows // world_size if equal else -(-total_rows // world_size)


def data_config(equal: tuple[str, ...] = EQUAL_SPLIT):
    """Ray Train's ``DataConfig`` for ``TorchTrainer(dataset_config=...)``: the datasets named in ``equal`` split
    with ``streaming_split(n, equal=True)`` (same row count on every worker), the others with ``equal=False``, so
    that evaluation reads every row once instead of dropping up to world_size - 1 of them."""
    from ray.train import DataConfig

    class _Config(DataConfig):
        def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
            output = [{} for _ in range(world_size)]
            hints = worker_node_ids if self._enable_shard_locality else None
            for name, ds in datasets.items():
                if ds.name is None:
                    ds.set_name(name)
                ds = ds.copy(ds)
                ds.context.execution_options = self._resolve_execution_options(name)
                for i, part in enumerate(ds.streaming_split(world_size, equal=name in equal, locality_hints=hints)):
                    output[i][name] = part
            return output

    return _Config()


class StreamingLoader:
    """Iterate (x float32 [B, 3, S, S] in [0, 1], y int64) device batches of an ``image_dataset`` shard.

    ``data``: what ``ray.train.get_dataset_shard(name)`` returns (a DataIterator), or a Ray Dataset (e.g. in a
    driver-side evaluation). Each ``iter`` starts a new pass (epoch) over the data. ``num_rows``, when given
    (see ``shard_rows``), makes ``len()`` work for schedules; ``set_epoch`` exists for parity with
    DeviceLoader and ParquetLoader (Ray Data reshuffles by itself). ``local_shuffle_buffer_size`` (rows)
    mixes rows across files within a worker; leave it None for eval.
    """

    def __init__(
        self,
        data: Any,
        *,
        batch_size: int,
        device: str | torch.device = "cpu",
        channels_last: bool = False,
        drop_last: bool = False,
        local_shuffle_buffer_size: int | None = None,
        prefetch_batches: int = 2,
        num_rows: int | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.data = data
        self.batch_size = batch_size
        self.device = torch.device(device)
        self.channels_last = channels_last
        self.drop_last = drop_last
        self.local_shuffle_buffer_size = local_shuffle_buffer_size
        self.prefetch_batches = prefetch_batches
        self.num_rows = num_rows
        self.epoch = 0

    def __len__(self) -> int:
        if self.num_rows is None:
            raise TypeError("StreamingLoader has no length unless num_rows is given (see shard_rows)")
        rounding = math.floor if self.drop_last else math.ceil
        return rounding(self.num_rows / self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        batches = self.data.iter_torch_batches(
            batch_size=self.batch_size,
            dtypes={"image": torch.uint8, "label": torch.int64},
            device="cpu",  # uint8 is moved by to_device_batch, once, in the layout the model wants
            drop_last=self.drop_last,
            local_shuffle_buffer_size=self.local_shuffle_buffer_size,
            prefetch_batches=self.prefetch_batches,
            pin_memory=self.device.type == "cuda",
        )
        for batch in batches:
            yield to_device_batch(batch["image"], batch["label"], self.device, self.channels_last)
