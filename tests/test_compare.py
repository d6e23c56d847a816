"""`raydist compare`: compare-file errors, a two-method comparison end to end, reuse, and refusals."""

from __future__ import annotations

import hashlib
import json
import re

import pytest
import yaml
from conftest import tiny_job, write_job

from raydist.cli import main
from raydist.compare.report import column_order, overfitting
from raydist.compare.spec import load_compare
from raydist.config import ConfigError


def _compare(tmp_path, **changes) -> dict:
    cmp = {
        "base": "base.yaml",
        "methods": [{"name": "fgsm_rs", "alpha": "40/255"}, {"name": "fgsm_sdi", "k": 5, "generator_width": 8}],
        "eval": {"attacks": ["clean", "pgd10", "apgd-ce"], "samples": 48, "shard_size": 24, "workers": 2,
                 "budgets": {"apgd-ce": {"n_iter": 3}}},
        "run": {"name": "cmp", "output_dir": str(tmp_path / "out")},
        "max_concurrent": 2,
    }
    cmp.update(changes)
    return cmp


def _write(tmp_path, cmp: dict, base: dict | None = None) -> str:
    write_job(tmp_path, base or tiny_job(tmp_path, optim={"epochs": 1}, eval={"val_steps": 2}), "base.yaml")
    path = tmp_path / "cmp.yaml"
    path.write_text(yaml.safe_dump(cmp))
    return str(path)


@pytest.mark.parametrize("change, named", [
    ({"methds": ["pgd_at"]}, "methds"),
    ({"methods": ["pgd_at", "fgsm_xx"]}, "methods[1].name"),
    ({"methods": [{"name": "pgd_at", "k": 3}]}, "method.k"),
    ({"methods": [{"name": "pgd_at", "stepz": 3}]}, "methods[0].stepz"),
    ({"methods": [{"name": "pgd_at", "steps": 0}]}, "method.steps"),
    ({"methods": [{"name": "fgsm_rs", "epsilon": "8/255"}]}, "methods[0].epsilon"),
    ({"methods": ["fgsm_rs", {"name": "fgsm_rs", "alpha": 0.1}]}, "methods[1]"),
    ({"methods": []}, "methods"),
    ({"methods": [{"name": "pgd_at", "set": {"optim.lrr": 0.1}}]}, "optim.lrr"),
    ({"overrides": {"optim.epochs": 0}}, "optim.epochs"),
    ({"overrides": {"optimepochs": 3}}, "optimepochs"),
    ({"overrides": {"method.name": "pgd_at"}}, "method.name"),
    ({"eval": {"attacks": ["clean", "pgdx"]}}, "pgdx"),
    ({"eval": {"attacks": ["pgd10"], "budgets": {"aa": {"n_iter": 3}}}}, "eval.budgets.aa"),
    ({"eval": {"attacks": ["aa"], "budgets": {"aa": {"n_iters": 3}}}}, "n_iters"),
    ({"eval": {"attacks": ["pgd10"], "workerz": 2}}, "eval.workerz"),
    ({"eval": {"samples": 0}}, "eval.samples"),
    ({"max_concurrent": 0}, "max_concurrent"),
    ({"base": "missing.yaml"}, "missing.yaml"),
])
def test_bad_compare_file_exits_2_naming_the_key(tmp_path, capsys, change, named):
    path = _write(tmp_path, _compare(tmp_path, **change))
    assert main(["compare", path]) == 2
    err = capsys.readouterr().err
    assert err.startswith("raydist: error:") and named in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_bad_set_and_unknown_file(tmp_path, capsys):
    path = _write(tmp_path, _compare(tmp_path))
    assert main(["compare", path, "--set", "method.kk=3"]) == 2
    assert "method.kk" in capsys.readouterr().err
    assert main(["compare", path, "--set", "method.k=3"]) == 2  # --set reaches every run; fgsm_rs takes no k
    assert "methods[0] (FGSM-RS): method.k" in capsys.readouterr().err
    assert main(["compare", str(tmp_path / "nope.yaml")]) == 2
    assert "nope.yaml" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_method_jobs_replace_the_method_section(tmp_path):
    base = tiny_job(tmp_path, method={"name": "fgsm_sdi", "epsilon": "16/255", "k": 7, "label_smoothing": 0.1})
    path = _write(tmp_path, _compare(tmp_path, methods=["fgsm_sdi", {"name": "pgd_at", "steps": 3},
                                                        {"name": "fgsm_sdi", "label": "SDI k=2", "k": 2}],
                                     overrides={"optim.lr": 0.07}), base)
    spec = load_compare(path, ["optim.epochs=3"])
    sdi, pgd, sdi2 = (r["job"] for r in spec["runs"])
    assert [r["slug"] for r in spec["runs"]] == ["fgsm_sdi", "pgd_at", "sdi_k_2"]
    assert sdi["method"]["k"] == 7 and sdi["method"]["label_smoothing"] == 0.1  # the base job's own method
    assert pgd["method"] == {"name": "pgd_at", "epsilon": 16 / 255, "label_smoothing": 0.0, "steps": 3,
                             "alpha": None, "random_start": True}
    assert sdi2["method"]["k"] == 2
    assert all(j["optim"]["lr"] == 0.07 and j["optim"]["epochs"] == 3 for j in (sdi, pgd, sdi2))
    assert spec["eval"]["eps"] == 16 / 255 and spec["eval"]["attacks"][0] == "clean"
    assert column_order(["aa", "apgd-ce", "cw20", "pgd50", "pgd10", "clean"]) == [
        "clean", "pgd10", "pgd50", "cw20", "apgd-ce", "aa"]


