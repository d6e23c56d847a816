"""Broken files where a run starts from weights: `raydist eval CKPT`, `raydist train --resume` (last.pt, best.pt,
config.yaml) and model.pretrained_path. A truncated or corrupted file, an empty one, a directory, one of another
model or dataset: each is one line and exit code 2, before Ray starts (read_checkpoint's own cases are in
test_safe_loading.py)."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_job, write_job

import raydist.train.driver
from raydist import config as C
from raydist.cli import main
from raydist.models import create_model, save_checkpoint
from raydist.models.checkpoint import CheckpointError, check_fits, read_checkpoint


@pytest.fixture
def no_ray(monkeypatch):
    import ray

    def refuse(*args, **kwargs):
        raise AssertionError("Ray was started")

    monkeypatch.setattr(ray, "init", refuse)
    monkeypatch.setattr(raydist.train.driver, "ensure_ray", refuse)


def _model(name="resnet18", **kw):
    return create_model(name, **{"num_classes": 10, "width": 4, "in_channels": 1, **kw})


def _one_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("raydist: error: ") and err.count("\n") == 1, err
    return err


def _damaged(tmp_path):
    """Checkpoints that unpickle fine but whose weights do not fit the model their spec names."""
    model = _model()
    state = model.state_dict()
    cases = {}
    for name, change in {"dropped": lambda s: s.pop("net.fc.weight"),
                         "reshaped": lambda s: s.__setitem__("net.conv1.weight", torch.zeros(3, 3)),
                         "foreign": lambda s: s.__setitem__("net.extra", torch.zeros(1))}.items():
        s = dict(state)
        change(s)
        path = tmp_path / f"{name}.pt"
        torch.save({"format": "raydist/1", "model": dict(model.spec), "state_dict": s, "epsilon": 0.1, "epoch": 1,
                    "dataset": "digits", "train_state": {"epoch": 1}}, path)
        cases[name] = path
    other = _model("preact_resnet18")
    path = tmp_path / "mixed.pt"  # a spec from one model, weights from another
    torch.save({"format": "raydist/1", "model": dict(model.spec), "state_dict": other.state_dict(), "epoch": 1,
                "epsilon": 0.1}, path)
    cases["mixed"] = path
    return cases


def test_check_fits_names_what_does_not_fit(tmp_path):
    good = save_checkpoint(tmp_path / "good.pt", _model(), epoch=1, epsilon=0.1)
    check_fits(read_checkpoint(good), good)
    for name, path in _damaged(tmp_path).items():
        with pytest.raises(CheckpointError) as info:
            check_fits(read_checkpoint(path), path)
        msg = str(info.value)
        assert str(path) in msg and "do not fit its model (resnet18" in msg and "\n" not in msg, (name, msg)
        assert {"dropped": "missing [net.fc.weight]", "reshaped": "net.conv1.weight (3, 3) vs (4, 1, 3, 3)",
                "foreign": "unexpected [net.extra]", "mixed": "missing"}[name] in msg, msg


def test_eval_refuses_broken_checkpoints_before_ray(tmp_path, capsys, no_ray):
    good = save_checkpoint(tmp_path / "good.pt", _model(), epoch=1, epsilon=0.1, dataset="digits")
    data = good.read_bytes()
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 3])
    (tmp_path / "dir.pt").mkdir()
    flipped = bytearray(data)
    flipped[len(data) // 2: len(data) // 2 + 64] = b"\xff" * 64
    (tmp_path / "flipped.pt").write_bytes(bytes(flipped))
    cases = {**{n: tmp_path / f"{n}.pt" for n in ("empty", "cut", "dir")}, **_damaged(tmp_path)}
    for name, path in cases.items():
        for eps in ([], ["--eps", "0.1"]):  # epsilon read from the file, or given
            assert main(["eval", str(path), "--attacks", "clean", "--out", str(tmp_path / "ev"), *eps]) == 2, name
            assert str(path) in _one_line(capsys), name
    # a few flipped bytes in the middle of the tensors' data need not be detectable, but never a traceback
    code = main(["eval", str(good), str(tmp_path / "flipped.pt"), "--attacks", "clean", "--eps", "0.1",
                 "--out", str(tmp_path / "ev")])
    assert code in (1, 2) and not (tmp_path / "ev").exists()


def _run_with(tmp_path, last, *, config=None):
    job = tiny_job(tmp_path)
    path = write_job(tmp_path, job)
    run_dir = tmp_path / "runs" / "t"
    run_dir.mkdir(parents=True, exist_ok=True)
    text = config if config is not None else C.dump(C.load_job(path))
    (run_dir / "config.yaml").write_bytes(text if isinstance(text, bytes) else text.encode())
    if last is not None:
        last(run_dir / "last.pt")
    return path, run_dir


def _last(model, **fields):
    def write(path):
        save_checkpoint(path, model, epoch=1, epsilon=32 / 255, train_state={"epoch": 1},
                        **{"dataset": "digits", "method": "fgsm_sdi", **fields})
    return write


@pytest.mark.parametrize("case, needle", [
    ("other_model", "is from another run (model.name 'preact_resnet18', not 'resnet18'"),
    ("other_dataset", "data.dataset 'cifar10', not 'digits'"),
    ("other_width", "model builder arguments {'width': 4}, not {'width': 8}"),
    ("damaged", "do not fit its model"),
    ("empty", "is empty"),
    ("directory", "is a directory"),
    ("binary_config", "not a text file"),
    ("list_config", "must be a mapping"),
    ("broken_best", "best.pt"),
])
def test_resume_refuses_a_last_pt_of_another_run(tmp_path, capsys, no_ray, case, needle):
    good = _model(width=8, in_channels=3)
    setups = {
        "other_model": dict(last=_last(_model("preact_resnet18", width=8, in_channels=3))),
        "other_dataset": dict(last=_last(good, dataset="cifar10")),
        "other_width": dict(last=_last(_model(width=4, in_channels=3))),
        "damaged": dict(last=lambda p: _damaged(p.parent)["dropped"].rename(p)),
        "empty": dict(last=lambda p: p.write_bytes(b"")),
        "directory": dict(last=lambda p: p.mkdir()),
        "binary_config": dict(last=_last(good), config=b"\x00\xff\xfe"),
        "list_config": dict(last=_last(good), config="[1, 2]\n"),
        "broken_best": dict(last=lambda p: (_last(good)(p), (p.parent / "best.pt").write_bytes(b"\x80\x02trunc"))),
    }
    path, _ = _run_with(tmp_path, **setups[case])
    assert main(["train", str(path), "--resume"]) == 2
    err = _one_line(capsys)
    assert needle in err, err


@pytest.mark.parametrize("case, needle", [
    ("empty", "is empty"), ("directory", "is a directory"), ("truncated", "corrupted"),
    ("missing", "not found"), ("other_model", "do not fit model 'resnet18'"), ("not_weights", "hold no state_dict"),
    ("other_width", "shape (file vs model)"),
])
def test_pretrained_path_is_checked_before_ray(tmp_path, capsys, no_ray, case, needle):
    weights = tmp_path / "w.pt"
    same = save_checkpoint(tmp_path / "same.pt", _model(width=8, num_classes=100, in_channels=3))
    setup = {
        "empty": lambda: weights.write_bytes(b""),
        "directory": lambda: weights.mkdir(),
        "truncated": lambda: weights.write_bytes(same.read_bytes()[:5000]),
        "missing": lambda: None,
        "other_model": lambda: torch.save(_model("preact_resnet18", width=8).state_dict(), weights),
        "not_weights": lambda: torch.save({"epoch": 3}, weights),
        "other_width": lambda: torch.save(_model(width=4).net.state_dict(), weights),
    }[case]
    setup()
    job = tiny_job(tmp_path, model={"pretrained_path": str(weights)})
    assert main(["train", str(write_job(tmp_path, job))]) == 2
    err = _one_line(capsys)
    assert "model.pretrained_path" in err and needle in err and str(weights) in err, err
    assert not (tmp_path / "runs").exists()


def test_pretrained_weights_of_the_same_model_pass_whatever_the_head(tmp_path, capsys):
    """Weights of the job's model trained on another number of classes (or input channels) load into the
    backbone: the check leaves the shapes that depend on the dataset to the loader."""
    same = save_checkpoint(tmp_path / "same.pt", _model(width=8, num_classes=100, in_channels=3))
    torch.save(_model(width=8, in_channels=3).net.state_dict(), tmp_path / "backbone.pth")
    for weights in (same, tmp_path / "backbone.pth"):
        job = tiny_job(tmp_path, model={"pretrained_path": str(weights)})
        assert main(["check", str(write_job(tmp_path, job))]) == 0, capsys.readouterr().err
        assert f"pretrained_path: {weights}" in capsys.readouterr().out
