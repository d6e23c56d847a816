"""What `raydist eval` evaluates: a raydist checkpoint, or a model trained elsewhere.

A *source* is plain data (it travels to the evaluation actors, and into settings.json and the report):

* ``{"kind": "raydist", "path"}``: a raydist checkpoint (``best.pt``, ``last.pt``);
* ``{"kind": "weights", "path", "model", ...}``: a state dict for a registered architecture (``--model NAME
  --weights FILE``), with other code's key prefixes and the reference repositories' layouts mapped;
* ``{"kind": "function", "function": "package.module:name", "args", "sys_path"}``: a function of the user's that
  returns an ``nn.Module`` (``--model-fn``, ``--model-args key=value``);
* ``{"kind": "export", "path", "format": "pt2" | "torchscript"}``: a ``torch.export`` archive or a TorchScript file.

Foreign sources also carry ``num_classes`` and ``mean``/``std``: the model then gets inputs in [0, 1] and a
``Normalize`` in front of it applies the statistics it was trained with, so attacks work in pixel space. Nothing
here unpickles an arbitrary object: state dicts are read with ``weights_only=True``, export archives and
TorchScript files by their own loaders (graphs of tensor operations, not Python objects).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from raydist import config as C


def kind_of_file(path: Path) -> str:
    """raydist, pt2 or torchscript, by the file's content (torch.save, torch.export and TorchScript all write zip
    archives; their members differ)."""
    if path.suffix == ".pt2":
        return "pt2"
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
    except (zipfile.BadZipFile, OSError):
        return "raydist"
    if any(n.endswith("archive_format") or "/models/" in n and n.endswith(".json") for n in names):
        return "pt2"
    if any(n.endswith("constants.pkl") for n in names) and any("/code/" in n for n in names):
        return "torchscript"
    return "raydist"


def label(source: dict[str, Any] | str) -> str:
    """What the report calls it: the file's path, or the function's name."""
    if isinstance(source, str):
        return source
    return source.get("path") or source["function"]


def file_of(source: dict[str, Any] | str) -> str | None:
    """The file a source is built from (its bytes travel to the actors), None for a function of the user's."""
    if isinstance(source, str):
        return source
    return source.get("path")


