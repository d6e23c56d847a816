"""Job files: schema, defaults, "8/255" parsing, and one clear error per mistake.

A job file is YAML with the sections below. Everything is validated here, before Ray starts, so a typo
costs a second instead of a cluster allocation. Every mistake raises :class:`ConfigError` whose message is
one line naming the key (or path) at fault; the CLI prints it and exits with code 2.
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import functools
import math
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

_CONTROL = {c: f"\\x{c:02x}" for c in [*range(0x20), 0x7F]} | {0x0A: "\\n", 0x0D: "\\r", 0x09: "\\t"}


class ConfigError(ValueError):
    """A mistake in a job file or an override; the message is one line naming the key. Control characters a file
    put in a key or value (a newline in a key name) are shown escaped, so the message stays one line."""

    def __init__(self, message: object = "") -> None:
        super().__init__(str(message).translate(_CONTROL))


_REQUIRED = object()


@dataclass(frozen=True)
class Field:
    """One leaf of the schema: its kind, default and the checks its value must pass."""

    kind: str  # int | float | frac | bool | str | int_list | str_list
    default: Any = None
    choices: Callable[[], Iterable[str]] | tuple[str, ...] | None = None
    min: float | None = None
    max: float | None = None
    min_exclusive: bool = False
    nullable: bool = False
    help: str = ""
    accept: Callable[[str], bool] | None = None  # admits values beyond `choices` (e.g. "elu(alpha=0.5)")

    def choice_list(self) -> list[str]:
        c = self.choices() if callable(self.choices) else self.choices
        return list(c or ())


def _datasets() -> tuple[str, ...]:
    from raydist.data import DATASETS

    return tuple(DATASETS)


def _models() -> list[str]:
    from raydist.models import list_models

    return [m["name"] for m in list_models()]


def _activation_spec_ok(value: str) -> bool:
    """A parametrised activation such as "elu(alpha=0.5)" is valid when it builds."""
    if "(" not in value:
        return False
    from raydist.models import make_activation

    try:
        make_activation(value)
    except (ValueError, TypeError):
        return False
    return True


def _timm_name(value: str) -> bool:
    return value.startswith("timm/") and len(value) > 5


def _activations() -> list[str]:
    from raydist.models import ACTIVATIONS

    return list(ACTIVATIONS)


def _methods() -> list[str]:
    from raydist.methods import METHODS

    return list(METHODS)


EVAL_ATTACKS = ("clean", "fgsm", "pgd10", "pgd20", "pgd50")


def _attacks() -> list[str]:
    from raydist.attacks import ATTACKS

    return list(ATTACKS)


def _attack_name_ok(value: str) -> bool:
    from raydist.attacks import get_attack

    try:
        get_attack(value)
    except ValueError:
        return False
    return True


SCHEMA: dict[str, dict[str, Any]] = {
    "run": {
        "name": Field("str", None, nullable=True, help="run name; default: the job file's name"),
        "output_dir": Field("str", "runs", help="runs are written to OUTPUT_DIR/NAME (a directory on disk; shared by "
                                                "every node on a multi-node cluster)"),
        "storage_path": Field("str", None, nullable=True,
                              help="Ray Train's checkpoint storage that restarted workers resume from: a path, "
                                   "a shared path or a URI (s3://, gs://, hdfs://, abfs://, file://); default: "
                                   "OUTPUT_DIR/NAME/ray"),
        "seed": Field("int", 0, min=0, help="initial weights, data order and attack starts"),
        "precision": Field("str", "auto", choices=("auto", "bf16", "fp32"),
                           help="auto: bf16 autocast on CUDA, fp32 on CPU"),
        "channels_last": Field("str", "auto", choices=("auto", "true", "false"),
                               help="auto: on for CUDA; true needs CUDA workers (on CPU a oneDNN kernel hangs on "
                                    "channels-last tensors)"),
        "compile": Field("str", "auto", choices=("auto", "true", "false"),
                         help="torch.compile the model; auto: on for CUDA (where it pays), off on CPU (where "
                              "compiling costs more than a short run saves)"),
        "compile_mode": Field("str", "default", choices=("default", "reduce-overhead", "max-autotune",
                                                         "max-autotune-no-cudagraphs"),
                              help="torch.compile mode; reduce-overhead replays the step's kernels as CUDA graphs"),
        "max_failures": Field("int", 0, min=-1, help="worker-group restarts Ray Train may make (-1: no limit)"),
        "resource_wait_s": Field("float", 1800.0, nullable=True, min=0, min_exclusive=True,
                                 help="how long a run (or a sweep's trials) may wait for the CPUs/GPUs its workers "
                                      "ask for before it fails saying so; null: wait for ever (e.g. for an "
                                      "autoscaler)"),
        "progress": Field("bool", True, help="print a progress line per epoch"),
        "stall_warning_s": Field("float", 600.0, nullable=True, min=0, min_exclusive=True,
                                 help="warn (naming the epoch, step and code) when no training or validation step "
                                      "has finished for this long; null: never"),
        "stall_timeout_s": Field("float", None, nullable=True, min=0, min_exclusive=True,
                                 help="end a worker whose step has not finished for this long, so Ray Train "
                                      "restarts the group from its last checkpoint (run.max_failures) or fails "
                                      "the run; default: wait"),
    },
    "data": {
        "dataset": Field("str", "digits", choices=_datasets, help="digits ships with scikit-learn"),
        "root": Field("str", None, nullable=True, help="where dataset files live"),
        "download": Field("bool", False, help="fetch CIFAR through torchvision when its files are missing"),
        "val_size": Field("int", None, nullable=True, min=1,
                          help="held out of the training set for model selection; default: 200 for digits, "
                               "1000 for CIFAR, 256 for synthetic"),
        "batch_size": Field("int", 128, min=1, help="per worker"),
        "eval_batch_size": Field("int", 256, min=1, help="batch size of validation and test evaluation"),
        "crop": Field("int", 4, min=0, help="random-crop padding in pixels (0: off)"),
        "flip": Field("bool", True, help="random horizontal flip"),
        "image_size": Field("int", 32, min=4, help="images are resized to this (synthetic: made at it)"),
        "num_classes": Field("int", 10, min=2, help="synthetic only"),
        "channels": Field("int", 3, min=1, help="synthetic (digits: 1 or 3)"),
        "train_size": Field("int", 2048, min=1, help="synthetic only"),
        "test_size": Field("int", 512, min=1, help="synthetic only"),
        "stream": Field("bool", False,
                        help="imagenet, tiny_imagenet: stream a parquet copy through Ray Data into the workers "
                             "(random resized crop + flip) instead of holding the decoded set in memory"),
    },
    "model": {
        "name": Field("str", "resnet18", choices=_models, accept=_timm_name,
                      help="see `raydist models`; timm/NAME when timm is installed"),
        "activation": Field("str", "relu", choices=_activations, accept=_activation_spec_ok,
                            help="swapped into every layer; parameters as in elu(alpha=0.5)"),
        "width": Field("int", None, nullable=True, min=1,
                       help="resnet18/preact_resnet18/resnext29_32x4d: base channels (64 in the papers); "
                            "wide_resnet: widening factor"),
        "zero_init_residual": Field("bool", False,
                                    help="zero-initialise the last BatchNorm of every residual block, as SAT's "
                                         "ResNets do (models with such a BatchNorm: resnet18, resnext29_32x4d and "
                                         "the ImageNet ResNets and ResNeXts)"),
        "smooth_backward": Field("str", "none", choices=("none", "attacker", "optimizer", "both"),
                                 help="SAT's controlled experiment, with activation relu_smoothgrad: where the "
                                      "smooth backward is used (attack gradients, weight update, both, neither)"),
        "pretrained_path": Field("str", None, nullable=True,
                                 help="local weights (state dict or raydist checkpoint) to start from"),
    },
    "method": {
        "name": Field("str", "fgsm_sdi", choices=_methods, help="training method"),
        "epsilon": Field("frac", 8 / 255, min=0, max=1, help="L-inf radius in [0,1] pixel units; 8/255 works"),
        "label_smoothing": Field("float", 0.0, min=0, max=1,
                                 help="of the training loss (FGSM-SDI's released code: 0.111, its factor 0.9; "
                                      "see docs/fidelity.md)"),
        # method-specific: which apply, and their defaults where not given, come from raydist.methods.METHOD_PARAMS
        "alpha": Field("frac", None, nullable=True, min=0, min_exclusive=True,
                       help="step size; default: eps/4 (pgd_at), 0.007/0.031 eps (trades: its reference's 0.007 "
                            "at eps 0.031), 1.25 eps (fgsm_rs, fgsm_ga, fgsm_ckpt), eps (fgsm_sdi, free_at)"),
        "steps": Field("int", 10, min=1, help="pgd_at, trades: attack steps"),
        "random_start": Field("bool", None, nullable=True,
                              help="start uniformly in the eps-ball; default: true (pgd_at, fgsm_ckpt), "
                                   "false (fgsm_ga)"),
        "k": Field("int", 20, min=1, help="FGSM-SDI: generator updated once every k target updates"),
        "generator_lr": Field("float", 1e-3, min=0, min_exclusive=True, help="FGSM-SDI: Adam lr of the generator"),
        "generator_weight_decay": Field("float", 5e-4, min=0, help="FGSM-SDI"),
        "generator_width": Field("int", 64, min=1, help="FGSM-SDI: hidden channels of the generator"),
        "generator_schedule": Field("str", "constant", choices=("constant", "model"),
                                    help="FGSM-SDI: the generator's Adam keeps generator_lr (constant, as in the "
                                         "reference) or follows the model's lr schedule (model)"),
        "m": Field("int", 8, min=1, help="free_at: replays of each minibatch"),
        "divide_epochs": Field("bool", True, help="free_at: run optim.epochs / m epochs (the paper's equal budget)"),
        "grad_align_lambda": Field("float", 0.2, min=0, help="fgsm_ga: weight of the GradAlign regularizer"),
        "c": Field("int", 3, min=1, help="fgsm_ckpt: checkpoints along the FGSM direction"),
        "beta": Field("float", 6.0, min=0, help="trades: weight of the KL term"),
    },
    "optim": {
        "name": Field("str", "sgd", choices=("sgd",), help="optimizer"),
        "lr": Field("float", 0.1, min=0, min_exclusive=True, help="peak learning rate"),
        "momentum": Field("float", 0.9, min=0, max=1, help="SGD momentum"),
        "weight_decay": Field("float", 5e-4, min=0, help="L2 weight decay"),
        "nesterov": Field("bool", False, help="Nesterov momentum"),
        "epochs": Field("int", 30, min=1, help="the lr schedule spans them; stepped every update"),
        "schedule": Field("str", "multistep", choices=("multistep", "cyclic", "cosine", "constant")),
        "milestones": Field("int_list", None, nullable=True,
                            help="multistep epochs; default: at 100/110 and 105/110 of the run"),
        "gamma": Field("float", 0.1, min=0, min_exclusive=True, help="multistep: factor at each milestone"),
        "peak": Field("float", 0.4, min=0, max=1, help="cyclic: fraction of the run where the lr peaks"),
    },
    "scaling": {
        "num_workers": Field("int", 1, min=0, help="Ray Train workers; 0 runs in the driver process"),
        "min_workers": Field("int", None, nullable=True, min=1,
                             help="elastic training: after a lost node, go on with as few as this many workers "
                                  "instead of waiting for a replacement, and grow back to num_workers when "
                                  "resources return; default: always num_workers"),
        "resize_interval_s": Field("float", 60.0, min=0, min_exclusive=True,
                                   help="elastic training: how often a healthy run checks whether it can grow"),
        "use_gpu": Field("bool", False, help="one CUDA device per worker (gpus_per_worker of it)"),
        "cpus_per_worker": Field("float", 1.0, min=0, min_exclusive=True, help="also torch's CPU threads"),
        "gpus_per_worker": Field("float", 1.0, min=0, min_exclusive=True,
                                 help="at most 1 (a worker uses one device); a fraction only with a single worker "
                                      "(num_workers 0 or 1): DDP ranks must not share a GPU"),
    },
    "eval": {
        "val_steps": Field("int", 10, min=1, help="PGD steps of the per-epoch validation attack"),
        "test_attacks": Field("str_list", list(EVAL_ATTACKS), choices=_attacks, accept=_attack_name_ok,
                              help="run on best and last at the end (PGD: step eps/4, random start; pgdN, cwN "
                                   "for N steps; the strong ones at their papers' budgets)"),
        "test_samples": Field("int", None, nullable=True, min=1, help="cap on test images (default: all)"),
        "select": Field("str", "robust", choices=("robust", "clean"),
                        help="best.pt is the epoch with the highest validation PGD (robust) or clean accuracy"),
        "guard_drop": Field("float", None, nullable=True, min=0, max=1,
                            help="stop when val PGD accuracy falls this far below its best"),
    },
    "tracking": {
        "mlflow": Field("bool", True, help="log the run to MLflow (installed by `pip install raydist[tracking]`; "
                                           "without it, nothing is logged)"),
        "uri": Field("str", None, nullable=True,
                     help="MLflow tracking URI: sqlite:///PATH, a path (a SQLite file), or a tracking server "
                          "http://HOST:5000; default: sqlite:///OUTPUT_DIR/mlflow.db (open it with `mlflow ui "
                          "--backend-store-uri sqlite:///OUTPUT_DIR/mlflow.db`); a server that is down is a "
                          "warning, never a failed run"),
        "experiment": Field("str", "raydist", help="MLflow experiment the runs go to"),
        "log_checkpoint": Field("bool", False, help="also upload best.pt to MLflow as an artifact"),
        "tensorboard": Field("bool", True, help="write the per-epoch scalars as TensorBoard event files into the run "
                                                "directory (`tensorboard --logdir OUTPUT_DIR`)"),
    },
}

# sections that say where a run is logged, not what it trains: a resumed or reused run may change them
TRACKING_SECTIONS = ("tracking",)

METHOD_COMMON = ("name", "epsilon", "label_smoothing")


def parse_fraction(value: Any, key: str) -> float:
    """Accept 0.03, 8/255, "8/255" or "0.03"; anything else is a ConfigError naming the key."""
    if isinstance(value, bool):
        raise ConfigError(f"{key}: expected a number or a fraction like 8/255, got {show(value)}")
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        text = value.strip()
        try:
            if "/" in text:
                num, den = text.split("/", 1)
                den_f = float(den)
                if den_f == 0:
                    raise ZeroDivisionError
                return float(num) / den_f
            return float(text)
        except (ValueError, ZeroDivisionError):
            pass
    raise ConfigError(f"{key}: expected a number or a fraction like 8/255, got {show(value)}")


def _did_you_mean(word: str, options: Iterable[str]) -> str:
    match = difflib.get_close_matches(word, list(options), n=1, cutoff=0.6)
    return f" (did you mean '{match[0]}'?)" if match else ""


def _coerce(field: Field, value: Any, key: str) -> Any:
    if value is None:
        if field.nullable:
            return None
        raise ConfigError(f"{key}: must be set (got null)")
    kind = field.kind
    if kind == "frac":
        out: Any = parse_fraction(value, key)
    elif kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                value = int(value)
            else:
                raise ConfigError(f"{key}: expected an integer, got {show(value)}")
        out = value
    elif kind == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {show(value)}")
        out = float(value)
    elif kind == "bool":
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {show(value)}")
        out = value
    elif kind == "str":
        if isinstance(value, bool) and field.choices == ("auto", "true", "false"):
            value = str(value).lower()
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {show(value)}")
        out = value
    elif kind in ("int_list", "str_list"):
        if isinstance(value, (str, int)) and not isinstance(value, bool):
            value = [v.strip() for v in value.split(",")] if isinstance(value, str) else [value]
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {show(value)}")
        want = int if kind == "int_list" else str
        for item in value:
            if isinstance(item, bool) or not isinstance(item, want):
                raise ConfigError(f"{key}: expected a list of {want.__name__}s, got item {show(item)}")
        out = list(value)
    else:  # pragma: no cover - schema bug
        raise AssertionError(kind)

    choices = field.choice_list()
    if choices:
        for item in out if isinstance(out, list) else [out]:
            if item not in choices and not (field.accept is not None and field.accept(item)):
                raise ConfigError(
                    f"{key}: unknown value {show(item)}{_did_you_mean(str(item), choices)}; "
                    f"choose from {', '.join(choices)}"
                )
    for item in out if isinstance(out, list) else [out]:
        if isinstance(item, (int, float)):
            if isinstance(item, float) and not math.isfinite(item):
                raise ConfigError(f"{key}: must be finite, got {show(item)}")
            if field.min is not None and (item < field.min or (field.min_exclusive and item == field.min)):
                op = ">" if field.min_exclusive else ">="
                raise ConfigError(f"{key}: must be {op} {field.min:g}, got {show(item)}")
            if field.max is not None and item > field.max:
                raise ConfigError(f"{key}: must be <= {field.max:g}, got {show(item)}")
    return out


def defaults() -> dict[str, dict[str, Any]]:
    """The full default job, every section and key present."""
    return {sec: {k: copy.deepcopy(f.default) for k, f in fields.items()} for sec, fields in SCHEMA.items()}


def _check_key(section: str, key: str | None = None) -> None:
    if section not in SCHEMA:
        raise ConfigError(f"unknown section '{section}'{_did_you_mean(section, SCHEMA)}; "
                          f"sections: {', '.join(SCHEMA)}")
    if key is not None and key not in SCHEMA[section]:
        raise ConfigError(f"unknown key '{section}.{key}'{_did_you_mean(key, SCHEMA[section])}; "
                          f"keys of {section}: {', '.join(SCHEMA[section])}")


def apply_overrides(raw: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` strings (values parsed as YAML) onto a raw job dict."""
    out = copy.deepcopy(raw)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {show(item)}: expected SECTION.KEY=VALUE, e.g. method.k=10")
        path, text = item.split("=", 1)
        parts = path.strip().split(".")
        if len(parts) != 2 or not all(parts):
            raise ConfigError(f"--set {show(item)}: expected SECTION.KEY=VALUE, e.g. method.k=10")
        section, key = parts
        _check_key(section, key)
        try:
            value = parse_yaml(text, f"--set {show(item)}") if text.strip() else None
        except yaml.YAMLError:
            value = text
        sec = out.setdefault(section, {})
        if not isinstance(sec, dict):
            raise ConfigError(f"section '{section}' must be a mapping")
        sec[key] = value
    return out


