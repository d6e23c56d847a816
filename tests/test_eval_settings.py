"""`raydist eval` cannot mix settings: a resume that differs in anything that changes a number is refused, the
summary counts every requested sample exactly once, reports name their weights by sha256, and an attack that
leaves its threat model stops the evaluation."""

from __future__ import annotations

import hashlib
import json
import shutil

import pyarrow.parquet as pq
import pytest
import torch

from raydist.attacks import ATTACKS
from raydist.cli import main
from raydist.models import create_model, model_spec_for, save_checkpoint


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """Two untrained width-8 ResNet-18 checkpoints with different weights (the numbers do not matter here)."""
    d = tmp_path_factory.mktemp("ck")
    spec = model_spec_for("resnet18", 10, "relu", 3, [3, 32, 32], [0.5] * 3, [0.25] * 3, width=8)
    for seed, name in ((0, "a.pt"), (1, "b.pt")):
        torch.manual_seed(seed)
        model = create_model("resnet18", num_classes=10, width=8, mean=[0.5] * 3, std=[0.25] * 3)
        save_checkpoint(d / name, model, model_spec=spec, epsilon=8 / 255, data={"dataset": "digits"}, epoch=1)
    return d


@pytest.fixture(scope="module")
def evaluated(ckpts, tmp_path_factory, ray_session):
    """One small finished evaluation of a.pt and b.pt (clean, pgd2, an eps sweep point)."""
    out = tmp_path_factory.mktemp("ev") / "eval"
    args = ["eval", str(ckpts / "a.pt"), str(ckpts / "b.pt"), "--attacks", "clean,pgd2", "--samples", "32",
            "--shard-size", "16", "--batch-size", "16", "--workers", "1", "--eps-sweep", "4/255", "--out", str(out)]
    assert main(args) == 0
    return out, args


def test_settings_record_everything_that_changes_a_number(evaluated, ckpts):
    out, _ = evaluated
    s = json.loads((out / "parts" / "settings.json").read_text())
    assert s["samples"] == 32 and s["shard_size"] == 16 and s["batch_size"] == 16 and s["seed"] == 0
    assert s["attacks"] == ["clean", "pgd2"] and s["eps_sweep"] == [4 / 255] and s["epsilon"] == 8 / 255
    assert s["budgets"] == {} and s["precision"] == "fp32" and s["dataset"] == "digits"
    assert [c["sha256"] for c in s["checkpoints"]] == [_sha(ckpts / "a.pt"), _sha(ckpts / "b.pt")]


@pytest.mark.parametrize("change, named", [
    (["--shard-size", "8"], "--shard-size 16"),
    (["--samples", "48"], "--samples 32"),
    (["--batch-size", "8"], "--batch-size 16"),
    (["--eps", "4/255"], "--eps 8/255"),
    (["--eps-sweep", "2/255"], "--eps-sweep 4/255"),
    (["--attacks", "clean,pgd3"], "--attacks clean,pgd2"),
    (["--seed", "1"], "--seed 0"),
])
def test_resume_with_another_setting_is_refused_naming_it(evaluated, capsys, change, named):
    out, args = evaluated
    before = {p.name: p.stat().st_mtime_ns for p in (out / "parts").iterdir()}
    assert main([*args, "--resume", *change]) == 2
    err = capsys.readouterr().err.strip()
    assert named in err and len(err.splitlines()) == 1, err
    assert {p.name: p.stat().st_mtime_ns for p in (out / "parts").iterdir()} == before


def test_resume_with_checkpoints_swapped_or_changed_is_refused(evaluated, ckpts, tmp_path, capsys):
    out, args = evaluated
    swapped = [a if a not in (str(ckpts / "a.pt"), str(ckpts / "b.pt")) else
               str(ckpts / ("b.pt" if a.endswith("a.pt") else "a.pt")) for a in args]
    assert main([*swapped, "--resume"]) == 2
    err = capsys.readouterr().err
    assert "checkpoint 0" in err and "b.pt" in err and _sha(ckpts / "b.pt")[:12] in err
    # the same file name with other weights (retrained in place)
    other = tmp_path / "a.pt"
    shutil.copy(ckpts / "b.pt", other)
    assert main([*(str(other) if a == str(ckpts / "a.pt") else a for a in args), "--resume"]) == 2
    assert "checkpoint 0" in capsys.readouterr().err


def test_summary_refuses_double_counted_or_missing_samples(evaluated, tmp_path, capsys):
    out, args = evaluated
    copy = tmp_path / "eval"
    shutil.copytree(out, copy)
    args = [copy.as_posix() if a == str(out) else a for a in args]
    parts = copy / "parts"
    first, second = sorted(parts.glob("c0_pgd2_8-255_*.parquet"))
    shutil.copy(first, second)  # samples 0-15 twice, 16-31 never
    assert main([*args, "--resume"]) == 1
    err = capsys.readouterr().err
    assert "checkpoint 0 under pgd2" in err and "16 counted twice" in err and "refusing" in err
    assert len([ln for ln in err.splitlines() if ln.startswith("raydist:")]) == 1  # one line, no traceback


def test_reports_name_their_weights(evaluated, ckpts):
    out, _ = evaluated
    rep = json.loads((out / "report.json").read_text())
    assert [r["sha256"] for r in rep["rows"]] == [_sha(ckpts / "a.pt"), _sha(ckpts / "b.pt")]
    samples = pq.read_table(out / "samples.parquet").to_pandas()
    assert len(samples) == 2 * 3 * 32 and not samples.duplicated(["checkpoint", "attack", "eps", "index"]).any()


# -- item 5: adversarials are checked where they are counted ------------------------------------------------
def _too_far(model, x, y, eps, seed=None, **kw):
    return (x + 2 * eps).clamp(0, 1)  # outside the eps-ball wherever there is room to move


def _off_the_box(model, x, y, eps, seed=None, **kw):
    return x - eps  # in the eps-ball, but below 0 where a pixel is dark


def _nan(model, x, y, eps, seed=None, **kw):
    return x + float("nan")


@pytest.mark.parametrize("attack, says", [(_too_far, "L-inf distance"), (_off_the_box, "must be in [0, 1]"),
                                          (_nan, "nan")])
def test_an_attack_outside_its_threat_model_stops_the_evaluation(ckpts, monkeypatch, attack, says):
    from raydist.evaluate.actors import EvalWorker, ThreatModelError

    monkeypatch.setitem(ATTACKS, "broken", attack)
    from raydist.data import load_dataset

    splits = load_dataset("digits")
    worker = EvalWorker({"x": splits.test_x[:16].numpy(), "y": splits.test_y[:16].numpy()}, use_gpu=False, threads=1)
    blob = [(ckpts / "a.pt").read_bytes()]
    with pytest.raises(ThreatModelError, match="broken returned an adversarial example outside") as err:
        worker.evaluate(str(ckpts / "a.pt"), blob, "broken", 0, 16, 8 / 255, 16, 0)
    assert says in str(err.value)
    ok = worker.evaluate(str(ckpts / "a.pt"), blob, "pgd2", 0, 16, 8 / 255, 16, 0)  # an honest attack passes
    assert (ok["linf"] <= 8 / 255 + 1e-6).all() and ok["linf"].max() > 0
