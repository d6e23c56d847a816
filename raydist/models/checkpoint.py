"""Self-describing checkpoints: the weights travel with the spec that rebuilds the model.

``raydist eval runs/x/best.pt`` must work with nothing but the file, so a checkpoint holds
the model spec (registry name, classes, activation, normalization, builder kwargs) next to
the weights of the *unwrapped* model — no DDP ``module.`` or ``torch.compile``
``_orig_mod.`` prefixes, so it loads into a plain model anywhere.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from raydist.models.registry import create_model, model_spec_for

FORMAT = "raydist/1"
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
_SPEC_KEYS = ("name", "num_classes", "activation", "in_channels", "input_size", "mean", "std", "kwargs")

__all__ = ["FORMAT", "load_checkpoint", "model_spec_for", "save_checkpoint", "unwrap_model"]


def unwrap_model(model: nn.Module) -> nn.Module:
    """Peel DistributedDataParallel (``.module``) and torch.compile (``._orig_mod``) wrappers."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel | nn.DataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


def _clean_key(key: str) -> str:
    stripped = True
    while stripped:
        stripped = False
        for prefix in _WRAPPER_PREFIXES:
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
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def load_checkpoint(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """Rebuild the model from the checkpoint's spec, load its weights, and return it in eval
    mode on ``device`` together with the whole checkpoint dict."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means "not a readable checkpoint"
        raise ValueError(f"cannot read checkpoint {path}: {type(e).__name__}: {e}") from e
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        found = ckpt.get("format") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise ValueError(f"{path} is not a raydist checkpoint (expected format {FORMAT!r}, found {found!r})")
    spec = ckpt.get("model")
    missing = [k for k in _SPEC_KEYS if not isinstance(spec, dict) or k not in spec]
    if missing or "state_dict" not in ckpt:
        what = f"model spec lacks {missing}" if missing else "no state_dict"
        raise ValueError(f"checkpoint {path} is incomplete: {what}")
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
        raise ValueError(f"checkpoint {path} does not match its model spec: {e}") from e
    return model.to(device).eval(), ckpt