def test_overfitting_is_read_off_the_validation_curve():
    rows = [{"epoch": e, "val_pgd_acc": a} for e, a in enumerate([0.2, 0.4, 0.5, 0.45, 0.05, 0.02], 1)]
    co = overfitting(rows)
    assert co["peak_epoch"] == 3 and co["collapse_epoch"] == 5 and co["last"] == 0.02
    assert overfitting([{"epoch": e, "val_pgd_acc": a} for e, a in enumerate([0.2, 0.4, 0.5, 0.45], 1)]) is None


def _table(md: str) -> tuple[list[str], list[list[str]]]:
    lines = [ln for ln in md.splitlines() if ln.startswith("|")]
    split = [[c.strip() for c in ln.strip("|").split("|")] for ln in lines]
    return split[0], split[2:]


@pytest.mark.usefixtures("ray_session")
def test_compare_two_methods_then_reuse_and_refuse(tmp_path, capsys):
    path = _write(tmp_path, _compare(tmp_path))
    assert main(["compare", path]) == 0
    out = capsys.readouterr().out
    d = tmp_path / "out" / "cmp"
    for name in ("compare.md", "compare.json", "val_pgd.png", "compare.yaml"):
        assert (d / name).is_file() and (d / name).stat().st_size > 0, name
    assert "FGSM-RS finished" in out and "FGSM-SDI finished" in out

    head, rows = _table((d / "compare.md").read_text())
    assert head == ["Method", "Checkpoint", "Epoch", "Clean", "PGD-10", "APGD", "Train time (min)"]
    assert [r[:2] for r in rows] == [["FGSM-RS", "best"], ["FGSM-RS", "last"], ["FGSM-SDI", "best"],
                                     ["FGSM-SDI", "last"]]
    for r in rows:
        clean, pgd, apgd = (float(x) for x in r[3:6])
        assert all(0 <= v <= 100 for v in (clean, pgd, apgd)) and clean >= pgd and clean >= apgd
        assert float(r[6]) > 0

    data = json.loads((d / "compare.json").read_text())
    assert data["columns"] == ["Clean", "PGD-10", "APGD"] and data["epsilon"] == pytest.approx(32 / 255)
    rs, sdi = data["runs"]
    assert rs["method"] == "fgsm_rs" and sdi["method"] == "fgsm_sdi"
    assert rs["best"]["n"] == 48 and set(rs["best"]["accuracy"]) == {"clean", "pgd10", "apgd-ce"}
    assert len(rs["val_curve"]) == 1 and rs["train_minutes"] > 0
    for r in (rs, sdi):  # every row names its weights
        for which in ("best", "last"):
            weights = d / "runs" / r["run_dir"].split("/")[-1] / f"{which}.pt"
            assert r[which]["sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    # both runs were launched before either finished (2 CPUs, 1 per run, max_concurrent 2)
    assert max(rs["started_at"], sdi["started_at"]) < min(rs["finished_at"], sdi["finished_at"])

    last = {r["label"]: (d / "runs" / r["run_dir"].split("/")[-1] / "last.pt").stat().st_mtime_ns
            for r in data["runs"]}
    assert main(["compare", path]) == 0  # everything reused: no training, no evaluation
    out = capsys.readouterr().out
    assert "reusing FGSM-RS" in out and "reusing FGSM-SDI" in out and "reusing the evaluation" in out
    assert "training 2 run(s)" not in out and "evaluating best and last" not in out
    assert _table((d / "compare.md").read_text())[1] == rows
    assert {lab: (d / "runs" / lab.lower().replace("-", "_") / "last.pt").stat().st_mtime_ns
            for lab in last} == last

    assert main(["compare", path, "--set", "optim.epochs=2"]) == 2  # a changed config is never retrained silently
    err = capsys.readouterr().err
    assert re.search(r"FGSM-RS: run .* another config: optim\.epochs \(1 -> 2\)", err) and "--overwrite" in err
    assert (d / "runs" / "fgsm_rs" / "last.pt").stat().st_mtime_ns == last["FGSM-RS"]


def test_plan_reuses_finished_runs_and_refuses_to_replace_others(tmp_path):
    from raydist.compare.runner import plan_runs
    from raydist.config import dump
    from raydist.train.driver import run_dir_of

    path = _write(tmp_path, _compare(tmp_path, methods=["fgsm_rs", {"name": "free_at", "m": 2}],
                                     overrides={"optim.epochs": 3}))
    spec = load_compare(path)
    assert plan_runs(spec, overwrite=False, resume=False) == ["train", "train"]
    for r, epochs in zip(spec["runs"], (3, 2)):  # free_at with m=2 runs ceil(3/2) epochs
        d = run_dir_of(r["job"])
        d.mkdir(parents=True)
        (d / "config.yaml").write_text(dump(r["job"]))
        (d / "metrics.jsonl").write_text("".join(json.dumps({"epoch": e, "stopped": False}) + "\n"
                                                 for e in range(1, epochs + 1)))
        (d / "last.pt").write_bytes(b"x")
        (d / "best.pt").write_bytes(b"x")
    assert plan_runs(spec, overwrite=False, resume=False) == ["reuse", "reuse"]

    rs = run_dir_of(spec["runs"][0]["job"])
    (rs / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "stopped": False}) + "\n")
    with pytest.raises(ConfigError, match=r"FGSM-RS: .* stopped at epoch 1/3 \(--resume"):
        plan_runs(spec, overwrite=False, resume=False)
    assert plan_runs(spec, overwrite=False, resume=True) == ["resume", "reuse"]
    assert plan_runs(spec, overwrite=True, resume=False) == ["retrain", "reuse"]
    with pytest.raises(ConfigError, match="exclude each other"):
        plan_runs(spec, overwrite=True, resume=True)

    changed = load_compare(path, ["optim.lr=0.2"])
    with pytest.raises(ConfigError, match=r"another config: optim\.lr \(0\.05 -> 0\.2\)"):
        plan_runs(changed, overwrite=False, resume=True)
    assert plan_runs(changed, overwrite=True, resume=False) == ["retrain", "retrain"]