class FixedMode(nn.Module):
    """An exported or TorchScript model: its train/eval behaviour was fixed when it was saved (an exported
    module refuses .train() and .eval()), so the attacks' eval()/train() calls stop here."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.training = False

    def train(self, mode: bool = True) -> FixedMode:
        self.training = mode
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x)


def _normalized(model: nn.Module, source: dict[str, Any]) -> nn.Module:
    mean, std = source.get("mean"), source.get("std")
    if mean is None and std is None:
        return model
    from raydist.models.registry import Normalize

    return nn.Sequential(Normalize(mean, std), model)


def _import_function(source: dict[str, Any]):
    """The user's function; its module is found on sys.path, the directory it was found in by the driver, or
    the working directory (where a cluster job's working_dir lands)."""
    for extra in [*source.get("sys_path", []), os.getcwd()]:
        if extra and Path(extra).is_dir() and extra not in sys.path:
            sys.path.insert(0, extra)
    module_name, _, fn_name = source["function"].partition(":")
    module = importlib.import_module(module_name)
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise C.ConfigError(f"--model-fn {source['function']}: {module_name} has no function {fn_name!r}")
    return fn


def build(source: dict[str, Any] | str, device: str | torch.device = "cpu", *, data: bytes | None = None) -> nn.Module:
    """The model of ``source`` in eval mode on ``device``, taking images in [0, 1]. ``data``: the bytes of the
    source's file, read elsewhere (an evaluation actor gets them through Ray's object store, so it needs no
    filesystem of the driver's); without it the file is read from ``source["path"]``."""
    import io

    if isinstance(source, str):
        source = {"kind": "raydist", "path": source}
    kind = source["kind"]
    if kind == "raydist":
        from raydist.models import load_checkpoint

        return load_checkpoint(source["path"], device=str(device), data=data)[0]
    if kind == "weights":
        from raydist.models.checkpoint import reference_state_dict
        from raydist.models.pretrained import fit_state_dict
        from raydist.models.registry import create_model

        c = source["in_channels"]
        model = create_model(source["model"], num_classes=source["num_classes"], in_channels=c,
                             activation=source.get("activation", "relu"),
                             mean=source.get("mean") or [0.0] * c, std=source.get("std") or [1.0] * c,
                             **source.get("kwargs", {}))
        fit_state_dict(model, reference_state_dict(source["path"], source["model"], data=data),
                       f"--weights {source['path']}")
        return model.to(device).eval()
    if kind == "function":
        fn = _import_function(source)
        model = fn(**source.get("args", {}))
        if not isinstance(model, nn.Module):
            raise C.ConfigError(f"--model-fn {source['function']} returned a {type(model).__name__}, "
                                "not a torch.nn.Module")
        return _normalized(model, source).to(device).eval()
    if kind == "export":
        if source["format"] == "pt2":
            model = torch.export.load(source["path"] if data is None else io.BytesIO(data)).module()
        else:
            model = torch.jit.load(source["path"] if data is None else io.BytesIO(data), map_location="cpu")
        return FixedMode(_normalized(model, source).to(device))
    raise ValueError(f"unknown model source kind {kind!r}")


def _parse_value(text: str) -> Any:
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def parse_model_args(items: list[str]) -> dict[str, Any]:
    """``key=value`` pairs (values read as YAML scalars: 10, 0.5, true, [1, 2], text)."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip().isidentifier():
            raise C.ConfigError(f"--model-args: expected key=value with a Python name as key, got {item!r}")
        out[key.strip()] = _parse_value(value)
    return out


def foreign_source(*, positional: list[str], model: str | None, weights: str | None, model_fn: str | None,
                   model_args: list[str], mean: list[float] | None, std: list[float] | None,
                   num_classes: int | None, dataset: str | None) -> dict[str, Any] | None:
    """The source the command line describes, or None for raydist checkpoints only. Checks what can be checked
    without building the model (see :func:`check`)."""
    given = [f for f, v in (("--model", model), ("--weights", weights), ("--model-fn", model_fn)) if v]
    files = [Path(p) for p in positional]
    exported = [p for p in files if p.is_file() and kind_of_file(p) != "raydist"]
    if model_args and not (model_fn or model):
        raise C.ConfigError("--model-args: only with --model-fn (its arguments) or --model (the builder's, e.g. "
                            "width=8)")
    if not given and not exported:
        for flag, value in (("--mean", mean), ("--std", std), ("--num-classes", num_classes)):
            if value is not None:
                raise C.ConfigError(f"{flag}: only for a model trained elsewhere (--model/--weights, --model-fn, "
                                    "or a .pt2 / TorchScript file); a raydist checkpoint carries its own")
        return None
    if (mean is None) != (std is None):
        raise C.ConfigError("--mean and --std go together")
    if exported and (given or len(files) > 1):
        raise C.ConfigError(f"{exported[0]}: evaluate an exported or TorchScript model on its own")
    if given and files:
        raise C.ConfigError(f"{files[0]}: give either raydist checkpoints or one model trained elsewhere "
                            f"({'/'.join(given)}), not both")
    if model_fn and (model or weights):
        raise C.ConfigError("--model-fn: give either --model-fn or --model with --weights, not both")
    if bool(model) != bool(weights):
        raise C.ConfigError("--model and --weights go together" if model else "--weights needs --model NAME "
                            "(the architecture; `raydist models` lists them)")
    if dataset is None:
        raise C.ConfigError("--dataset: name the data a model trained elsewhere is evaluated on, e.g. cifar10")
    common = {"num_classes": num_classes, "mean": mean, "std": std}
    if model:
        from raydist.models.registry import get_model_entry

        try:
            get_model_entry(model)
        except (KeyError, ValueError) as err:
            raise C.ConfigError(f"--model: {str(err).strip(chr(39))}") from None
        path = Path(weights)
        if not path.is_file():
            raise C.ConfigError(f"--weights {path}: " + ("is a directory" if path.is_dir() else "not found"))
        return {"kind": "weights", "path": str(path.resolve()), "model": model,
                "kwargs": parse_model_args(model_args), **common}
    if model_fn:
        module_name, sep, fn_name = model_fn.partition(":")
        if not sep or not fn_name.isidentifier() or not all(p.isidentifier() for p in module_name.split(".")):
            raise C.ConfigError(f"--model-fn: expected package.module:function, got {model_fn!r}")
        return {"kind": "function", "function": model_fn, "args": parse_model_args(model_args), **common}
    p = exported[0]
    return {"kind": "export", "path": str(p.resolve()), "format": kind_of_file(p), **common}


def check(source: dict[str, Any], data: dict[str, Any], splits) -> dict[str, Any]:
    """Build ``source`` on the CPU and run it on two test images, before Ray starts: every mismatch (classes,
    input size, missing or unexpected keys, a function that fails) is a ConfigError naming it. Returns the
    source completed (classes, channels, the function's sys.path entry) for the actors."""
    from raydist.models.checkpoint import CheckpointError

    source = dict(source)
    c, h, w = (int(v) for v in splits.test_x.shape[1:])
    n_data = int(splits.num_classes)
    if source["num_classes"] is None:
        source["num_classes"] = n_data
    elif source["num_classes"] != n_data:
        raise C.ConfigError(f"--num-classes {source['num_classes']}: {data['dataset']} has {n_data} classes")
    for flag in ("mean", "std"):
        if source.get(flag) is not None and len(source[flag]) not in (1, c):
            raise C.ConfigError(f"--{flag}: {len(source[flag])} values for {c}-channel images")
        if source.get(flag) is not None and len(source[flag]) == 1:
            source[flag] = source[flag] * c
    if source.get("std") is not None and any(s <= 0 for s in source["std"]):
        raise C.ConfigError(f"--std: must be positive, got {source['std']}")
    what = {"weights": f"--weights {source.get('path')}", "function": f"--model-fn {source.get('function')}",
            "export": str(source.get("path"))}[source["kind"]]
    if source["kind"] == "weights":
        source["in_channels"] = c
    if source["kind"] == "function":
        module_name = source["function"].partition(":")[0]
        where = [os.getcwd()]
        try:
            spec = importlib.util.find_spec(module_name.split(".")[0])
        except (ImportError, ValueError):
            spec = None
        if spec is None and os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())
            spec = importlib.util.find_spec(module_name.split(".")[0])
        if spec is None:
            raise C.ConfigError(f"--model-fn {source['function']}: no module {module_name.split('.')[0]!r} on the "
                                "Python path or in the working directory")
        # the directory the top-level module or package was found in: the actors look there too
        origin = spec.origin if spec.submodule_search_locations is None else list(spec.submodule_search_locations)[0]
        if origin:
            where.insert(0, str(Path(origin).parent))
        source["sys_path"] = where
    try:
        model = build(source, "cpu")
    except C.ConfigError:
        raise
    except CheckpointError as err:
        raise C.ConfigError(str(err)) from None
    except Exception as err:  # noqa: BLE001 - whatever the user's code or file does wrong is one line naming it
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise C.ConfigError(f"{what}: cannot build the model: {first}") from None
    x = splits.test_x[:2].float().div(255)
    try:
        with torch.no_grad():
            out = model(x)
    except Exception as err:  # noqa: BLE001
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise C.ConfigError(f"{what}: fails on {data['dataset']}'s {c}x{h}x{w} images: {first}") from None
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != 2:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise C.ConfigError(f"{what}: returns {shape} for a batch of 2 images, not logits of shape (2, classes)")
    if out.shape[1] != source["num_classes"]:
        raise C.ConfigError(f"{what}: outputs {out.shape[1]} classes, {data['dataset']} has {n_data}")
    return source


def describe(source: dict[str, Any] | str) -> dict[str, Any]:
    """The report's account of a source: kind, file and sha256 (or function and arguments), normalisation."""
    from raydist.models.checkpoint import file_sha256

    if isinstance(source, str):
        source = {"kind": "raydist", "path": source}
    out: dict[str, Any] = {"kind": source["kind"]}
    if source.get("path"):
        out.update(file=source["path"], sha256=file_sha256(source["path"]))
    if source["kind"] == "weights":
        out["architecture"] = source["model"]
        if source.get("kwargs"):
            out["args"] = source["kwargs"]
    if source["kind"] == "export":
        out["format"] = source["format"]
    if source["kind"] == "function":
        out.update(function=source["function"], args=source.get("args", {}))
        module = sys.modules.get(source["function"].partition(":")[0])
        if module is not None and getattr(module, "__file__", None):
            out.update(file=module.__file__, sha256=file_sha256(module.__file__))
    for key in ("num_classes", "mean", "std"):
        if source.get(key) is not None:
            out[key] = source[key]
    return out
