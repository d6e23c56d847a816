"""Tracking for real: a digits run, a small sweep and a small comparison logged to local MLflow stores (read back
through MlflowClient), their TensorBoard event files (read back with tensorboard's event reader), `raydist eval`
nested under the run it evaluates, the MLflow UI serving a run through its REST API; a tracking server that is down
or refuses is a warning; the key reference page matches the schema; Ray's internal noise stays out of the driver."""

from __future__ import annotations

import contextlib
import csv
import http.server
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, free_port, tiny_job, write_job

from raydist.cli import main

mlflow = pytest.importorskip("mlflow", reason="the tracking extra: pip install raydist[tracking]")
pytest.importorskip("tensorboard", reason="the tracking extra: pip install raydist[tracking]")

from mlflow.tracking import MlflowClient  # noqa: E402

from raydist import track  # noqa: E402
from raydist.track.context import TrackingContext  # noqa: E402


def _job(tmp: Path, **sections) -> dict:
    base = {"model": {"width": 4}, "method": {"generator_width": 4}, "eval": {"val_steps": 2, "test_samples": 32,
                                                                               "test_attacks": ["clean", "pgd10"]},
            "tracking": {"mlflow": True, "tensorboard": True}}  # tiny_job has them off
    for sec, values in sections.items():
        base.setdefault(sec, {}).update(values)
    return tiny_job(tmp, **base)


def _small(tmp: Path, **sections) -> dict:
    """For the sweep and the comparison: the same job on 256 synthetic 16x16 images (seconds an epoch)."""
    data = {"dataset": "synthetic", "image_size": 16, "train_size": 256, "test_size": 64, "val_size": 64}
    return _job(tmp, data=data, **sections)


def _runs(client: MlflowClient, name: str | None = None) -> list:
    exps = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(exps, max_results=500)
    return [r for r in runs if name is None or r.info.run_name == name]


def _history(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def _same(got: list[tuple[int, float]], want: list[tuple[int, float]]) -> None:
    """The same epochs, the same values (TensorBoard keeps float32)."""
    assert [s for s, _ in got] == [s for s, _ in want]
    assert [v for _, v in got] == pytest.approx([v for _, v in want], rel=1e-5)


def _scalars(run_dir: Path, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, ray_session):
    """One digits run (default store: OUTPUT_DIR/mlflow.db, with best.pt uploaded), then `raydist eval` of it."""
    tmp = tmp_path_factory.mktemp("tracked_run")
    job = _job(tmp, tracking={"log_checkpoint": True}, data={"val_size": 64})
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):  # where Ray prints its workers' lines
        assert main(["train", str(write_job(tmp, job))]) == 0
        time.sleep(2)  # Ray's log thread passes the last lines on
    run_dir = tmp / "runs" / "t"
    assert main(["eval", str(run_dir / "best.pt"), "--attacks", "clean,fgsm", "--samples", "32", "--workers",
                 "1"]) == 0
    return {"tmp": tmp, "run_dir": run_dir, "uri": f"sqlite:///{tmp / 'runs' / 'mlflow.db'}",
            "output": out.getvalue()}


@pytest.fixture(scope="module")
def swept(tmp_path_factory, ray_session):
    """A two-trial sweep (trials trained in their Tune processes) with ASHA, logged to a store named by --tracking."""
    tmp = tmp_path_factory.mktemp("tracked_sweep")
    write_job(tmp, _small(tmp, optim={"epochs": 2}, scaling={"num_workers": 0}), "base.yaml")
    sweep = {"base": "base.yaml", "space": {"optim.lr": {"type": "loguniform", "low": 0.01, "high": 0.2}},
             "search": {"seed": 0}, "scheduler": {"grace_period": 1, "reduction_factor": 2},
             "budget": {"num_trials": 2, "max_concurrent_trials": 1},
             "run": {"name": "sw", "output_dir": str(tmp / "sweeps")}, "tracking": {"experiment": "sweeps"}}
    (tmp / "sweep.yaml").write_text(yaml.safe_dump(sweep))
    uri = f"sqlite:///{tmp / 'store' / 'mlflow.db'}"
    assert main(["tune", str(tmp / "sweep.yaml"), "--tracking", uri]) == 0
    return {"dir": tmp / "sweeps" / "sw", "uri": uri}


