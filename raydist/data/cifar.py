"""CIFAR-10 and CIFAR-100 from the official python pickle batches.

The batches are read directly (a dict with ``data`` (N, 3072) uint8 and ``labels``/``fine_labels``)
instead of through torchvision's dataset classes, which re-hash every file on each construction and
reject anything that is not the exact official archive. torchvision is used only to download.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from raydist.data.common import DataError, DatasetSplits, make_splits, resize_uint8, stratified_holdout

DEFAULT_VAL_SIZE = 1000


@dataclass(frozen=True)
class CifarLayout:
    """Where one CIFAR variant keeps its files inside the data root."""

    folder: str
    train_files: tuple[str, ...]
    test_file: str
    label_key: str
    num_classes: int


LAYOUTS: dict[str, CifarLayout] = {
    "cifar10": CifarLayout(
        "cifar-10-batches-py", tuple(f"data_batch_{i}" for i in range(1, 6)), "test_batch", "labels", 10
    ),
    "cifar100": CifarLayout("cifar-100-python", ("train",), "test", "fine_labels", 100),
}

HINT = "set data.download: true to fetch it, or data.root to where it is"


def check_cifar(name: str, root: Path, download: bool) -> None:
    """Raise DataError (one line naming the path) if ``name`` cannot be read from ``root`` as configured."""
    if download:
        return
    layout = LAYOUTS[name]
    folder = root / layout.folder
    if not root.is_dir():
        raise DataError(f"{name} not found at {folder}: data root {root} does not exist ({HINT})")
    if not folder.is_dir():
        raise DataError(f"{name} not found at {folder} ({HINT})")
    missing = [f for f in (*layout.train_files, layout.test_file) if not (folder / f).is_file()]
    if missing:
        raise DataError(f"{name} incomplete at {folder}: missing {', '.join(missing)} ({HINT})")


def _fetch(name: str, root: Path) -> None:
    """Download and unpack the official archive into ``root`` with torchvision (which checks its md5)."""
    import torchvision  # lazy: only needed to download

    cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
    cls(str(root), train=True, download=True)


def _download(name: str, root: Path) -> None:
    """Fetch ``name`` unless present, under a lock file so that several workers on one machine may all
    ask for the download: the first fetches, the others wait and then find the files."""
    from filelock import FileLock  # a torch dependency

    try:
        root.mkdir(parents=True, exist_ok=True)
        with FileLock(str(root / f".{name}.lock")):
            try:
                check_cifar(name, root, download=False)
            except DataError:
                _fetch(name, root)
    except Exception as e:  # network / disk errors become one actionable line
        reason = " ".join(str(e).split())  # keep the message on one line
        folder = root / LAYOUTS[name].folder
        raise DataError(
            f"{name} download into {root} failed ({type(e).__name__}: {reason}); "
            f"without network, unpack the official archive to {folder} or set data.root to where it is"
        ) from e


def _read_batch(path: Path, label_key: str) -> tuple[np.ndarray, list[int]]:
    """One pickle batch as (N, 3072) uint8 and labels; keys may be bytes (py2 pickles) or str."""
    with open(path, "rb") as f:
        entry = pickle.load(f, encoding="latin1")
    entry = {k.decode() if isinstance(k, bytes) else k: v for k, v in entry.items()}
    try:
        return np.asarray(entry["data"], dtype=np.uint8), list(entry[label_key])
    except KeyError as e:
        raise DataError(f"{path} is not a CIFAR batch: no {e.args[0]!r} entry") from e


def read_cifar(name: str, root: Path, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The official train or test set as uint8 [N, 3, 32, 32] and int64 labels."""
    layout = LAYOUTS[name]
    files = layout.train_files if train else (layout.test_file,)
    parts = [_read_batch(root / layout.folder / f, layout.label_key) for f in files]
    data = np.concatenate([p[0] for p in parts]).reshape(-1, 3, 32, 32)
    labels = [label for p in parts for label in p[1]]
    return torch.from_numpy(np.ascontiguousarray(data)), torch.tensor(labels, dtype=torch.int64)


def load_cifar_splits(
    name: str,
    root: Path,
    *,
    download: bool = False,
    val_size: int | None = None,
    image_size: int = 32,
    split_seed: int = 0,
) -> DatasetSplits:
    """CIFAR-10/100: ``val_size`` (default 1000) stratified out of the 50k train set; official test set."""
    if name not in LAYOUTS:
        raise DataError(f"unknown CIFAR variant {name!r}; choose {', '.join(LAYOUTS)}")
    layout = LAYOUTS[name]
    if download:
        try:
            check_cifar(name, root, download=False)
        except DataError:
            _download(name, root)
    check_cifar(name, root, download=False)
    x, y = read_cifar(name, root, train=True)
    test_x, test_y = read_cifar(name, root, train=False)
    val_size = DEFAULT_VAL_SIZE if val_size is None else val_size
    if not 0 <= val_size < y.numel():
        raise DataError(f"{name} val_size must be in [0, {y.numel()}), got {val_size}")
    train, val = stratified_holdout(y, val_size, seed=split_seed)
    x, test_x = resize_uint8(x, image_size), resize_uint8(test_x, image_size)
    return make_splits(
        name, (x[train], y[train]), (x[val], y[val]), (test_x, test_y), num_classes=layout.num_classes
    )
