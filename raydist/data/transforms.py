"""Decode encoded images and apply the standard ImageNet train / eval transforms, on the CPU with PIL.

- train: random resized crop (scale 0.08-1, aspect 3/4-4/3, torchvision's sampling with its center-crop
  fallback) to ``image_size``, then a horizontal flip with probability 1/2;
- eval: resize the short side to ``image_size / crop_fraction`` and take the central ``image_size`` square
  (crop_fraction 0.875: the classic 256 -> 224; SAT's 299 and 380 scale the same way).

Each crop and its resize are a single ``Image.resize(..., box=...)`` call (antialiased, one resampling). A JPEG
is decoded in PIL's draft mode: libjpeg's DCT scaling decodes it at 1/2, 1/4 or 1/8 of its size whenever the crop
still has at least ``image_size`` pixels per side at that scale, so no output pixel is upsampled more than without
it, and large images decode several times faster (bench/decode.py).
Output is uint8 HWC (what PIL gives; the batch is made NCHW on the device, see ``to_device_batch``) so
only a quarter of the float bytes ever crosses to the accelerator. Randomness comes from an explicit
seed per image, so a batch decoded by several threads is still a function of its seeds.
"""

from __future__ import annotations

import io
import logging
import math
from collections.abc import Sequence
from concurrent.futures import Executor
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
DEFAULT_CROP_FRACTION = 0.875
logger = logging.getLogger(__name__)


class CorruptImage(ValueError):
    """An image that PIL cannot decode (truncated, not an image, unsupported)."""


def open_rgb(data: bytes) -> Image.Image:
    """Decode JPEG / PNG / ... bytes to an RGB image (grayscale, CMYK, palette and alpha images converted)."""
    img = Image.open(io.BytesIO(data))
    img.load()
    return img if img.mode == "RGB" else img.convert("RGB")


