"""ImageNet-style class folders: find the images, name the classes, hold out a validation split.

Two on-disk layouts are read, and may be mixed split by split:

- **ImageNet (prepared)**: ``root/train/<wnid>/*.JPEG`` and ``root/val/<wnid>/*.JPEG`` (the layout that
  torchvision's ImageFolder and the usual ``valprep.sh`` produce);
- **Tiny ImageNet** (the official ``tiny-imagenet-200`` zip): ``root/train/<wnid>/images/*.JPEG``, and
  ``root/val/images/*.JPEG`` labelled by ``root/val/val_annotations.txt`` (tab-separated: file, wnid, box).

Classes are the sorted names of the folders under ``root/train`` (torchvision's convention, which gives
ImageNet's usual label order). The official validation set becomes the *test* split; the *val* split used
for model selection is held out of train, stratified and seeded by ``split_seed`` only, so every run of a
sweep is judged on the same images. Everything here works on file paths: nothing is decoded.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from raydist.data.common import DataError, stratified_holdout

IMAGE_EXTENSIONS: frozenset[str] = frozenset({".jpeg", ".jpg", ".png", ".bmp", ".webp"})
TINY_ANNOTATIONS = "val_annotations.txt"
DEFAULT_VAL_PER_CLASS = 10
SPLITS: tuple[str, ...] = ("train", "val", "test")

# A labelled image: (absolute path, class index).
Sample = tuple[str, int]


@dataclass(frozen=True)
class FolderSplits:
    """Train / val / test file lists of one class-folder dataset (val held out of train; test = official val)."""

    root: Path
    classes: tuple[str, ...]
    train: list[Sample]
    val: list[Sample]
    test: list[Sample]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def split(self, which: str) -> list[Sample]:
        """The samples of 'train', 'val' or 'test'."""
        if which not in SPLITS:
            raise ValueError(f"unknown split {which!r}; choose train, val or test")
        return getattr(self, which)

    def sizes(self) -> dict[str, int]:
        return {s: len(self.split(s)) for s in SPLITS}


def _is_image(name: str) -> bool:
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _subdirs(folder: Path) -> list[str]:
    with os.scandir(folder) as entries:
        return sorted(e.name for e in entries if e.is_dir() and not e.name.startswith("."))


def _images_in(folder: Path) -> list[str]:
    """Sorted absolute paths of the images directly in ``folder`` (none if it does not exist)."""
    if not folder.is_dir():
        return []
    with os.scandir(folder) as entries:
        return sorted(e.path for e in entries if _is_image(e.name) and e.is_file())


def _class_images(class_dir: Path) -> list[str]:
    """A class folder's images: directly inside it (ImageNet) and/or in its ``images/`` subfolder (Tiny)."""
    return _images_in(class_dir) + _images_in(class_dir / "images")


def check_image_folder(root: str | os.PathLike[str], name: str = "image folder") -> None:
    """Raise DataError (one line naming the missing path) unless ``root`` looks like a class-folder dataset.

    Cheap: it lists directories and reads no image, so config validation can call it on ImageNet.
    """
    root = Path(root)
    hint = "expected root/train/<class>/ and root/val/<class>/ (ImageNet) or root/val/images + val_annotations.txt"
    if not root.is_dir():
        raise DataError(f"{name} not found at {root}: directory does not exist ({hint})")
    train = root / "train"
    if not train.is_dir():
        raise DataError(f"{name} incomplete at {root}: missing {train} ({hint})")
    if not _subdirs(train):
        raise DataError(f"{name} incomplete at {root}: {train} has no class folders ({hint})")
    val = root / "val"
    if not val.is_dir():
        raise DataError(f"{name} incomplete at {root}: missing {val} (the official validation set, used as test)")
    if (val / "images").is_dir() and not (val / TINY_ANNOTATIONS).is_file():
        raise DataError(f"{name} incomplete at {root}: {val / 'images'} needs its labels in {val / TINY_ANNOTATIONS}")


def _read_tiny_annotations(val: Path, class_index: dict[str, int]) -> list[Sample]:
    """Tiny ImageNet's flat val set, labelled by val_annotations.txt (file <TAB> wnid <TAB> box...)."""
    path = val / TINY_ANNOTATIONS
    samples = []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            parts = line.split("\t") if "\t" in line else line.split()
            if len(parts) < 2:
                raise DataError(f"{path}:{lineno}: expected 'file<TAB>wnid', got {line.strip()!r}")
            fname, wnid = parts[0].strip(), parts[1].strip()
            if wnid not in class_index:
                raise DataError(f"{path}:{lineno}: class {wnid!r} has no folder under {val.parent / 'train'}")
            image = val / "images" / fname
            if not image.is_file():
                raise DataError(f"{path}:{lineno}: image {image} does not exist")
            samples.append((str(image), class_index[wnid]))
    return sorted(samples)


