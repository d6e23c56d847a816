"""Sweep files: a base job, a search space over job keys, an objective and a budget — validated like job files.

```yaml
base: digits_fgsm_sdi.yaml          # a job file, relative to this sweep file
set: {optim.epochs: 6}              # fixed changes to the base job (optional)
space:
  method.k: {type: int, low: 1, high: 40}
  optim.lr: {type: loguniform, low: 0.01, high: 0.3}
  model.activation: {type: choice, values: [relu, softplus, silu]}
  method.generator_lr: {type: loguniform, low: 1.0e-4, high: 1.0e-2, when: {method.name: fgsm_sdi}}
objective: single                   # single: validation PGD accuracy up; multi: also training time down
search: {seed: 0, initial: [{method.k: 20}]}
scheduler: {grace_period: 1, reduction_factor: 2}     # ASHA on validation PGD accuracy (or: none)
budget: {num_trials: 8, max_concurrent_trials: 2}
run: {name: my_sweep, output_dir: runs}
tracking: {experiment: sweeps}      # keys of the job's tracking section (optional; default: the base job's)
```

Every mistake raises ConfigError with one line naming the key, before Ray starts.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

from raydist import config as C

SWEEP_KEYS = ("base", "set", "space", "objective", "search", "scheduler", "budget", "run", "tracking")
SPACE_TYPES = ("int", "float", "loguniform", "choice")
DEFAULTS: dict[str, dict[str, Any]] = {
    "search": {"seed": 0, "initial": []},
    "scheduler": {"type": "asha", "grace_period": 1, "reduction_factor": 2},
    "budget": {"num_trials": 8, "max_concurrent_trials": 1, "time_budget_s": None, "trial_retries": 2},
    "run": {"name": None, "output_dir": None},
}


def _job_key(path: str, where: str) -> tuple[str, str]:
    parts = str(path).split(".")
    if len(parts) != 2:
        raise C.ConfigError(f"{where}: '{path}' is not a job key (expected SECTION.KEY, e.g. method.k)")
    C._check_key(parts[0], parts[1])
    return parts[0], parts[1]


def _section(raw: dict[str, Any], name: str, sweep_key: str) -> dict[str, Any]:
    values = C.mapping(raw.get(name), sweep_key)
    out = copy.deepcopy(DEFAULTS[name])
    for key, value in values.items():
        if key not in out:
            raise C.ConfigError(f"unknown key '{sweep_key}.{key}'{C._did_you_mean(str(key), out)}; "
                                f"keys of {sweep_key}: {', '.join(out)}")
        out[key] = value
    return out


def _check_int(value: Any, key: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise C.ConfigError(f"{key}: expected an integer >= {minimum}, got {C.show(value)}")
    return value


def _check_entry(path: str, entry: Any, base: dict[str, Any]) -> dict[str, Any]:
    where = f"space.{path}"
    section, key = _job_key(path, where)
    if section in ("scaling", "run", *C.TRACKING_SECTIONS):
        # a trial's resources and run directory are fixed before Optuna draws its parameters
        raise C.ConfigError(f"{where}: {section} keys cannot be searched (set them in the base job or in 'set')")
    entry = dict(C.mapping(entry, where))
    kind = entry.get("type")
    if kind not in SPACE_TYPES:
        raise C.ConfigError(f"{where}.type: expected one of {', '.join(SPACE_TYPES)}, got {C.show(kind)}")
    allowed = {"type", "when"} | ({"values"} if kind == "choice" else {"low", "high"})
    for k in entry:
        if k not in allowed:
            raise C.ConfigError(f"{where}: unknown key '{k}' for type {kind} (keys: {', '.join(sorted(allowed))})")
    field = C.SCHEMA[section][key]
    if kind == "choice":
        values = entry.get("values")
        if not isinstance(values, list) or not values:
            raise C.ConfigError(f"{where}.values: expected a non-empty list, got {C.show(values)}")
        probes = values
    else:
        for bound in ("low", "high"):
            if bound not in entry:
                raise C.ConfigError(f"{where}: '{bound}' is required for type {kind}")
        if kind == "int" and field.kind != "int":
            raise C.ConfigError(f"{where}.type: int does not fit {path}, which is a {field.kind}")
        if kind != "int" and field.kind not in ("float", "frac"):
            raise C.ConfigError(f"{where}.type: {kind} does not fit {path}, which is a {field.kind}")
        if kind == "int":
            lo, hi = entry["low"], entry["high"]
            for name, v in (("low", lo), ("high", hi)):
                if isinstance(v, bool) or not isinstance(v, int):
                    raise C.ConfigError(f"{where}.{name}: expected an integer, got {C.show(v)}")
        else:
            lo = C.parse_fraction(entry["low"], f"{where}.low")
            hi = C.parse_fraction(entry["high"], f"{where}.high")
            if kind == "loguniform" and lo <= 0:
                raise C.ConfigError(f"{where}.low: must be > 0 for loguniform, got {C.show(lo)}")
        if not lo < hi:
            raise C.ConfigError(f"{where}: low must be below high, got low={entry['low']!r} high={entry['high']!r}")
        entry["low"], entry["high"] = lo, hi
        probes = [lo, hi]
    for value in probes:  # each value the search can pick must make a valid job
        probe = copy.deepcopy(base)
        probe.setdefault(section, {})[key] = value
        try:
            C.validate(probe)
        except C.ConfigError as err:
            raise C.ConfigError(f"{where}: {C.show(value)} does not make a valid job ({err})") from None
    when = C.mapping(entry.get("when"), f"{where}.when")
    for cond in when:
        _job_key(cond, f"{where}.when")
    entry["when"] = when
    return entry


def load_sweep(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    """Read and validate a sweep file; ``overrides`` (SECTION.KEY=VALUE) apply to the base job."""
    p = Path(path)
    if not p.is_file():
        raise C.ConfigError(f"sweep file not found: {p}")
    raw = C.mapping(C.read_yaml(p), str(p))
    for key in raw:
        if key not in SWEEP_KEYS:
            raise C.ConfigError(f"unknown sweep key '{key}'{C._did_you_mean(str(key), SWEEP_KEYS)}; "
                                f"keys: {', '.join(SWEEP_KEYS)}")
    if "base" not in raw:
        raise C.ConfigError(f"{p}: 'base' is required (the job file the sweep varies)")
    base_path = (p.parent / str(raw["base"])).resolve()
    if not base_path.is_file():
        raise C.ConfigError(f"base: job file not found: {base_path}")
    base_raw = C.mapping(C.read_yaml(base_path, "base: "), f"base: {base_path}")
    fixed = dict(C.mapping(raw.get("set"), "set"))
    for key in fixed:
        _job_key(key, "set")
    for key, value in C.mapping(raw.get("tracking"), "tracking").items():  # the sweep's own tracking section
        _job_key(f"tracking.{key}", "tracking")
        fixed[f"tracking.{key}"] = value
    base_raw = C.apply_overrides(base_raw, [f"{k}={yaml.safe_dump(v, default_flow_style=True).strip()}"
                                            for k, v in fixed.items()])
    base_raw = C.apply_overrides(base_raw, overrides)
    base_cfg = C.validate(base_raw, name_hint=base_path.stem)

    space_raw = C.mapping(raw.get("space"), "space")
    if not space_raw:
        raise C.ConfigError("space: at least one job key to search over is required")
    space = {k: _check_entry(k, v, base_raw) for k, v in space_raw.items()}
    order = list(space)
    for k, entry in space.items():
        for cond in entry["when"]:  # a condition names an earlier entry or a key of the base job
            if cond in space and order.index(cond) >= order.index(k):
                raise C.ConfigError(f"space.{k}.when: '{cond}' must come before {k} in space")

    objective = raw.get("objective", "single")
    if objective not in ("single", "multi"):
        raise C.ConfigError(f"objective: expected single or multi, got {objective!r}")
    search = _section(raw, "search", "search")
    _check_int(search["seed"], "search.seed", 0)
    if not isinstance(search["initial"], list) or not all(isinstance(d, dict) for d in search["initial"]):
        raise C.ConfigError("search.initial: expected a list of {job key: value} mappings")
    for i, point in enumerate(search["initial"]):
        for key in point:
            if key not in space:
                raise C.ConfigError(f"search.initial[{i}]: '{key}' is not in space")
    scheduler = _section(raw, "scheduler", "scheduler")
    if scheduler["type"] not in ("asha", "none"):
        raise C.ConfigError(f"scheduler.type: expected asha or none, got {scheduler['type']!r}")
    _check_int(scheduler["grace_period"], "scheduler.grace_period", 1)
    _check_int(scheduler["reduction_factor"], "scheduler.reduction_factor", 2)
    budget = _section(raw, "budget", "budget")
    _check_int(budget["num_trials"], "budget.num_trials", 1)
    _check_int(budget["max_concurrent_trials"], "budget.max_concurrent_trials", 1)
    if budget["time_budget_s"] is not None:
        _check_int(budget["time_budget_s"], "budget.time_budget_s", 1)
    _check_int(budget["trial_retries"], "budget.trial_retries", 0)
    run = _section(raw, "run", "run")
    run["name"] = run["name"] or p.stem
    run["output_dir"] = run["output_dir"] or base_cfg["run"]["output_dir"]
    if not isinstance(run["name"], str) or "/" in run["name"]:
        raise C.ConfigError(f"run.name: must be a plain name, got {run['name']!r}")
    return {
        "path": str(p.resolve()), "base_path": str(base_path), "base": base_cfg, "base_raw": base_raw,
        "space": space, "objective": objective, "search": search, "scheduler": scheduler, "budget": budget,
        "run": run,
    }


def job_for(sweep: dict[str, Any], params: dict[str, Any], name: str, output_dir: str) -> dict[str, Any]:
    """The resolved job a trial runs: the base job with the trial's parameters."""
    raw = copy.deepcopy(sweep["base_raw"])
    for path, value in params.items():
        section, key = path.split(".")
        raw.setdefault(section, {})[key] = value
    raw.setdefault("run", {}).update(name=name, output_dir=output_dir)
    return C.validate(raw, name_hint=name)
