"""Tests for raydist.data: dataset loaders, splits, the pre-flight check and the sharded device loader."""

from __future__ import annotations

import ast
import math
import pickle
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from raydist.data import DATASETS, DataError, DeviceLoader, check_dataset, cifar, load_dataset
from raydist.data.augment import crop_at, random_crop, random_flip
from raydist.data.common import stratified_holdout
from raydist.data.digits import load_digits_images

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


# ----------------------------------------------------------------------------------------------- datasets


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def _rows(x: torch.Tensor, y: torch.Tensor) -> Counter:
    """Multiset of (image bytes, label): compares splits even if the dataset holds duplicate images."""
    return Counter((xi.numpy().tobytes(), int(yi)) for xi, yi in zip(x, y))


def test_registry_names():
    assert set(DATASETS) >= {"digits", "cifar10", "cifar100", "synthetic"}


def test_digits_shapes_dtypes_ranges(digits):
    assert digits.name == "digits" and digits.num_classes == 10 and digits.input_size == (3, 32, 32)
    assert digits.sizes() == {"train": 1238, "val": 200, "test": 359}
    for split in ("train", "val", "test"):
        x, y = digits.split(split)
        assert x.dtype == torch.uint8 and x.shape[1:] == (3, 32, 32) and x.device.type == "cpu"
        assert y.dtype == torch.int64 and y.shape == (x.shape[0],)
        assert int(y.min()) == 0 and int(y.max()) == 9
        assert torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 0], x[:, 2])
    assert int(digits.train_x.max()) == 255 and int(digits.train_x.min()) == 0
    assert len(digits.mean) == len(digits.std) == 3
    assert all(0 < m < 1 for m in digits.mean) and all(0 < s < 1 for s in digits.std)
    # mean/std are statistics of the train split in [0, 1] units
    train = digits.train_x.double() / 255
    assert digits.mean[0] == pytest.approx(train[:, 0].mean().item(), abs=1e-9)
    assert digits.std[0] == pytest.approx(train[:, 0].std(unbiased=False).item(), abs=1e-9)


def test_digits_splits_partition_the_dataset(digits):
    x, y = load_digits_images()
    together = _rows(digits.train_x, digits.train_y) + _rows(digits.val_x, digits.val_y)
    together += _rows(digits.test_x, digits.test_y)
    assert together == _rows(x, y)  # disjoint and covering: every sample exactly once


def test_digits_splits_are_stratified(digits):
    overall = torch.bincount(torch.cat([digits.train_y, digits.val_y, digits.test_y]), minlength=10).double()
    for split in ("val", "test"):
        y = digits.split(split)[1]
        expected = overall * y.numel() / overall.sum()
        assert (torch.bincount(y, minlength=10) - expected).abs().max() < 1.0


def test_digits_split_depends_only_on_split_seed(digits):
    again = load_dataset("digits")
    assert torch.equal(again.test_x, digits.test_x) and torch.equal(again.val_y, digits.val_y)
    other = load_dataset("digits", split_seed=1, val_size=50)
    assert other.sizes() == {"train": 1388, "val": 50, "test": 359}
    assert not torch.equal(other.test_x, digits.test_x)


def test_digits_one_channel_and_other_size():
    d = load_dataset("digits", channels=1, image_size=16, val_size=0)
    assert d.input_size == (1, 16, 16) and d.val_x.shape == (0, 1, 16, 16) and len(d.mean) == 1


def test_stratified_holdout_exact_and_disjoint():
    labels = torch.tensor([0] * 50 + [1] * 30 + [2] * 20)
    keep, held = stratified_holdout(labels, 7, seed=3)
    assert held.numel() == 7 and keep.numel() == 93
    assert sorted(torch.cat([keep, held]).tolist()) == list(range(100))
    assert torch.bincount(labels[held], minlength=3).tolist() == [4, 2, 1]  # 3.5, 2.1, 1.4 -> exact total
    assert torch.equal(stratified_holdout(labels, 7, seed=3)[1], held)
    assert not torch.equal(stratified_holdout(labels, 7, seed=4)[1], held)