@pytest.fixture(scope="module")
def compared(tmp_path_factory, ray_session):
    """Two methods, one epoch each, evaluated under clean and PGD-10 on 32 images."""
    tmp = tmp_path_factory.mktemp("tracked_compare")
    write_job(tmp, _small(tmp, optim={"epochs": 1}, scaling={"num_workers": 0}), "base.yaml")
    spec = {"base": "base.yaml", "methods": ["fgsm_rs", "fgsm_sdi"],
            "eval": {"attacks": ["clean", "pgd10"], "samples": 32, "workers": 1},
            "run": {"name": "cmp", "output_dir": str(tmp / "cmp")}, "max_concurrent": 1}
    (tmp / "compare.yaml").write_text(yaml.safe_dump(spec))
    assert main(["compare", str(tmp / "compare.yaml")]) == 0
    return {"dir": tmp / "cmp" / "cmp", "uri": f"sqlite:///{tmp / 'cmp' / 'mlflow.db'}"}


# -- a training run ------------------------------------------------------------------------------------------
@pytest.mark.timeout(1200)
def test_a_run_logs_params_metrics_test_table_artifacts_and_tags(trained):
    client = MlflowClient(trained["uri"])
    (run,) = _runs(client, "t")
    rid = run.info.run_id
    assert run.info.status == "FINISHED"
    assert json.loads((trained["run_dir"] / "tracking.json").read_text())["run_id"] == rid
    p = run.data.params
    assert p["optim.epochs"] == "2" and p["method.name"] == "fgsm_sdi" and p["model.width"] == "4"
    assert p["tracking.log_checkpoint"] == "True" and p["data.dataset"] == "digits"
    rows = [json.loads(line) for line in (trained["run_dir"] / "metrics.jsonl").read_text().splitlines()]
    for key in ("train_loss", "train_acc", "val_clean_acc", "val_pgd_acc", "lr", "images_per_sec"):
        _same(_history(client, rid, key), [(r["epoch"], r[key]) for r in rows])
    summary = json.loads((trained["run_dir"] / "summary.json").read_text())
    for which in ("best", "last"):
        for attack, acc in summary[which]["accuracy"].items():
            assert run.data.metrics[f"test_{which}_{attack}"] == pytest.approx(acc)
    tags = run.data.tags
    assert (tags["method"], tags["model"], tags["activation"], tags["epsilon"], tags["dataset"]) == (
        "fgsm_sdi", "resnet18", "relu", "32/255", "digits")
    if (ROOT / ".git").exists():
        head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True).stdout
        assert tags["git_commit"] == head.strip()
    names = {a.path for a in client.list_artifacts(rid)}
    assert {"config.yaml", "summary.json", "curves.png", "best.pt"} <= names


def test_tensorboard_files_hold_the_per_epoch_scalars(trained):
    rows = [json.loads(line) for line in (trained["run_dir"] / "metrics.jsonl").read_text().splitlines()]
    assert list(trained["run_dir"].glob("events.out.tfevents.*"))
    for key in ("train_loss", "val_pgd_acc", "lr"):
        _same(_scalars(trained["run_dir"], key), [(r["epoch"], r[key]) for r in rows])
    summary = json.loads((trained["run_dir"] / "summary.json").read_text())
    assert _scalars(trained["run_dir"], "test/best_pgd10")[-1][1] == pytest.approx(
        summary["best"]["accuracy"]["pgd10"], rel=1e-5)


