"""Compare files: one base job, the methods to train under it, and how to evaluate them — validated up front.

```yaml
base: digits_fgsm_sdi.yaml           # a job file, relative to this compare file
overrides: {optim.epochs: 30}        # SECTION.KEY: value, applied to every method's job (optional)
methods:                             # a name, or a mapping: name, label, set, and the method's own keys
  - pgd_at
  - {name: fgsm_rs, alpha: 64/255}
  - {name: fgsm_sdi, label: FGSM-SDI (k=5), k: 5, set: {optim.lr: 0.1}}
eval:                                # evaluation of best.pt and last.pt on the Ray evaluation actors
  attacks: [clean, pgd10, pgd20, pgd50, cw20, apgd-ce, aa]
  eps: null                          # default: the jobs' method.epsilon
  samples: null                      # first N test images (default: all)
  budgets: {aa: {n_iter: 20}}        # keyword arguments per attack (smaller budgets)
  workers: 2
run: {name: null, output_dir: null}  # default: the compare file's name, the base job's output_dir
max_concurrent: null                 # training runs at once (default: as many as the cluster fits)
tracking: {experiment: compare}      # keys of the job's tracking section (optional; default: the base job's)
```

Each method's job is the base job with its ``method`` section replaced: ``{name, epsilon}`` plus the entry's own
keys — or, when the entry names the base job's own method, the base job's method section with the entry's keys
on top (the base job is a complete, tuned job for its method). Then ``overrides`` and the command line's
``--set`` apply to every job, ``--set`` last, and an entry's ``set`` to its own job. Every job is validated here,
so every mistake is one ConfigError naming the key, before Ray starts.
"""

from __future__ import annotations

import copy
import inspect
import math
import re
from pathlib import Path
from typing import Any

from raydist import config as C

COMPARE_KEYS = ("base", "overrides", "methods", "eval", "run", "max_concurrent", "tracking")
EVAL_DEFAULTS: dict[str, Any] = {
    "attacks": ["clean", "pgd10", "pgd20", "pgd50", "cw20", "apgd-ce", "aa"],
    "eps": None, "samples": None, "budgets": {}, "workers": 2, "cpus_per_worker": 1.0, "gpus_per_worker": 0.0,
    "batch_size": 256, "shard_size": 256, "seed": 0,
}
RUN_DEFAULTS: dict[str, Any] = {"name": None, "output_dir": None}
ENTRY_KEYS = ("name", "label", "set")
# the papers' names for the methods (the table's first column, and the run directory's name)
LABELS = {"standard": "Standard", "pgd_at": "PGD-AT", "fgsm_rs": "FGSM-RS", "fgsm_ckpt": "FGSM-CKPT",
          "fgsm_ga": "FGSM-GA", "free_at": "Free-AT", "fgsm_sdi": "FGSM-SDI", "trades": "TRADES"}
# keys of a job's run section that name where a run lives or how it prints, not what it trains
RUN_PLACE_KEYS = ("name", "output_dir", "progress")


