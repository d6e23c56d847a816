"""`raydist compare`: train every method of a compare file on Ray Train (concurrently where the cluster fits them),
evaluate their best and last checkpoints on the Ray evaluation actors, and write one table in the papers' layout.

Each training run is a Ray task that drives its own TorchTrainer (as a Tune trial does), so several runs train at
once when the cluster has the CPUs/GPUs for their workers; the driver prints one labelled line per epoch and per
finished run. Nothing is redone that is already there: a run whose saved config equals the new one and that
finished is reused, an evaluation with the same settings and checkpoints too. Nothing is replaced silently: a run
or evaluation made with other settings needs --overwrite, an interrupted run --resume (or --overwrite).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from raydist import config as C
from raydist.compare import report
from raydist.compare.spec import RUN_PLACE_KEYS, expected_epochs
from raydist.train import artifacts
from raydist.train.driver import run_dir_of

LAST, BEST = "last.pt", "best.pt"
EVAL_DIR, RUNS_DIR = "eval", "runs"


# -- what is there already ----------------------------------------------------------------------------------------
def config_differences(saved: dict[str, Any], job: dict[str, Any]) -> list[str]:
    """What differs between a run's saved config and the job, apart from where the run lives and how it prints."""
    place = {f"run.{k}" for k in RUN_PLACE_KEYS}
    return [d for d in C.differences(saved, job, ignore_sections=C.TRACKING_SECTIONS)
            if d.split(" ", 1)[0] not in place]


def run_state(job: dict[str, Any]) -> tuple[str, str]:
    """(state, detail) of a run directory: new, foreign, changed, finished, unfinished or empty."""
    d = run_dir_of(job)
    if not d.exists() or not any(d.iterdir()):
        return "new", ""
    saved_path = d / artifacts.CONFIG
    if not saved_path.is_file():
        return "foreign", f"{d} holds no {artifacts.CONFIG}"
    try:
        saved = yaml.safe_load(saved_path.read_text()) or {}
    except yaml.YAMLError:
        return "foreign", f"{saved_path} is not valid YAML"
    diff = config_differences(saved, job)
    if diff:
        return "changed", ", ".join(diff)
    if not (d / LAST).is_file():
        return "empty", ""
    rows = artifacts.read_metrics(d)
    want = expected_epochs(job)
    done = bool(rows) and (rows[-1]["epoch"] >= want or bool(rows[-1].get("stopped")))
    if done and (d / BEST).is_file():
        return "finished", f"{rows[-1]['epoch']} epochs"
    return "unfinished", f"epoch {rows[-1]['epoch'] if rows else 0}/{want}"


def plan_runs(spec: dict[str, Any], *, overwrite: bool, resume: bool) -> list[str]:
    """The action for every run (train, retrain, resume, reuse); a refusal is a ConfigError, raised before Ray."""
    if overwrite and resume:
        raise C.ConfigError("--resume and --overwrite exclude each other")
    actions = []
    for r in spec["runs"]:
        state, detail = run_state(r["job"])
        where = run_dir_of(r["job"])
        if state == "new":
            actions.append("train")
        elif state == "empty":  # a config.yaml and no finished epoch: nothing to lose
            actions.append("retrain")
        elif state == "finished":
            actions.append("reuse")
        elif state == "unfinished" and resume:
            actions.append("resume")
        elif overwrite:
            actions.append("retrain")
        elif state == "unfinished":
            raise C.ConfigError(f"{r['label']}: run {where} stopped at {detail} "
                                "(--resume continues it, --overwrite trains it again)")
        elif state == "changed":
            raise C.ConfigError(f"{r['label']}: run {where} was trained with another config: {detail} "
                                "(--overwrite trains it again)")
        else:
            raise C.ConfigError(f"{r['label']}: {detail} (--overwrite replaces it)")
    return actions


def _fingerprint(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns]


