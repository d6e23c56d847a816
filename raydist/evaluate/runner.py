"""`raydist eval`: checkpoints x attacks x test shards, fanned out over a pool of Ray evaluation actors.

Every finished shard is written at once as a small parquet part, so an interrupted evaluation resumes where it
stopped (--resume), and a shard whose actor died is handed to another actor. At the end the parts are merged
into samples.parquet and summarised as report.md / report.json (one row per checkpoint, the papers' column
order), with eps_curve.png for --eps-sweep and the sanity flags a robustness researcher looks for.
"""

from __future__ import annotations

import json
import math
import shutil
from collections import deque
from pathlib import Path
from typing import Any

from raydist import config as C
from raydist.evaluate import sources as S

COLUMNS = {"clean": "Clean", "fgsm": "FGSM", "pgd10": "PGD-10", "pgd20": "PGD-20", "pgd50": "PGD-50",
           "cw20": "C&W", "apgd-ce": "APGD-CE", "apgd-dlr": "APGD-DLR", "apgd-t": "APGD-T", "fab-t": "FAB-T",
           "square": "Square", "aa": "AA"}
WHITE_BOX = ("fgsm", "pgd10", "pgd20", "pgd50", "cw20", "apgd-ce", "apgd-dlr", "apgd-t", "fab-t")
SWEEP_ATTACK = "pgd20"
SETTINGS = "settings.json"  # in parts/: what a --resume must match
IN_FLIGHT = 2  # shards queued per actor


def _eps_tag(eps: float) -> str:
    k = eps * 255
    return f"{round(k)}-255" if abs(k - round(k)) < 1e-6 else f"{eps:.6g}"


def _column_order(attack: str) -> int:
    import re

    names = list(COLUMNS)
    m = re.fullmatch(r"(pgd|cw)[0-9]+(?:x[0-9]+)?", attack)
    if attack not in names and m:  # any pgdN / pgdNxR next to PGD-50, any cwN next to C&W
        attack = "pgd50" if m.group(1) == "pgd" else "cw20"
    return names.index(attack) if attack in names else len(names)


def check_inputs(checkpoints: list[str | dict[str, Any]], attacks: list[str], out_dir: Path, *, resume: bool,
                 overwrite: bool, data: dict[str, Any] | None = None) -> dict[str, Any]:
    """Everything a user typed, checked before Ray starts; returns the data section the actors load.
    ``checkpoints``: raydist checkpoint paths, or one model source (a dict, see raydist.evaluate.sources) with
    ``data`` ({"dataset": ..., "root": ...}) saying what it is evaluated on."""
    from raydist.attacks import get_attack
    from raydist.models.checkpoint import CheckpointError, check_fits, read_checkpoint

    if not checkpoints:
        raise C.ConfigError("give at least one checkpoint")
    for name in attacks:
        try:
            get_attack(name)
        except ValueError as err:
            raise C.ConfigError(f"--attacks: {err}") from None
    if data is not None:
        from raydist.data import DATASETS

        if data.get("dataset") not in DATASETS:
            raise C.ConfigError(f"--dataset: unknown dataset {data.get('dataset')!r}; choose one of: "
                                f"{', '.join(DATASETS)}")
    given, data = data, None
    for path in checkpoints:
        if isinstance(path, dict):
            continue
        p = Path(path)
        try:
            ckpt = read_checkpoint(p)
            check_fits(ckpt, p)  # weights of its own model: a damaged file fails here, not in an actor
        except CheckpointError as err:
            raise C.ConfigError(str(err)) from None
        this = ckpt.get("data") or {"dataset": ckpt.get("dataset", "digits")}
        if given is not None and this.get("dataset") != given.get("dataset"):
            raise C.ConfigError(f"--dataset {given.get('dataset')}: {p} was trained on {this.get('dataset')}")
        if data is not None and this != data:
            raise C.ConfigError(f"{p} was trained on {this.get('dataset')} with other data settings than "
                                f"{checkpoints[0]}: evaluate them separately")
        data = this
    if data is None:
        data = dict(given or {})
    if overwrite and resume:
        raise C.ConfigError("--resume and --overwrite exclude each other")
    if resume and not (out_dir / "parts").is_dir():
        raise C.ConfigError(f"--resume: no evaluation to resume at {out_dir}")
    if not resume and out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise C.ConfigError(f"output directory {out_dir} already exists "
                            "(--resume finishes it, --overwrite deletes it and starts again)")
    keep = ("dataset", "root", "download", "val_size", "image_size", "num_classes", "channels", "train_size",
            "test_size")
    return {k: v for k, v in data.items() if k in keep}


