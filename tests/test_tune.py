"""`raydist tune`: sweep validation, a real Ray Tune + Optuna sweep on digits, ASHA, failures, resume, best.yaml."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml
from conftest import ROOT, tiny_job, write_job

from raydist import config as C
from raydist.cli import main
from raydist.tune.sweep import load_sweep


def _sweep(tmp_path, **extra) -> dict:
    job = tiny_job(tmp_path, model={"width": 4}, method={"generator_width": 4},
                   optim={"epochs": 3}, eval={"val_steps": 2})
    write_job(tmp_path, job, "base.yaml")
    sweep = {
        "base": "base.yaml",
        "space": {"method.k": {"type": "int", "low": 1, "high": 40},
                  "optim.lr": {"type": "loguniform", "low": 0.01, "high": 0.2}},
        "search": {"seed": 0},
        "scheduler": {"grace_period": 1, "reduction_factor": 2},
        "budget": {"num_trials": 4, "max_concurrent_trials": 2},
        "run": {"name": "sw", "output_dir": str(tmp_path / "sweeps")},
    }
    for key, value in extra.items():
        sweep[key] = value
    return sweep


def _write(tmp_path, sweep, name="sweep.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(sweep, sort_keys=False))
    return path


def _trials(tmp_path):
    with open(tmp_path / "sweeps" / "sw" / "trials.csv") as f:
        return list(csv.DictReader(f))


def test_shipped_sweep_files_validate():
    for path in sorted((ROOT / "jobs").glob("tune_*.yaml")):
        sweep = load_sweep(path)
        assert sweep["space"]


BAD = [
    ({"space": {"method.kk": {"type": "int", "low": 1, "high": 4}}}, "method.kk"),
    ({"space": {"method.k": {"type": "int", "low": 0, "high": 4}}}, "space.method.k"),
    ({"space": {"method.k": {"type": "int", "low": 5, "high": 4}}}, "low must be below high"),
    ({"space": {"optim.lr": {"type": "loguniform", "low": 0, "high": 1}}}, "space.optim.lr.low"),
    ({"space": {"model.activation": {"type": "choice", "values": ["relu", "swishy"]}}}, "swishy"),
    ({"space": {"method.k": {"type": "gaussian", "low": 1, "high": 4}}}, "space.method.k.type"),
    ({"budget": {"num_trials": 0, "max_concurrent_trials": 1}}, "budget.num_trials"),
    ({"budgett": {}}, "did you mean 'budget'"),
    ({"base": "missing.yaml"}, "missing.yaml"),
    ({"objective": "pareto"}, "objective"),
    ({"space": {"scaling.num_workers": {"type": "int", "low": 0, "high": 2}}}, "scaling keys cannot be searched"),
]


@pytest.mark.parametrize("change,needle", BAD, ids=[b[1][:20] for b in BAD])
def test_bad_sweep_exits_2_before_ray(tmp_path, capsys, change, needle):
    sweep = _sweep(tmp_path, **change)
    assert main(["tune", str(_write(tmp_path, sweep))]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and needle in err, err
    assert not (tmp_path / "sweeps").exists()


def test_conditional_space_entry(tmp_path):
    sweep = _sweep(tmp_path, space={
        "model.activation": {"type": "choice", "values": ["relu", "softplus"]},
        "method.k": {"type": "int", "low": 1, "high": 4, "when": {"model.activation": "softplus"}},
    })
    loaded = load_sweep(_write(tmp_path, sweep))
    import optuna

    from raydist.tune.runner import DefineByRun

    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(12):
        trial = study.ask()
        DefineByRun(loaded["space"], loaded["base"])(trial)
        assert ("method.k" in trial.params) == (trial.params["model.activation"] == "softplus")
    with pytest.raises(C.ConfigError, match="must come before"):
        bad = dict(sweep["space"])
        load_sweep(_write(tmp_path, _sweep(tmp_path, space={"method.k": bad["method.k"],
                                                            "model.activation": bad["model.activation"]}), "b.yaml"))


@pytest.mark.usefixtures("ray_session")
def test_sweep_runs_stops_early_records_failures_and_writes_best(tmp_path, capsys):
    # the first trial is forced (outside the space) to diverge: lr 1e9 gives a NaN loss. It must be recorded as
    # failed and the sweep go on. One trial at a time, lr down to 1e-5: ASHA stops the weak ones at its first rung.
    sweep = _sweep(tmp_path, search={"seed": 0, "initial": [{"method.k": 3, "optim.lr": 1.0e9}]},
                   space={"method.k": {"type": "int", "low": 1, "high": 40},
                          "optim.lr": {"type": "loguniform", "low": 1e-5, "high": 0.2}})
    sweep["budget"] = {"num_trials": 4, "max_concurrent_trials": 1, "trial_retries": 1}
    # the trials train in their own Tune process (Ray Train's local mode), reporting to Tune from the loop; the
    # resume test below runs its trials on Ray Train workers through TuneReportCallback
    sweep["set"] = {"scaling.num_workers": 0}
    assert main(["tune", str(_write(tmp_path, sweep))]) == 0
    d = tmp_path / "sweeps" / "sw"
    rows = _trials(tmp_path)
    assert len(rows) == 4
    states = [r["state"] for r in rows]
    assert "failed" in states and "completed" in states and "stopped early" in states, states
    failed = next(r for r in rows if r["state"] == "failed")
    assert float(failed["optim.lr"]) == pytest.approx(1.0e9) and "diverged" in failed["error"]
    assert all(1 <= int(r["method.k"]) <= 40 for r in rows)
    assert (d / "search.png").is_file() and (d / "optuna.db").is_file()
    import optuna

    study = optuna.load_study(study_name="sw", storage=f"sqlite:///{d / 'optuna.db'}")
    assert len(study.trials) == 4
    # Optuna hears the truth: ASHA's early stops are PRUNED (not COMPLETE with their last value), the diverged
    # trial FAIL
    told = sorted(t.state.name for t in study.trials)
    assert told == sorted({"completed": "COMPLETE", "stopped early": "PRUNED", "failed": "FAIL"}[x] for x in states)
    best = yaml.safe_load((d / "best.yaml").read_text())
    assert best["method"]["k"] == int(max((r for r in rows if r["state"] == "completed"),
                                          key=lambda r: float(r["best_val_pgd_acc"]))["method.k"])
    out = capsys.readouterr().out
    assert "best:" in out and "val PGD" in out
    assert out.count("trying it again") == 1  # budget.trial_retries: 1, then recorded as failed
    # best.yaml is a complete job that `raydist train` runs as is
    cfg = C.load_job(d / "best.yaml")
    assert cfg["optim"]["epochs"] == 3 and cfg["run"]["name"] == "sw_best"
    assert main(["train", str(d / "best.yaml"), "--set", f"run.output_dir={tmp_path / 'best_runs'}",
                 "--set", "optim.epochs=1", "--set", "eval.test_attacks=[clean]",
                 "--set", "scaling.num_workers=0"]) == 0
    assert (tmp_path / "best_runs" / "sw_best" / "summary.json").is_file()


def test_resume_finishes_only_the_remaining_trials(tmp_path, ray_session):
    sweep = _sweep(tmp_path, scheduler={"type": "none"})
    sweep["budget"] = {"num_trials": 2, "max_concurrent_trials": 1}
    sweep["set"] = {"optim.epochs": 1}
    path = _write(tmp_path, sweep)
    d = tmp_path / "sweeps" / "sw"
    env = dict(os.environ, RAY_ADDRESS=ray_session.get_runtime_context().gcs_address)
    proc = subprocess.Popen([sys.executable, "-m", "raydist.cli", "tune", str(path)], env=env, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 300
        while time.time() < deadline:
            done = list(d.glob("trials/*/last.pt"))
            if len(done) >= 1:
                break
            if proc.poll() is not None:
                pytest.fail("the sweep ended before it could be interrupted")
            time.sleep(0.5)
        else:
            pytest.fail("no finished trial within the deadline")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    finished = {p.parent.name: p.stat().st_mtime for p in d.glob("trials/*/last.pt")}
    assert len(finished) == 1
    time.sleep(1)
    assert main(["tune", str(path)]) == 2  # not overwritten by accident
    assert main(["tune", str(path), "--resume"]) == 0
    rows = _trials(tmp_path)
    assert len(rows) == 2 and all(r["state"] == "completed" for r in rows)
    for name, mtime in finished.items():  # finished trials were not trained again
        assert (d / "trials" / name / "last.pt").stat().st_mtime == mtime


def test_a_sweep_whose_trials_wait_for_resources_too_long_fails_saying_so(monkeypatch):
    """Tune would hold PENDING trials for ever; past run.resource_wait_s the sweep stops with a line saying why."""
    import types

    import ray

    from raydist.tune.runner import _resource_watch

    monkeypatch.setattr(ray, "available_resources", lambda: {"CPU": 0.5})
    watch = _resource_watch(0.2, {"CPU": 1.0})
    pending, running = types.SimpleNamespace(status="PENDING"), types.SimpleNamespace(status="RUNNING")
    watch.on_step_begin(0, [pending, running])  # a trial runs: waiting behind it is fine
    time.sleep(0.3)
    watch.on_step_begin(1, [pending, running])
    watch.on_step_begin(2, [pending])  # nothing runs: the clock starts
    time.sleep(0.3)
    with pytest.raises(RuntimeError, match=r"1 trial\(s\) waited 0 s for the resources each asks for \(1 CPU\) "
                                           r"while no trial ran; free now: 0.5 CPU"):
        watch.on_step_begin(3, [pending])
    assert _resource_watch(None, {"CPU": 1.0}).on_step_begin(0, [pending]) is None  # null: wait for ever
