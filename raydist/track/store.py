"""One MLflow run that never fails what it tracks: the first error (a server down or refusing, a store that cannot
be opened) is one warning line, after which the run logs nothing more."""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from raydist.track.context import TrackingContext

RECORD = "tracking.json"  # in a run directory: the MLflow store and run it logs to
_PARAMS_PER_CALL, _METRICS_PER_CALL = 100, 1000
_warned: set[str] = set()


def warn(message: str) -> None:
    """One line on stderr, once per message per process."""
    if message in _warned:
        return
    _warned.add(message)
    print(f"raydist: warning: tracking: {message}", file=sys.stderr, flush=True)


def _import_client():
    """MlflowClient, with MLflow's and its migrations' INFO lines silenced and a down server answered quickly
    (MLflow retries a request 7 times with a growing back-off by default)."""
    for key, value in (("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1"), ("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1"),
                       ("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")):
        os.environ.setdefault(key, value)
    from mlflow.tracking import MlflowClient

    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)
    return MlflowClient


def _server_problem(uri: str) -> str | None:
    """For an http(s) store: None when its /health answers, else why not (in a few seconds, not minutes)."""
    if not uri.startswith(("http://", "https://")):
        return None
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=5) as resp:
            resp.read(64)
        return None
    except urllib.error.HTTPError as err:
        return f"the MLflow server {uri} answered HTTP {err.code}"
    except (OSError, ValueError) as err:
        reason = getattr(err, "reason", err)
        return f"the MLflow server {uri} cannot be reached ({reason})"


def read_record(run_dir: str | Path) -> dict[str, Any] | None:
    """The MLflow store and run a run directory logged to, if any."""
    try:
        rec = json.loads((Path(run_dir) / RECORD).read_text())
    except (OSError, ValueError):
        return None
    return rec if isinstance(rec, dict) and rec.get("run_id") and rec.get("uri") else None


def flatten(cfg: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """A resolved job as ``section.key: value`` strings (MLflow's params)."""
    out: dict[str, str] = {}
    for key, value in cfg.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = "null" if value is None else str(value)
    return out


class MlflowRun:
    """A handle on one MLflow run; inactive (every call a no-op) when tracking is off or has failed."""

    def __init__(self, client=None, run_id: str | None = None, uri: str | None = None) -> None:
        self.client, self.run_id, self.uri = client, run_id, uri

    @property
    def active(self) -> bool:
        return self.client is not None

    def _call(self, what: str, fn: Callable[[], Any]) -> Any:
        if self.client is None:
            return None
        for attempt in range(4):
            try:
                return fn()
            except Exception as err:  # noqa: BLE001 - tracking never fails a run
                if "locked" in str(err) and attempt < 3:  # SQLite: another run is writing this moment
                    time.sleep(0.5 * (attempt + 1))
                    continue
                text = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__
                warn(f"{what} failed for {self.uri} ({type(err).__name__}: {text}); no more MLflow logging for "
                     "this run, the numbers stay in metrics.jsonl")
                self.client = None
                return None
        return None

    def params(self, values: dict[str, str]) -> None:
        from mlflow.entities import Param

        items = [Param(k, v[:6000]) for k, v in values.items()]
        for i in range(0, len(items), _PARAMS_PER_CALL):
            chunk = items[i:i + _PARAMS_PER_CALL]
            self._call("logging params", lambda c=chunk: self.client.log_batch(self.run_id, params=c))

    def metrics(self, values: dict[str, Any], step: int | None = None) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step or 0) for k, v in values.items()
                 if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))]
        for i in range(0, len(items), _METRICS_PER_CALL):
            chunk = items[i:i + _METRICS_PER_CALL]
            self._call("logging metrics", lambda c=chunk: self.client.log_batch(self.run_id, metrics=c))

    def tags(self, values: dict[str, Any]) -> None:
        from mlflow.entities import RunTag

        items = [RunTag(k, str(v)) for k, v in values.items() if v is not None]
        if items:
            self._call("setting tags", lambda: self.client.log_batch(self.run_id, tags=items))

    def artifacts(self, paths: Iterable[Path], subdir: str | None = None) -> None:
        for p in paths:
            if Path(p).is_file():
                self._call(f"uploading {Path(p).name}",
                           lambda p=p: self.client.log_artifact(self.run_id, str(p), artifact_path=subdir))

    def status(self, status: str) -> None:
        """RUNNING again (a resumed run), or FINISHED / FAILED / KILLED with an end time."""
        if status == "RUNNING":
            self._call("reopening the run", lambda: self.client.update_run(self.run_id, status="RUNNING"))
        else:
            self._call("ending the run", lambda: self.client.set_terminated(self.run_id, status=status))


def _experiment_id(client, name: str, uri: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = None
    if uri.startswith("sqlite:///"):  # artifacts beside the store, not in ./mlruns of whoever logs first
        location = (Path(uri[len("sqlite:///"):]).parent / "mlartifacts" / name).as_uri()
    try:
        return client.create_experiment(name, artifact_location=location)
    except Exception:  # noqa: BLE001 - a concurrent run created it first
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def open_run(ctx: TrackingContext, name: str, *, record_dir: Path | None = None, tags: dict[str, Any] | None = None,
             params: dict[str, str] | None = None, parent: str | None = None) -> MlflowRun:
    """The MLflow run of ``record_dir`` (reopened when its record names this store), else a new one, nested under
    ``parent`` (default: the context's). Inactive when tracking is off or the store cannot be used."""
    if not ctx["mlflow"] or not ctx["uri"]:
        return MlflowRun()
    uri = ctx["uri"]
    try:
        client_cls = _import_client()
    except ImportError:
        if ctx["explicit"]:
            warn("mlflow is not installed (pip install raydist[tracking]); nothing is logged to " + uri)
        return MlflowRun()
    problem = _server_problem(uri)
    if problem:
        warn(problem + "; the numbers stay in metrics.jsonl")
        return MlflowRun()
    if uri.startswith("sqlite:///"):
        Path(uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    parent = parent if parent is not None else ctx["parent"]
    run = MlflowRun(client_cls(tracking_uri=uri), None, uri)
    rec = read_record(record_dir) if record_dir is not None else None
    if rec is not None and rec["uri"] == uri:
        run.run_id = rec["run_id"]
        run.status("RUNNING")
        if parent:
            run.tags({"mlflow.parentRunId": parent})
        return run
    exp_id = run._call("opening the store", lambda: _experiment_id(run.client, ctx["experiment"], uri))
    if exp_id is None:
        return run
    all_tags = {**(tags or {}), **({"mlflow.parentRunId": parent} if parent else {})}
    created = run._call("creating a run", lambda: run.client.create_run(
        exp_id, run_name=name, tags={k: str(v) for k, v in all_tags.items() if v is not None}))
    if created is None:
        return run
    run.run_id = created.info.run_id
    if params:
        run.params(params)
    if record_dir is not None:
        Path(record_dir).mkdir(parents=True, exist_ok=True)
        (Path(record_dir) / RECORD).write_text(json.dumps(
            {"uri": uri, "experiment_id": exp_id, "run_id": run.run_id}, indent=2) + "\n")
    return run
