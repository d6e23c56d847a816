"""Sharded parquet copies of class-folder datasets, and an in-process loader that streams them.

Layout written by ``folder_to_parquet`` (and read by everything else here and by ``streaming``)::

    DST/classes.json                 ["n01440764", ...]  class names, index = label
    DST/train/part-00000.parquet     columns: image (binary, encoded JPEG/PNG), label (int64), path (string)
    DST/val/part-00000.parquet ...   val: held out of the source's train folders (seeded, stratified)
    DST/test/part-00000.parquet ...  test: the source's official validation set

Rows are shuffled (seeded) before sharding, so every shard mixes all classes and any prefix of a split is a
fair sample of it. Each file's schema metadata repeats the class names and the split under ``raydist``.
Images are kept encoded (JPEG/PNG bytes as found), by default after shrinking the short side to
``RESIZE_FACTOR`` (1.15) x ``image_size`` pixels (258 for 224: the eval center crop, 224 of 256, keeps full
resolution), which makes both the files and the decoding several times cheaper for ImageNet. A source image PIL
cannot decode is left out with a warning naming it.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import sys
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from threading import Lock
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image

from raydist.atomic import write_atomic
from raydist.data.common import DataError, mix_seed
from raydist.data.folders import SPLITS, Sample, split_image_folder
from raydist.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageTransform,
    keep_decoded,
    to_device_batch,
    try_transform,
)

CLASSES_FILE = "classes.json"
META_KEY = b"raydist"
DEFAULT_SHARD_SIZE = 1024
DEFAULT_IMAGE_SIZE = 224
RESIZE_FACTOR = 1.15
logger = logging.getLogger(__name__)


def default_resize(image_size: int = DEFAULT_IMAGE_SIZE) -> int:
    """The short side images are stored at for a model trained at ``image_size``: 1.15 x, rounded up."""
    return math.ceil(RESIZE_FACTOR * image_size)
SCHEMA = pa.schema([("image", pa.binary()), ("label", pa.int64()), ("path", pa.string())])


def _workers(num_workers: int | None) -> int:
    return min(8, os.cpu_count() or 1) if num_workers is None else max(0, int(num_workers))


# --------------------------------------------------------------------------------------------- conversion


def _encoded(path: str, resize: int | None, quality: int) -> bytes | None:
    """The file's bytes, or a re-encoding (same format: JPEG stays JPEG, others become PNG) with the short
    side shrunk to ``resize``. Images already that small are kept byte for byte (never upscaled). An image
    that does not decode completely is None, with a warning naming it."""
    with open(path, "rb") as f:
        data = f.read()
    try:
        img = Image.open(io.BytesIO(data))  # the header
        keep = resize is None or min(img.size) <= resize
        if not keep and img.format == "JPEG":  # DCT scaling down to no less than twice the target, then resize
            img.draft("RGB", tuple(max(1, 2 * resize * s // min(img.size)) for s in img.size))
        img.load()  # decodes it all: a truncated or broken file fails here, not in every epoch of training
        if keep:
            return data
    except Exception as e:  # PIL raises several types for broken files
        logger.warning("skipping corrupt image %s: %s: %s", path, type(e).__name__, e)
        return None
    fmt = "JPEG" if img.format == "JPEG" else "PNG"
    if fmt == "JPEG" and img.mode != "RGB":
        img = img.convert("RGB")  # CMYK / grayscale-with-alpha cannot be saved as JPEG as they are
    scale = resize / min(img.size)
    size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
    out = io.BytesIO()
    img.resize(size, Image.Resampling.BICUBIC, reducing_gap=3.0).save(
        out, format=fmt, **({"quality": quality} if fmt == "JPEG" else {})
    )
    return out.getvalue()


def _write_shard(
    target: Path, rows: list[Sample], root: Path, metadata: dict[bytes, bytes], resize: int | None, quality: int,
    tick: Any,
) -> int:
    images = []
    for path, _ in rows:
        images.append(_encoded(path, resize, quality))
        tick()
    rows = [row for row, data in zip(rows, images) if data is not None]
    images = [data for data in images if data is not None]
    paths = [os.path.relpath(p, root) for p, _ in rows]
    table = pa.table(
        [pa.array(images, pa.binary()), pa.array([y for _, y in rows], pa.int64()), pa.array(paths, pa.string())],
        schema=SCHEMA.with_metadata(metadata),
    )
    # a shard exists complete or not at all; encoded images do not compress further
    write_atomic(target, lambda f: pq.write_table(table, f, compression="none"))
    return len(rows)


def folder_to_parquet(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    split: str | Sequence[str] | None = None,
    shard_size: int = DEFAULT_SHARD_SIZE,
    resize: int | None | str = "auto",
    image_size: int = DEFAULT_IMAGE_SIZE,
    num_workers: int | None = None,
    val_size: int | None = None,
    val_per_class: int | None = None,
    split_seed: int = 0,
    quality: int = 90,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, int]:
    """Convert a class-folder dataset (ImageNet or Tiny ImageNet layout) into sharded parquet under ``dst``.

    split: which of 'train', 'val', 'test' to write (None: all three). The val split is held out of the
    source's train folders (``val_size`` total or ``val_per_class``, default 10 per class, seeded by
    ``split_seed``) and never appears in train; test is the official validation set. Converting splits in
    separate calls with the same arguments gives the same partition.
    shard_size: rows per parquet file. resize: shrink the short side to this many pixels (re-encoding); "auto"
    (default): ``default_resize(image_size)``, 1.15 x the training resolution; None: keep the source bytes.
    A source image that does not decode is left out with a warning naming it.
    num_workers: threads encoding shards in parallel (None: up to 8; 0: in this thread).
    overwrite: replace a split's existing part files (otherwise existing files are an error).
    Returns the number of images written per split. Raises DataError naming the path for missing input.
    """
    if shard_size < 1:
        raise DataError(f"shard_size must be >= 1, got {shard_size}")
    if resize == "auto":
        if image_size < 1:
            raise DataError(f"image_size must be positive, got {image_size}")
        resize = default_resize(image_size)
    if resize is not None and (not isinstance(resize, int) or resize < 1):
        raise DataError(f"resize must be a positive short-side length, \"auto\" or None, got {resize!r}")
    wanted = list(SPLITS) if split is None else [split] if isinstance(split, str) else list(split)
    unknown = [s for s in wanted if s not in SPLITS]
    if unknown or not wanted:
        raise DataError(f"unknown split(s) {unknown or wanted}; choose from {', '.join(SPLITS)}")
    src, dst = Path(src), Path(dst)
    for s in wanted:  # before scanning the source: that takes a while for ImageNet
        existing = sorted((dst / s).glob("*.parquet"))
        if existing and not overwrite:
            raise DataError(f"{dst / s} already holds {len(existing)} parquet files; remove them or pass overwrite")
    folders = split_image_folder(src, val_size=val_size, val_per_class=val_per_class, split_seed=split_seed,
                                 name="source dataset")
    dst.mkdir(parents=True, exist_ok=True)
    (dst / CLASSES_FILE).write_text(json.dumps(list(folders.classes)))

    from tqdm.auto import tqdm  # lazy: only the converter reports progress

    counts = {}
    total = sum(len(folders.split(s)) for s in wanted)
    with tqdm(total=total, unit="img", desc=f"to-parquet {dst}", disable=not progress, file=sys.stderr) as bar:
        lock = Lock()

        def tick() -> None:
            with lock:
                bar.update(1)

        for s in wanted:
            rows = folders.split(s)
            order = np.random.default_rng(mix_seed(split_seed, 7919, SPLITS.index(s))).permutation(len(rows))
            rows = [rows[i] for i in order]
            out = dst / s
            out.mkdir(parents=True, exist_ok=True)
            for old in out.glob("*.parquet"):
                old.unlink()
            meta = {"classes": list(folders.classes), "split": s, "resize": resize, "source": str(src)}
            metadata = {META_KEY: json.dumps(meta).encode()}
            # an empty split still gets one (empty) file, so readers see a present split with zero rows
            shards = [rows[i : i + shard_size] for i in range(0, len(rows), shard_size)] or [[]]
            jobs = [(out / f"part-{i:05d}.parquet", part, src, metadata, resize, quality, tick)
                    for i, part in enumerate(shards)]
            workers = _workers(num_workers)
            if workers == 0:
                counts[s] = sum(_write_shard(*job) for job in jobs)
            else:
                with ThreadPoolExecutor(workers) as pool:  # PIL and pyarrow release the GIL for the heavy parts
                    counts[s] = sum(pool.map(lambda job: _write_shard(*job), jobs))
    return counts


# ------------------------------------------------------------------------------------------------ reading


def parquet_files(path: str | os.PathLike[str], split: str) -> list[Path]:
    """The sorted part files of ``split`` under a converted dataset; DataError naming the path if none."""
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; choose from {', '.join(SPLITS)}")
    folder = Path(path) / split
    if not Path(path).is_dir():
        raise DataError(f"parquet dataset not found at {path}: directory does not exist "
                        "(convert a class-folder dataset with folder_to_parquet / `raydist data to-parquet`)")
    if not folder.is_dir():
        raise DataError(f"parquet dataset at {path} has no {split} split: missing {folder}")
    files = sorted(folder.glob("*.parquet"))
    if not files:
        raise DataError(f"parquet dataset at {path} has no {split} split: no .parquet files in {folder}")
    return files


def read_classes(path: str | os.PathLike[str]) -> list[str]:
    """Class names of a converted dataset (index = label): classes.json, else the schema metadata."""
    path = Path(path)
    if (path / CLASSES_FILE).is_file():
        return list(json.loads((path / CLASSES_FILE).read_text()))
    for s in SPLITS:
        for f in sorted((path / s).glob("*.parquet")) if (path / s).is_dir() else ():
            meta = pq.read_schema(f).metadata or {}
            if META_KEY in meta:
                return list(json.loads(meta[META_KEY])["classes"])
    raise DataError(f"no class names at {path}: missing {path / CLASSES_FILE} and no raydist schema metadata")


def is_parquet_dataset(path: str | os.PathLike[str]) -> bool:
    """True when ``path`` holds a converted dataset (a train split with part files)."""
    folder = Path(path) / "train"
    return folder.is_dir() and any(folder.glob("*.parquet"))


def check_parquet(path: str | os.PathLike[str], splits: Sequence[str] = SPLITS) -> None:
    """Raise DataError (one line naming the missing path) unless every split in ``splits`` has part files."""
    for s in splits:
        parquet_files(path, s)


@dataclass(frozen=True)
class ParquetInfo:
    """What a training loop needs to know about a converted dataset before reading any image."""

    path: Path
    classes: tuple[str, ...]
    counts: dict[str, int]
    files: dict[str, list[Path]] = field(repr=False)
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def input_size(self, image_size: int) -> tuple[int, int, int]:
        """Model input shape for a given resolution (the transforms make every image square RGB)."""
        return (3, image_size, image_size)


def describe_parquet(path: str | os.PathLike[str], splits: Sequence[str] = SPLITS) -> ParquetInfo:
    """Classes, per-split row counts (from parquet footers: no image is read) and files of a converted dataset.

    mean / std are ImageNet's standard statistics (computing them would mean decoding the train split).
    """
    files = {s: parquet_files(path, s) for s in splits}
    counts = {s: sum(pq.read_metadata(f).num_rows for f in fs) for s, fs in files.items()}
    return ParquetInfo(Path(path), tuple(read_classes(path)), counts, files)


def _file_rows(files: Sequence[Path]) -> list[int]:
    return [pq.read_metadata(f).num_rows for f in files]


class ParquetLoader:
    """Stream (x float32 [B, 3, S, S] in [0, 1], y int64) batches of one split of a converted dataset,
    in this process, with pyarrow: the fallback for num_workers=0 and for tests, and a Ray-free reference.

    Memory stays bounded: files are read one at a time and rows pass through a ``shuffle_buffer``-row buffer.
    Sharding and batch counts follow DeviceLoader: all ranks walk the files in the same (seed, epoch) order,
    rank r takes the r-th contiguous slice of rows (sizes differ by at most one), and every rank yields
    ceil(ceil(N / world_size) / batch_size) batches, so each sample is seen once per epoch and DDP's
    collectives line up. Call ``set_epoch(epoch)`` before each epoch; shuffling and augmentation are
    seeded by (seed, epoch[, rank]) and do not depend on ``num_threads``.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        split: str,
        *,
        image_size: int,
        batch_size: int,
        train: bool | None = None,
        device: str | torch.device = "cpu",
        shuffle: bool | None = None,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        channels_last: bool = False,
        num_threads: int | None = None,
        shuffle_buffer: int = 2048,
        transform: ImageTransform | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} out of range for world_size {world_size}")
        self.files = parquet_files(path, split)
        self.rows = _file_rows(self.files)
        self.train = split == "train" if train is None else train
        self.shuffle = self.train if shuffle is None else shuffle
        self.transform = transform or ImageTransform(image_size, train=self.train)
        self.batch_size = batch_size
        self.device = torch.device(device)
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.channels_last = channels_last
        self.num_threads = _workers(num_threads if num_threads is not None else min(4, os.cpu_count() or 1))
        self.shuffle_buffer = max(1, shuffle_buffer)
        self.epoch = 0
        n = sum(self.rows)
        self.num_batches = math.ceil(math.ceil(n / world_size) / batch_size)

    @property
    def dataset_size(self) -> int:
        """Rows in the whole split (all ranks together)."""
        return sum(self.rows)

    @property
    def num_samples(self) -> int:
        """Rows this rank yields per epoch."""
        lo, hi = self._rank_range()
        return hi - lo

    def __len__(self) -> int:
        return self.num_batches

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order and augmentation the next iteration uses."""
        self.epoch = int(epoch)

    def _rank_range(self) -> tuple[int, int]:
        n, w, r = self.dataset_size, self.world_size, self.rank
        base, extra = divmod(n, w)
        start = r * base + min(r, extra)
        return start, start + base + (1 if r < extra else 0)

    def _rows(self) -> Iterator[tuple[bytes, int, str]]:
        """This rank's (image bytes, label, source path) rows for the epoch, shuffled through a bounded buffer."""
        order = list(range(len(self.files)))
        rng = np.random.default_rng(mix_seed(self.seed, self.epoch, self.rank, 11))
        if self.shuffle:
            order = np.random.default_rng(mix_seed(self.seed, self.epoch)).permutation(len(self.files)).tolist()
        lo, hi = self._rank_range()

        def stream() -> Iterator[tuple[bytes, int, str]]:
            offset = 0
            for i in order:
                a, b = max(lo - offset, 0), min(hi - offset, self.rows[i])
                offset += self.rows[i]
                if a >= b:
                    continue
                has_path = "path" in pq.read_schema(self.files[i]).names
                table = pq.read_table(self.files[i], columns=["image", "label"] + ["path"] * has_path)
                table = table.slice(a, b - a)
                images, labels = table.column("image").to_pylist(), table.column("label").to_pylist()
                paths = table.column("path").to_pylist() if has_path else [f"{self.files[i]} row {a + k}"
                                                                          for k in range(len(labels))]
                idx = rng.permutation(len(labels)) if self.shuffle else range(len(labels))
                for j in idx:
                    yield images[j], labels[j], paths[j]

        if not self.shuffle:
            yield from stream()
            return
        buffer: list[tuple[bytes, int, str]] = []
        for row in stream():
            if len(buffer) < self.shuffle_buffer:
                buffer.append(row)
                continue
            k = int(rng.integers(len(buffer)))
            buffer[k], row = row, buffer[k]
            yield row
        rng.shuffle(buffer)
        yield from buffer

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n_rows = self.num_samples
        sizes = [len(c) for c in np.array_split(np.arange(n_rows), self.num_batches)] if self.num_batches else []
        aug = np.random.default_rng(mix_seed(self.seed, self.epoch, self.rank, 13))
        rows = self._rows()
        pool = ThreadPoolExecutor(self.num_threads) if self.num_threads > 0 else None
        pending: list[tuple[list[Any], list[int], list[str]]] = []
        try:
            for size in sizes:
                batch = [next(rows) for _ in range(size)]
                images, labels, names = [b[0] for b in batch], [b[1] for b in batch], [b[2] for b in batch]
                seeds = aug.integers(0, 2**63 - 1, size=len(batch)).tolist()
                if pool is None:
                    decoded = [try_transform(self.transform, d, s) for d, s in zip(images, seeds)]
                else:  # decode this batch on the threads while the caller consumes the previous one
                    decoded = [pool.submit(try_transform, self.transform, d, s) for d, s in zip(images, seeds)]
                pending.append((decoded, labels, names))
                if len(pending) > 1:
                    yield self._finish(*pending.pop(0))
            while pending:
                yield self._finish(*pending.pop(0))
        finally:
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)

    def _finish(self, decoded: list[Any], labels: list[int], names: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """A batch's tensors; a corrupt image is dropped with a warning naming its source path."""
        results = [d.result() if hasattr(d, "result") else d for d in decoded]
        x, keep = keep_decoded(results, self.transform.image_size, names)
        y = torch.tensor([labels[i] for i in keep], dtype=torch.int64)
        return to_device_batch(torch.from_numpy(x), y, self.device, self.channels_last)
