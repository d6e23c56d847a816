"""Datasets (uint8 CPU splits) and the device-resident, rank-sharded loader that feeds training; for sets too
large for memory (ImageNet), a parquet converter and two streaming loaders.

- small sets: ``load_dataset(name)`` -> DatasetSplits -> DeviceLoader (digits, CIFAR, synthetic, tiny_imagenet);
- large sets: ``folder_to_parquet(src, dst)`` once, then per worker either Ray Data
  (``image_dataset`` -> TorchTrainer(datasets=...) -> ``StreamingLoader(get_dataset_shard(...))``) or the
  in-process ``ParquetLoader`` (num_workers=0, tests). See raydist.data.streaming for the wiring.

Nothing here imports Ray at import time: the training loop hands in rank / world size (or dataset shards),
so this package is plain PyTorch and testable on its own.
"""

from raydist.data.catalog import DATASETS, IMAGE_DATASETS, check_dataset, load_dataset
from raydist.data.common import DataError, DatasetSplits
from raydist.data.folders import FolderSplits, check_image_folder, split_image_folder
from raydist.data.loader import DeviceLoader
from raydist.data.parquet import (
    ParquetInfo,
    ParquetLoader,
    check_parquet,
    describe_parquet,
    folder_to_parquet,
    parquet_files,
    read_classes,
)
from raydist.data.streaming import StreamingLoader, image_dataset, parquet_dataset, shard_rows
from raydist.data.transforms import IMAGENET_MEAN, IMAGENET_STD, ImageTransform

__all__ = [
    "DATASETS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMAGE_DATASETS",
    "DataError",
    "DatasetSplits",
    "DeviceLoader",
    "FolderSplits",
    "ImageTransform",
    "ParquetInfo",
    "ParquetLoader",
    "StreamingLoader",
    "check_dataset",
    "check_image_folder",
    "check_parquet",
    "describe_parquet",
    "folder_to_parquet",
    "image_dataset",
    "load_dataset",
    "parquet_dataset",
    "parquet_files",
    "read_classes",
    "shard_rows",
    "split_image_folder",
]
