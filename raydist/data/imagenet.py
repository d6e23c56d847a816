"""The named class-folder datasets, ``imagenet`` and ``tiny_imagenet``: where they live and how they load.

Under the data root each lives in its own folder (``imagenet/``, ``tiny-imagenet-200/`` as the official zip
unpacks), or the root itself is the dataset. Either may be the class folders or a converted parquet copy
(see ``folder_to_parquet``). Neither is downloaded: ImageNet needs an account, and Tiny ImageNet's zip is to
be unpacked by hand.

- ``tiny_imagenet`` (110k images of 64x64) fits in memory: ``load_image_dataset`` decodes it into uint8
  DatasetSplits (resize short side to ``image_size`` + center crop), so it trains with the fast DeviceLoader
  like CIFAR;
- ``imagenet`` does not (150+ GB decoded): loading it raises DataError unless the folder is small (a subset, the
  tests' data); stream it instead with ``streaming.image_dataset`` (Ray Data, ``data.stream: true`` in a job) or
  ``parquet.ParquetLoader`` (in-process).
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow.parquet as pq
import torch

from raydist.data.common import DataError, DatasetSplits, make_splits
from raydist.data.folders import check_image_folder, split_image_folder
from raydist.data.parquet import describe_parquet, is_parquet_dataset, parquet_files
from raydist.data.transforms import ImageTransform, decode_rows

FOLDERS: dict[str, str] = {"imagenet": "imagenet", "tiny_imagenet": "tiny-imagenet-200"}
MAX_IN_MEMORY_BYTES = 16 * 1024**3  # decoded uint8; larger sets are streamed (data.stream)
STREAM_HINT = ("convert it once with folder_to_parquet (`raydist data to-parquet SRC DST`) and stream it with "
               "raydist.data.streaming.image_dataset / raydist.data.parquet.ParquetLoader")


def locate_image_dataset(name: str, root: Path) -> Path:
    """``root/<folder>`` (imagenet/, tiny-imagenet-200/) when it exists, else ``root`` itself."""
    folder = root / FOLDERS[name]
    return folder if folder.is_dir() else root


def check_image_dataset(name: str, root: Path, download: bool = False) -> Path:
    """The dataset's directory, or DataError (one line naming the path) if neither layout is found there.

    ``download`` changes nothing: these datasets are never fetched, so their files must be present.
    """
    path = locate_image_dataset(name, root)
    if is_parquet_dataset(path):
        for s in ("val", "test"):
            parquet_files(path, s)
        return path
    try:
        check_image_folder(path, name)
    except DataError as e:
        fetch = " (raydist does not download it)" if download else ""
        looked = f"looked in {root / FOLDERS[name]} and {root}; " if path == root else ""
        raise DataError(f"{e}{fetch}; {looked}or point data.root at a converted parquet copy") from None
    return path


def _decode_all(images: list[bytes], labels: list[int], names: list[str], transform: ImageTransform,
                pool: ThreadPoolExecutor) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 NCHW images (like the other datasets) and their labels; a corrupt image is skipped with a warning."""
    out, keep = decode_rows(images, transform, executor=pool, names=names)
    y = torch.tensor([labels[i] for i in keep], dtype=torch.int64)
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous(), y


def _read_file(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def load_image_dataset(
    name: str,
    root: Path,
    *,
    val_size: int | None = None,
    image_size: int = 64,
    split_seed: int = 0,
    num_threads: int | None = None,
) -> DatasetSplits:
    """Decode a class-folder dataset that fits in memory (tiny_imagenet, a small ImageNet-format set) fully into
    uint8 CPU DatasetSplits; one larger than MAX_IN_MEMORY_BYTES decoded raises DataError (stream it instead).

    From class folders: ``val_size`` held out of train (default 10 per class), stratified by ``split_seed``;
    from a parquet copy the splits were fixed at conversion, so ``val_size`` must be None or match them.
    Images are resized (short side) to ``image_size`` and center-cropped square; test is the official val.
    """
    path = check_image_dataset(name, root)
    transform = ImageTransform(image_size, train=False, crop_fraction=1.0)
    threads = min(8, os.cpu_count() or 1) if num_threads is None else max(1, num_threads)
    if is_parquet_dataset(path):
        info = describe_parquet(path)
        sizes, classes = info.counts, info.classes
        if val_size is not None and val_size != sizes["val"]:
            raise DataError(f"{name} at {path} is a parquet copy whose val split has {sizes['val']} images, not "
                            f"{val_size}: leave data.val_size unset or convert again with val_size={val_size}")
    else:
        folders = split_image_folder(path, val_size=val_size, split_seed=split_seed, name=name)
        sizes, classes = folders.sizes(), folders.classes
    need = sum(sizes.values()) * 3 * image_size * image_size
    if need > MAX_IN_MEMORY_BYTES:
        raise DataError(f"{name} at {path} needs {need / 1024**3:.0f} GiB decoded at image_size {image_size}; "
                        f"{STREAM_HINT}")
    parts = []
    with ThreadPoolExecutor(threads) as pool:
        for s in ("train", "val", "test"):
            if is_parquet_dataset(path):
                xs, ys = [], []
                for f in info.files[s]:  # one file at a time: encoded bytes of a whole split never pile up
                    table = pq.read_table(f, columns=["image", "label"])
                    names = [f"{f} row {k}" for k in range(table.num_rows)]
                    x, y = _decode_all(table.column("image").to_pylist(), table.column("label").to_pylist(), names,
                                       transform, pool)
                    xs.append(x)
                    ys.append(y)
                x, y = torch.cat(xs), torch.cat(ys)
            else:
                samples = folders.split(s)
                images = list(pool.map(_read_file, [p for p, _ in samples]))
                x, y = _decode_all(images, [label for _, label in samples], [p for p, _ in samples], transform, pool)
            parts.append((x, y))
    return make_splits(name, *parts, num_classes=len(classes))

