"""`raydist eval`: a pool of Ray evaluation actors, per-sample parquet, resume, a killed actor, sanity flags."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import pyarrow.parquet as pq
import pytest
import torch

from raydist.cli import main
from raydist.data import DeviceLoader, load_dataset
from raydist.evaluate.runner import sanity_flags
from raydist.methods import create_method
from raydist.models import create_model, model_spec_for, save_checkpoint

EPS = 32 / 255


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A width-8 ResNet-18 trained for one FGSM-RS epoch on digits, saved as raydist checkpoints."""
    torch.manual_seed(0)
    splits = load_dataset("digits")
    model = create_model("resnet18", num_classes=10, width=8, mean=splits.mean, std=splits.std)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    method = create_method("fgsm_rs", model, opt, epsilon=EPS)
    for x, y in DeviceLoader(splits.train_x, splits.train_y, batch_size=64):
        method.step(x, y)
    spec = model_spec_for("resnet18", 10, "relu", 3, [3, 32, 32], list(splits.mean), list(splits.std), width=8)
    d = tmp_path_factory.mktemp("ckpt")
    for name in ("best.pt", "last.pt"):
        save_checkpoint(d / name, model, model_spec=spec, epsilon=EPS, method="fgsm_rs", dataset="digits",
                        data={"dataset": "digits"}, epoch=1)
    return d


def test_sanity_flags():
    assert "label leaking" in " ".join(sanity_flags(0.8, {"fgsm": 0.9, "pgd10": 0.5}, {}))
    assert "gradient masking" in " ".join(sanity_flags(0.9, {"fgsm": 0.3, "pgd10": 0.6}, {}))
    assert "gradient masking" in " ".join(sanity_flags(0.9, {"pgd10": 0.5, "square": 0.2}, {}))
    assert "gradient masking" in " ".join(sanity_flags(0.9, {}, {2 / 255: 0.5, 8 / 255: 0.7}))
    assert sanity_flags(0.9, {"fgsm": 0.6, "pgd10": 0.5, "square": 0.55}, {2 / 255: 0.7, 8 / 255: 0.5}) == []


def test_bad_input_exits_2(tmp_path, checkpoint, capsys):
    assert main(["eval", str(tmp_path / "missing.pt")]) == 2
    assert "missing.pt" in capsys.readouterr().err
    assert main(["eval", str(checkpoint / "best.pt"), "--attacks", "clean,pgdx", "--out", str(tmp_path / "o")]) == 2
    assert "pgdx" in capsys.readouterr().err
    (tmp_path / "junk.pt").write_bytes(b"junk")
    assert main(["eval", str(tmp_path / "junk.pt")]) == 2
    assert "junk.pt" in capsys.readouterr().err
    (tmp_path / "o2").mkdir()
    (tmp_path / "o2" / "report.md").write_text("mine")
    assert main(["eval", str(checkpoint / "best.pt"), "--out", str(tmp_path / "o2")]) == 2
    assert (tmp_path / "o2" / "report.md").read_text() == "mine"
    assert not (tmp_path / "o").exists()