# -------------------------------------------------------------------------------------- fake CIFAR files


def _image_rows(n: int, offset: int) -> np.ndarray:
    """Distinct, recognisable images in the official row layout (1024 R, then G, then B, row-major)."""
    rows = (np.arange(n * 3072, dtype=np.int64).reshape(n, 3072) * 7 + offset) % 251
    return rows.astype(np.uint8)


def _write(path: Path, obj: dict) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f)


def _fake_cifar10(root: Path, per_batch: int = 20, test: int = 10) -> Path:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for i in range(1, 6):
        labels = [j % 10 for j in range(per_batch)]
        _write(
            folder / f"data_batch_{i}",
            {
                b"batch_label": b"b",
                b"data": _image_rows(per_batch, i),
                b"labels": labels,
                b"filenames": [b"f"] * per_batch,
            },
        )
    _write(folder / "test_batch", {b"data": _image_rows(test, 0), b"labels": [j % 10 for j in range(test)]})
    _write(folder / "batches.meta", {b"label_names": [f"c{i}".encode() for i in range(10)]})
    return folder


def test_cifar10_reads_official_pickle_format(tmp_path):
    _fake_cifar10(tmp_path)
    check_dataset("cifar10", tmp_path, download=False)
    d = load_dataset("cifar10", root=tmp_path, val_size=10)
    assert d.num_classes == 10 and d.input_size == (3, 32, 32)
    assert d.sizes() == {"train": 90, "val": 10, "test": 10}
    assert torch.bincount(d.val_y, minlength=10).tolist() == [1] * 10  # stratified: one per class
    # the official test set is kept in order, and rows become NCHW planes
    expected = torch.from_numpy(_image_rows(10, 0)).reshape(10, 3, 32, 32)
    assert torch.equal(d.test_x, expected) and d.test_y.tolist() == list(range(10))
    assert d.test_x.dtype == torch.uint8 and d.train_y.dtype == torch.int64
    # train + val is the 5 training batches, each sample exactly once
    every = torch.from_numpy(np.concatenate([_image_rows(20, i) for i in range(1, 6)])).reshape(-1, 3, 32, 32)
    labels = torch.tensor([j % 10 for j in range(20)] * 5)
    assert _rows(d.train_x, d.train_y) + _rows(d.val_x, d.val_y) == _rows(every, labels)
    # seeded by split_seed, and download=True with files present reads them without fetching
    again = load_dataset("cifar10", root=tmp_path, val_size=10, download=True)
    assert torch.equal(again.val_x, d.val_x)
    assert not torch.equal(load_dataset("cifar10", root=tmp_path, val_size=10, split_seed=5).val_x, d.val_x)


