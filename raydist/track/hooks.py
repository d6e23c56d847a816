"""What train, tune, compare and eval log: one call each where a run starts, finishes an epoch and ends.

Names are those of metrics.jsonl and summary.json: per epoch ``train_loss``, ``train_acc``, ``val_clean_acc``,
``val_pgd_acc``, ``lr``, ``images_per_sec`` (step = epoch); the final test ``test_best_<attack>`` and
``test_last_<attack>``; an evaluation ``eval_<checkpoint>_<attack>``.
"""

from __future__ import annotations

import functools
import subprocess
from pathlib import Path
from typing import Any

from raydist.track.context import TrackingContext, resolve_uri, tracking_context
from raydist.track.events import EventWriter
from raydist.track.store import MlflowRun, _import_client, flatten, open_run, read_record

EPOCH_METRICS = ("train_loss", "train_acc", "val_clean_acc", "val_pgd_acc", "lr", "images_per_sec", "epoch_seconds",
                 "elapsed", "checkpoint_seconds")
RUN_ARTIFACTS = ("config.yaml", "summary.json", "curves.png")
# a sweep trial's state (tune/report.py) as an MLflow run status
TRIAL_STATUS = {"completed": "FINISHED", "stopped early": "KILLED", "failed": "FAILED"}


@functools.lru_cache(maxsize=1)
def git_commit() -> str | None:
    """The project's commit, when raydist runs from a git checkout."""
    root = Path(__file__).resolve().parents[2]
    if not (root / ".git").exists():
        return None
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=5, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() or None


def _eps_text(eps: float) -> str:
    k = eps * 255
    return f"{round(k)}/255" if abs(k - round(k)) < 1e-6 else f"{eps:g}"


def job_tags(job: dict[str, Any], kind: str) -> dict[str, Any]:
    """method, model, activation, epsilon, dataset and the git commit, for filtering runs in the MLflow UI."""
    commit = git_commit()
    return {"raydist.kind": kind, "method": job["method"]["name"], "model": job["model"]["name"],
            "activation": job["model"]["activation"], "epsilon": _eps_text(job["method"]["epsilon"]),
            "dataset": job["data"]["dataset"], "git_commit": commit, "mlflow.source.git.commit": commit}


class TrainingTracker:
    """Rank 0's MLflow run and TensorBoard writer for one run directory, used by the training loop:
    ``start`` (every rank calls it; only rank 0 opens anything), ``epoch``, ``finish``; leaving the ``with`` block
    on an error marks the MLflow run FAILED."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.ctx: TrackingContext | None = config.get("tracking")
        self.run = MlflowRun()
        self.events: EventWriter | None = None
        self.run_dir: Path | None = None
        self.job: dict[str, Any] | None = None

    def start(self, rank: int, job: dict[str, Any], run_dir: Path, kind: str = "train") -> None:
        if rank != 0:
            return
        self.run_dir, self.job = Path(run_dir), job
        ctx = self.ctx or tracking_context(job.get("tracking") or {}, Path(run_dir).parent)
        self.ctx = ctx
        if ctx["tensorboard"]:
            self.events = EventWriter(run_dir)
        self.run = open_run(ctx, job["run"]["name"], record_dir=self.run_dir, tags=job_tags(job, kind),
                            params=flatten(job))

    def epoch(self, row: dict[str, Any]) -> None:
        values = {k: row[k] for k in EPOCH_METRICS if k in row}
        if self.events is not None:
            self.events.scalars(values, row["epoch"])
        self.run.metrics(values, step=row["epoch"])

    def finish(self) -> None:
        """The final test table (when the run had one) and the run's files; the MLflow run ends FINISHED."""
        if self.run_dir is None:
            return
        import json

        summary_path = self.run_dir / "summary.json"
        if summary_path.is_file():
            summary = json.loads(summary_path.read_text())
            values = {}
            for which in ("best", "last"):
                for attack, acc in summary.get(which, {}).get("accuracy", {}).items():
                    values[f"test_{which}_{attack}"] = acc
            values["train_minutes"] = summary.get("train_minutes")
            self.run.metrics(values, step=summary.get("best", {}).get("epoch"))
            if self.events is not None:
                self.events.scalars({k.replace("test_", "test/", 1): v for k, v in values.items()
                                     if k.startswith("test_")}, summary.get("last", {}).get("epoch") or 0)
            self.run.tags({"best_epoch": summary.get("best", {}).get("epoch")})
        names = list(RUN_ARTIFACTS) + (["best.pt"] if self.ctx and self.ctx["log_checkpoint"] else [])
        self.run.artifacts([self.run_dir / n for n in names])
        self.run.status("FINISHED")

    def __enter__(self) -> TrainingTracker:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.run.tags({"error": f"{exc_type.__name__}: {exc}"[:500]})
            self.run.status("FAILED")
        if self.events is not None:
            self.events.close()