def _section(raw: dict[str, Any], name: str, defaults: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(defaults)
    for key, value in C.mapping(raw.get(name), name).items():
        if key not in out:
            raise C.ConfigError(f"unknown key '{name}.{key}'{C._did_you_mean(str(key), out)}; "
                                f"keys of {name}: {', '.join(out)}")
        out[key] = value
    return out


def _int(value: Any, key: str, minimum: int, nullable: bool = False) -> int | None:
    if value is None and nullable:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise C.ConfigError(f"{key}: expected an integer >= {minimum}, got {C.show(value)}")
    return value


def _number(value: Any, key: str, minimum: float, exclusive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < minimum or (
            exclusive and value == minimum):
        raise C.ConfigError(f"{key}: expected a number {'>' if exclusive else '>='} {minimum:g}, got {C.show(value)}")
    return float(value)


def _job_changes(mapping: Any, where: str) -> list[tuple[str, str, Any]]:
    """``{SECTION.KEY: value}`` as (section, key, value), each key checked against the job schema."""
    out = []
    for path, value in C.mapping(mapping, where).items():
        parts = str(path).split(".")
        if len(parts) != 2 or not all(parts):
            raise C.ConfigError(f"{where}: '{path}' is not a job key (expected SECTION.KEY, e.g. optim.epochs)")
        try:
            C._check_key(parts[0], parts[1])
        except C.ConfigError as err:
            raise C.ConfigError(f"{where}: {err}") from None
        _not_the_method(parts[0], parts[1], where)
        out.append((parts[0], parts[1], value))
    return out


def _not_the_method(section: str, key: str, where: str) -> None:
    if (section, key) == ("method", "name"):
        raise C.ConfigError(f"{where}: method.name cannot be changed for every run; each entry of methods names its "
                            "method")


def _cli_changes(overrides: list[str] | tuple[str, ...]) -> list[tuple[str, str, Any]]:
    """``--set SECTION.KEY=VALUE`` strings, parsed and checked as `raydist train --set` does."""
    out = []
    for item in overrides:
        ((section, values),) = C.apply_overrides({}, [item]).items()
        ((key, value),) = values.items()
        _not_the_method(section, key, f"--set {item}")
        out.append((section, key, value))
    return out


def _apply(raw: dict[str, Any], changes: list[tuple[str, str, Any]]) -> dict[str, Any]:
    out = copy.deepcopy(raw)
    for section, key, value in changes:
        sec = out.get(section)
        if sec is None:
            sec = out[section] = {}
        if not isinstance(sec, dict):
            raise C.ConfigError(f"section '{section}' must be a mapping")
        sec[key] = copy.deepcopy(value)
    return out


def slug(label: str) -> str:
    """The run directory's name for a label: "FGSM-SDI (k=5)" -> "fgsm_sdi_k_5"."""
    return re.sub(r"[^a-z0-9]+", "_", label.lower()).strip("_")


def _entry(item: Any, i: int) -> dict[str, Any]:
    where = f"methods[{i}]"
    if isinstance(item, str):
        item = {"name": item}
    if not isinstance(item, dict):
        raise C.ConfigError(f"{where}: expected a method name or a mapping with 'name', got {C.show(item)}")
    if "name" not in item:
        raise C.ConfigError(f"{where}: 'name' is required (one of {', '.join(C._methods())})")
    name = item["name"]
    methods = C._methods()
    if name not in methods:
        raise C.ConfigError(f"{where}.name: unknown method {name!r}{C._did_you_mean(str(name), methods)}; "
                            f"choose from {', '.join(methods)}")
    keys = {}
    for key, value in item.items():
        if key in ENTRY_KEYS:
            continue
        if key == "epsilon":
            raise C.ConfigError(f"{where}.epsilon: every method is trained and evaluated at one eps; "
                                "set it for all with overrides: {method.epsilon: ...}")
        if key not in C.SCHEMA["method"]:
            options = list(ENTRY_KEYS) + [k for k in C.SCHEMA["method"] if k not in ("name", "epsilon")]
            raise C.ConfigError(f"unknown key '{where}.{key}'{C._did_you_mean(str(key), options)}; "
                                f"an entry takes name, label, set and method keys ({', '.join(options[3:])})")
        keys[key] = value
    label = item.get("label", LABELS.get(name, name))
    if not isinstance(label, str) or not slug(label):
        raise C.ConfigError(f"{where}.label: expected a name with letters or digits, got {C.show(label)}")
    return {"name": name, "label": label, "keys": keys, "set": _job_changes(item.get("set"), f"{where}.set")}


def _budget_params(attack: str) -> dict[str, inspect.Parameter]:
    """The keyword arguments an attack's function takes beyond what its name fixes (a pgdN's steps)."""
    import raydist.attacks as A

    base = re.sub(r"[0-9]+$", "", attack) if re.fullmatch(r"(pgd|cw)[0-9]+", attack) else attack
    fn = {"fgsm": A.fgsm, "pgd": A.pgd, "cw": A.cw, "apgd-ce": A.apgd, "apgd-dlr": A.apgd,
          "apgd-t": A.apgd_targeted, "fab-t": A.fab_targeted, "square": A.square, "aa": A.autoattack}.get(base)
    if fn is None:
        return {}
    fixed = {"seed", "steps"} | ({"loss"} if base.startswith("apgd-") else set())
    params = {p.name: p for p in inspect.signature(fn).parameters.values()
              if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name not in fixed}
    if base == "pgd":  # the pgdN wrapper takes alpha (default eps/4) as a keyword
        params["alpha"] = inspect.Parameter("alpha", inspect.Parameter.KEYWORD_ONLY, default=None)
    return params


def _check_budgets(budgets: Any, attacks: list[str]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for attack, kwargs in C.mapping(budgets, "eval.budgets").items():
        where = f"eval.budgets.{attack}"
        if attack not in attacks:
            raise C.ConfigError(f"{where}: '{attack}' is not in eval.attacks ({', '.join(attacks)})")
        params = _budget_params(attack)
        out[attack] = {}
        for key, value in C.mapping(kwargs, where).items():
            if key not in params:
                takes = ", ".join(params) or "nothing"
                raise C.ConfigError(f"{where}: unknown keyword '{key}'{C._did_you_mean(str(key), params)}; "
                                    f"{attack} takes {takes}")
            default = params[key].default
            if key == "alpha":
                value = C.parse_fraction(value, f"{where}.alpha")
            elif isinstance(default, bool):
                if not isinstance(value, bool):
                    raise C.ConfigError(f"{where}.{key}: expected true or false, got {C.show(value)}")
            elif isinstance(default, int):
                _int(value, f"{where}.{key}", 1)
            elif isinstance(default, float):
                value = _number(value, f"{where}.{key}", 0.0)
            elif isinstance(default, str) and not isinstance(value, str):
                raise C.ConfigError(f"{where}.{key}: expected a string, got {C.show(value)}")
            out[attack][key] = value
        if not out[attack]:
            del out[attack]
    return out


def _check_eval(raw: dict[str, Any], eps: float) -> dict[str, Any]:
    from raydist.attacks import get_attack

    ev = _section(raw, "eval", EVAL_DEFAULTS)
    attacks = ev["attacks"]
    if isinstance(attacks, str):
        attacks = [a.strip() for a in attacks.split(",") if a.strip()]
    if not isinstance(attacks, list) or not attacks or not all(isinstance(a, str) for a in attacks):
        raise C.ConfigError(f"eval.attacks: expected a non-empty list of attack names, got {ev['attacks']!r}")
    for a in attacks:
        try:
            get_attack(a)
        except ValueError as err:
            raise C.ConfigError(f"eval.attacks: {err}") from None
    if len(set(attacks)) != len(attacks):
        raise C.ConfigError(f"eval.attacks: an attack is listed twice: {attacks}")
    if "clean" not in attacks:
        attacks = ["clean", *attacks]
    ev["attacks"] = attacks
    ev["eps"] = eps if ev["eps"] is None else C.parse_fraction(ev["eps"], "eval.eps")
    if not 0 <= ev["eps"] <= 1:
        raise C.ConfigError(f"eval.eps: must lie in [0, 1], got {ev['eps']!r}")
    _int(ev["samples"], "eval.samples", 1, nullable=True)
    for key in ("workers", "batch_size", "shard_size"):
        _int(ev[key], f"eval.{key}", 1)
    _int(ev["seed"], "eval.seed", 0)
    ev["cpus_per_worker"] = _number(ev["cpus_per_worker"], "eval.cpus_per_worker", 0.0, exclusive=True)
    ev["gpus_per_worker"] = _number(ev["gpus_per_worker"], "eval.gpus_per_worker", 0.0)
    ev["budgets"] = _check_budgets(ev["budgets"], attacks)
    return ev


def method_job(base_raw: dict[str, Any], entry: dict[str, Any],
               changes: list[tuple[str, str, Any]]) -> dict[str, Any]:
    """The raw job of one entry: the base job with the entry's method section, then ``changes`` and its ``set``."""
    raw = copy.deepcopy(base_raw)
    base_method = dict(raw.get("method") or {})
    if base_method.get("name", C.SCHEMA["method"]["name"].default) == entry["name"]:
        method = base_method
    else:
        method = {k: base_method[k] for k in ("epsilon",) if k in base_method}
    method.update(entry["keys"], name=entry["name"])
    raw["method"] = method
    return _apply(raw, [*changes, *entry["set"]])


def load_compare(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    """Read and validate a compare file; ``overrides`` (SECTION.KEY=VALUE) apply to every method's job, last.

    Returns the resolved comparison: every run's complete job (``runs``), the evaluation settings, the directory.
    """
    p = Path(path)
    if not p.is_file():
        raise C.ConfigError(f"compare file not found: {p}")
    raw = C.mapping(C.read_yaml(p, ""), str(p))
    for key in raw:
        if key not in COMPARE_KEYS:
            raise C.ConfigError(f"unknown compare key '{key}'{C._did_you_mean(str(key), COMPARE_KEYS)}; "
                                f"keys: {', '.join(COMPARE_KEYS)}")
    if "base" not in raw:
        raise C.ConfigError(f"{p}: 'base' is required (the job file every method is trained with)")
    base_path = (p.parent / str(raw["base"])).resolve()
    if not base_path.is_file():
        raise C.ConfigError(f"base: job file not found: {base_path}")
    base_raw = C.mapping(C.read_yaml(base_path, "base: ") or {}, f"base: {base_path}")
    tracking = [("tracking", str(k), v) for k, v in C.mapping(raw.get("tracking"), "tracking").items()]
    for _, key, _ in tracking:
        C._check_key("tracking", key)
    changes = tracking + _job_changes(raw.get("overrides"), "overrides") + _cli_changes(overrides)
    C.validate(_apply(base_raw, changes), name_hint=base_path.stem)  # a mistake in the base job is its own

    items = raw.get("methods")
    if not isinstance(items, list) or not items:
        raise C.ConfigError(f"methods: expected a non-empty list of methods ({', '.join(C._methods())}), "
                            f"got {C.show(items)}")
    entries = [_entry(item, i) for i, item in enumerate(items)]
    seen: dict[str, int] = {}
    for i, e in enumerate(entries):
        if slug(e["label"]) in seen:
            raise C.ConfigError(f"methods[{i}]: '{e['label']}' is listed twice (methods[{seen[slug(e['label'])]}]);"
                                " give each entry its own label")
        seen[slug(e["label"])] = i

    run = _section(raw, "run", RUN_DEFAULTS)
    run["name"] = run["name"] if run["name"] is not None else p.stem
    if not isinstance(run["name"], str) or "/" in run["name"] or run["name"] in ("", ".", ".."):
        raise C.ConfigError(f"run.name: must be a plain name, got {run['name']!r}")
    jobs = []
    for i, e in enumerate(entries):
        try:
            jobs.append(C.validate(method_job(base_raw, e, changes), name_hint=slug(e["label"])))
        except C.ConfigError as err:
            raise C.ConfigError(f"methods[{i}] ({e['label']}): {err}") from None
    if run["output_dir"] is None:
        run["output_dir"] = jobs[0]["run"]["output_dir"]
    if not isinstance(run["output_dir"], str) or not run["output_dir"]:
        raise C.ConfigError(f"run.output_dir: expected a path, got {run['output_dir']!r}")
    directory = (Path(run["output_dir"]).expanduser() / run["name"]).resolve()
    eps = {job["method"]["epsilon"] for job in jobs}
    if len(eps) > 1:
        raise C.ConfigError(f"methods: the jobs train at different eps ({sorted(eps)}): "
                            "set method.epsilon once, in the base job or overrides")
    runs = []
    for e, job in zip(entries, jobs):
        # each run lives in the comparison's directory; the driver prints its own per-epoch lines, with labels
        job["run"].update(name=slug(e["label"]), output_dir=str(directory / "runs"), progress=False)
        runs.append({"label": e["label"], "slug": slug(e["label"]), "job": job})
    return {
        "path": str(p.resolve()), "base_path": str(base_path), "runs": runs, "eval": _check_eval(raw, eps.pop()),
        "run": run, "dir": str(directory),
        "max_concurrent": _int(raw.get("max_concurrent"), "max_concurrent", 1, nullable=True),
    }


def expected_epochs(job: dict[str, Any]) -> int:
    """Epochs the loop runs: Free-AT (divide_epochs) replays each minibatch m times and runs epochs / m of them."""
    m = job["method"]
    if m["name"] == "free_at" and m.get("divide_epochs", True):
        return max(1, math.ceil(job["optim"]["epochs"] / m["m"]))
    return job["optim"]["epochs"]