@pytest.mark.usefixtures("ray_session")
def test_eval_report_samples_resume_and_a_killed_actor(tmp_path, checkpoint, capsys):
    import ray
    from ray.util.state import list_actors

    out = tmp_path / "eval"
    args = ["eval", str(checkpoint / "best.pt"), str(checkpoint / "last.pt"), "--attacks", "clean,fgsm,pgd10",
            "--samples", "96", "--shard-size", "16", "--workers", "2", "--eps-sweep", "8/255,32/255",
            "--out", str(out)]
    killed = []
    gcs = ray.get_runtime_context().gcs_address  # this session's Ray, whatever else runs on the host

    def kill_one_actor():  # once shards are landing, kill a busy evaluation actor's process
        deadline = time.time() + 240
        while time.time() < deadline and not killed:
            if list((out / "parts").glob("*.parquet")):  # this session's actors (not another Ray's on the host)
                alive = list_actors(address=gcs, filters=[("class_name", "=", "EvalWorker"), ("state", "=", "ALIVE")])
                if alive:
                    os.kill(alive[0].pid, signal.SIGKILL)
                    killed.append(alive[0].pid)
                    return
            time.sleep(0.05)

    errors = []

    def guarded():
        try:
            kill_one_actor()
        except Exception as err:  # noqa: BLE001 - reported by the assertion below
            errors.append(repr(err))

    t = threading.Thread(target=guarded, daemon=True)
    t.start()
    assert main(args) == 0
    t.join(timeout=5)
    printed = capsys.readouterr()
    assert killed, f"no actor was killed {errors}"
    assert "redone on another" in printed.err + printed.out

    report = json.loads((out / "report.json").read_text())
    assert len(report["rows"]) == 2
    samples = pq.read_table(out / "samples.parquet").to_pandas()
    # 2 checkpoints x (3 attacks + the eps-sweep point 8/255 at PGD-20 + 32/255 at PGD-20) x 96 samples
    assert len(samples) == 2 * 5 * 96
    assert not samples.duplicated(["checkpoint", "attack", "eps", "index"]).any()
    for row in report["rows"]:
        acc = row["accuracy"]
        assert acc["pgd10"] <= acc["clean"] and row["n"] == 96
        assert [p["eps"] for p in row["eps_curve"]] == [8 / 255, 32 / 255]
        assert row["eps_curve"][0]["accuracy"] >= row["eps_curve"][1]["accuracy"]
    assert report["rows"][0]["accuracy"] == report["rows"][1]["accuracy"]  # same weights, same seeds
    text = (out / "report.md").read_text()
    assert "| Clean | FGSM | PGD-10 |" in text and (out / "eps_curve.png").is_file()

    # resume: lose two shards, finish only those
    parts = sorted((out / "parts").glob("*.parquet"))
    mtimes = {p.name: p.stat().st_mtime for p in parts}
    for p in parts[:2]:
        p.unlink()
    assert main([*args, "--resume"]) == 0
    assert f"{len(parts) - 2} already done" in capsys.readouterr().out
    after = sorted((out / "parts").glob("*.parquet"))
    assert len(after) == len(parts)
    for p in after[2:]:
        assert p.stat().st_mtime == mtimes[p.name]
    assert json.loads((out / "report.json").read_text())["rows"] == report["rows"]
    # every actor is gone at the end, the replacement of the killed one included
    left = list_actors(address=gcs, filters=[("class_name", "=", "EvalWorker"), ("state", "=", "ALIVE")])
    assert left == []
    ray.get([])  # the session's Ray is still usable


@pytest.mark.usefixtures("ray_session")
def test_actors_need_neither_the_checkpoint_files_nor_the_dataset_on_their_node(tmp_path, checkpoint, monkeypatch):
    """No shared filesystem: the driver puts each checkpoint's bytes and the test split into the object store;
    the actors never open a path of the driver's. Here the checkpoint's directory disappears as soon as its
    bytes are in the object store, before any actor starts, and the evaluation still finishes."""
    import shutil

    import ray

    from raydist.evaluate import runner
    from raydist.evaluate.actors import EvalWorker

    mine = tmp_path / "ckpts"
    shutil.copytree(checkpoint, mine)
    put = ray.put

    def put_then_lose(value, *args, **kwargs):
        ref = put(value, *args, **kwargs)
        if isinstance(value, bytes) and mine.exists():
            mine.rename(tmp_path / "gone")  # the driver's file is no longer where its path says
        return ref

    monkeypatch.setattr(ray, "put", put_then_lose)
    report = runner.run_evaluation([str(mine / "best.pt")], ["clean", "fgsm"], EPS, tmp_path / "eval", workers=1,
                                   shard_size=24, samples=48)
    assert not mine.exists() and report["rows"][0]["n"] == 48

    # the same numbers as the actor class computes from the file itself
    splits = load_dataset("digits")
    worker = EvalWorker({"x": splits.test_x[:48].numpy(), "y": splits.test_y[:48].numpy()}, use_gpu=False)
    blob = (tmp_path / "gone" / "best.pt").read_bytes()
    direct = worker.evaluate("nowhere/best.pt", [blob], "fgsm", 0, 48, EPS, 48, seed=0)
    assert report["rows"][0]["accuracy"]["fgsm"] == pytest.approx(direct["robust"].mean())