def _scan_labelled(split_dir: Path, class_index: dict[str, int]) -> list[Sample]:
    """Every image of a split in class folders; class folders unknown to train are an error."""
    samples = []
    for cls in _subdirs(split_dir):
        if cls == "images" and (split_dir / TINY_ANNOTATIONS).is_file():
            continue
        if cls not in class_index:
            raise DataError(f"{split_dir / cls}: class {cls!r} has no folder under {split_dir.parent / 'train'}")
        samples.extend((p, class_index[cls]) for p in _class_images(split_dir / cls))
    return samples


def scan_image_folder(
    root: str | os.PathLike[str], name: str = "image folder"
) -> tuple[tuple[str, ...], list[Sample], list[Sample]]:
    """(classes, train samples, official-val samples) of a class-folder dataset in either layout.

    Samples are sorted by path, so the result (and every split derived from it) is the same on every machine.
    """
    root = Path(root)
    check_image_folder(root, name)
    classes = tuple(_subdirs(root / "train"))
    class_index = {c: i for i, c in enumerate(classes)}
    train = []
    for cls in classes:
        images = _class_images(root / "train" / cls)
        if not images:
            exts = ", ".join(sorted(IMAGE_EXTENSIONS))
            raise DataError(f"{name} class folder {root / 'train' / cls} holds no images ({exts})")
        train.extend((p, class_index[cls]) for p in images)
    val = root / "val"
    official = _scan_labelled(val, class_index)
    if (val / TINY_ANNOTATIONS).is_file():
        official += _read_tiny_annotations(val, class_index)
    if not official:
        if _images_in(val):
            raise DataError(f"{name} validation images in {val} are not in class folders: sort them into "
                            f"{val}/<class>/ (ImageNet's valprep.sh) or add {val / TINY_ANNOTATIONS}")
        raise DataError(f"{name} validation set at {val} holds no labelled images")
    return classes, train, sorted(official)


def holdout_indices(
    labels: torch.Tensor, *, val_size: int | None = None, val_per_class: int | None = None, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sorted (keep, holdout) indices: ``val_size`` in total (class-proportional) or ``val_per_class`` from each
    class; neither means DEFAULT_VAL_PER_CLASS per class. Deterministic in ``seed``."""
    if val_size is not None and val_per_class is not None:
        raise DataError("give val_size (total) or val_per_class, not both")
    n = labels.numel()
    if val_size is not None:
        if not 0 <= val_size < n:
            raise DataError(f"val_size must be in [0, {n}), got {val_size}")
        return stratified_holdout(labels, val_size, seed=seed)
    per_class = DEFAULT_VAL_PER_CLASS if val_per_class is None else val_per_class
    classes, counts = torch.unique(labels, return_counts=True)
    if per_class < 0 or (classes.numel() and per_class >= int(counts.min())):
        smallest = int(counts.min()) if classes.numel() else 0
        raise DataError(f"val_per_class must be in [0, {smallest}) (the smallest class has {smallest} images), "
                        f"got {per_class}")
    gen = torch.Generator().manual_seed(seed)
    mask = torch.zeros(n, dtype=torch.bool)
    for cls in classes.tolist():
        members = torch.nonzero(labels == cls).flatten()
        mask[members[torch.randperm(members.numel(), generator=gen)[:per_class]]] = True
    return torch.nonzero(~mask).flatten(), torch.nonzero(mask).flatten()


def split_image_folder(
    root: str | os.PathLike[str],
    *,
    val_size: int | None = None,
    val_per_class: int | None = None,
    split_seed: int = 0,
    name: str = "image folder",
) -> FolderSplits:
    """Scan ``root`` (either layout) into train / val / test samples.

    val: ``val_size`` images in total or ``val_per_class`` per class held out of train (default 10 per class),
    stratified and seeded by ``split_seed``; test: the official validation set.
    """
    classes, train, test = scan_image_folder(root, name)
    labels = torch.tensor([y for _, y in train], dtype=torch.int64)
    keep, held = holdout_indices(labels, val_size=val_size, val_per_class=val_per_class, seed=split_seed)
    return FolderSplits(
        root=Path(root),
        classes=classes,
        train=[train[i] for i in keep.tolist()],
        val=[train[i] for i in held.tolist()],
        test=test,
    )
