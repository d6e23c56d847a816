"""`raydist tune`: a Ray Tune sweep whose trials are `raydist train` runs on Ray Train.

Ray 2.60 pattern (Train V2): Tune runs a function trainable per trial; the function builds the same TorchTrainer
as `raydist train` with Tune's ``TuneReportCallback``, so every epoch's validation metrics reach Tune. Optuna's
TPE sampler (seeded, its study in SQLite in the sweep directory) proposes the parameters; ASHA stops weak trials
early on validation PGD accuracy. The test set is never touched during a sweep.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from raydist import config as C
from raydist.train import artifacts
from raydist.tune import report
from raydist.tune.sweep import job_for

METRIC, TIME = "val_pgd_acc", "elapsed"
TUNE_DIR, TRIALS_DIR, STUDY_DB = "tune", "trials", "optuna.db"


def sweep_dir_of(sweep: dict[str, Any]) -> Path:
    return (Path(sweep["run"]["output_dir"]) / sweep["run"]["name"]).resolve()


def check_sweep_dir(sweep: dict[str, Any], *, overwrite: bool, resume: bool) -> None:
    """The same rule as runs: an existing sweep needs --resume or --overwrite; checked before Ray starts."""
    d = sweep_dir_of(sweep)
    if overwrite and resume:
        raise C.ConfigError("--resume and --overwrite exclude each other")
    if resume:
        if not (d / TUNE_DIR).is_dir():
            raise C.ConfigError(f"--resume: no sweep to resume at {d / TUNE_DIR}")
        return
    if d.exists() and any(d.iterdir()) and not overwrite:
        raise C.ConfigError(f"sweep directory {d} already exists "
                            "(--resume finishes its remaining trials, --overwrite deletes it and starts again)")


def _conditions_hold(when: dict[str, Any], chosen: dict[str, Any], base: dict[str, Any]) -> bool:
    for path, want in when.items():
        section, key = path.split(".")
        have = chosen.get(path, base[section][key])
        if have != want and not (isinstance(want, list) and have in want):
            return False
    return True


class DefineByRun:
    """Optuna define-by-run space: entries in file order, a `when` entry only where its condition holds.

    A class, not a closure, so Tune can pickle the searcher into its experiment state (for --resume).
    """

    def __init__(self, space: dict[str, dict[str, Any]], base: dict[str, Any]) -> None:
        self.space, self.base = space, base

    def __call__(self, trial) -> None:
        chosen: dict[str, Any] = {}
        for path, e in self.space.items():
            if not _conditions_hold(e["when"], chosen, self.base):
                continue
            if e["type"] == "int":
                chosen[path] = trial.suggest_int(path, e["low"], e["high"])
            elif e["type"] == "float":
                chosen[path] = trial.suggest_float(path, e["low"], e["high"])
            elif e["type"] == "loguniform":
                chosen[path] = trial.suggest_float(path, e["low"], e["high"], log=True)
            else:
                chosen[path] = trial.suggest_categorical(path, e["values"])
        return None


def _trial(config: dict[str, Any], sweep: dict[str, Any], sweep_dir: str) -> None:
    """One trial: the base job with this trial's parameters, trained by Ray Train, reporting to Tune (with
    ``scaling.num_workers: 0``, trained in this process); logged as a run nested under the sweep's (raydist.track)."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from raydist.train.driver import build_trainer, create_run_dir, fit, run_dir_of, streamed_datasets
    from raydist.train.loop import train_loop_per_worker

    name = ray.tune.get_context().get_trial_name()
    params = {k: v for k, v in config.items() if "." in k}
    job = job_for(sweep, params, name, str(Path(sweep_dir) / TRIALS_DIR))
    run_dir = run_dir_of(job)
    last = run_dir / "last.pt"
    resume = str(last) if last.is_file() else None  # a trial interrupted with the driver continues
    if resume is None:
        create_run_dir(job, overwrite=True)
    else:
        history = artifacts.read_metrics(run_dir)
        if history and history[-1]["epoch"] >= job["optim"]["epochs"]:
            for row in history:  # finished before the driver died: tell the restored Tune what it missed
                ray.tune.report(row)
            return
    if job["scaling"]["num_workers"] == 0:  # the loop runs here, in the trial's process, and reports to Tune
        train_loop_per_worker({"job": job, "run_dir": str(run_dir), "resume": resume, "final_test": False,
                               "tune_trial": True, "datasets": streamed_datasets(job),
                               "tracking": sweep.get("tracking")})
    else:
        fit(build_trainer(job, resume, callbacks=[TuneReportCallback()], final_test=False,
                          tracking=sweep.get("tracking")), job)