def test_cifar100_reads_fine_labels(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    _write(
        folder / "train",
        {
            b"data": _image_rows(300, 1),
            b"fine_labels": [j % 100 for j in range(300)],
            b"coarse_labels": [0] * 300,
        },
    )
    _write(folder / "test", {b"data": _image_rows(100, 2), b"fine_labels": list(range(100))})
    d = load_dataset("cifar100", root=tmp_path, val_size=100, image_size=16)
    assert d.num_classes == 100 and d.input_size == (3, 16, 16)
    assert d.sizes() == {"train": 200, "val": 100, "test": 100}
    assert torch.bincount(d.val_y, minlength=100).tolist() == [1] * 100


def _one_line_error(fn, *args, **kwargs) -> str:
    with pytest.raises(DataError) as info:
        fn(*args, **kwargs)
    msg = str(info.value)
    assert "\n" not in msg
    return msg


def test_missing_cifar_names_the_path(tmp_path):
    msg = _one_line_error(load_dataset, "cifar10", root=tmp_path)
    assert str(tmp_path / "cifar-10-batches-py") in msg and "download" in msg
    msg = _one_line_error(check_dataset, "cifar100", tmp_path, False)
    assert str(tmp_path / "cifar-100-python") in msg
    missing_root = tmp_path / "nowhere"
    msg = _one_line_error(check_dataset, "cifar10", missing_root, False)
    assert str(missing_root) in msg
    check_dataset("cifar10", missing_root, download=True)  # will be fetched: nothing required yet


def test_incomplete_cifar_names_missing_file(tmp_path):
    folder = _fake_cifar10(tmp_path)
    (folder / "data_batch_3").unlink()
    msg = _one_line_error(check_dataset, "cifar10", tmp_path, False)
    assert "data_batch_3" in msg and str(folder) in msg


def test_download_fetches_once_then_reads(tmp_path, monkeypatch):
    calls = []

    def fake_fetch(name, root):  # stands in for torchvision's network fetch
        calls.append((name, root))
        _fake_cifar10(root)

    monkeypatch.setattr(cifar, "_fetch", fake_fetch)
    root = tmp_path / "new" / "root"
    d = load_dataset("cifar10", root=root, download=True, val_size=10)
    assert calls == [("cifar10", root)] and d.sizes()["test"] == 10
    load_dataset("cifar10", root=root, download=True, val_size=10)
    assert len(calls) == 1  # files present: no second fetch


def test_failed_download_is_one_line(tmp_path, monkeypatch):
    def offline(name, root):
        raise RuntimeError("Error downloading cifar-10-python.tar.gz:\nTried https://x, got:\nno network")

    monkeypatch.setattr(cifar, "_fetch", offline)
    msg = _one_line_error(load_dataset, "cifar10", root=tmp_path, download=True)
    assert str(tmp_path) in msg and "no network" in msg


def test_root_defaults_to_env(tmp_path, monkeypatch):
    monkeypatch.setenv("RAYDIST_DATA", str(tmp_path / "env-root"))
    assert str(tmp_path / "env-root" / "cifar-10-batches-py") in _one_line_error(check_dataset, "cifar10")


def test_check_dataset_choices_and_fileless_datasets(tmp_path):
    msg = _one_line_error(check_dataset, "imagenet-42", None, False)
    assert all(name in msg for name in DATASETS)
    _one_line_error(load_dataset, "nope")
    check_dataset("digits", tmp_path / "does-not-exist", False)  # needs no files
    check_dataset("synthetic", tmp_path / "does-not-exist", False)


def test_synthetic_shapes_determinism_and_learnability():
    kw = dict(image_size=20, num_classes=3, channels=1, train_size=90, val_size=12, test_size=30)
    d = load_dataset("synthetic", **kw)
    assert d.input_size == (1, 20, 20) and d.num_classes == 3
    assert d.sizes() == {"train": 90, "val": 12, "test": 30}
    assert d.train_x.dtype == torch.uint8 and d.train_y.dtype == torch.int64
    assert torch.bincount(d.train_y).tolist() == [30, 30, 30]
    assert torch.equal(load_dataset("synthetic", **kw).train_x, d.train_x)
    assert not torch.equal(load_dataset("synthetic", split_seed=1, **kw).train_x, d.train_x)
    # nearest class mean separates the classes: the templates differ and the noise does not hide them
    centroids = torch.stack([d.train_x[d.train_y == c].float().mean(0).flatten() for c in range(3)])
    pred = torch.cdist(d.test_x.float().flatten(1), centroids).argmin(1)
    assert (pred == d.test_y).float().mean() > 0.9


def test_synthetic_default_sizes():
    d = load_dataset("synthetic", image_size=8)
    assert d.sizes() == {"train": 2048, "val": 256, "test": 512} and d.input_size == (3, 8, 8)


def test_data_package_does_not_import_ray():
    """Only streaming.py (the Ray Data bridge) touches Ray, and only inside its functions."""
    for path in Path(__file__).parents[1].joinpath("raydist", "data").glob("*.py"):
        tree = ast.parse(path.read_text())
        nodes = tree.body if path.name == "streaming.py" else ast.walk(tree)
        for node in nodes:
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            assert not any(n == "ray" or n.startswith("ray.") for n in names), path


# ------------------------------------------------------------------------------------------------ loader


def _indexed(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Images whose pixels encode their own index, so yielded batches reveal which samples they hold."""
    x = (torch.arange(n) % 256).to(torch.uint8).view(n, 1, 1, 1).expand(n, 3, 4, 4).contiguous()
    return x, torch.arange(n)


def _epoch(loader: DeviceLoader) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x.cpu(), y.cpu()) for x, y in loader]


@pytest.mark.parametrize("n,world,batch", [(101, 2, 16), (5, 4, 2), (5, 4, 1), (100, 3, 7), (64, 4, 16)])
@pytest.mark.parametrize("shuffle", [True, False])
def test_ranks_are_disjoint_cover_everything_and_agree_on_batch_count(n, world, batch, shuffle):
    x, y = _indexed(n)
    loaders = [
        DeviceLoader(x, y, batch_size=batch, shuffle=shuffle, rank=r, world_size=world, seed=7)
        for r in range(world)
    ]
    expected_batches = math.ceil(math.ceil(n / world) / batch)
    seen = []
    for loader in loaders:
        loader.set_epoch(3)
        batches = _epoch(loader)
        assert len(batches) == len(loader) == expected_batches  # DDP needs the same count on every rank
        got = torch.cat([b[1] for b in batches])
        assert torch.equal(got, loader.epoch_indices())  # batches come in epoch_indices order
        assert got.numel() == loader.num_samples
        assert max(b[1].numel() for b in batches) <= batch
        sizes = [b[1].numel() for b in batches]
        assert max(sizes) - min(sizes) <= 1  # nearly equal chunks, no padding
        for xb, yb in batches:
            assert torch.equal((xb[:, 0, 0, 0] * 255).round().long(), yb % 256)
        seen.append(got)
    everything = torch.cat(seen)
    assert sorted(everything.tolist()) == list(range(n))  # disjoint and covering
    # one shared permutation: rank r holds perm[r::world]
    single = DeviceLoader(x, y, batch_size=batch, shuffle=shuffle, seed=7)
    single.set_epoch(3)
    perm = single.epoch_indices()
    for r, got in enumerate(seen):
        assert torch.equal(got, perm[r::world])
    if not shuffle:
        assert torch.equal(perm, torch.arange(n))


def test_shuffle_is_deterministic_per_epoch_and_changes_across_epochs():
    x, y = _indexed(200)
    a = DeviceLoader(x, y, batch_size=32, seed=1)
    b = DeviceLoader(x, y, batch_size=32, seed=1)
    a.set_epoch(0)
    b.set_epoch(0)
    first = a.epoch_indices()
    assert torch.equal(first, b.epoch_indices())
    a.set_epoch(1)
    assert not torch.equal(first, a.epoch_indices())
    a.set_epoch(0)
    assert torch.equal(first, a.epoch_indices())  # replayable, e.g. after resume
    assert not torch.equal(first, DeviceLoader(x, y, batch_size=32, seed=2).epoch_indices())


def test_empty_split_yields_nothing():
    x, y = _indexed(0)
    loader = DeviceLoader(x, y, batch_size=4, world_size=2, rank=1)
    assert len(loader) == 0 and _epoch(loader) == [] and loader.num_samples == 0


@pytest.mark.parametrize("device", DEVICES)
def test_no_augment_is_exact_scaling(device, digits):
    x, y = digits.val_x, digits.val_y
    loader = DeviceLoader(
        x, y, batch_size=64, device=device, shuffle=False, augment={"crop": 0, "flip": False}
    )
    out = torch.cat([b[0] for b in _epoch(loader)])
    assert out.dtype == torch.float32 and torch.equal(out, x.float() / 255)
    assert torch.equal(torch.cat([b[1] for b in _epoch(loader)]), y)


def test_crop_at_known_offset_is_a_translation():
    x = torch.randint(1, 256, (2, 3, 8, 8), dtype=torch.uint8)
    p = 2
    out = crop_at(x, p, torch.tensor([[p, p], [0, 4]]))
    assert torch.equal(out[0], x[0])  # centre offset is the identity
    # offset (0, 4): content moves down by 2 and left by 2, zeros enter from the top
    expected = torch.zeros_like(x[1])
    expected[:, 2:, :6] = x[1, :, :6, 2:]
    assert torch.equal(out[1], expected)


@pytest.mark.parametrize("device", DEVICES)
def test_random_crop_output_is_one_of_the_valid_translations(device):
    p = 3
    x = torch.randint(1, 256, (16, 3, 10, 10), dtype=torch.uint8, device=device)
    gen = torch.Generator(device=device).manual_seed(0)
    out = random_crop(x, p, gen)
    assert out.shape == x.shape and out.dtype == x.dtype
    padded = torch.nn.functional.pad(x, (p, p, p, p))
    for i in range(x.shape[0]):
        windows = [
            padded[i, :, dy : dy + 10, dx : dx + 10] for dy in range(2 * p + 1) for dx in range(2 * p + 1)
        ]
        assert any(torch.equal(out[i], w) for w in windows)
    assert not torch.equal(out, x)  # 16 samples all at the centre offset: probability 49**-16


def test_random_flip_mirrors_some_samples():
    x = torch.randint(0, 256, (64, 3, 5, 5), dtype=torch.uint8)
    out = random_flip(x, torch.Generator().manual_seed(0))
    flipped = [torch.equal(o, xi.flip(2)) for o, xi in zip(out, x)]
    kept = [torch.equal(o, xi) for o, xi in zip(out, x)]
    assert all(f or k for f, k in zip(flipped, kept))
    assert 10 < sum(flipped) < 54


@pytest.mark.parametrize("device", DEVICES)
def test_augmented_batches_keep_shape_range_and_are_seeded(device, digits):
    x, y = digits.train_x[:300], digits.train_y[:300]
    aug = {"crop": 4, "flip": True}

    def run(epoch: int, rank: int = 0) -> torch.Tensor:
        loader = DeviceLoader(
            x, y, batch_size=64, device=device, augment=aug, seed=5, rank=rank, world_size=2
        )
        loader.set_epoch(epoch)
        batches = _epoch(loader)
        for xb, yb in batches:
            assert xb.shape[1:] == x.shape[1:] and xb.dtype == torch.float32 and yb.dtype == torch.int64
            assert xb.min() >= 0 and xb.max() <= 1
        return torch.cat([b[0] for b in batches])

    first = run(0)
    assert torch.equal(first, run(0))
    assert not torch.equal(first, run(1))
    plain = DeviceLoader(x, y, batch_size=64, device=device, seed=5, rank=0, world_size=2)
    assert not torch.equal(first, torch.cat([b[0] for b in _epoch(plain)]))  # it did augment


@pytest.mark.parametrize("channels_last", [False, True])
def test_channels_last_flag(channels_last, digits):
    loader = DeviceLoader(
        digits.val_x, digits.val_y, batch_size=50, augment={"crop": 2}, channels_last=channels_last
    )
    xb, _ = next(iter(loader))
    assert xb.is_contiguous(memory_format=torch.channels_last) == channels_last
    assert xb.is_contiguous() != channels_last


def test_loader_rejects_bad_arguments(digits):
    x, y = digits.val_x, digits.val_y
    with pytest.raises(ValueError):
        DeviceLoader(x.float(), y, batch_size=4)
    with pytest.raises(ValueError):
        DeviceLoader(x, y[:-1], batch_size=4)
    with pytest.raises(ValueError):
        DeviceLoader(x, y, batch_size=4, rank=2, world_size=2)
    with pytest.raises(ValueError):
        DeviceLoader(x, y, batch_size=4, augment={"rotate": 10})
    with pytest.raises(ValueError):
        DeviceLoader(x, y, batch_size=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_batch_loop_does_not_sync_with_host(digits):
    loader = DeviceLoader(
        digits.train_x,
        digits.train_y,
        batch_size=128,
        device="cuda",
        augment={"crop": 4, "flip": True},
        channels_last=True,
    )
    list(loader)  # warm the per-epoch index cache (one host-to-device copy per epoch, allowed)
    torch.cuda.set_sync_debug_mode("error")
    try:
        for xb, yb in loader:
            assert xb.is_cuda and yb.is_cuda
    finally:
        torch.cuda.set_sync_debug_mode("default")