def _tasks(n_ckpt: int, attacks: list[str], eps: float, sweep: list[float], n: int, shard: int) -> list[tuple]:
    jobs = [(c, a, eps) for c in range(n_ckpt) for a in attacks]
    jobs += [(c, SWEEP_ATTACK, e) for c in range(n_ckpt) for e in sweep if (c, SWEEP_ATTACK, e) not in jobs]
    return [(c, a, e, s0, min(n, s0 + shard)) for c, a, e in jobs for s0 in range(0, n, shard)]


def _part_name(task: tuple) -> str:
    c, a, e, s0, _ = task
    return f"c{c}_{a}_{_eps_tag(e)}_{s0:07d}.parquet"


def run_evaluation(checkpoints: list[str], attacks: list[str], eps: float, out_dir: str | Path, *,
                   workers: int = 2, gpus_per_worker: float = 0.0, cpus_per_worker: float = 1.0,
                   shard_size: int = 256, batch_size: int = 256, samples: int | None = None, seed: int = 0,
                   eps_sweep: list[float] | None = None, resume: bool = False, overwrite: bool = False,
                   data_root: str | None = None, attack_kwargs: dict[str, Any] | None = None,
                   precision: str = "fp32", tracking: str | bool = False, data: dict[str, Any] | None = None,
                   robustbench_json: str | Path | None = None) -> dict[str, Any]:
    """Evaluate ``checkpoints`` under ``attacks`` on the actor pool; returns the report (also written to
    ``out_dir``). ``precision``: fp32 (default) or bf16 for the attacks' forward and backward passes.
    ``checkpoints`` are raydist checkpoint paths or one model source (see raydist.evaluate.sources), which needs
    ``data`` ({"dataset": ...}); ``robustbench_json``: also write the result in RobustBench's format there.
    ``tracking``: log each attack's accuracy per checkpoint to MLflow (raydist.track.log_evaluation): an MLflow
    URI, or True for the store the checkpoints' training run logged to (if any)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import ray
    from tqdm import tqdm

    from raydist.atomic import write_atomic
    from raydist.data import load_dataset
    from raydist.evaluate.actors import EvalWorker
    from raydist.train.driver import ensure_ray

    out = Path(out_dir).resolve()
    from raydist.attacks.losses import PRECISIONS

    data = check_inputs(checkpoints, attacks, out, resume=resume, overwrite=overwrite, data=data)
    if precision not in PRECISIONS:
        raise C.ConfigError(f"--precision: expected one of {', '.join(PRECISIONS)}, got {precision!r}")
    if data_root is not None:
        data["root"] = data_root
    from raydist.data import DataError
    try:
        splits = load_dataset(data["dataset"], **{k: v for k, v in data.items() if k != "dataset"})
    except DataError as err:
        raise C.ConfigError(str(err)) from None
    # raydist checkpoints by absolute path; a model trained elsewhere, built once here to check that it fits
    paths = [S.check(p, data, splits) if isinstance(p, dict) else str(Path(p).resolve()) for p in checkpoints]
    n_test = len(splits.test_y)
    n = n_test if samples is None else min(samples, n_test)
    sweep = sorted(eps_sweep or [])
    settings = {"seed": seed, "precision": precision, "epsilon": eps, "eps_sweep": sweep, "attacks": list(attacks),
                "budgets": dict(attack_kwargs or {}), "samples": n, "shard_size": shard_size,
                "batch_size": batch_size, "dataset": data["dataset"],
                "checkpoints": [{"index": i, **S.describe(p)} for i, p in enumerate(paths)]}
    if resume:
        _check_resume_settings(out, settings)
    ensure_ray()
    if overwrite and out.exists():
        shutil.rmtree(out)
    parts = out / "parts"
    parts.mkdir(parents=True, exist_ok=True)
    (parts / SETTINGS).write_text(json.dumps(settings, indent=1) + "\n")
    todo = deque(t for t in _tasks(len(paths), attacks, eps, sweep, n, shard_size)
                 if not (parts / _part_name(t)).exists())
    every = _tasks(len(paths), attacks, eps, sweep, n, shard_size)
    total = len(every)
    label = {t: _column(t[1]) + ("" if t[2] == eps else f"@{_eps_tag(t[2]).replace('-', '/')}")
             for t in every}
    by_attack = {lab: [0, 0] for lab in label.values()}  # shards done, shards in all, per attack
    for t in every:
        by_attack[label[t]][1] += 1
        by_attack[label[t]][0] += (parts / _part_name(t)).exists()
    print(f"raydist: evaluating {len(paths)} checkpoint(s) x {len(attacks)} attack(s) on {n} test images "
          f"({total} shards, {total - len(todo)} already done) with {workers} actor(s)", flush=True)

    # the test split and every checkpoint travel through the object store once: an actor on any node works
    # without the driver's files (no shared filesystem needed) and without the dataset on its own disk
    test = ray.put({"x": splits.test_x[:n].numpy(), "y": splits.test_y[:n].numpy()})
    blobs = [ray.put(Path(S.file_of(p)).read_bytes()) if S.file_of(p) else None for p in paths]
    del splits
    remote = ray.remote(EvalWorker).options(num_cpus=cpus_per_worker, num_gpus=gpus_per_worker or 0)
    threads = max(1, int(cpus_per_worker))
    actors: list = []  # every actor started, replacements included: all are killed at the end

    def start_actor() -> Any:
        actor = remote.remote(test, gpus_per_worker > 0, threads)
        actors.append(actor)
        return actor

    # two slots per actor: while it attacks one shard the next waits in its queue, so its device never idles
    # between a result going back and the next shard coming in
    idle = deque(a for a in [start_actor() for _ in range(max(1, workers))] for _ in range(IN_FLIGHT))
    running: dict[Any, tuple] = {}
    dead: set = set()
    bar = tqdm(total=total, initial=total - len(todo), desc="shards", unit="shard")
    retries = 0
    try:
        while todo or running:
            while todo and idle:
                actor, task = idle.popleft(), todo.popleft()
                c, a, e, s0, s1 = task
                ref = actor.evaluate.remote(paths[c], [blobs[c]], a, s0, s1, e, batch_size, seed, attack_kwargs,
                                            precision)
                running[ref] = (task, actor)
            done, _ = ray.wait(list(running), num_returns=1)
            ref = done[0]
            task, actor = running.pop(ref)
            try:
                result = ray.get(ref)
            except (ray.exceptions.RayActorError, ray.exceptions.ActorDiedError):
                retries += 1
                if retries > 3 * len(actors) + total:
                    raise
                todo.appendleft(task)  # the shard goes to another actor; this one is replaced (once)
                if actor not in dead:
                    dead.add(actor)
                    while actor in idle:
                        idle.remove(actor)
                    fresh = start_actor()
                    idle.extend([fresh] * IN_FLIGHT)
                    bar.write(f"an evaluation actor died; shard {_part_name(task)} is redone on another")
                continue
            c, a, e, s0, _ = task
            table = pa.table({"checkpoint": [c] * len(result["index"]), "attack": [a] * len(result["index"]),
                              "eps": [e] * len(result["index"]), **result})
            write_atomic(parts / _part_name(task), lambda f, t=table: pq.write_table(t, f))
            idle.append(actor)
            by_attack[label[task]][0] += 1
            bar.set_postfix_str(" ".join(f"{k} {d}/{t}" for k, (d, t) in by_attack.items() if 0 < d < t)
                                or f"{label[task]} done")
            bar.update(1)
    finally:
        bar.close()
        for actor in actors:
            ray.kill(actor)
    report = summarize(out, paths, attacks, eps, sweep, precision, settings=settings)
    if robustbench_json is not None:
        results = [robustbench_result(report, row, _architecture(src)) for row, src in zip(report["rows"], paths)]
        Path(robustbench_json).write_text(json.dumps(results[0] if len(results) == 1 else results, indent=2) + "\n")
        print(f"written: {robustbench_json} (RobustBench's result format)")
    if tracking:
        from raydist.track import log_evaluation

        log_evaluation(report, out, tracking if isinstance(tracking, str) else None)
    return report


def _architecture(source: str | dict[str, Any]) -> str | None:
    if isinstance(source, dict):
        return source.get("model") or source.get("function")
    from raydist.models.checkpoint import CheckpointError, read_checkpoint

    try:
        return (read_checkpoint(source).get("model") or {}).get("name")
    except CheckpointError:
        return None


_FLAGS = {"seed": "--seed", "precision": "--precision", "epsilon": "--eps", "eps_sweep": "--eps-sweep",
          "attacks": "--attacks", "budgets": "the attack budgets", "samples": "--samples",
          "shard_size": "--shard-size", "batch_size": "--batch-size", "dataset": "the dataset"}


def _check_resume_settings(out: Path, settings: dict[str, Any]) -> None:
    """A resumed evaluation must be the one that was interrupted: every setting that changes a number (seeds,
    precision, eps, the eps sweep, attacks and their budgets, samples, shard and batch size, the data) and the
    content of every checkpoint index. A difference is one line naming it."""
    path = out / "parts" / SETTINGS
    if not path.is_file():
        raise C.ConfigError(f"--resume: {out} records no settings ({path} is missing), so it cannot be checked "
                            "that its parts match; --overwrite evaluates again")
    try:
        before = json.loads(path.read_text())
    except ValueError:
        raise C.ConfigError(f"--resume: {path} is not valid JSON; --overwrite evaluates again") from None
    for key, value in settings.items():
        if key == "checkpoints":
            continue
        flag = _FLAGS.get(key, key)
        if key not in before:
            raise C.ConfigError(f"--resume: {out} does not record {flag} (made by an older raydist), so it cannot "
                                "be checked that its parts match; --overwrite evaluates again")
        if before[key] != value:
            raise C.ConfigError(f"--resume: {out} was evaluated with {flag} {_show(key, before[key])}, "
                                f"not {_show(key, value)}")
    was = before.get("checkpoints")
    now = settings["checkpoints"]
    if not isinstance(was, list):
        raise C.ConfigError(f"--resume: {out} does not record its checkpoints' sha256 (made by an older raydist); "
                            "--overwrite evaluates again")
    if len(was) != len(now):
        raise C.ConfigError(f"--resume: {out} was evaluated on {len(was)} checkpoint(s), not {len(now)}")
    for a, b in zip(was, now):
        same = {k: v for k, v in a.items() if k != "file"} == {k: v for k, v in b.items() if k != "file"}
        if not same:
            raise C.ConfigError(f"--resume: checkpoint {b['index']} ({_what(b)}) is not the one evaluated there "
                                f"({_what(a)})")


def _what(entry: dict[str, Any]) -> str:
    text = entry.get("function") or entry.get("file") or "?"
    if entry.get("function") and entry.get("args"):
        text += " " + json.dumps(entry["args"], sort_keys=True)
    return text + (f", sha256 {str(entry['sha256'])[:12]}" if entry.get("sha256") else "")


def _show(key: str, value: Any) -> str:
    if key == "epsilon":
        return _eps_tag(value).replace("-", "/")
    if key == "eps_sweep":
        return ",".join(_eps_tag(e).replace("-", "/") for e in value) or "(none)"
    if key == "attacks":
        return ",".join(value)
    if key == "budgets":
        return json.dumps(value, sort_keys=True)
    return str(value)


class EvaluationError(RuntimeError):
    """Parts that do not add up to the evaluation asked for, or an attack that left its threat model."""


def _check_coverage(df, settings: dict[str, Any]) -> None:
    """Each (checkpoint, attack, eps) of the evaluation holds every requested sample exactly once."""
    import numpy as np

    n = settings["samples"]
    want = np.arange(n)
    jobs = {(c, a, e) for c, a, e, _, _ in _tasks(len(settings["checkpoints"]), settings["attacks"],
                                                   settings["epsilon"], settings["eps_sweep"], n,
                                                   settings["shard_size"])}
    groups = {k: g.to_numpy() for k, g in df.groupby(["checkpoint", "attack", "eps"])["index"]}
    for key in sorted(groups, key=str):
        if key not in jobs:
            raise EvaluationError(f"the parts hold checkpoint {key[0]} under {key[1]} at eps {key[2]:.6g}, which "
                                  "this evaluation did not ask for")
    for c, a, e in sorted(jobs, key=str):
        got = np.sort(groups.get((c, a, e), np.array([], dtype=int)))
        if len(got) != n or not (got == want).all():
            dup = int((np.diff(got) == 0).sum()) if len(got) else 0
            missing = len(np.setdiff1d(want, got))
            raise EvaluationError(f"checkpoint {c} under {a} at eps {_eps_tag(e).replace('-', '/')}: the parts hold "
                                  f"{len(got)} results for {n} samples ({dup} counted twice, {missing} missing); "
                                  "refusing to count them")


def summarize(out: Path, paths: list[str], attacks: list[str], eps: float, sweep: list[float],
              precision: str = "fp32", *, settings: dict[str, Any] | None = None) -> dict[str, Any]:
    """Merge the parts into samples.parquet and write report.md, report.json and eps_curve.png. With
    ``settings`` (those of parts/settings.json), only the evaluation's own parts are read, and each (checkpoint,
    attack, eps) must hold every requested sample exactly once."""
    import pyarrow.parquet as pq

    if settings is None:
        files = sorted((out / "parts").glob("*.parquet"))
    else:
        files = [out / "parts" / _part_name(t) for t in _tasks(len(paths), attacks, eps, sweep,
                                                                settings["samples"], settings["shard_size"])]
        absent = [f.name for f in files if not f.is_file()]
        if absent:
            raise EvaluationError(f"{len(absent)} part(s) missing in {out / 'parts'}, e.g. {absent[0]}")
    table = pq.read_table(files)
    df = table.to_pandas()
    if settings is not None:
        _check_coverage(df, settings)
    pq.write_table(table, out / "samples.parquet")
    rows = []
    for c, source in enumerate(paths):
        mine = df[(df.checkpoint == c) & (abs(df.eps - eps) < 1e-12)]
        acc = {a: float(mine[mine.attack == a].robust.mean()) for a in attacks if (mine.attack == a).any()}
        curve = {}
        for e in sweep:
            sub = df[(df.checkpoint == c) & (df.attack == SWEEP_ATTACK) & (abs(df.eps - e) < 1e-12)]
            if len(sub):
                curve[e] = float(sub.robust.mean())
        clean = float((mine.clean_pred == mine.label).mean()) if len(mine) else math.nan
        described = settings["checkpoints"][c] if settings else S.describe(source)
        described = {k: v for k, v in described.items() if k != "index"}
        rows.append({"checkpoint": S.label(source), "sha256": described.get("sha256"), "source": described,
                     "n": int(mine.groupby("attack").size().max()) if len(mine) else 0,
                     "clean": clean, "accuracy": acc, "worst_case": worst_case(mine, attacks),
                     "min_norm": min_norms(mine, attacks),
                     "eps_curve": [{"eps": e, "attack": SWEEP_ATTACK, "accuracy": v} for e, v in curve.items()],
                     "flags": sanity_flags(clean, acc, curve)})
    report = {"epsilon": eps, "threat_model": "Linf", "attacks": attacks, "precision": precision,
              "data": {"dataset": (settings or {}).get("dataset"), "samples": (settings or {}).get("samples")},
              "budgets": {a: attack_budget(a, eps, (settings or {}).get("budgets")) for a in attacks},
              "seed": (settings or {}).get("seed"), "rows": rows}
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "report.md").write_text(format_report(report) + "\n")
    if sweep:
        _plot_curve(out / "eps_curve.png", rows)
    print("\n" + format_report(report))
    print(f"\nwritten: {out}/report.md, report.json, samples.parquet" + (", eps_curve.png" if sweep else ""))
    return report


def worst_case(mine, attacks: list[str]) -> float | None:
    """The usual protocol's number (AutoAttack's, per sample): a point counts as robust only if it is classified
    right and every attack that ran at this eps failed on it. None with no attack besides clean."""
    ran = [a for a in attacks if a != "clean" and (mine.attack == a).any()]
    if not ran:
        return None
    sub = mine[mine.attack.isin(ran)]
    clean_ok = (sub.clean_pred == sub.label)
    per_sample = (sub.robust & clean_ok).groupby(sub["index"]).all()
    return float(per_sample.mean())


def min_norms(mine, attacks: list[str]) -> dict[str, dict[str, float | int]]:
    """For the minimal-perturbation attack (FAB): the median and mean L-inf norm of its successful perturbations
    (points classified right that it flipped within eps)."""
    out = {}
    for a in attacks:
        if not a.startswith("fab"):
            continue
        sub = mine[(mine.attack == a) & (mine.clean_pred == mine.label) & ~mine.robust]
        if "linf" not in sub:
            continue
        out[a] = {"successful": len(sub), "median_linf": float(sub.linf.median()) if len(sub) else None,
                  "mean_linf": float(sub.linf.mean()) if len(sub) else None}
    return out


def attack_budget(name: str, eps: float, kwargs: dict[str, Any] | None = None) -> dict[str, Any]:
    """Every setting an attack ran with: its function's defaults, what its name fixes (pgdN's steps, pgdNxR's
    restarts), and the budgets given."""
    import inspect
    import re

    from raydist import attacks as A

    if name == "clean":
        return {}
    fixed: dict[str, Any] = {}
    m = re.fullmatch(r"(pgd|cw)([0-9]+)(?:x([0-9]+))?", name)
    if m:
        fn = A.pgd if m.group(1) == "pgd" else A.cw
        fixed["steps"] = int(m.group(2))
        fixed["alpha"] = eps / 4
        if m.group(3):
            fixed["restarts"] = int(m.group(3))
    else:
        fn = {"fgsm": A.fgsm, "apgd-ce": A.apgd, "apgd-dlr": A.apgd, "apgd-t": A.apgd_targeted,
              "fab-t": A.fab_targeted, "square": A.square, "aa": A.autoattack}.get(name)
        if name == "apgd-dlr":
            fixed["loss"] = "dlr"
    if fn is None:
        return dict(kwargs or {})
    budget = {k: (list(p.default) if isinstance(p.default, tuple) else p.default)
              for k, p in inspect.signature(fn).parameters.items()
              if p.default is not inspect.Parameter.empty and k not in ("seed", "precision")}
    return {**budget, **fixed, **(kwargs or {})}


def robustbench_result(report: dict[str, Any], row: dict[str, Any], architecture: str | None) -> dict[str, Any]:
    """One row in the layout of RobustBench's model_info JSON files (accuracies in percent, as strings)."""
    robust = row["accuracy"].get("aa", row.get("worst_case"))
    return {
        "link": "", "name": Path(str(row["checkpoint"])).name, "authors": "", "additional_data": False,
        "number_forward_passes": 1, "dataset": report["data"].get("dataset"), "venue": "",
        "architecture": architecture or "", "eps": _eps_tag(report["epsilon"]).replace("-", "/"),
        "clean_acc": f"{100 * row['clean']:.2f}",
        "reported": f"{100 * robust:.2f}" if robust is not None else "",
        "autoattack_acc": f"{100 * robust:.2f}" if robust is not None else "",
        "threat_model": report.get("threat_model", "Linf"),
        "unreliable": False, "footnote": (
            "" if "aa" in row["accuracy"] else
            "robust accuracy is the per-sample worst case over "
            + ", ".join(a for a in report["attacks"] if a != "clean") + ", not the standard AutoAttack"),
        "raydist": {"sha256": row.get("sha256"), "samples": row["n"], "budgets": report["budgets"]},
    }