# -- sweeps ----------------------------------------------------------------------------------------------------
def start_sweep(sweep: dict[str, Any], sweep_dir: Path) -> tuple[MlflowRun, TrackingContext]:
    """The sweep's parent run, and the context its trials log with (nested under it)."""
    base = sweep["base"]
    ctx = tracking_context(base.get("tracking") or {}, sweep["run"]["output_dir"])
    params = {f"space.{k}": str({kk: vv for kk, vv in v.items() if vv != {}}) for k, v in sweep["space"].items()}
    params.update({f"budget.{k}": str(v) for k, v in sweep["budget"].items()})
    params.update({"objective": sweep["objective"], "base": Path(sweep["base_path"]).name,
                   "scheduler": str(sweep["scheduler"]), "search.seed": str(sweep["search"]["seed"])})
    run = open_run(ctx, sweep["run"]["name"], record_dir=sweep_dir, tags=job_tags(base, "sweep"), params=params)
    return run, TrackingContext(**{**ctx, "parent": run.run_id if run.active else None})


def finish_sweep(run: MlflowRun, out: dict[str, Any] | None, sweep_dir: Path) -> None:
    """Each trial's state (completed, stopped early, failed) on its run; the parent gets the sweep's files."""
    if not run.active:
        return
    if out is None:
        run.status("FAILED")
        return
    for row in out["rows"]:
        rec = read_record(sweep_dir / "trials" / row["trial"])
        if rec is None or rec["uri"] != run.uri:
            continue
        child = MlflowRun(run.client, rec["run_id"], run.uri)
        child.tags({"trial_state": row["state"], "trial": row["trial"], "mlflow.parentRunId": run.run_id})
        if not run._call("listing artifacts", lambda r=rec: run.client.list_artifacts(r["run_id"])):
            # Tune ended the trial at its last report (or ASHA stopped it), before the trial logged its files
            child.artifacts([sweep_dir / "trials" / row["trial"] / n for n in RUN_ARTIFACTS])
        child.status(TRIAL_STATUS.get(row["state"], "FINISHED"))
    best = out.get("best")
    if best is not None:
        run.metrics({"best_val_pgd_acc": best["best_val_pgd_acc"], "best_val_clean_acc": best["best_val_clean_acc"]})
        run.tags({"best_trial": best["trial"]})
    run.metrics({"trials_" + s.replace(" ", "_"): sum(r["state"] == s for r in out["rows"]) for s in TRIAL_STATUS})
    run.artifacts([sweep_dir / n for n in ("trials.csv", "best.yaml", "search.png", "pareto.png", "sweep.yaml")])
    run.status("FINISHED")


# -- comparisons -----------------------------------------------------------------------------------------------
def start_compare(spec: dict[str, Any]) -> tuple[MlflowRun, TrackingContext]:
    """The comparison's parent run, and the context its methods' runs log with (nested under it)."""
    first = spec["runs"][0]["job"]
    ctx = tracking_context(first.get("tracking") or {}, spec["run"]["output_dir"])
    params = {"methods": ", ".join(r["label"] for r in spec["runs"]), "base": Path(spec["base_path"]).name}
    params.update({f"eval.{k}": str(v) for k, v in spec["eval"].items()})
    tags = {k: v for k, v in job_tags(first, "compare").items() if k != "method"}
    tags["methods"] = params["methods"]
    run = open_run(ctx, spec["run"]["name"], record_dir=Path(spec["dir"]), tags=tags, params=params)
    return run, TrackingContext(**{**ctx, "parent": run.run_id if run.active else None})