def test_eval_logs_each_attacks_accuracy_nested_under_the_run(trained):
    client = MlflowClient(trained["uri"])
    (run,) = _runs(client, "t")
    evals = [r for r in _runs(client) if r.data.tags.get("raydist.kind") == "eval"]
    assert len(evals) == 1 and evals[0].data.tags["mlflow.parentRunId"] == run.info.run_id
    report = json.loads((trained["run_dir"] / "eval" / "report.json").read_text())
    assert set(report["rows"][0]["accuracy"]) == {"clean", "fgsm"}
    for attack, acc in report["rows"][0]["accuracy"].items():
        assert evals[0].data.metrics[f"eval_best_{attack}"] == pytest.approx(acc)


@pytest.mark.timeout(1200)
def test_the_mlflow_ui_serves_the_run(trained, tmp_path):
    """`mlflow ui --backend-store-uri sqlite:///OUTPUT_DIR/mlflow.db` needs no server of ours: started here on a
    free port, its REST API returns the run with its params and metrics; and as a tracking server (http://) it
    takes a run's logging the same way."""
    run_id = json.loads((trained["run_dir"] / "tracking.json").read_text())["run_id"]
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", trained["uri"],
                             "--host", "127.0.0.1", "--port", str(port), "--workers", "1"], cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline, body = time.monotonic() + 400, None  # its imports take minutes on a busy 2-core machine
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/2.0/mlflow/runs/get?run_id={run_id}",
                                            timeout=5) as resp:
                    body = json.loads(resp.read())
                break
            except OSError:
                time.sleep(1)
        assert body is not None, "the MLflow UI did not answer"
        data = body["run"]["data"]
        assert {p["key"]: p["value"] for p in data["params"]}["method.name"] == "fgsm_sdi"
        assert "val_pgd_acc" in {m["key"] for m in data["metrics"]}
        assert body["run"]["info"]["status"] == "FINISHED"

        remote = f"http://127.0.0.1:{port}"
        run_dir = tmp_path / "remote_run"
        run_dir.mkdir()
        (run_dir / "config.yaml").write_text("optim: {lr: 0.1}\n")
        job = {"tracking": {}, "run": {"name": "over_http"}, "method": {"name": "pgd_at", "epsilon": 8 / 255},
               "model": {"name": "resnet18", "activation": "silu"}, "data": {"dataset": "digits"}}
        with track.TrainingTracker({"tracking": {**_ctx(remote), "experiment": "remote"}}) as tracker:
            tracker.start(0, job, run_dir)
            for epoch in (1, 2):
                tracker.epoch({"epoch": epoch, "val_pgd_acc": 0.1 * epoch})
            tracker.finish()
        client = MlflowClient(remote)
        logged = client.get_run(json.loads((run_dir / "tracking.json").read_text())["run_id"])
        assert logged.info.status == "FINISHED" and logged.data.tags["activation"] == "silu"
        _same(_history(client, logged.info.run_id, "val_pgd_acc"), [(1, 0.1), (2, 0.2)])
        assert "config.yaml" in {a.path for a in client.list_artifacts(logged.info.run_id)}
    finally:  # the server and its uvicorn worker: its own process group
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