def sanity_flags(clean: float, acc: dict[str, float], curve: dict[float, float]) -> list[str]:
    """What a robustness researcher checks before trusting a table (Carlini et al., "On evaluating...")."""
    flags = []
    if "fgsm" in acc and acc["fgsm"] > clean + 1e-9:
        flags.append("FGSM accuracy is above clean accuracy: label leaking")
    white = [acc[a] for a in WHITE_BOX if a in acc]
    multi = [acc[a] for a in ("pgd10", "pgd20", "pgd50", "apgd-ce") if a in acc]
    if "fgsm" in acc and multi and min(multi) > acc["fgsm"] + 0.02:
        flags.append("multi-step attacks are weaker than FGSM: gradient masking")
    if "square" in acc and white and acc["square"] < min(white) - 0.02:
        flags.append("the black-box Square attack beats the white-box attacks: gradient masking")
    if len(curve) >= 2:
        es = sorted(curve)
        if any(curve[b] > curve[a] + 0.02 for a, b in zip(es, es[1:])):
            flags.append("accuracy does not fall as eps grows: gradient masking")
    return flags


def _column(attack: str) -> str:
    import re

    m = re.fullmatch(r"(pgd|cw)([0-9]+)(?:x([0-9]+))?", attack)
    if attack not in COLUMNS and m:
        return ("PGD-" if m.group(1) == "pgd" else "C&W-") + m.group(2) + (f"x{m.group(3)}" if m.group(3) else "")
    return COLUMNS.get(attack, attack)