DRIVER_RESOURCE = "raydist_driver"  # declared by the head and on-demand nodes of clusters/*.yaml


def driver_resources(cluster: dict[str, float] | None = None) -> dict[str, float]:
    """Where a process that only drives Ray Train workers (a sweep trial, a compare run) may live: on a node that
    declares the custom resource ``raydist_driver`` (the head and on-demand nodes in the cluster files), never on a
    spot worker whose preemption would take the driver and its run down with it. A cluster without it (a laptop,
    a plain `ray start`) puts drivers anywhere."""
    if cluster is None:
        import ray

        cluster = ray.cluster_resources()
    return {DRIVER_RESOURCE: 0.001} if cluster.get(DRIVER_RESOURCE, 0) > 0 else {}


def trial_resources(scaling: dict[str, Any], cluster: dict[str, float] | None = None) -> dict[str, float]:
    """What a trial's own process asks Ray for. With Ray Train workers it only drives them (they ask for their
    own CPUs and GPUs) and stays off spot nodes where it can; with ``num_workers: 0`` it trains itself, so it
    holds one worker's share."""
    if scaling["num_workers"]:
        return {"CPU": 0.01, **driver_resources(cluster)}
    need = {"CPU": scaling["cpus_per_worker"]}
    if scaling["use_gpu"]:
        need["GPU"] = scaling["gpus_per_worker"]
    return need


def trial_name(trial) -> str:
    """trial_<Tune trial id>: stable for the trial's life, resumes included, so its Ray Train run directory
    (trials/<name>) is found again when an interrupted sweep is resumed."""
    return f"trial_{trial.trial_id}"


def _progress_callback(retries: int):
    import ray.tune

    class ProgressLine(ray.tune.Callback):
        """One line per reported epoch and per finished trial, instead of Tune's status tables."""

        def on_trial_result(self, iteration, trials, trial, result, **info):
            print(f"{trial} {_params(trial.config)}  epoch {result.get('epoch')}: "
                  f"val PGD {100 * result.get(METRIC, 0):.1f}%  val clean {100 * result.get('val_clean_acc', 0):.1f}%",
                  flush=True)

        def on_trial_complete(self, iteration, trials, trial, **info):
            done = sum(t.status in ("TERMINATED", "ERROR") for t in trials)
            print(f"trial {trial} finished ({done}/{len(trials)} trials done)", flush=True)

        def on_trial_error(self, iteration, trials, trial, **info):
            print(f"trial {trial} failed; the sweep goes on", flush=True)

        def on_trial_recover(self, iteration, trials, trial, **info):
            print(f"trial {trial} failed (failure {trial.num_failures} of up to {retries + 1}); trying it again, "
                  "from its last.pt if it has one", flush=True)

    return ProgressLine()


def _resource_watch(limit_s: float | None, need: dict[str, float]):
    """A sweep whose trials cannot get the CPUs/GPUs they ask for fails, saying so, after ``run.resource_wait_s``
    (instead of Tune holding them PENDING for ever, e.g. behind resources something else holds)."""
    import time

    import ray.tune

    class ResourceWatch(ray.tune.Callback):
        def __init__(self) -> None:
            self.since: float | None = None

        def on_step_begin(self, iteration, trials, **info):
            pending = [t for t in trials if t.status == "PENDING"]
            if limit_s is None or not pending or any(t.status == "RUNNING" for t in trials):
                self.since = None
                return
            self.since = self.since or time.monotonic()
            waited = time.monotonic() - self.since
            if waited > limit_s:
                free = ray.available_resources()
                raise RuntimeError(
                    f"{len(pending)} trial(s) waited {waited:.0f} s for the resources each asks for "
                    f"({_resources_text(need)}) while no trial ran; free now: {_resources_text(free)} "
                    "(run.resource_wait_s sets how long a sweep waits)")

    return ResourceWatch()


def _resources_text(res: dict[str, float]) -> str:
    return ", ".join(f"{res.get(k, 0):g} {k}" for k in ("CPU", "GPU") if k in res or k == "CPU")


