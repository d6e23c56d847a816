"""Tests for the class-folder / parquet / streaming half of raydist.data, on a tiny folder dataset built from
scikit-learn's digits (10 classes, 8 images each, JPEG and PNG) in both the ImageNet and Tiny ImageNet layouts."""

from __future__ import annotations

import io
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from raydist.data import (
    DATASETS,
    DataError,
    ImageTransform,
    ParquetLoader,
    StreamingLoader,
    check_dataset,
    check_image_folder,
    describe_parquet,
    folder_to_parquet,
    image_dataset,
    load_dataset,
    parquet_dataset,
    parquet_files,
    read_classes,
    shard_rows,
    split_image_folder,
)
from raydist.data.transforms import center_box, random_resized_box

TRAIN_PER_CLASS, VAL_PER_CLASS = 6, 2
WNIDS = [f"n{(7 * i) % 10:08d}" for i in range(10)]  # digit i's folder; sorted order differs from digit order
SIZE = (28, 24)  # width, height: not square, so crops and resizes are exercised


def _digit_images() -> list[list[Image.Image]]:
    """TRAIN_PER_CLASS + VAL_PER_CLASS RGB images per digit, tinted per class so channels differ."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    out = []
    for digit in range(10):
        imgs = []
        for k in np.flatnonzero(bunch.target == digit)[: TRAIN_PER_CLASS + VAL_PER_CLASS]:
            gray = (bunch.images[k] * (255 / 16)).round().astype(np.uint8)
            rgb = np.stack([gray, gray // 2 + 10 * digit, 255 - gray], axis=-1).astype(np.uint8)
            imgs.append(Image.fromarray(rgb).resize(SIZE, Image.Resampling.NEAREST))
        out.append(imgs)
    return out


def _save(img: Image.Image, path: Path, digit: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format="JPEG" if digit % 2 == 0 else "PNG", **({"quality": 95} if digit % 2 == 0 else {}))


def _ext(digit: int) -> str:
    return ".JPEG" if digit % 2 == 0 else ".png"


@pytest.fixture(scope="module")
def images():
    return _digit_images()


@pytest.fixture(scope="module")
def imagenet_root(tmp_path_factory, images) -> Path:
    """root/train/<wnid>/*.JPEG|png and root/val/<wnid>/*: the prepared ImageNet layout."""
    root = tmp_path_factory.mktemp("imagenet")
    for digit, imgs in enumerate(images):
        for k, img in enumerate(imgs):
            split = "train" if k < TRAIN_PER_CLASS else "val"
            _save(img, root / split / WNIDS[digit] / f"{WNIDS[digit]}_{k}{_ext(digit)}", digit)
    return root


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory, images) -> Path:
    """The official tiny-imagenet-200 layout, inside a data root: train/<wnid>/images, val/images + annotations."""
    data_root = tmp_path_factory.mktemp("data")
    root = data_root / "tiny-imagenet-200"
    lines = []
    for digit, imgs in enumerate(images):
        for k, img in enumerate(imgs):
            if k < TRAIN_PER_CLASS:
                _save(img, root / "train" / WNIDS[digit] / "images" / f"{WNIDS[digit]}_{k}{_ext(digit)}", digit)
            else:
                name = f"val_{digit * 10 + k}{_ext(digit)}"
                _save(img, root / "val" / "images" / name, digit)
                lines.append(f"{name}\t{WNIDS[digit]}\t0\t0\t27\t23\n")
        (root / "train" / WNIDS[digit] / f"{WNIDS[digit]}_boxes.txt").write_text("")
    (root / "val" / "val_annotations.txt").write_text("".join(lines))
    (root / "wnids.txt").write_text("\n".join(WNIDS))
    _save(images[0][0], root / "test" / "images" / "test_0.JPEG", 0)  # unlabelled official test: ignored
    return root


@pytest.fixture(scope="module")
def converted(tmp_path_factory, imagenet_root) -> Path:
    dst = tmp_path_factory.mktemp("parquet")
    folder_to_parquet(imagenet_root, dst, shard_size=7, val_per_class=1, num_workers=2, progress=False)
    return dst


@pytest.fixture(scope="module")
def converted_ray(tmp_path_factory, imagenet_root) -> Path:
    """Fewer, larger shards for the Ray Data tests: each file is a read task, and tasks are slow on 2 cores."""
    dst = tmp_path_factory.mktemp("parquet_ray")
    folder_to_parquet(imagenet_root, dst, shard_size=25, val_per_class=1, progress=False)
    return dst


def _one_line_error(fn, *args, **kwargs) -> str:
    with pytest.raises(DataError) as info:
        fn(*args, **kwargs)
    msg = str(info.value)
    assert "\n" not in msg
    return msg


def _class_of(path: str) -> str:
    """The wnid a source path belongs to (its folder, or its annotation for Tiny's flat val)."""
    parts = Path(path).parts
    return next(p for p in parts if p in WNIDS) if any(p in WNIDS for p in parts) else ""


# --------------------------------------------------------------------------------------------- folders


@pytest.mark.parametrize("layout", ["imagenet", "tiny"])
def test_both_layouts_scan_to_the_same_splits(layout, imagenet_root, tiny_root):
    root = imagenet_root if layout == "imagenet" else tiny_root
    check_image_folder(root)
    s = split_image_folder(root, val_per_class=2, split_seed=3)
    assert s.classes == tuple(sorted(WNIDS)) and s.num_classes == 10
    assert s.sizes() == {"train": 40, "val": 20, "test": 20}
    for part in ("train", "val", "test"):
        counts = Counter(y for _, y in s.split(part))
        assert sorted(counts) == list(range(10)) and len(set(counts.values())) == 1  # stratified
    for path, y in s.train + s.val:
        assert s.classes[y] == _class_of(path)  # label = index of the sorted class folder
    assert not {p for p, _ in s.train} & {p for p, _ in s.val}
    assert "test_0" not in " ".join(p for p, _ in s.test)  # Tiny's unlabelled test set is not used
    # seeded by split_seed only
    assert split_image_folder(root, val_per_class=2, split_seed=3).val == s.val
    assert split_image_folder(root, val_per_class=2, split_seed=4).val != s.val
    total = split_image_folder(root, val_size=15)
    assert len(total.val) == 15 and set(Counter(y for _, y in total.val).values()) <= {1, 2}
    assert "val_per_class" in _one_line_error(split_image_folder, root)  # default 10 per class: classes too small


def test_tiny_labels_follow_annotations(tiny_root, imagenet_root):
    tiny = split_image_folder(tiny_root, val_per_class=1)
    ref = split_image_folder(imagenet_root, val_per_class=1)
    # the same images (by pixel content) carry the same labels in both layouts
    def by_content(samples):
        return Counter((np.asarray(Image.open(p)).tobytes(), y) for p, y in samples)

    assert by_content(tiny.test) == by_content(ref.test)


def test_holdout_errors(imagenet_root):
    assert "val_per_class" in _one_line_error(split_image_folder, imagenet_root, val_per_class=6)
    _one_line_error(split_image_folder, imagenet_root, val_per_class=1, val_size=3)
    _one_line_error(split_image_folder, imagenet_root, val_size=60)


def test_missing_or_broken_folders_name_the_path(tmp_path, tiny_root):
    missing = tmp_path / "nowhere"
    assert str(missing) in _one_line_error(check_image_folder, missing)
    (tmp_path / "a").mkdir()
    assert str(tmp_path / "a" / "train") in _one_line_error(check_image_folder, tmp_path / "a")
    (tmp_path / "a" / "train" / "n1").mkdir(parents=True)
    assert str(tmp_path / "a" / "val") in _one_line_error(check_image_folder, tmp_path / "a")
    (tmp_path / "a" / "val" / "images").mkdir(parents=True)
    assert "val_annotations.txt" in _one_line_error(check_image_folder, tmp_path / "a")
    (tmp_path / "a" / "val" / "images").rmdir()
    assert str(tmp_path / "a" / "train" / "n1") in _one_line_error(split_image_folder, tmp_path / "a")
    Image.new("RGB", (4, 4)).save(tmp_path / "a" / "train" / "n1" / "x.png")
    Image.new("RGB", (4, 4)).save(tmp_path / "a" / "val" / "flat.JPEG")
    assert "class folders" in _one_line_error(split_image_folder, tmp_path / "a", val_per_class=0)
    (tmp_path / "a" / "val" / "n9").mkdir()
    assert "'n9'" in _one_line_error(split_image_folder, tmp_path / "a", val_per_class=0)
    # registry: named datasets are found under root/<folder> or at root, and never downloaded
    check_dataset("tiny_imagenet", tiny_root.parent)
    check_dataset("tiny_imagenet", tiny_root)
    msg = _one_line_error(check_dataset, "imagenet", tmp_path / "empty", True)
    assert str(tmp_path / "empty") in msg and "does not download" in msg


# --------------------------------------------------------------------------------------------- parquet


def _read_split(path: Path, split: str):
    return pq.ParquetDataset([str(f) for f in parquet_files(path, split)]).read().to_pydict()


@pytest.mark.parametrize("layout", ["imagenet", "tiny"])
def test_to_parquet_round_trip(layout, tmp_path, imagenet_root, tiny_root):
    src = imagenet_root if layout == "imagenet" else tiny_root
    counts = folder_to_parquet(src, tmp_path, shard_size=7, val_per_class=1, num_workers=0, progress=False)
    assert counts == {"train": 50, "val": 10, "test": 20}
    assert json.loads((tmp_path / "classes.json").read_text()) == sorted(WNIDS) == read_classes(tmp_path)
    folders = split_image_folder(src, val_per_class=1)
    for split, n in counts.items():
        files = parquet_files(tmp_path, split)
        assert [f.name for f in files] == [f"part-{i:05d}.parquet" for i in range(-(-n // 7))]
        assert all(pq.read_metadata(f).num_rows <= 7 for f in files)
        meta = json.loads(pq.read_schema(files[0]).metadata[b"raydist"])
        assert meta["classes"] == sorted(WNIDS) and meta["split"] == split
        rows = _read_split(tmp_path, split)
        expected = {str(Path(p).relative_to(src)): y for p, y in folders.split(split)}
        assert dict(zip(rows["path"], rows["label"])) == expected  # same images, same labels
        assert len(rows["path"]) == n
        for rel, data in zip(rows["path"][:5], rows["image"][:5]):
            assert data == (src / rel).read_bytes()  # no resize: bytes as found
        if split != "train":
            continue
        assert rows["label"] != sorted(rows["label"])  # rows are shuffled before sharding
    info = describe_parquet(tmp_path)
    assert info.counts == counts and info.num_classes == 10 and info.input_size(32) == (3, 32, 32)
    # a second conversion refuses to mix with existing shards unless told to overwrite
    assert str(tmp_path / "train") in _one_line_error(folder_to_parquet, src, tmp_path, progress=False)
    # converting one split alone gives the same partition as converting all of them
    alone = folder_to_parquet(src, tmp_path / "v", split="val", val_per_class=1, progress=False)
    assert alone == {"val": 10} and not (tmp_path / "v" / "train").exists()
    assert sorted(_read_split(tmp_path / "v", "val")["path"]) == sorted(_read_split(tmp_path, "val")["path"])


def test_to_parquet_resize_keeps_format(tmp_path, imagenet_root):
    folder_to_parquet(imagenet_root, tmp_path, split="test", resize=12, shard_size=100, val_per_class=1,
                      progress=False)
    rows = _read_split(tmp_path, "test")
    for rel, data in zip(rows["path"], rows["image"]):
        img = Image.open(io.BytesIO(data))
        assert min(img.size) == 12 and img.size == (14, 12)  # short side 24 -> 12, aspect kept
        assert img.format == ("PNG" if rel.endswith(".png") else "JPEG")
    folder_to_parquet(imagenet_root, tmp_path / "big", split="test", resize=100, val_size=5, progress=False)
    rows = _read_split(tmp_path / "big", "test")
    assert all(data == (imagenet_root / rel).read_bytes() for rel, data in zip(rows["path"], rows["image"]))


def test_parquet_errors_name_the_path(tmp_path, converted):
    assert str(tmp_path / "none") in _one_line_error(parquet_files, tmp_path / "none", "train")
    (tmp_path / "p" / "train").mkdir(parents=True)
    assert str(tmp_path / "p" / "train") in _one_line_error(parquet_files, tmp_path / "p", "train")
    assert str(tmp_path / "p" / "val") in _one_line_error(parquet_files, tmp_path / "p", "val")
    _one_line_error(folder_to_parquet, tmp_path / "none", tmp_path / "out", progress=False)
    assert str(tmp_path / "none") in _one_line_error(ParquetLoader, tmp_path / "none", "train", image_size=8,
                                                     batch_size=4)


# ------------------------------------------------------------------------------------------ transforms


def test_eval_transform_is_deterministic_and_train_is_random(imagenet_root):
    data = next((imagenet_root / "train" / WNIDS[0]).iterdir()).read_bytes()
    ev = ImageTransform(16, train=False)
    a, b = ev(data), ev(data, seed=5)
    assert a.shape == (16, 16, 3) and a.dtype == np.uint8 and np.array_equal(a, b)
    tr = ImageTransform(16, train=True)
    outs = [tr(data, seed=s) for s in range(6)]
    assert all(o.shape == (16, 16, 3) for o in outs)
    assert np.array_equal(tr(data, seed=1), outs[1])  # seeded
    assert len({o.tobytes() for o in outs}) == 6  # random crops differ
    full = ImageTransform(16, train=True, scale=(1.0, 1.0), ratio=(28 / 24, 28 / 24))
    plain = np.asarray(Image.open(io.BytesIO(data)).convert("RGB").resize((16, 16), Image.Resampling.BILINEAR))
    flips = [full(data, seed=s) for s in range(8)]  # whole image: the only randomness left is the flip
    assert any(np.array_equal(f, plain) for f in flips) and any(np.array_equal(f, plain[:, ::-1]) for f in flips)


def test_crop_boxes_stay_inside():
    rng = np.random.default_rng(0)
    for w, h in [(28, 24), (500, 375), (10, 300), (300, 10)]:
        for _ in range(50):
            left, top, right, bottom = random_resized_box(w, h, rng, (0.08, 1.0), (3 / 4, 4 / 3))
            assert 0 <= left < right <= w and 0 <= top < bottom <= h
    assert center_box(500, 400, 0.875) == pytest.approx((75, 25, 425, 375))
    assert center_box(400, 500, 1.0) == pytest.approx((0, 50, 400, 450))


# -------------------------------------------------------------------------------------- pyarrow loader


def test_parquet_loader_eval(converted):
    loader = ParquetLoader(converted, "test", image_size=16, batch_size=6)
    assert not loader.train and len(loader) == 4 and loader.dataset_size == 20
    batches = list(loader)
    assert [x.shape[0] for x, _ in batches] == [5, 5, 5, 5]  # balanced like DeviceLoader
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    assert x.shape == (20, 3, 16, 16) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
    assert y.dtype == torch.int64 and y.tolist() == _read_split(converted, "test")["label"]  # file order
    again = torch.cat([b[0] for b in ParquetLoader(converted, "test", image_size=16, batch_size=6, num_threads=0)])
    assert torch.equal(again, x)  # eval: deterministic, whatever the threads
    # ranks take contiguous slices of the same order: together they are the whole split, once
    parts = [ParquetLoader(converted, "test", image_size=16, batch_size=4, rank=r, world_size=3) for r in range(3)]
    assert [len(p) for p in parts] == [2, 2, 2] and [p.num_samples for p in parts] == [7, 7, 6]
    assert torch.equal(torch.cat([xb for p in parts for xb, _ in p]), x)
    cl = next(iter(ParquetLoader(converted, "test", image_size=16, batch_size=4, channels_last=True)))[0]
    assert cl.is_contiguous(memory_format=torch.channels_last) and torch.equal(cl, x[:4])


def test_parquet_loader_train_shuffles_and_augments(converted):
    def epoch(loader, e):
        loader.set_epoch(e)
        xs, ys = zip(*loader)
        return torch.cat(xs), torch.cat(ys)

    loader = ParquetLoader(converted, "train", image_size=12, batch_size=8, seed=1, shuffle_buffer=10)
    assert loader.train and len(loader) == 7
    x0, y0 = epoch(loader, 0)
    assert x0.shape == (50, 3, 12, 12) and sorted(y0.tolist()) == sorted(_read_split(converted, "train")["label"])
    x0b, y0b = epoch(ParquetLoader(converted, "train", image_size=12, batch_size=8, seed=1, shuffle_buffer=10,
                                   num_threads=0), 0)
    assert torch.equal(x0, x0b) and torch.equal(y0, y0b)  # a function of (seed, epoch), not of threading
    x1, y1 = epoch(loader, 1)
    assert not torch.equal(y0, y1) and not torch.equal(x0, x1)
    # two ranks: disjoint, together the whole split, same number of batches
    ranks = [ParquetLoader(converted, "train", image_size=12, batch_size=8, rank=r, world_size=2) for r in range(2)]
    labels = [epoch(r, 3)[1] for r in ranks]
    assert len(ranks[0]) == len(ranks[1]) == 4 and sorted(torch.cat(labels).tolist()) == sorted(y0.tolist())


# ------------------------------------------------------------------------------------------- registry


def test_registry_names_and_in_memory_tiny(tmp_path, tiny_root, converted, monkeypatch):
    assert {"imagenet", "tiny_imagenet"} <= set(DATASETS) and {"digits", "cifar10"} <= set(DATASETS)
    assert "imagenet" in _one_line_error(check_dataset, "imagenet-42", None, False)
    small = load_dataset("imagenet", root=converted, image_size=16)  # a small ImageNet-format set fits in memory
    assert small.num_classes == 10 and small.input_size == (3, 16, 16)
    import raydist.data.imagenet as imagenet_module

    monkeypatch.setattr(imagenet_module, "MAX_IN_MEMORY_BYTES", 1000)
    msg = _one_line_error(load_dataset, "imagenet", root=converted, image_size=16)
    assert "to-parquet" in msg and "stream" in msg
    monkeypatch.undo()
    d = load_dataset("tiny_imagenet", root=tiny_root.parent, image_size=16, val_size=10)
    assert d.name == "tiny_imagenet" and d.num_classes == 10 and d.input_size == (3, 16, 16)
    assert d.sizes() == {"train": 50, "val": 10, "test": 20} and d.train_x.dtype == torch.uint8
    assert torch.bincount(d.val_y, minlength=10).tolist() == [1] * 10
    # from a parquet copy: same images and labels; the val split is the one fixed at conversion
    p = load_dataset("tiny_imagenet", root=converted, image_size=16)
    assert p.sizes() == d.sizes()
    assert Counter(p.test_y.tolist()) == Counter(d.test_y.tolist())
    assert "val_size" in _one_line_error(load_dataset, "tiny_imagenet", root=converted, image_size=16, val_size=3)
    _one_line_error(load_dataset, "tiny_imagenet", root=tiny_root, channels=1)


# ------------------------------------------------------------------------------------------ Ray Data


def _rows(xs: torch.Tensor, ys: torch.Tensor) -> list[tuple[int, bytes]]:
    """Order-free view of a set of (image, label) pairs."""
    return sorted((int(label), img.numpy().tobytes()) for img, label in zip(xs, ys))


@pytest.mark.usefixtures("ray_session")
def test_ray_data_eval_stream_matches_pyarrow_path(converted_ray):
    assert parquet_dataset(converted_ray, "test").schema().names == ["image", "label"]
    loader = StreamingLoader(image_dataset(converted_ray, "test", image_size=16), batch_size=6, num_rows=20)
    assert len(loader) == 4
    x, y = map(torch.cat, zip(*loader))
    assert x.shape == (20, 3, 16, 16) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
    assert y.dtype == torch.int64
    ref_x, ref_y = map(torch.cat, zip(*ParquetLoader(converted_ray, "test", image_size=16, batch_size=20)))
    assert _rows(x, y) == _rows(ref_x, ref_y)  # same decode + eval transform, whatever the order


@pytest.mark.usefixtures("ray_session")
def test_ray_data_train_stream_per_worker(converted_ray):
    """What Ray Train does with datasets={"train": ds}: an equal streaming split, one part per worker."""
    import threading

    shards = image_dataset(converted_ray, "train", image_size=12).streaming_split(2, equal=True)
    out: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def consume(i: int) -> None:  # the parts of a streaming split are consumed concurrently, as by workers
        loader = StreamingLoader(shards[i], batch_size=8, num_rows=shard_rows(50, 2))
        out[i] = tuple(map(torch.cat, zip(*loader)))  # type: ignore[assignment]
        assert len(loader) == 4

    threads = [threading.Thread(target=consume, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert sorted(out) == [0, 1] and out[0][0].shape == out[1][0].shape == (25, 3, 12, 12)
    x, y = torch.cat([out[0][0], out[1][0]]), torch.cat([out[0][1], out[1][1]])
    assert Counter(y.tolist()) == Counter(_read_split(converted_ray, "train")["label"])  # disjoint, covering
    assert 0 <= x.min() and x.max() <= 1
    loader = ParquetLoader(converted_ray, "train", image_size=12, batch_size=50, train=False)
    eval_x, eval_y = map(torch.cat, zip(*loader))
    assert len(set(_rows(x, y)) & set(_rows(eval_x, eval_y))) < 10  # random crops, not the eval center crops


# ------------------------------------------------------------------- draft decoding, corrupt images, splits


def _photo(width: int = 640, height: int = 480) -> bytes:
    """A real photograph (scikit-learn's sample image) as a JPEG of the given size."""
    from sklearn.datasets import load_sample_image

    img = Image.fromarray(load_sample_image("china.jpg")).resize((width, height), Image.Resampling.BICUBIC)
    out = io.BytesIO()
    img.save(out, format="JPEG", quality=90)
    return out.getvalue()


def test_draft_decoding_matches_full_decoding():
    """Draft mode decodes a large JPEG at a DCT scale that still covers the crop with image_size pixels: the
    crops are the same picture (same geometry, same seeds), within resampling differences."""
    data = _photo()
    for train in (False, True):
        full = ImageTransform(64, train=train, draft=False)
        draft = ImageTransform(64, train=train)
        for seed in range(3):
            a, b = full(data, seed).astype(np.float32), draft(data, seed).astype(np.float32)
            assert a.shape == b.shape == (64, 64, 3)
            assert np.abs(a - b).mean() < 6, (train, seed, np.abs(a - b).mean())
    # a crop that needs the full resolution is not drafted: identical to the plain decode
    big = ImageTransform(448, train=False)
    assert np.array_equal(big(data), ImageTransform(448, train=False, draft=False)(data))


def test_corrupt_images_are_skipped_with_a_warning_naming_them(tmp_path, imagenet_root, caplog):
    import shutil

    from raydist.data.streaming import decode_images

    src = tmp_path / "src"
    shutil.copytree(imagenet_root, src)
    bad = sorted((src / "val" / WNIDS[0]).glob("*.JPEG"))[0]
    bad.write_bytes(_photo()[:2000])  # a truncated JPEG: the header reads, the pixels do not
    with caplog.at_level("WARNING"):
        counts = folder_to_parquet(src, tmp_path / "pq", split="test", val_per_class=1, progress=False)
    assert counts == {"test": 10 * VAL_PER_CLASS - 1}
    assert any(str(bad) in r.getMessage() for r in caplog.records)
    assert str(bad.relative_to(src)) not in _read_split(tmp_path / "pq", "test")["path"]

    # decoding: a corrupt row in a parquet copy is dropped from its batch, named by its source path
    rows = _read_split(tmp_path / "pq", "test")
    images = [rows["image"][0], _photo()[:2000], rows["image"][1]]
    batch = {"image": np.array(images, dtype=object), "label": np.array([3, 4, 5]),
             "path": np.array(["a.JPEG", "broken/b.JPEG", "c.JPEG"], dtype=object)}
    caplog.clear()
    with caplog.at_level("WARNING"):
        out = decode_images(batch, ImageTransform(12, train=False))
    assert out["image"].shape == (2, 12, 12, 3) and out["label"].tolist() == [3, 5]
    assert any("broken/b.JPEG" in r.getMessage() for r in caplog.records)


def test_conversion_resizes_to_1_15_image_size_by_default(tmp_path, imagenet_root):
    from raydist.data.parquet import default_resize

    assert default_resize(224) == 258 and default_resize(16) == 19
    folder_to_parquet(imagenet_root, tmp_path, split="test", image_size=16, val_per_class=1, progress=False)
    for data in _read_split(tmp_path, "test")["image"]:
        assert min(Image.open(io.BytesIO(data)).size) == 19  # short side 24 -> 19
    with pytest.raises(DataError, match="resize"):
        folder_to_parquet(imagenet_root, tmp_path / "x", split="test", resize=0, val_per_class=1, progress=False)


def test_object_store_size(monkeypatch):
    from raydist.config import ConfigError
    from raydist.train.driver import object_store_bytes

    monkeypatch.delenv("RAYDIST_OBJECT_STORE_MB", raising=False)
    assert object_store_bytes(None) == 512 * 1024**2
    assert object_store_bytes({"data": {"stream": True}}) is None  # Ray's default, 30% of memory
    monkeypatch.setenv("RAYDIST_OBJECT_STORE_MB", "4096")
    assert object_store_bytes({"data": {"stream": True}}) == 4096 * 1024**2
    monkeypatch.setenv("RAYDIST_OBJECT_STORE_MB", "lots")
    with pytest.raises(ConfigError, match="RAYDIST_OBJECT_STORE_MB"):
        object_store_bytes(None)



@pytest.mark.usefixtures("ray_session")
def test_evaluation_split_covers_every_image(converted_ray):
    """Ray Train's DataConfig as raydist passes it to the TorchTrainer (it calls configure once per dataset, with
    keywords), for 3 workers: the 20 test rows are all evaluated (an equal split would drop 2), the 50 train rows
    split equally (16 each)."""
    import threading

    from ray import cloudpickle
    from ray.train import DataConfig

    from raydist.data.streaming import data_config

    config = cloudpickle.loads(cloudpickle.dumps(data_config()))  # it travels to Ray Train's controller
    assert isinstance(config, DataConfig)
    shards = {name: config.configure(datasets={name: image_dataset(converted_ray, name, image_size=8)},
                                     world_size=3, worker_handles=None, worker_node_ids=None)
              for name in ("test", "train")}
    got: dict[tuple[str, int], list[int]] = {}

    def consume(name: str, i: int) -> None:
        got[name, i] = [int(y) for _, ys in StreamingLoader(shards[name][i][name], batch_size=8) for y in ys]

    for name in ("test", "train"):
        threads = [threading.Thread(target=consume, args=(name, i)) for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=180)
    test_labels = sum((got["test", i] for i in range(3)), [])
    assert Counter(test_labels) == Counter(_read_split(converted_ray, "test")["label"])  # all 20, once each
    assert [len(got["train", i]) for i in range(3)] == [shard_rows(50, 3)] * 3 == [16] * 3
    assert shard_rows(20, 3, equal=False) == 7

def test_cli_to_parquet_image_size_and_resize(tmp_path, imagenet_root, capsys):
    from raydist.cli import main

    args = ["data", "to-parquet", str(imagenet_root), "--split", "test", "--val-per-class", "1"]
    assert main([*args[:3], str(tmp_path / "a"), *args[3:], "--image-size", "16"]) == 0
    assert {min(Image.open(io.BytesIO(d)).size) for d in _read_split(tmp_path / "a", "test")["image"]} == {19}
    assert main([*args[:3], str(tmp_path / "b"), *args[3:], "--resize", "0"]) == 0  # the source bytes
    rows = _read_split(tmp_path / "b", "test")
    assert all(d == (imagenet_root / rel).read_bytes() for rel, d in zip(rows["path"], rows["image"]))
    capsys.readouterr()
    assert main([*args[:3], str(tmp_path / "c"), *args[3:], "--resize", "-3"]) == 2
    err = capsys.readouterr().err
    assert "resize" in err and len(err.strip().splitlines()) == 1