def eval_groups(ev: dict[str, Any]) -> list[tuple[str, list[str], dict[str, Any]]]:
    """(directory name, attacks, keyword arguments): one evaluation per distinct attack budget."""
    groups: dict[str, tuple[list[str], dict[str, Any]]] = {}
    for attack in ev["attacks"]:
        kwargs = ev["budgets"].get(attack, {})
        tag = "default" if not kwargs else "budget-" + hashlib.sha1(
            json.dumps(kwargs, sort_keys=True).encode()).hexdigest()[:8]
        groups.setdefault(tag, ([], kwargs))[0].append(attack)
    return [(tag, attacks, kwargs) for tag, (attacks, kwargs) in groups.items()]


def _eval_settings(ev: dict[str, Any], kwargs: dict[str, Any]) -> dict[str, Any]:
    """What an evaluation's per-shard parts depend on besides the checkpoints (not the attack list: each attack
    has parts of its own)."""
    return {"eps": ev["eps"], "samples": ev["samples"], "seed": ev["seed"], "shard_size": ev["shard_size"],
            "batch_size": ev["batch_size"], "attack_kwargs": kwargs}


def _eval_key(ev: dict[str, Any], run_dir: Path, kwargs: dict[str, Any]) -> dict[str, Any]:
    return {"checkpoints": {n: _fingerprint(run_dir / n) for n in (BEST, LAST)}, **_eval_settings(ev, kwargs)}


def _record_path(spec: dict[str, Any], r: dict[str, Any], tag: str) -> Path:
    return Path(spec["dir"]) / EVAL_DIR / r["slug"] / f"{tag}.json"


def plan_evals(spec: dict[str, Any], actions: list[str], *, overwrite: bool) -> None:
    """Refuse, before Ray starts, to replace an evaluation of a reused run that was made with other settings."""
    for r, action in zip(spec["runs"], actions):
        if action != "reuse":
            continue  # its evaluations (if any) belong to the run that is trained again, and go with it
        run_dir = run_dir_of(r["job"])
        for tag, _, kwargs in eval_groups(spec["eval"]):
            path = _record_path(spec, r, tag)
            if not path.is_file():
                continue
            saved = json.loads(path.read_text()).get("key", {})
            new = _eval_key(spec["eval"], run_dir, kwargs)
            diff = [k for k in new if saved.get(k) != new[k]]
            if diff and not overwrite:
                raise C.ConfigError(f"{r['label']}: its evaluation {path} was made with other {', '.join(diff)} "
                                    "(--overwrite evaluates again)")


# -- training --------------------------------------------------------------------------------------------------
def _train_one(job: dict[str, Any], resume: str | None, tracking: dict[str, Any] | None = None) -> None:
    """A Ray task: drive one Ray Train run (its workers ask for their own CPUs/GPUs) without the final test
    (``tracking``: its MLflow run nests under the comparison's)."""
    from raydist.train.driver import build_trainer, fit

    fit(build_trainer(job, resume, final_test=False, tracking=tracking), job)


def _need(job: dict[str, Any]) -> dict[str, float]:
    sc = job["scaling"]
    n = max(1, sc["num_workers"])
    need = {"CPU": n * sc["cpus_per_worker"]}
    if sc["use_gpu"]:
        need["GPU"] = n * sc["gpus_per_worker"]
    return need


def _fits(need: dict[str, float], free: dict[str, float]) -> bool:
    return all(free.get(k, 0.0) + 1e-9 >= v for k, v in need.items())


def _epoch_line(label: str, row: dict[str, Any], epochs: int) -> str:
    stopped = "  (stopped: eval.guard_drop)" if row.get("stopped") else ""
    return (f"[{label}] epoch {row['epoch']}/{epochs}  loss {row['train_loss']:.3f}  "
            f"train {100 * row['train_acc']:.1f}%  val clean {100 * row['val_clean_acc']:.1f}%  "
            f"val PGD-{row.get('val_steps', 10)} {100 * row['val_pgd_acc']:.1f}%  {row['images_per_sec']:.0f} img/s  "
            f"train time {row['elapsed'] / 60:.1f} min{stopped}")