def _budget_text(name: str, budget: dict[str, Any]) -> str:
    shown = {k: (_eps_tag(v).replace("-", "/") if k == "alpha" and isinstance(v, float) else v)
             for k, v in budget.items() if k not in ("norm",)}
    return f"{_column(name)} ({', '.join(f'{k}={v}' for k, v in shown.items())})"


def format_report(report: dict[str, Any]) -> str:
    attacks = sorted(report["attacks"], key=_column_order)
    worst = any(r.get("worst_case") is not None for r in report["rows"]) and len(
        [a for a in attacks if a != "clean"]) > 1
    head = ["checkpoint", "n"] + [_column(a) for a in attacks] + (["Worst case"] if worst else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    notes = []
    for r in report["rows"]:
        name = "/".join(Path(r["checkpoint"]).parts[-2:])
        cells = [name, str(r["n"])] + [f"{100 * r['accuracy'][a]:.2f}" if a in r["accuracy"] else "-"
                                       for a in attacks]
        if worst:
            cells.append(f"{100 * r['worst_case']:.2f}" if r.get("worst_case") is not None else "-")
        lines.append("| " + " | ".join(cells) + " |")
        notes += [f"- {name}: {f}" for f in r["flags"]]
        if r["eps_curve"]:
            notes.append(f"- {name}: {SWEEP_ATTACK} accuracy by eps: " + ", ".join(
                f"{_eps_tag(p['eps']).replace('-', '/')}: {100 * p['accuracy']:.1f}%" for p in r["eps_curve"]))
        for a, m in (r.get("min_norm") or {}).items():
            if m["successful"]:
                notes.append(f"- {name}: {_column(a)} flipped {m['successful']} points with L-inf norm median "
                             f"{255 * m['median_linf']:.2f}/255, mean {255 * m['mean_linf']:.2f}/255")
        src = r.get("source") or {}
        if src.get("kind") not in (None, "raydist"):
            what = src.get("function") or src.get("file")
            extra = [f"{src['architecture']}" if src.get("architecture") else "",
                     f"args {json.dumps(src['args'])}" if src.get("args") else "",
                     f"normalised with mean {src['mean']} std {src['std']}" if src.get("mean") else "",
                     f"sha256 {src['sha256'][:16]}" if src.get("sha256") else ""]
            notes.append(f"- {name}: {src['kind']} {what} (" + ", ".join(e for e in extra if e) + ")")
    eps = report["epsilon"]
    how = "" if report.get("precision", "fp32") == "fp32" else ", attacks run in bf16 autocast"
    data = report.get("data") or {}
    on = f" on {data['samples']} test images of {data['dataset']}" if data.get("dataset") else ""
    lines.insert(0, f"Robust accuracy (%) at eps = {_eps_tag(eps).replace('-', '/')} (L-inf{how}){on}\n")
    if worst:
        lines.append("\nWorst case: a point counts as robust only if every attack above failed on it.")
    budgets = report.get("budgets") or {}
    shown = [_budget_text(a, b) for a, b in budgets.items() if b]
    if shown:
        lines.append("Budgets: " + "; ".join(shown) + (f"; seed {report['seed']}" if report.get("seed") is not None
                                                       else ""))
    lines.append("\n" + ("\n".join(notes) if notes else "sanity checks: no label leaking or gradient masking signs"))
    return "\n".join(lines)


def _plot_curve(path: Path, rows: list[dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for r in rows:
        ax.plot([p["eps"] * 255 for p in r["eps_curve"]], [100 * p["accuracy"] for p in r["eps_curve"]], "-o", ms=3,
                label="/".join(Path(r["checkpoint"]).parts[-2:]))
    ax.set_xlabel("eps (x/255)")
    ax.set_ylabel(f"{SWEEP_ATTACK.upper()} accuracy (%)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