@pytest.fixture(scope="module")
def trained_checkpoint(tmp_path_factory):
    """Four epochs of standard training: a model that is right on most digits and that PGD at 8/255 moves
    (the one-epoch FGSM-RS fixture above can end near chance, where no attack has anything to break)."""
    torch.manual_seed(0)
    splits = load_dataset("digits")
    model = create_model("resnet18", num_classes=10, width=8, mean=splits.mean, std=splits.std)
    method = create_method("standard", model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), epsilon=0)
    loader = DeviceLoader(splits.train_x, splits.train_y, batch_size=64, shuffle=True, augment={"crop": 2})
    for epoch in range(4):
        loader.set_epoch(epoch)
        for x, y in loader:
            method.step(x, y)
    spec = model_spec_for("resnet18", 10, "relu", 3, [3, 32, 32], list(splits.mean), list(splits.std), width=8)
    path = tmp_path_factory.mktemp("trained") / "best.pt"
    save_checkpoint(path, model, model_spec=spec, epsilon=8 / 255, method="standard", dataset="digits",
                    data={"dataset": "digits"}, epoch=4)
    return path


def test_bf16_attacks_are_judged_in_fp32_and_match_fp32_ones(trained_checkpoint):
    """--precision bf16 runs the attack's passes in bf16 autocast; on this model it finds the same robust
    accuracy as fp32 within a few points (docs/evaluation.md has the per-sample comparison at full size)."""
    from raydist.evaluate.actors import EvalWorker

    splits = load_dataset("digits")
    worker = EvalWorker({"x": splits.test_x.numpy(), "y": splits.test_y.numpy()}, use_gpu=False, threads=1)
    blob = [trained_checkpoint.read_bytes()]
    out = {p: worker.evaluate(str(trained_checkpoint), blob, "pgd10", 0, 128, 8 / 255, 64, 0, None, p)
           for p in ("fp32", "bf16")}
    assert (out["fp32"]["clean_pred"] == out["bf16"]["clean_pred"]).all()  # the clean judgement is fp32
    clean = float((out["fp32"]["clean_pred"] == out["fp32"]["label"]).mean())
    acc = {p: float(o["robust"].mean()) for p, o in out.items()}
    assert clean > 0.6 and acc["fp32"] < clean - 0.1, (clean, acc)  # the attack has something to break
    assert abs(acc["bf16"] - acc["fp32"]) <= 0.05, acc


def test_resume_refuses_other_precision_or_seed(tmp_path, checkpoint, capsys):
    out = tmp_path / "ev"
    (out / "parts").mkdir(parents=True)
    (out / "parts" / "settings.json").write_text(json.dumps({"seed": 0, "precision": "fp32"}))
    base = ["eval", str(checkpoint / "best.pt"), "--out", str(out), "--resume"]
    assert main([*base, "--precision", "bf16"]) == 2
    assert "--precision fp32" in capsys.readouterr().err
    assert main([*base, "--seed", "3"]) == 2
    assert "--seed 0" in capsys.readouterr().err


def test_report_says_when_attacks_ran_in_bf16():
    from raydist.evaluate.runner import format_report

    row = {"checkpoint": "r/best.pt", "n": 8, "accuracy": {"clean": 0.9, "pgd10": 0.5}, "flags": [], "eps_curve": []}
    text = format_report({"epsilon": 8 / 255, "attacks": ["clean", "pgd10"], "precision": "bf16", "rows": [row]})
    assert "bf16" in text.splitlines()[0]
    assert "bf16" not in format_report({"epsilon": 8 / 255, "attacks": ["clean"], "rows": [row]}).splitlines()[0]