def random_resized_box(
    width: int, height: int, rng: np.random.Generator, scale: tuple[float, float], ratio: tuple[float, float]
) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of a random crop covering ``scale`` of the area at aspect ``ratio``.

    torchvision's RandomResizedCrop.get_params: ten tries, then the largest central crop within ``ratio``.
    """
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return left, top, left + w, top + h
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, round(width / min(ratio))
    elif in_ratio > max(ratio):
        w, h = round(height * max(ratio)), height
    else:
        w, h = width, height
    top, left = (height - h) // 2, (width - w) // 2
    return left, top, left + w, top + h


def center_box(width: int, height: int, crop_fraction: float) -> tuple[float, float, float, float]:
    """The central square that 'resize short side to size / crop_fraction, center-crop size' keeps."""
    side = min(width, height) * crop_fraction
    left, top = (width - side) / 2, (height - side) / 2
    return left, top, left + side, top + side


@dataclass(frozen=True)
class ImageTransform:
    """Encoded bytes -> uint8 [image_size, image_size, 3]: train (random crop + flip) or eval (center crop).

    ``crop_fraction`` only affects eval; ``scale``, ``ratio`` and ``flip`` only train. Picklable, so it can
    be shipped to Ray Data tasks.
    """

    image_size: int
    train: bool
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: bool = True
    crop_fraction: float = DEFAULT_CROP_FRACTION

    def __post_init__(self) -> None:
        if self.image_size < 1:
            raise ValueError(f"image_size must be positive, got {self.image_size}")
        if not 0 < self.crop_fraction <= 1:
            raise ValueError(f"crop_fraction must be in (0, 1], got {self.crop_fraction}")
        if not 0 < self.scale[0] <= self.scale[1] <= 1 or not 0 < self.ratio[0] <= self.ratio[1]:
            raise ValueError(f"bad random-resized-crop scale {self.scale} or ratio {self.ratio}")

    draft: bool = True

    def __call__(self, data: bytes, seed: int | None = None) -> np.ndarray:
        """Transform one encoded image. ``seed`` drives the train randomness (None: fresh entropy).
        Raises CorruptImage for bytes PIL cannot decode."""
        try:
            img = Image.open(io.BytesIO(data))  # the header: size and format, nothing decoded yet
            width, height = img.size
            rng = np.random.default_rng(seed) if self.train else None
            if rng is None:
                box = center_box(width, height, self.crop_fraction)
            else:
                box = random_resized_box(width, height, rng, self.scale, self.ratio)
            if self.draft and img.format == "JPEG":
                # the smallest DCT scale that keeps >= image_size pixels across the crop box
                reduce = min((box[2] - box[0]) / self.image_size, (box[3] - box[1]) / self.image_size)
                if reduce >= 2:
                    img.draft("RGB", (math.ceil(width / reduce), math.ceil(height / reduce)))
                    sx, sy = img.size[0] / width, img.size[1] / height
                    box = (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy)
            img.load()
            img = img if img.mode == "RGB" else img.convert("RGB")
        except Exception as e:  # PIL raises several types for broken data
            raise CorruptImage(f"{type(e).__name__}: {e}") from e
        size = (self.image_size, self.image_size)
        if rng is None:
            return np.asarray(img.resize(size, Image.Resampling.BILINEAR, box=box))
        out = img.resize(size, Image.Resampling.BILINEAR, box=box)
        if self.flip and rng.random() < 0.5:
            out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return np.asarray(out)


def try_transform(transform: ImageTransform, data: bytes, seed: int | None = None) -> np.ndarray | str:
    """``transform(data, seed)``, or the reason as a string when the image cannot be decoded."""
    try:
        return transform(data, seed)
    except CorruptImage as e:
        return str(e)


def keep_decoded(results: Sequence[np.ndarray | str], image_size: int,
                 names: Sequence[str] | None = None) -> tuple[np.ndarray, list[int]]:
    """Stack the decoded images of ``try_transform`` results into uint8 [B', H, W, 3] with the indices kept; each
    failure is logged as a warning naming the image (``names[i]``, else its row in the batch)."""
    keep = []
    for i, r in enumerate(results):
        if isinstance(r, str):
            logger.warning("skipping corrupt image %s: %s", names[i] if names is not None else f"row {i}", r)
        else:
            keep.append(i)
    if not keep:
        return np.empty((0, image_size, image_size, 3), dtype=np.uint8), keep
    return np.stack([results[i] for i in keep]), keep


def decode_rows(
    images: Sequence[bytes],
    transform: ImageTransform,
    seeds: Sequence[int] | None = None,
    executor: Executor | None = None,
    names: Sequence[str] | None = None,
) -> tuple[np.ndarray, list[int]]:
    """Transform a batch of encoded images into uint8 [B', H, W, 3] and the indices of the rows kept, optionally
    on an executor's threads (PIL releases the GIL while decoding and resizing). An image PIL cannot decode is
    skipped with a warning naming it (``names[i]``, e.g. its source path)."""
    seeds = list(seeds) if seeds is not None else [None] * len(images)
    if executor is None:
        results = [try_transform(transform, data, seed) for data, seed in zip(images, seeds)]
    else:
        results = list(executor.map(try_transform, [transform] * len(images), images, seeds))
    return keep_decoded(results, transform.image_size, names)


def decode_batch(
    images: Sequence[bytes],
    transform: ImageTransform,
    seeds: Sequence[int] | None = None,
    executor: Executor | None = None,
) -> np.ndarray:
    """``decode_rows`` for a batch known to be intact: uint8 [B, H, W, 3]; CorruptImage if one is not."""
    seeds = list(seeds) if seeds is not None else [None] * len(images)
    if executor is None:
        arrays = [transform(data, seed) for data, seed in zip(images, seeds)]
    else:
        arrays = list(executor.map(transform, images, seeds))
    if not arrays:
        return np.empty((0, transform.image_size, transform.image_size, 3), dtype=np.uint8)
    return np.stack(arrays)


def to_device_batch(
    x_nhwc: torch.Tensor, y: torch.Tensor, device: torch.device | str, channels_last: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 [B, H, W, C] + labels -> (float32 [B, C, H, W] in [0, 1], int64) on ``device``.

    The uint8 batch is moved first (4x fewer bytes than float); NHWC memory is already channels_last.
    """
    x = x_nhwc.to(device, non_blocking=True).permute(0, 3, 1, 2)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    x = x.to(dtype=torch.float32, memory_format=memory_format).div_(255.0)
    return x, y.to(device, dtype=torch.int64, non_blocking=True)