def validate(raw: dict[str, Any] | None, *, name_hint: str = "job") -> dict[str, dict[str, Any]]:
    """Turn a raw job dict into the resolved config: defaults filled, values typed and checked."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError("a job file must be a mapping of sections (run, data, model, method, ...)")
    cfg = defaults()
    for section, values in raw.items():
        _check_key(str(section))
        if values is None:
            continue
        if not isinstance(values, dict):
            raise ConfigError(f"section '{section}' must be a mapping, got {show(values)}")
        for key, value in values.items():
            _check_key(section, str(key))
            cfg[section][key] = _coerce(SCHEMA[section][key], value, f"{section}.{key}")

    _check_method_keys(raw.get("method") or {}, cfg["method"])
    _settle_method_keys(raw.get("method") or {}, cfg["method"])
    if cfg["run"]["name"] is None:
        cfg["run"]["name"] = name_hint
    if "/" in cfg["run"]["name"] or cfg["run"]["name"] in ("", ".", ".."):
        raise ConfigError(f"run.name: must be a plain name, got {cfg['run']['name']!r}")
    _check_storage(cfg["run"])
    if cfg["tracking"]["uri"] is not None and not cfg["tracking"]["uri"].strip():
        raise ConfigError("tracking.uri: empty; leave it out for sqlite:///OUTPUT_DIR/mlflow.db")
    ms = cfg["optim"]["milestones"]
    multistep = cfg["optim"]["schedule"] == "multistep"
    if multistep and ms is not None and any(m < 1 or m > cfg["optim"]["epochs"] for m in ms):
        raise ConfigError(f"optim.milestones: each must lie in 1..optim.epochs ({cfg['optim']['epochs']}), got {ms}")
    _check_gpus(cfg["scaling"])
    _check_elastic(cfg["scaling"])
    from raydist.train.speed import channels_last_problem

    problem = channels_last_problem(cfg["run"]["channels_last"], cfg["scaling"]["use_gpu"])
    if problem:
        raise ConfigError(problem)
    if _CHECK_FILES:
        _check_data(cfg["data"])
    _check_model(cfg)
    return cfg


def _check_elastic(sc: dict[str, Any]) -> None:
    if sc["min_workers"] is None:
        return
    if sc["num_workers"] < 1 or sc["min_workers"] > sc["num_workers"]:
        raise ConfigError(f"scaling.min_workers: {sc['min_workers']} must lie in 1..scaling.num_workers "
                          f"({sc['num_workers']})")
    from ray.train import ScalingConfig

    if "elastic_resize_monitor_interval_s" not in getattr(ScalingConfig, "__dataclass_fields__", {}):
        import ray

        raise ConfigError(f"scaling.min_workers: this Ray ({ray.__version__}) has no elastic Ray Train (a range of "
                          "workers); upgrade Ray or leave min_workers out")


def _check_gpus(sc: dict[str, Any]) -> None:
    """GPU shares Ray can grant but the loop cannot use: NCCL refuses two DDP ranks on one device ("Duplicate GPU
    detected", ray-project/ray#48012), so fractions need a single rank; and each rank drives one device, so more
    than one GPU per worker would be reserved and left idle."""
    if not sc["use_gpu"]:
        return
    g, n = sc["gpus_per_worker"], sc["num_workers"]
    if g > 1:
        raise ConfigError(f"scaling.gpus_per_worker: {g:g} reserves GPUs a worker never uses (each Ray Train worker "
                          f"drives one GPU); use 1 and scaling.num_workers: {n * math.ceil(g)} for that many GPUs")
    if g < 1 and n > 1:
        raise ConfigError(f"scaling.gpus_per_worker: {g:g} with {n} workers puts DDP ranks on a shared GPU, which "
                          "NCCL refuses (\"Duplicate GPU detected\"); use 1 GPU per worker, or num_workers: 1")


URI_SCHEMES = ("s3", "gs", "gcs", "hdfs", "viewfs", "abfs", "abfss", "file")


def is_uri(path: str) -> bool:
    return "://" in path


def check_output_dir(value: str) -> str:
    """run.output_dir is a directory on disk; object storage belongs in run.storage_path."""
    if is_uri(value):
        raise ConfigError(f"run.output_dir: {show(value)} is a URI, but the run directory is a directory on disk (a "
                          "shared filesystem on a multi-node cluster); put Ray Train's checkpoints in object "
                          f"storage with run.storage_path: {value}")
    return value


def check_storage_path(value: str | None) -> str | None:
    """A local path (made absolute) or a URI whose scheme pyarrow opens."""
    if value is None:
        return None
    if not value.strip():
        raise ConfigError("run.storage_path: empty; leave it out for <run directory>/ray")
    if is_uri(value):
        scheme = value.split("://", 1)[0].lower()
        if scheme not in URI_SCHEMES:
            raise ConfigError(f"run.storage_path: unknown URI scheme '{scheme}://' in {show(value)}; use a path or one "
                              f"of {', '.join(s + '://' for s in URI_SCHEMES)}")
        return value.rstrip("/")
    return str(Path(os.path.expanduser(value)).resolve())


def _check_storage(run: dict[str, Any]) -> None:
    check_output_dir(run["output_dir"])
    if run["storage_path"] is not None and (_CHECK_FILES or is_uri(run["storage_path"])):
        run["storage_path"] = check_storage_path(run["storage_path"])  # else a path on the cluster, kept as written


def _check_model(cfg: dict[str, Any]) -> None:
    model = cfg["model"]
    if model["smooth_backward"] != "none":
        from raydist.models.activations import parse_activation

        if parse_activation(model["activation"])[0] != "relu_smoothgrad":
            raise ConfigError(f"model.smooth_backward: {model['smooth_backward']!r} needs model.activation "
                              f"relu_smoothgrad (ReLU forward, smooth backward), not {model['activation']!r}")
        if cfg["method"]["name"] == "free_at" and model["smooth_backward"] != "both":
            raise ConfigError("model.smooth_backward: free_at takes attack and weight gradients from one backward "
                              "pass, so only 'none' or 'both' apply")
    if model["zero_init_residual"] and not model["name"].startswith("timm/"):
        from raydist.models.registry import builder_kwargs

        if "zero_init_residual" not in builder_kwargs(model["name"]):
            raise ConfigError(f"model.zero_init_residual: model '{model['name']}' has no BatchNorm closing its "
                              "residual blocks to zero-initialise (resnet18, resnext29_32x4d and the ImageNet "
                              "ResNets and ResNeXts have)")
    if model["pretrained_path"] is not None and _CHECK_FILES:
        path = Path(os.path.expanduser(model["pretrained_path"]))
        try:
            stat = path.stat()
            version = (stat.st_mtime_ns, stat.st_size)
        except (OSError, ValueError):
            version = None
        problem = _pretrained_problem(str(path), version, model["name"], model["activation"],
                                      tuple(sorted(model_params(cfg).items())))
        if problem:
            raise ConfigError(f"model.pretrained_path: {problem}")
        model["pretrained_path"] = str(path)


@functools.lru_cache(maxsize=16)
def _pretrained_problem(path: str, version: tuple | None, name: str, activation: str, kwargs: tuple) -> str | None:
    """Why the weights at ``path`` cannot start this model (readable, safe, of its architecture), or None; kept per
    file version, since a sweep or a comparison validates one job many times."""
    from raydist.models.pretrained import check_pretrained

    try:
        check_pretrained(path, name, activation, **dict(kwargs))
    except ValueError as err:
        return str(err)
    return None


def _check_method_keys(raw_method: dict[str, Any], method: dict[str, Any]) -> None:
    from raydist.methods import METHOD_PARAMS

    params = METHOD_PARAMS[method["name"]]
    for key in raw_method:
        if key not in METHOD_COMMON and key not in params:
            own = ", ".join(list(METHOD_COMMON[1:]) + list(params))
            raise ConfigError(f"method.{key}: not a parameter of method '{method['name']}' (its parameters: {own})")


def _settle_method_keys(raw_method: dict[str, Any], method: dict[str, Any]) -> None:
    """Keep only the keys the chosen method takes, with the method's own default where the job gives none, so a
    resolved config is itself a valid job file (and fgsm_ga's random_start defaults to false, pgd_at's to true)."""
    from raydist.methods import METHOD_PARAMS

    params = METHOD_PARAMS[method["name"]]
    for key in list(method):
        if key not in METHOD_COMMON and key not in params:
            del method[key]
    for key, default in params.items():
        if key not in raw_method:
            method[key] = default


_CHECK_FILES = True


@contextlib.contextmanager
def files_elsewhere():
    """Validate jobs whose data and weights live on another machine (``raydist submit``): every key and value is
    checked as usual, but not that data.root or model.pretrained_path exist here."""
    global _CHECK_FILES
    previous, _CHECK_FILES = _CHECK_FILES, False
    try:
        yield
    finally:
        _CHECK_FILES = previous


def _check_data(data: dict[str, Any]) -> None:
    from raydist.data import DataError, check_dataset

    if data["root"] is not None:
        data["root"] = str(Path(os.path.expanduser(data["root"])))
    try:
        check_dataset(data["dataset"], data["root"], data["download"])
    except DataError as err:
        raise ConfigError(f"data.root: {err}") from None
    if data["stream"]:
        from raydist.data import IMAGE_DATASETS
        from raydist.data.common import default_root
        from raydist.data.imagenet import locate_image_dataset
        from raydist.data.parquet import is_parquet_dataset

        if data["dataset"] not in IMAGE_DATASETS:
            raise ConfigError(f"data.stream: only for {', '.join(IMAGE_DATASETS)}; {data['dataset']} is held in "
                              "memory on the device")
        path = locate_image_dataset(data["dataset"], default_root(data["root"]))
        if not is_parquet_dataset(path):
            raise ConfigError(f"data.stream: {path} holds class folders; convert them once with "
                              f"`raydist data to-parquet {path} DST` and set data.root to DST")


def model_params(cfg: dict[str, Any]) -> dict[str, Any]:
    """The model builder's own keyword arguments the job sets (``width``, ``zero_init_residual``), for
    ``create_model`` and ``model_spec_for``; keys left at their default are left out."""
    m = cfg["model"]
    out: dict[str, Any] = {}
    if m["width"] is not None:
        out["width"] = m["width"]
    if m.get("zero_init_residual"):
        out["zero_init_residual"] = True
    return out


def method_params(cfg: dict[str, Any]) -> dict[str, Any]:
    """The keyword arguments the chosen method takes, from the resolved config."""
    from raydist.methods import METHOD_PARAMS

    m = cfg["method"]
    return {k: m[k] for k in METHOD_PARAMS[m["name"]] if k in m}


class StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader (plain data only), except that a key given twice in one mapping is an error: the safe
    loader silently keeps the last one, so a forgotten duplicate would quietly change a run. Keys a merge
    (``<<: *anchor``) brings in may still be overridden, as YAML intends."""

    def construct_mapping(self, node, deep=False):  # noqa: ANN001, ANN201 - PyYAML's signature
        if isinstance(node, yaml.MappingNode):
            first: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    seen = key in first
                except TypeError:  # an unhashable key: the safe loader's own error names it
                    continue
                if seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {show(key)} (first given on line {first[key] + 1}; "
                                    "give each key once)", key_node.start_mark)
                first[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


MAX_DEPTH = 16  # a raydist file nests 5 levels at most (compare: methods, entry, set, key, list)
MAX_VALUES = 100_000  # after anchors and aliases are expanded


def show(value: Any) -> str:
    """A value for an error message: its repr, shortened (a file may hold a long list or a long string)."""
    import reprlib

    r = reprlib.Repr()
    r.maxstring, r.maxother, r.maxlist, r.maxdict, r.maxlevel = 200, 200, 8, 8, 3
    return r.repr(value)


def _check_size(data: Any, where: str) -> None:
    """Refuse structures no raydist file needs: deeper than MAX_DEPTH (an alias that contains itself is
    infinitely deep) or, aliases expanded, more than MAX_VALUES values (a "billion laughs" file)."""
    stack, count = [(data, 0)], 0
    while stack:
        value, depth = stack.pop()
        count += 1
        if count > MAX_VALUES:
            raise ConfigError(f"{where}: too large (over {MAX_VALUES} values once its aliases are expanded)")
        if isinstance(value, (dict, list)):
            if depth >= MAX_DEPTH:
                raise ConfigError(f"{where}: nested more than {MAX_DEPTH} levels deep (or an alias contains "
                                  "itself); a raydist file needs a few")
            items = list(value.keys()) + list(value.values()) if isinstance(value, dict) else value
            stack.extend((v, depth + 1) for v in items)


def parse_yaml(text: str, where: str = "YAML") -> Any:
    """Plain data from YAML text with :class:`StrictLoader`; raises yaml.YAMLError or ConfigError (size)."""
    try:
        data = yaml.load(text, Loader=StrictLoader)  # noqa: S506 - StrictLoader is a SafeLoader
    except RecursionError:
        raise ConfigError(f"{where}: nested more than {MAX_DEPTH} levels deep; a raydist file needs a few") from None
    _check_size(data, where)
    return data


def read_yaml(path: Path, what: str = "") -> Any:
    """The YAML content of ``path``; any mistake (not text, bad syntax, a duplicate key, absurd nesting) is one
    ConfigError line naming the file and, where there is one, the line."""
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        raise ConfigError(f"{what}{path}: cannot read: {err.strerror or type(err).__name__}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{what}{path}: not a text file (byte {err.start} is not UTF-8); a raydist file is "
                          "YAML text") from None
    try:
        return parse_yaml(text, f"{what}{path}")
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or (str(err).splitlines() or ["invalid YAML"])[0]
        raise ConfigError(f"{what}{path}:{where}: {problem}") from None


def mapping(value: Any, key: str) -> dict[str, Any]:
    """``value`` as a mapping (None: empty), or a ConfigError naming ``key``; for sweep and compare files."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{key}: must be a mapping, got {show(value)}")
    return value


def load_job(path: str | os.PathLike, overrides: Iterable[str] = ()) -> dict[str, dict[str, Any]]:
    """Read, override and validate a job file. Raises ConfigError with one line on any mistake."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"job file not found: {p}")
    raw = apply_overrides(read_yaml(p) or {}, overrides)
    return validate(raw, name_hint=p.stem)


def dump(cfg: dict[str, Any]) -> str:
    """YAML text of a resolved config (what goes into the run directory)."""
    return yaml.safe_dump(cfg, sort_keys=False, default_flow_style=None)


def differences(a: dict[str, Any], b: dict[str, Any], ignore_sections: Iterable[str] = ()) -> list[str]:
    """Keys whose values differ between two resolved configs, as 'section.key (old -> new)'."""
    out = []
    for sec in SCHEMA:
        if sec in ignore_sections:
            continue
        for key in SCHEMA[sec]:
            va, vb = a.get(sec, {}).get(key), b.get(sec, {}).get(key)
            if va != vb:
                out.append(f"{sec}.{key} ({va!r} -> {vb!r})")
    return out