# -- a sweep -------------------------------------------------------------------------------------------------
@pytest.mark.timeout(1200)
def test_a_sweep_is_a_parent_run_with_one_nested_run_per_trial(swept):
    client = MlflowClient(swept["uri"])
    assert client.get_experiment_by_name("sweeps") is not None
    (parent,) = _runs(client, "sw")
    assert parent.info.status == "FINISHED" and parent.data.tags["raydist.kind"] == "sweep"
    with open(swept["dir"] / "trials.csv") as f:
        trials = {r["trial"]: r for r in csv.DictReader(f)}
    children = [r for r in _runs(client) if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(c.info.run_name for c in children) == sorted(trials)
    status = {"completed": "FINISHED", "stopped early": "KILLED", "failed": "FAILED"}
    for c in children:
        t = trials[c.info.run_name]
        assert c.data.tags["trial_state"] == t["state"] and c.info.status == status[t["state"]]
        assert len(_history(client, c.info.run_id, "val_pgd_acc")) == int(t["epochs"])
        assert float(c.data.params["optim.lr"]) == pytest.approx(float(t["optim.lr"]))
        assert _scalars(swept["dir"] / "trials" / c.info.run_name, "val_pgd_acc")
        assert {"config.yaml", "curves.png"} <= {a.path for a in client.list_artifacts(c.info.run_id)}
    assert "trials.csv" in {a.path for a in client.list_artifacts(parent.info.run_id)}


# -- a comparison --------------------------------------------------------------------------------------------
@pytest.mark.timeout(1200)
def test_a_compare_is_a_parent_run_with_one_child_per_method_and_its_evaluation(compared):
    client = MlflowClient(compared["uri"])
    (parent,) = _runs(client, "cmp")
    assert parent.info.status == "FINISHED" and parent.data.tags["raydist.kind"] == "compare"
    table = json.loads((compared["dir"] / "compare.json").read_text())
    children = {r.data.tags.get("label"): r for r in _runs(client)
                if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert set(children) == {"FGSM-RS", "FGSM-SDI"}
    assert {c.data.tags["method"] for c in children.values()} == {"fgsm_rs", "fgsm_sdi"}
    for row in table["runs"]:
        child = children[row["label"]]
        for which in ("best", "last"):
            for attack, acc in row[which]["accuracy"].items():
                assert child.data.metrics[f"eval_{which}_{attack}"] == pytest.approx(acc)
        assert _scalars(Path(row["run_dir"]), "val_pgd_acc")
    assert "compare.md" in {a.path for a in client.list_artifacts(parent.info.run_id)}


# -- never a failed run --------------------------------------------------------------------------------------
def _ctx(uri: str) -> TrackingContext:
    return TrackingContext(mlflow=True, uri=uri, experiment="raydist", log_checkpoint=False, tensorboard=True,
                           parent=None, explicit=True)


class _Refusing(http.server.BaseHTTPRequestHandler):
    def _refuse(self):
        self.send_response(403)
        self.end_headers()
        self.wfile.write(b"forbidden")

    do_GET = do_POST = _refuse

    def log_message(self, *args):
        pass


@pytest.mark.parametrize("server", ["down", "refusing"])
def test_a_tracking_server_down_or_refusing_is_a_warning_and_the_run_goes_on(tmp_path, capsys, server):
    httpd = None
    if server == "down":
        uri = f"http://127.0.0.1:{free_port()}"
    else:
        httpd = http.server.HTTPServer(("127.0.0.1", 0), _Refusing)
        threading.Thread(target=httpd.serve_forever, daemon=True).start()
        uri = f"http://127.0.0.1:{httpd.server_address[1]}"
    job = {"tracking": {}, "run": {"name": "r"}, "method": {"name": "fgsm_rs", "epsilon": 8 / 255},
           "model": {"name": "resnet18", "activation": "relu"}, "data": {"dataset": "digits"}}
    try:
        start = time.monotonic()
        with track.TrainingTracker({"tracking": _ctx(uri)}) as tracker:
            tracker.start(0, job, tmp_path)
            tracker.epoch({"epoch": 1, "train_loss": 1.5, "val_pgd_acc": 0.25})
            tracker.finish()
        assert time.monotonic() - start < 30
    finally:
        if httpd is not None:
            httpd.shutdown()
    err = capsys.readouterr().err
    assert f"raydist: warning: tracking: the MLflow server {uri}" in err and "metrics.jsonl" in err
    assert not (tmp_path / "tracking.json").exists()
    _same(_scalars(tmp_path, "val_pgd_acc"), [(1, 0.25)])  # TensorBoard does not depend on the server


def test_only_rank_0_logs(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    job = {"tracking": {}, "run": {"name": "r"}}
    with track.TrainingTracker({"tracking": _ctx(uri)}) as tracker:
        tracker.start(1, job, tmp_path)
        tracker.epoch({"epoch": 1, "train_loss": 1.0})
        tracker.finish()
    assert list(tmp_path.iterdir()) == []


def test_tracking_mistakes_exit_2_before_ray(tmp_path, capsys):
    path = write_job(tmp_path, _job(tmp_path))
    assert main(["train", str(path), "--tracking", " "]) == 2
    assert "--tracking" in capsys.readouterr().err
    assert main(["train", str(path), "--set", "tracking.experimnt=x"]) == 2
    assert "tracking.experimnt" in capsys.readouterr().err
    write_job(tmp_path, _job(tmp_path), "base.yaml")
    (tmp_path / "s.yaml").write_text(yaml.safe_dump({"base": "base.yaml", "tracking": {"urii": "x"},
                                                     "space": {"optim.lr": {"type": "float", "low": 0.01,
                                                                            "high": 0.1}}}))
    assert main(["tune", str(tmp_path / "s.yaml")]) == 2
    assert "tracking.urii" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


# -- the key reference ---------------------------------------------------------------------------------------
def test_docs_keys_page_matches_the_schema(capsys):
    from raydist import config as C
    from raydist.keys_doc import key_reference

    page = (ROOT / "docs" / "keys.md").read_text()
    assert page == key_reference(), "docs/keys.md is stale: run `raydist docs keys > docs/keys.md`"
    assert main(["docs", "keys"]) == 0 and capsys.readouterr().out == page
    for section, fields in C.SCHEMA.items():
        for key, field in fields.items():
            line = next(ln for ln in page.splitlines() if ln.startswith(f"| `{section}.{key}` |"))
            assert field.help.split(";")[0][:30].replace("|", "\\|") in line


# -- Ray's noise -----------------------------------------------------------------------------------------------
def test_local_ray_environment_and_noise_filter(monkeypatch, tmp_path):
    from raydist.train import quiet

    for key in ("RAY_TRAIN_ENABLE_STATE_TRACKING", "MPLCONFIGDIR"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    quiet.prepare_local_env()
    assert os.environ["RAY_TRAIN_ENABLE_STATE_TRACKING"] == "1"  # the dashboard's Train view
    assert os.environ["MPLCONFIGDIR"] == str(tmp_path / "matplotlib")
    noise = ("[2026-12-02 11:49:19,878 E 12761 12813] core_worker.cc:2465: Actor with class name: "
             "'PreemptionWatcher' and ID: 'c72f' has constructor arguments in the object store and max_restarts > 0.")
    assert not quiet._keep(noise) and not quiet._keep("generated new fontManager")
    import logging

    assert not logging.getLogger("ray._private.authentication.authentication_token_setup").isEnabledFor(
        logging.WARNING)  # "Token authentication is enabled for this Ray cluster ..."
    quiet.quiet_loggers()
    assert not logging.getLogger("matplotlib.font_manager").isEnabledFor(logging.INFO)
    assert quiet._keep("[###.......] epoch 1/2  loss 2.498  train 8.8%")
    late = ["Failed to send resource request for train-86. If this only happens transiently during network "
            "partition or CPU being overloaded, it's safe to ignore this error.", "Traceback (most recent call last):",
            '  File "ray/_private/worker.py", line 3009, in get', "    values = worker.get_objects(",
            "ray.exceptions.GetTimeoutError: Get timed out: some object(s) not ready.", "[##########] epoch 2/2"]
    assert quiet.drop_noise([noise, *late]) == ["[##########] epoch 2/2"]


def test_rays_internal_noise_does_not_reach_the_terminal(trained, ray_session):
    """Ray writes the PreemptionWatcher ERROR line into its log files; the driver's output never shows it."""
    logs = Path(ray_session._private.worker._global_node.get_logs_dir_path())
    assert any("PreemptionWatcher" in p.read_text(errors="replace") for p in logs.glob("worker-*.err"))
    out = trained["output"]
    assert "epoch 2/2" in out  # the workers' lines do reach it
    for noise in ("PreemptionWatcher", "Token authentication is enabled", "generated new fontManager",
                  "exclude_resources"):
        assert noise not in out, noise
