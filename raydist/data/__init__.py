"""Datasets (uint8 CPU splits) and the device-resident, rank-sharded loader that feeds training.

Nothing here imports Ray: the training loop hands in rank / world size, so this package is plain PyTorch
and testable on its own.
"""

from raydist.data.common import DataError, DatasetSplits
from raydist.data.datasets import DATASETS, check_dataset, load_dataset
from raydist.data.loader import DeviceLoader

__all__ = ["DATASETS", "DataError", "DatasetSplits", "DeviceLoader", "check_dataset", "load_dataset"]