def _params(config: dict[str, Any]) -> str:
    return " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in config.items() if "." in k)


def build_tuner(sweep: dict[str, Any], *, resume: bool):
    import optuna
    import ray.tune
    from optuna.samplers import TPESampler
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    d = sweep_dir_of(sweep)
    trainable = ray.tune.with_parameters(_trial, sweep=sweep, sweep_dir=str(d))
    trainable = ray.tune.with_resources(trainable, trial_resources(sweep["base"]["scaling"]))
    if resume:
        # errored trials continue from their last.pt (the trial function resumes a run directory it finds)
        return ray.tune.Tuner.restore(str(d / TUNE_DIR), trainable=trainable, resume_unfinished=True,
                                      resume_errored=True, restart_errored=False)

    multi = sweep["objective"] == "multi"
    seed = sweep["search"]["seed"]
    from raydist.tune.searcher import StoppedArePruned

    search = StoppedArePruned(
        epochs=sweep["base"]["optim"]["epochs"],
        space=DefineByRun(sweep["space"], sweep["base"]),
        metric=[METRIC, TIME] if multi else METRIC,
        mode=["max", "min"] if multi else "max",
        sampler=TPESampler(seed=seed, multivariate=True) if not multi else optuna.samplers.NSGAIISampler(seed=seed),
        study_name=sweep["run"]["name"],
        storage=optuna.storages.RDBStorage(f"sqlite:///{d / STUDY_DB}"),
        points_to_evaluate=sweep["search"]["initial"] or None,
    )
    sch = sweep["scheduler"]
    epochs = sweep["base"]["optim"]["epochs"]
    # time_attr "epoch": a resumed trial's training_iteration restarts at 1, its epoch does not
    scheduler = (ASHAScheduler(time_attr="epoch", metric=METRIC, mode="max", max_t=epochs,
                               grace_period=min(sch["grace_period"], epochs), reduction_factor=sch["reduction_factor"])
                 if sch["type"] == "asha" else FIFOScheduler())
    budget = sweep["budget"]
    return ray.tune.Tuner(
        trainable,
        tune_config=ray.tune.TuneConfig(
            search_alg=search, scheduler=scheduler, num_samples=budget["num_trials"],
            max_concurrent_trials=budget["max_concurrent_trials"], time_budget_s=budget["time_budget_s"],
            trial_name_creator=trial_name, trial_dirname_creator=trial_name,
        ),
        run_config=ray.tune.RunConfig(name=TUNE_DIR, storage_path=str(d), verbose=0,
                                      callbacks=[_progress_callback(sweep["budget"]["trial_retries"]), _resource_watch(
                                          sweep["base"]["run"]["resource_wait_s"],
                                          trial_resources(sweep["base"]["scaling"]))],
                                      # a trial lost with its node (a preempted spot worker) is tried again
                                      # and continues from its last.pt
                                      failure_config=ray.tune.FailureConfig(
                                          max_failures=sweep["budget"]["trial_retries"])),
    )


def run_sweep(sweep: dict[str, Any], *, overwrite: bool = False, resume: bool = False) -> dict[str, Any]:
    """Run (or finish) a sweep; writes trials.csv, best.yaml and a plot into the sweep directory."""
    from raydist.cluster.storage import check_visible_from_every_node
    from raydist.train.driver import ensure_ray

    check_sweep_dir(sweep, overwrite=overwrite, resume=resume)
    ensure_ray()
    d = sweep_dir_of(sweep)
    check_visible_from_every_node({"run.output_dir": d.parent})  # trials write their runs under it
    if overwrite and d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True, exist_ok=True)
    if not resume:
        shutil.copy(sweep["path"], d / "sweep.yaml")
    print(f"raydist: sweep {sweep['run']['name']}: {sweep['budget']['num_trials']} trials of "
          f"{Path(sweep['base_path']).name}, {sweep['budget']['max_concurrent_trials']} at a time; "
          f"directory {d}", flush=True)
    from raydist import track

    parent, sweep["tracking"] = track.start_sweep(sweep, d)  # the trials' runs nest under the sweep's
    out = None
    try:
        grid = build_tuner(sweep, resume=resume).fit()
        out = report.write_outputs(sweep, d, grid)
    finally:
        track.finish_sweep(parent, out, d)
    return out
