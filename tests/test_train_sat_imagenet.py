"""The CLI trains SAT jobs: resnet18 under every activation on digits, SAT's backward-only rows, ImageNet-size models
on a small ImageNet-format folder dataset (in memory), and a parquet copy streamed through Ray Data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_job, write_job
from PIL import Image
from sklearn.datasets import load_digits

from raydist.cli import main
from raydist.data import DeviceLoader, load_dataset
from raydist.methods import create_method
from raydist.models import create_model
from raydist.models.activations import ACTIVATIONS

WNIDS = [f"n{i:08d}" for i in range(10)]


@pytest.fixture(scope="module")
def folder_root(tmp_path_factory) -> Path:
    """root/imagenet/{train,val}/<wnid>/*.png: 8 train and 2 val digits per class, upscaled to 40x40 RGB."""
    root = tmp_path_factory.mktemp("data")
    digits = load_digits()
    seen = dict.fromkeys(range(10), 0)
    for img, label in zip(digits.images, digits.target):
        k = seen[int(label)]
        if k >= 10:
            continue
        seen[int(label)] += 1
        split = "train" if k < 8 else "val"
        path = root / "imagenet" / split / WNIDS[label] / f"{WNIDS[label]}_{k}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        pixels = (img / 16 * 255).astype(np.uint8)
        Image.fromarray(np.stack([pixels] * 3, -1)).resize((40, 40), Image.BILINEAR).save(path)
    return root


def _summary(tmp_path: Path, name: str = "t") -> dict:
    return json.loads((tmp_path / "runs" / name / "summary.json").read_text())


def _job(tmp_path, **sections):
    """tiny_job, with the method section replaced (not merged) when one is given."""
    method = sections.pop("method", None)
    job = tiny_job(tmp_path, **sections)
    if method is not None:
        job["method"] = method
    return job


def _in_process(tmp_path, **sections):
    job = _job(tmp_path, **sections)
    job["scaling"] = {"num_workers": 0}
    job["optim"]["epochs"] = 1
    job["eval"] = {"val_steps": 1, "test_attacks": ["clean", "fgsm"], "test_samples": 32}
    return job


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
def test_resnet18_learns_digits_under_every_activation(activation):
    """Every activation trains (plain PyTorch, no Ray: the CLI path is the same loop, run below for a few)."""
    torch.manual_seed(0)
    torch.set_num_threads(1)
    splits = load_dataset("digits")
    model = create_model("resnet18", num_classes=10, activation=activation, width=4, mean=splits.mean,
                         std=splits.std)
    method = create_method("fgsm_rs", model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9),
                           epsilon=8 / 255)
    losses = []
    for epoch in range(2):
        for x, y in DeviceLoader(splits.train_x, splits.train_y, batch_size=64, shuffle=True, seed=epoch):
            losses.append(method.step(x, y)[0].item())
    assert np.isfinite(losses).all()
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.3, f"{activation}: loss did not fall"


@pytest.mark.usefixtures("ray_session")
@pytest.mark.parametrize("activation", ["smoothrelu", "parametric_softplus", "elu(alpha=0.5)"])
def test_cli_trains_resnet18_on_digits_with_sat_activations(tmp_path, activation):
    job = _in_process(tmp_path, model={"activation": activation, "width": 4},
                      method={"name": "fgsm_rs", "epsilon": "16/255"})
    assert main(["train", str(write_job(tmp_path, job))]) == 0
    summary = _summary(tmp_path)
    assert summary["model"] == f"resnet18 ({activation})"
    assert all(0 <= v <= 1 for v in summary["last"]["accuracy"].values())


@pytest.mark.usefixtures("ray_session")
def test_sat_backward_only_rows_train(tmp_path):
    job = _in_process(tmp_path, model={"activation": "relu_smoothgrad", "width": 4, "smooth_backward": "attacker"},
                      method={"name": "pgd_at", "epsilon": "16/255", "steps": 1, "alpha": "16/255"})
    assert main(["train", str(write_job(tmp_path, job))]) == 0
    config = (tmp_path / "runs" / "t" / "config.yaml").read_text()
    assert "smooth_backward: attacker" in config


@pytest.mark.parametrize(("change", "named"), [
    ({"model": {"smooth_backward": "both"}}, "model.smooth_backward"),
    ({"model": {"activation": "relu_smoothgrad", "smooth_backward": "attacker"},
      "method": {"name": "free_at", "epsilon": "8/255"}}, "model.smooth_backward"),
    ({"model": {"pretrained_path": "/nowhere/weights.pt"}}, "/nowhere/weights.pt"),
    ({"data": {"stream": True}}, "data.stream"),
])
def test_bad_sat_and_data_keys_exit_2(tmp_path, capsys, change, named):
    job = tiny_job(tmp_path)
    if change.get("method", {}).get("name"):
        job["method"] = {}
    for sec, values in change.items():
        job[sec].update(values)
    assert main(["train", str(write_job(tmp_path, job))]) == 2
    err = capsys.readouterr().err.strip()
    assert named in err and "\n" not in err
    assert not (tmp_path / "runs").exists()


def test_stream_needs_a_parquet_copy(tmp_path, folder_root, capsys):
    job = tiny_job(tmp_path, data={"dataset": "imagenet", "root": str(folder_root), "stream": True})
    assert main(["train", str(write_job(tmp_path, job))]) == 2
    err = capsys.readouterr().err
    assert "to-parquet" in err and str(folder_root / "imagenet") in err


@pytest.mark.usefixtures("ray_session")
@pytest.mark.parametrize("model", ["efficientnet_b0", "resnext50_32x4d"])
def test_imagenet_size_models_train_on_folder_data(tmp_path, folder_root, model):
    job = _in_process(tmp_path, data={"dataset": "imagenet", "root": str(folder_root), "image_size": 32, "val_size": 10,
                                      "batch_size": 16, "eval_batch_size": 20, "crop": 4, "flip": True},
                      model={"name": model, "activation": "silu", "width": None},
                      method={"name": "fgsm_rs", "epsilon": "4/255"})
    assert main(["train", str(write_job(tmp_path, job))]) == 0
    summary = _summary(tmp_path)
    assert summary["model"] == f"{model} (silu)" and summary["n_test"] == 20  # the official val: 2 per class
    rows = [json.loads(x) for x in (tmp_path / "runs" / "t" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and np.isfinite(rows[0]["train_loss"])


@pytest.mark.usefixtures("ray_session")
def test_to_parquet_then_stream_through_ray_data(tmp_path, folder_root, capsys):
    dst = tmp_path / "parquet"
    args = ["data", "to-parquet", str(folder_root / "imagenet"), str(dst), "--shard-size", "40",
            "--val-per-class", "1"]
    assert main(args) == 0
    assert "train 70 images" in capsys.readouterr().out
    assert sorted(p.name for p in dst.iterdir()) == ["classes.json", "test", "train", "val"]
    assert main(args) == 2  # never overwrites without --overwrite
    assert str(dst) in capsys.readouterr().err

    job = _job(tmp_path, data={"dataset": "imagenet", "root": str(dst), "stream": True, "image_size": 24,
                                   "batch_size": 16, "eval_batch_size": 16},
                   model={"name": "resnet18", "width": 4}, method={"name": "fgsm_rs", "epsilon": "8/255"})
    job["optim"]["epochs"] = 2
    job["eval"] = {"val_steps": 1, "test_attacks": ["clean", "pgd3"]}
    assert main(["train", str(write_job(tmp_path, job))]) == 0
    rows = [json.loads(x) for x in (tmp_path / "runs" / "t" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    summary = _summary(tmp_path)
    assert summary["n_test"] == 20 and set(summary["last"]["accuracy"]) == {"clean", "pgd3"}
