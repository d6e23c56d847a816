"""Self-describing checkpoints: the weights travel with the spec that rebuilds the model.

``raydist eval runs/x/best.pt`` must work with nothing but the file, so a checkpoint holds
the model spec (registry name, classes, activation, normalization, builder kwargs) next to
the weights of the *unwrapped* model — no DDP ``module.`` or ``torch.compile``
``_orig_mod.`` prefixes, so it loads into a plain model anywhere.
"""

from __future__ import annotations

import io
import os
import pickle
from pathlib import Path

import torch
from torch import nn

from raydist.models.registry import create_model, model_spec_for

FORMAT = "raydist/1"
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
_SPEC_KEYS = ("name", "num_classes", "activation", "in_channels", "input_size", "mean", "std", "kwargs")

__all__ = ["FORMAT", "CheckpointError", "check_fits", "file_sha256", "fit_problems", "load_checkpoint",
           "load_weights_only", "model_spec_for", "read_checkpoint", "reference_state_dict", "save_checkpoint",
           "unwrap_model"]


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: missing, a directory, empty, truncated, not a raydist checkpoint, or one
    whose unpickling would run code. The message is one line naming the file."""


def file_sha256(path: str | os.PathLike) -> str:
    """The sha256 of a file's bytes (hex): what reports name a checkpoint's weights by."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def unwrap_model(model: nn.Module) -> nn.Module:
    """Peel DistributedDataParallel (``.module``) and torch.compile (``._orig_mod``) wrappers."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel | nn.DataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


def _clean_key(key: str, prefixes: tuple[str, ...] = _WRAPPER_PREFIXES) -> str:
    """``key`` without the wrapper prefixes (DDP's ``module.``, torch.compile's ``_orig_mod.``, ...)."""
    stripped = True
    while stripped:
        stripped = False
        for prefix in prefixes:
            if key.startswith(prefix):
                key, stripped = key[len(prefix) :], True
        key = key.replace("._orig_mod.", ".")
    return key


def save_checkpoint(
    path: str | os.PathLike, model: nn.Module, *, model_spec: dict | None = None, **fields: object
) -> Path:
    """Write ``{"format", "model": spec, "state_dict", **fields}`` atomically.

    The file appears complete or not at all (temp file + ``os.replace``), so a worker killed
    mid-save never leaves a truncated "best" checkpoint.  ``model_spec`` defaults to the
    ``spec`` that ``create_model`` attached to the model.  Keep ``fields`` to plain data
    (numbers, strings, lists, dicts, tensors): checkpoints are loaded with ``weights_only``.
    """
    path = Path(path)
    inner = unwrap_model(model)
    spec = model_spec if model_spec is not None else getattr(inner, "spec", None)
    if not spec:
        raise ValueError("save_checkpoint needs model_spec= (the model carries no spec)")
    reserved = {"format", "model", "state_dict"} & fields.keys()
    if reserved:
        raise ValueError(f"checkpoint fields may not be named {sorted(reserved)}")
    state = {_clean_key(k): v.detach().cpu() for k, v in inner.state_dict().items()}
    payload = {"format": FORMAT, "model": dict(spec), "state_dict": state, **fields}
    from raydist.atomic import write_atomic

    return write_atomic(path, lambda f: torch.save(payload, f))


def _pickles_objects(source: Path | bytes) -> bool:
    """Whether ``source`` is a plain pickle stream (not torch's zip format) that imports or builds objects: read
    opcode by opcode with pickletools, which executes nothing."""
    import pickletools

    raw = source if isinstance(source, bytes) else source.read_bytes()
    try:
        return any(op.name in ("GLOBAL", "STACK_GLOBAL", "REDUCE", "INST", "OBJ", "NEWOBJ", "NEWOBJ_EX", "BUILD")
                   for op, _, _ in pickletools.genops(raw))
    except Exception:  # noqa: BLE001 - not a pickle stream at all: damaged or another format
        return False


def _unsafe_global(err: BaseException) -> str | None:
    """The module.name a refused pickle asked to import (torch's weights_only unpickler names it)."""
    import re

    found = re.search(r"unsupported (?:global:\s*)?GLOBAL ([\w.]+)", str(err), re.IGNORECASE)
    return found.group(1) if found else None


def load_weights_only(path: Path, *, noun: str = "checkpoint", map_location: str | torch.device = "cpu",
                      data: bytes | None = None) -> object:
    """``torch.load(path, weights_only=True)``, every way the file can be unusable (a directory, missing, empty,
    truncated, not a PyTorch file, or asking the unpickler for code) one :class:`CheckpointError` line naming it
    (``noun``: what the file is to the user, e.g. "pretrained weights"). ``data``: the file's bytes, read
    elsewhere; ``path`` then only names it."""
    if data is None:
        if path.is_dir():
            raise CheckpointError(f"{noun} {path} is a directory, not a file")
        if not path.is_file():
            raise CheckpointError(f"{noun} not found: {path}")
    if (len(data) if data is not None else path.stat().st_size) == 0:
        raise CheckpointError(f"{noun} {path} is empty (0 bytes)")
    try:
        return torch.load(path if data is None else io.BytesIO(data), map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        bad = _unsafe_global(err)
        if bad:
            raise CheckpointError(f"refused to load {path}: reading it would import {bad}, and a raydist {noun} "
                                  "holds only tensors and plain data (loading it could run code)") from None
        if _pickles_objects(path if data is None else data):  # a raw pickle that builds objects: refused
            raise CheckpointError(f"refused to load {path}: it holds something other than tensors and plain data "
                                  "(a pickled object; loading it could run code)") from None
        raise CheckpointError(f"cannot read {noun} {path}: not a PyTorch file, or corrupted") from None
    except Exception as err:  # noqa: BLE001 - the unpickler fails in many ways on a damaged file; all are this
        what = ("truncated or corrupted" if isinstance(err, (RuntimeError, EOFError))
                else "not a PyTorch file, or corrupted")
        raise CheckpointError(f"cannot read {noun} {path}: {what} ({type(err).__name__})") from None


def read_checkpoint(path: str | os.PathLike, *, map_location: str | torch.device = "cpu",
                    require: tuple[str, ...] = (), data: bytes | None = None) -> dict:
    """The content of a raydist checkpoint, read without running code.

    Always ``torch.load(weights_only=True)``: a checkpoint is tensors and plain data (the training state of
    ``last.pt`` included), so a file that asks the unpickler for anything else (a function to call, a class to
    build) is refused before it can run — a checkpoint downloaded from the internet is data, never a program.
    Every way a file can be unusable is a :class:`CheckpointError` with one line naming it; ``require`` names
    top-level keys the caller needs (e.g. ``train_state`` for ``--resume``). ``data``: the file's bytes, read
    elsewhere (an evaluation actor on another node gets them through Ray's object store); ``path`` then only
    names it in messages.
    """
    path = Path(path)
    ckpt = load_weights_only(path, map_location=map_location, data=data)
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        found = ckpt.get("format") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise CheckpointError(f"{path} is not a raydist checkpoint (expected format {FORMAT!r}, found {found!r})")
    missing = [k for k in require if k not in ckpt]
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks {', '.join(missing)}")
    return ckpt


def load_checkpoint(path: str | os.PathLike, device: str | torch.device = "cpu", *,
                    data: bytes | None = None) -> tuple[nn.Module, dict]:
    """Rebuild the model from the checkpoint's spec, load its weights, and return it in eval
    mode on ``device`` together with the whole checkpoint dict (``data``: the file's bytes, as in
    :func:`read_checkpoint`)."""
    ckpt = read_checkpoint(path, map_location=device, data=data)
    spec = ckpt.get("model")
    missing = [k for k in _SPEC_KEYS if not isinstance(spec, dict) or k not in spec]
    if missing or "state_dict" not in ckpt:
        what = f"model spec lacks {missing}" if missing else "no state_dict"
        raise CheckpointError(f"checkpoint {path} is incomplete: {what}")
    try:
        model = create_model(
            spec["name"],
            num_classes=spec["num_classes"],
            activation=spec["activation"],
            in_channels=spec["in_channels"],
            mean=spec["mean"],
            std=spec["std"],
            **spec["kwargs"],
        )
        model.load_state_dict(ckpt["state_dict"])
    except (ValueError, RuntimeError, TypeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"checkpoint {path} does not match its model spec: {first}") from e
    return model.to(device).eval(), ckpt


def _meta_model(spec: dict, **change: object) -> nn.Module:
    """The model a spec describes, built on the meta device (shapes only: no memory, no initialisation)."""
    spec = {**spec, **change}
    with torch.device("meta"):
        return create_model(spec["name"], num_classes=spec["num_classes"], activation=spec["activation"],
                            in_channels=spec["in_channels"], mean=spec["mean"], std=spec["std"], **spec["kwargs"])


def fit_problems(own: dict[str, torch.Tensor], state: dict[str, torch.Tensor], optional: set[str] = frozenset(),
                 skip_shapes: set[str] = frozenset()) -> str | None:
    """How ``state`` fails to fit a model whose state dict is ``own`` (keys missing, unexpected, of another
    shape), in a few words; None when it fits. ``optional`` keys may be missing; ``skip_shapes`` keys may differ."""
    def short(keys: list[str], limit: int = 4) -> str:
        return ", ".join(keys[:limit]) + (f", ... ({len(keys)})" if len(keys) > limit else "")

    missing = [k for k in own if k not in state and k not in optional]
    unexpected = [k for k in state if k not in own]
    mismatched = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own
                  if k in state and k not in skip_shapes and tuple(state[k].shape) != tuple(own[k].shape)]
    parts = [f"{what} [{short(keys)}]" for what, keys in (("missing", missing), ("unexpected", unexpected),
                                                          ("shape (file vs model)", mismatched)) if keys]
    return "; ".join(parts) or None


def check_fits(ckpt: dict, path: str | os.PathLike) -> None:
    """Refuse (CheckpointError, one line) a checkpoint whose weights do not fit the model its own spec describes:
    damaged, or a spec and weights from different models. Checked on the meta device, before any real work."""
    spec = ckpt.get("model")
    missing = [k for k in _SPEC_KEYS if not isinstance(spec, dict) or k not in spec]
    state = ckpt.get("state_dict")
    if missing or not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        what = f"model spec lacks {missing}" if missing else "no state_dict of tensors"
        raise CheckpointError(f"checkpoint {path} is incomplete: {what}")
    try:
        own = _meta_model(spec).state_dict()
    except Exception as err:  # noqa: BLE001 - an unknown model name, bad kwargs: the spec cannot be built
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"checkpoint {path}: its model spec ({spec.get('name')!r}) cannot be built: "
                              f"{first}") from None
    problem = fit_problems(own, {_clean_key(k): v for k, v in state.items()})
    if problem:
        raise CheckpointError(f"checkpoint {path}: its weights do not fit its model ({spec['name']}, "
                              f"{spec['activation']}): {problem}")


# Key prefixes of weights saved elsewhere: DDP, torch.compile, and wrappers that hold the network as `model`
_FOREIGN_PREFIXES = ("module.", "_orig_mod.", "model.")
# How the reference repositories name what raydist's registered models call otherwise, per registry name prefix:
# (regex, replacement); a replacement of None drops the key.
REFERENCE_LAYOUTS: dict[str, list[tuple[str, str | None]]] = {
    # kuangliu/pytorch-cifar's ResNet-18 as FGSM-SDI and Fast-AT use it: the classifier is `linear`
    "resnet": [(r"^linear\.", "fc.")],
    # Fast-AT's / FGSM-SDI's PreActResNet-18: the projection shortcut is nn.Sequential(conv)
    "preact_resnet": [(r"\.shortcut\.0\.", ".shortcut.")],
    # TRADES' (and RobustBench's) WideResNet: NetworkBlock.layer, convShortcut, the final bn1, and TRADES' unused
    # sub_block1 (built, never called in forward)
    "wide_resnet": [(r"^sub_block1\..*", None), (r"^(block\d)\.layer\.", r"\1."), (r"\.convShortcut\.", ".shortcut."),
                    (r"^bn1\.", "bn.")],
}


def reference_state_dict(path: str | os.PathLike, model_name: str, *,
                         data: bytes | None = None) -> dict[str, torch.Tensor]:
    """The weights of a state-dict file saved by other code, renamed for ``model_name`` (a registered model):
    read with ``weights_only=True`` (tensors and plain data only); ``{"state_dict": ...}`` / ``{"model": ...}``
    unwrapped; ``module.``, ``_orig_mod.`` and ``model.`` prefixes stripped; the reference repositories' layouts
    (REFERENCE_LAYOUTS) mapped. A CheckpointError names the file when it cannot be read."""
    import re

    from raydist.models.pretrained import _extract_state_dict

    path = Path(path)
    obj = load_weights_only(path, noun="--weights", data=data)
    if isinstance(obj, dict) and obj.get("format") == FORMAT:
        obj = obj.get("state_dict")
    try:
        state = _extract_state_dict(obj, path)
    except ValueError as err:
        raise CheckpointError(str(err)) from None
    rules = next((r for prefix, r in sorted(REFERENCE_LAYOUTS.items(), key=lambda kv: -len(kv[0]))
                  if model_name.startswith(prefix)), [])
    out = {}
    for key, value in state.items():
        key = _clean_key(key, _FOREIGN_PREFIXES)
        for pattern, repl in rules:
            if re.search(pattern, key):
                key = None if repl is None else re.sub(pattern, repl, key)
                if key is None:
                    break
        if key is not None:
            out[key] = value
    return out