def finish_compare(run: MlflowRun, results: list[dict[str, Any]] | None, compare_dir: Path) -> None:
    """Each method's evaluation (best and last under every attack) on its run; the parent gets the table."""
    if not run.active:
        return
    if results is None:
        run.status("FAILED")
        return
    for res in results:
        rec = read_record(res["run_dir"])
        if rec is None or rec["uri"] != run.uri:
            continue
        child = MlflowRun(run.client, rec["run_id"], run.uri)
        child.tags({"mlflow.parentRunId": run.run_id, "label": res["label"]})  # a reused run joins this comparison
        values = {}
        for which in ("best", "last"):
            for attack, acc in (res.get(which) or {}).get("accuracy", {}).items():
                values[f"eval_{which}_{attack}"] = acc
        child.metrics(values, step=(res.get("best") or {}).get("epoch"))
        if res.get("error"):
            child.tags({"error": res["error"]})
            child.status("FAILED")
        run.metrics({f"{res['slug']}_{k}": v for k, v in values.items()})
    run.artifacts([compare_dir / n for n in ("compare.md", "compare.json", "val_pgd.png", "compare.yaml")])
    run.status("FAILED" if any(r.get("error") for r in results) else "FINISHED")


# -- evaluations -----------------------------------------------------------------------------------------------
def _labels(paths: list[str]) -> list[str]:
    stems = [Path(p).stem for p in paths]
    if len(set(stems)) == len(stems):
        return stems
    return [f"{Path(p).parent.name}_{Path(p).stem}" if stems.count(Path(p).stem) > 1 else Path(p).stem
            for p in paths]


def log_evaluation(report: dict[str, Any], out_dir: Path, uri: str | None = None) -> MlflowRun:
    """``raydist eval``: one MLflow run with each attack's accuracy per checkpoint (``eval_<best|last|...>_<attack>``),
    nested under the training run of the first checkpoint when that run logged to the same store. ``uri``: the
    store (--tracking); default: the one the checkpoints' runs logged to, else nothing is logged."""
    paths = [r["checkpoint"] for r in report["rows"]]
    records = [read_record(Path(p).parent) for p in paths]
    first = next((r for r in records if r is not None), None)
    if uri is None and first is None:
        return MlflowRun()
    resolved = resolve_uri(uri, out_dir) if uri is not None else first["uri"]
    experiment = "raydist"
    parent = first["run_id"] if first is not None and first["uri"] == resolved else None
    if parent is not None:
        try:
            experiment = _import_client()(tracking_uri=resolved).get_experiment(first["experiment_id"]).name
        except Exception:  # noqa: BLE001 - open_run reports a store that does not answer
            pass
    ctx = TrackingContext(mlflow=True, uri=resolved, experiment=experiment, log_checkpoint=False, tensorboard=False,
                          parent=parent, explicit=True)
    names = sorted({Path(p).parent.name for p in paths})
    params = {"attacks": ",".join(report["attacks"]), "epsilon": _eps_text(report["epsilon"]),
              "precision": report.get("precision", "fp32"), "checkpoints": ",".join(paths)[:6000]}
    run = open_run(ctx, f"eval {', '.join(names)}"[:200], tags={"raydist.kind": "eval",
                                                                "epsilon": params["epsilon"]}, params=params)
    values = {}
    for label, row in zip(_labels(paths), report["rows"]):
        for attack, acc in row["accuracy"].items():
            values[f"eval_{label}_{attack}"] = acc
        values[f"eval_{label}_n"] = row["n"]
    run.metrics(values)
    run.artifacts([Path(out_dir) / n for n in ("report.md", "report.json", "eps_curve.png")])
    run.status("FINISHED")
    return run