def _finished_line(label: str, rows: list[dict[str, Any]], done: int, total: int) -> str:
    if not rows:
        return f"raydist: {label} finished ({done}/{total} runs done)"
    best = max(rows, key=lambda r: (r["val_pgd_acc"], r["val_clean_acc"]))
    return (f"raydist: {label} finished ({done}/{total} runs done): {rows[-1]['epoch']} epochs, "
            f"train time {rows[-1]['elapsed'] / 60:.1f} min, val PGD-{rows[-1].get('val_steps', 10)} "
            f"best {100 * best['val_pgd_acc']:.1f}% (epoch {best['epoch']}), last {100 * rows[-1]['val_pgd_acc']:.1f}%")


def _cause(err: BaseException) -> str:
    import ray

    if isinstance(err, ray.exceptions.RayTaskError):
        inner = err.as_instanceof_cause()
        err = inner if isinstance(inner, BaseException) else err
    while err.__cause__ is not None:
        err = err.__cause__
    text = f"{type(err).__name__}: {err}".strip()
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return lines[-1] if lines and "Traceback" in lines[0] else (lines[0] if lines else type(err).__name__)


def train_all(spec: dict[str, Any], actions: list[str], limit: int | None,
              tracking: dict[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    """Train the runs that need it, as many at once as the cluster fits (and ``limit``); returns per-run records."""
    import ray

    from raydist.train.driver import check_resources, check_shared_storage, create_run_dir, ensure_ray

    records: dict[str, dict[str, Any]] = {}
    todo = []
    for r, action in zip(spec["runs"], actions):
        run_dir = run_dir_of(r["job"])
        records[r["slug"]] = {"action": action, "started_at": None, "finished_at": None, "error": None}
        if action == "reuse":
            print(f"raydist: reusing {r['label']}: {run_dir} finished with the same config", flush=True)
            continue
        todo.append(r)
    if not todo:
        return records
    ensure_ray()  # only now: a comparison of finished runs and evaluations needs no Ray at all
    for r in todo:
        check_resources(r["job"])
    check_shared_storage(todo[0]["job"])  # every run lives under the comparison's directory
    local = not os.environ.get("RAY_ADDRESS")  # a remote cluster may autoscale: only `limit` holds there
    total = ray.cluster_resources()
    free = {k: float(total.get(k, 0.0)) for k in ("CPU", "GPU")} if local else {"CPU": math.inf, "GPU": math.inf}
    limit = limit or len(todo)
    from raydist.tune.runner import driver_resources

    # the task only drives its run's Ray Train workers: off spot nodes where the cluster says which those are
    remote = ray.remote(num_cpus=0, max_retries=0, resources=driver_resources())(_train_one)
    pending, running = list(todo), {}
    seen: dict[str, int] = {}
    done_count = len(spec["runs"]) - len(todo)
    print(f"raydist: training {len(todo)} run(s), up to {min(limit, len(todo))} at a time "
          f"({_fmt_resources(total) if local else 'cluster'}; each asks for "
          f"{', '.join(sorted({_fmt_resources(_need(r['job'])) for r in todo}))})", flush=True)
    while pending or running:
        launched = True
        while launched and len(running) < limit:
            launched = False
            for r in pending:
                need = _need(r["job"])
                if _fits(need, free) or not running:  # alone it always runs: check_resources said it fits
                    action = records[r["slug"]]["action"]
                    resume = str(run_dir_of(r["job"]) / LAST) if action == "resume" else None
                    if resume is None:
                        shutil.rmtree(Path(spec["dir"]) / EVAL_DIR / r["slug"], ignore_errors=True)
                        create_run_dir(r["job"], overwrite=True)
                    else:
                        shutil.rmtree(Path(spec["dir"]) / EVAL_DIR / r["slug"], ignore_errors=True)
                        artifacts.truncate_metrics(run_dir_of(r["job"]), _last_saved_epoch(Path(resume)))
                    seen[r["slug"]] = len(artifacts.read_metrics(run_dir_of(r["job"])))
                    for k, v in need.items():
                        free[k] = free.get(k, 0.0) - v
                    running[remote.remote(r["job"], resume, tracking)] = (r, need)
                    records[r["slug"]]["started_at"] = time.time()
                    verb = "continuing" if resume else "training"
                    print(f"raydist: {verb} {r['label']} ({r['job']['method']['name']}"
                          f"{_params_text(r['job'])}) in {run_dir_of(r['job'])}", flush=True)
                    pending.remove(r)
                    launched = True
                    break
        ready, _ = ray.wait(list(running), num_returns=1, timeout=2.0)
        for r, _ in running.values():  # one labelled line per new epoch of every running run
            rows = artifacts.read_metrics(run_dir_of(r["job"]))
            for row in rows[seen[r["slug"]]:]:
                print(_epoch_line(r["label"], row, expected_epochs(r["job"])), flush=True)
            seen[r["slug"]] = len(rows)
        for ref in ready:
            r, need = running.pop(ref)
            for k, v in need.items():
                free[k] = free.get(k, 0.0) + v
            rec = records[r["slug"]]
            rec["finished_at"] = time.time()
            done_count += 1
            try:
                ray.get(ref)
            except Exception as err:  # noqa: BLE001 - a failed run is reported; the others go on
                rec["error"] = _cause(err)
                print(f"raydist: {r['label']} failed ({done_count}/{len(spec['runs'])}): {rec['error']}",
                      file=sys.stderr, flush=True)
                continue
            print(_finished_line(r["label"], artifacts.read_metrics(run_dir_of(r["job"])), done_count,
                                 len(spec["runs"])), flush=True)
    return records


def _last_saved_epoch(last: Path) -> int:
    from raydist.models.checkpoint import read_checkpoint

    return int(read_checkpoint(last, require=("train_state",))["train_state"]["epoch"])


def _fmt_resources(res: dict[str, float]) -> str:
    return ", ".join(f"{res[k]:g} {k}" for k in ("CPU", "GPU") if res.get(k))


def _params_text(job: dict[str, Any]) -> str:
    from raydist.config import method_params

    params = dict(method_params(job))
    if job["method"]["label_smoothing"]:
        params["label_smoothing"] = job["method"]["label_smoothing"]
    text = ", ".join(f"{k}={_frac(v) if k == 'alpha' else v}" for k, v in params.items())
    return f": {text}" if text else ""


def _frac(value: Any) -> str:
    if value is None:
        return "default"
    k = value * 255
    return f"{round(k)}/255" if abs(k - round(k)) < 1e-6 else f"{value:.4g}"


# -- evaluation ------------------------------------------------------------------------------------------------
class _OnlyHeadlines(io.TextIOBase):
    """stdout during run_evaluation: its "raydist: evaluating ..." line and news of a dead actor pass, its table
    of the batch's checkpoints does not (the comparison prints one table for all runs at the end)."""

    def __init__(self, target) -> None:
        self.target, self.buf = target, ""

    def write(self, text: str) -> int:
        self.buf += text
        while "\n" in self.buf:
            line, self.buf = self.buf.split("\n", 1)
            if line.startswith("raydist:") or "actor died" in line:
                self.target.write(line + "\n")
                self.target.flush()
        return len(text)

    def flush(self) -> None:
        self.target.flush()


def _checkpoint_epoch(path: str) -> int:
    from raydist.models.checkpoint import read_checkpoint

    return int(read_checkpoint(path, require=("epoch",))["epoch"])


def evaluate_all(spec: dict[str, Any], runs: list[dict[str, Any]], *, workers: int | None) -> dict[str, Any]:
    """Best and last of every run under every attack: {slug: {"best": {...}, "last": {...}}}.

    Per budget group, the runs without a matching record are evaluated together in one `run_evaluation` (one pool
    of actors, shards of all checkpoints interleaved) in eval/batches/<group>-<hash>/, which an interrupted
    comparison resumes shard by shard; each run's rows are then kept as eval/<run>/<group>.json, so a run that is
    reused later is not evaluated again, and a run added later is evaluated alone. Where best.pt is the last epoch,
    the weights are the same and are evaluated once.
    """
    from raydist.evaluate.runner import run_evaluation
    from raydist.models.checkpoint import file_sha256

    ev = spec["eval"]
    merged = {r["slug"]: {which: {"checkpoint": str(run_dir_of(r["job"]) / name), "n": 0, "clean": math.nan,
                                  "accuracy": {}, "flags": []}
                          for which, name in (("best", BEST), ("last", LAST))} for r in runs}
    for tag, attacks, kwargs in eval_groups(ev):
        todo: dict[str, list[dict[str, Any]]] = {}
        reused = []
        for r in runs:
            path = _record_path(spec, r, tag)
            key = _eval_key(ev, run_dir_of(r["job"]), kwargs)
            rec = json.loads(path.read_text()) if path.is_file() else None
            if rec is not None and rec["key"] == key and set(attacks) <= set(rec["attacks"]):
                reused.append(r["label"])
                _merge(merged[r["slug"]], rec["rows"], attacks)
            else:  # checkpoints of one data section go together (`raydist eval` checks that they match)
                todo.setdefault(json.dumps(r["job"]["data"], sort_keys=True), []).append(r)
        if reused:
            print(f"raydist: reusing the evaluation of {', '.join(reused)} under {', '.join(attacks)} "
                  f"({Path(spec['dir']) / EVAL_DIR}/<run>/{tag}.json)", flush=True)
        for group in todo.values():
            ckpts, where = [], []  # where[i]: the indices of run i's best and last in ckpts
            for r in group:
                best, last = (str(run_dir_of(r["job"]) / name) for name in (BEST, LAST))
                if _checkpoint_epoch(best) == _checkpoint_epoch(last):  # the same weights: evaluated once
                    ckpts.append(last)
                    where.append((len(ckpts) - 1, len(ckpts) - 1))
                else:
                    ckpts += [best, last]
                    where.append((len(ckpts) - 2, len(ckpts) - 1))
            batch_key = {"settings": _eval_settings(ev, kwargs),
                         "checkpoints": [[c, _fingerprint(Path(c))] for c in ckpts]}
            digest = hashlib.sha1(json.dumps(batch_key, sort_keys=True).encode()).hexdigest()[:10]
            out = Path(spec["dir"]) / EVAL_DIR / "batches" / f"{tag}-{digest}"
            resume = (out / "parts").is_dir()  # the same checkpoints and settings: finish what is there
            print(f"raydist: evaluating best and last of {', '.join(r['label'] for r in group)} under "
                  f"{', '.join(attacks)}" + (f" ({', '.join(f'{k}={v}' for k, v in kwargs.items())})" if kwargs
                                             else "") + f" -> {out}", flush=True)
            with contextlib.redirect_stdout(_OnlyHeadlines(sys.stdout)):
                rep = run_evaluation(ckpts, attacks, ev["eps"], out, workers=workers or ev["workers"],
                                     gpus_per_worker=ev["gpus_per_worker"], cpus_per_worker=ev["cpus_per_worker"],
                                     shard_size=ev["shard_size"], batch_size=ev["batch_size"], samples=ev["samples"],
                                     seed=ev["seed"], resume=resume, overwrite=out.exists() and not resume,
                                     attack_kwargs=kwargs or None)
            for i, r in enumerate(group):
                rows = {"best": rep["rows"][where[i][0]], "last": rep["rows"][where[i][1]]}
                path = _record_path(spec, r, tag)
                path.parent.mkdir(parents=True, exist_ok=True)
                artifacts.write_json(path, {"key": _eval_key(ev, run_dir_of(r["job"]), kwargs), "attacks": attacks,
                                            "batch": str(out), "rows": rows})
                _merge(merged[r["slug"]], rows, attacks)
    for m in merged.values():
        for res in m.values():
            res["epoch"] = _checkpoint_epoch(res["checkpoint"])
            res["sha256"] = file_sha256(res["checkpoint"])  # the weights the row is of
    return merged


def _merge(into: dict[str, Any], rows: dict[str, Any], attacks: list[str]) -> None:
    for which in ("best", "last"):
        m, row = into[which], rows[which]
        m["n"], m["clean"] = row["n"], row["clean"]
        m["accuracy"].update({a: row["accuracy"][a] for a in attacks if a in row["accuracy"]})
        m["flags"] += [f for f in row["flags"] if f not in m["flags"]]


def _keep_times_of_reused(spec: dict[str, Any], records: dict[str, dict[str, Any]]) -> None:
    """A reused run keeps the start and finish times the comparison that trained it recorded."""
    path = Path(spec["dir"]) / report.JSON
    try:
        before = {r["run_dir"]: r for r in json.loads(path.read_text())["runs"]}
    except (OSError, ValueError, KeyError, TypeError):
        return
    for r in spec["runs"]:
        rec, old = records[r["slug"]], before.get(str(run_dir_of(r["job"])))
        if rec["action"] == "reuse" and old and old.get("error") is None:
            rec["started_at"], rec["finished_at"] = old.get("started_at"), old.get("finished_at")


# -- the whole comparison --------------------------------------------------------------------------------------
def run_compare(spec: dict[str, Any], *, overwrite: bool = False, resume: bool = False,
                workers: int | None = None) -> dict[str, Any]:
    """Train (or reuse), evaluate and tabulate every method of a compare file; returns compare.json's content."""
    start = time.time()
    actions = plan_runs(spec, overwrite=overwrite, resume=resume)
    plan_evals(spec, actions, overwrite=overwrite)
    d = Path(spec["dir"])
    d.mkdir(parents=True, exist_ok=True)
    shutil.copy(spec["path"], d / "compare.yaml")
    print(f"raydist: compare {', '.join(r['label'] for r in spec['runs'])} on "
          f"{spec['runs'][0]['job']['data']['dataset']} at eps = {_frac(spec['eval']['eps'])}; directory {d}",
          flush=True)
    from raydist import track

    parent, tracking = track.start_compare(spec)  # each method's run nests under the comparison's
    try:
        out, results = _train_evaluate_tabulate(spec, actions, workers, start, tracking)
    except BaseException:
        track.finish_compare(parent, None, d)
        raise
    track.finish_compare(parent, results, d)
    failed = [r["label"] for r in results if r["error"]]
    if failed:
        raise RuntimeError(f"{len(failed)} run(s) failed: {', '.join(failed)} (the table holds the others)")
    return out


def _train_evaluate_tabulate(spec: dict[str, Any], actions: list[str], workers: int | None, start: float,
                             tracking: dict[str, Any]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    records = train_all(spec, actions, spec["max_concurrent"], tracking)
    _keep_times_of_reused(spec, records)
    trained = [r for r in spec["runs"] if records[r["slug"]]["error"] is None]
    evaluated = evaluate_all(spec, trained, workers=workers) if trained else {}
    results = []
    for r in spec["runs"]:
        res = {"label": r["label"], "slug": r["slug"], "job": r["job"], "run_dir": str(run_dir_of(r["job"])),
               "history": artifacts.read_metrics(run_dir_of(r["job"])), **records[r["slug"]]}
        res.update(evaluated.get(r["slug"], {}))
        results.append(res)
    out = report.write_outputs(spec, results, wall_seconds=time.time() - start)
    return out, results
