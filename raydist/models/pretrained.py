"""Load local weights into a freshly built model (``create_model(..., pretrained_path=...)``).

Nothing is ever downloaded.  Accepted files:

* a raydist checkpoint (``save_checkpoint``): its whole state, normalization buffers included,
  so the model computes exactly what the checkpointed one did (``model.spec``'s mean/std follow);
* a ``state_dict`` of an ``ImageClassifier`` (keys ``normalize.*``/``net.*``): the same;
* a plain backbone ``state_dict``, e.g. torchvision's (``conv1.weight``, ...), or a training
  script's ``{"state_dict": ...}``/``{"model": ...}``: loaded into the backbone, keeping the
  model's own normalization.

``module.``/``_orig_mod.`` prefixes (DDP, torch.compile) are stripped.  Loading is strict,
except that parameters of activation modules the file lacks (SmoothReLU's α when the weights
come from a ReLU model) keep their initial values.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from raydist.models.swap import is_activation

__all__ = ["check_pretrained", "load_pretrained", "read_pretrained"]


def _extract_state_dict(obj: object, path: Path) -> dict[str, torch.Tensor]:
    from raydist.models.checkpoint import FORMAT

    def is_state(d: object) -> bool:
        return isinstance(d, dict) and bool(d) and all(isinstance(v, torch.Tensor) for v in d.values())

    if isinstance(obj, dict) and obj.get("format") == FORMAT and is_state(obj.get("state_dict")):
        return obj["state_dict"]
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and is_state(obj.get(key)):
            return obj[key]
    if is_state(obj):
        return obj
    raise ValueError(f"pretrained weights {path} hold no state_dict (a dict of tensors)")


def _activation_state_keys(module: nn.Module) -> set[str]:
    keys = set()
    for prefix, sub in module.named_modules():
        if is_activation(sub):
            for name, _ in list(sub.named_parameters()) + list(sub.named_buffers()):
                keys.add(f"{prefix}.{name}" if prefix else name)
    return keys


def read_pretrained(path: Path) -> dict[str, torch.Tensor]:
    """The state dict in a weights file, read with ``weights_only=True`` (a file that would run code is refused);
    a broken file is a one-line ValueError (CheckpointError) naming it."""
    from raydist.models.checkpoint import _clean_key, load_weights_only

    obj = load_weights_only(path, noun="pretrained weights")
    return {_clean_key(k): v for k, v in _extract_state_dict(obj, path).items()}


def check_pretrained(path: str | os.PathLike, name: str, activation: str, **kwargs: object) -> None:
    """Before anything runs (``raydist train``'s check of model.pretrained_path): the file is readable weights
    that fit model ``name``. The model is built on the meta device twice, with different classes and input
    channels, since those come from the dataset: tensors whose shape depends on them (the stem, the classifier)
    are checked by name only, the rest by name and shape. ValueError, one line, if not."""
    from raydist.models.checkpoint import CheckpointError, fit_problems
    from raydist.models.registry import create_model

    path = Path(path)
    state = read_pretrained(path)
    whole = any(k.startswith(("net.", "normalize.")) for k in state)
    built = []
    for classes, channels in ((10, 3), (11, 4)):
        try:
            with torch.device("meta"):
                model = create_model(name, num_classes=classes, activation=activation, in_channels=channels,
                                     **kwargs)
        except Exception:  # noqa: BLE001 - a builder that cannot run on the meta device: the loader checks the fit
            return
        built.append(model if whole or not hasattr(model, "net") else model.net)
    own, other = (m.state_dict() for m in built)
    data_dependent = {k for k in own if k in other and tuple(own[k].shape) != tuple(other[k].shape)}
    problem = fit_problems(own, state, _activation_state_keys(built[0]), data_dependent)
    if problem:
        raise CheckpointError(f"pretrained weights {path} do not fit model {name!r}: {problem}")


def load_pretrained(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load the weights in ``path`` into ``model`` (an ``ImageClassifier`` from ``create_model``).

    ``FileNotFoundError`` naming the path if it is missing; ``ValueError`` naming it if the file
    is unreadable or its weights do not fit the model.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"pretrained weights not found: {path}")
    return fit_state_dict(model, read_pretrained(path), f"pretrained weights {path}")


def fit_state_dict(model: nn.Module, state: dict[str, torch.Tensor], what: str) -> nn.Module:
    """Load ``state`` (prefixes already stripped) into ``model``, whole (``normalize.*``/``net.*`` keys) or into
    its backbone, strictly; a ValueError starting with ``what`` lists the missing, unexpected and misshapen keys."""
    whole = any(k.startswith(("net.", "normalize.")) for k in state)
    target = model if whole or not hasattr(model, "net") else model.net
    own = target.state_dict()
    optional = _activation_state_keys(target) | {k for k in own if k.endswith("num_batches_tracked")}
    missing = [k for k in own if k not in state and k not in optional]
    unexpected = [k for k in state if k not in own]
    mismatched = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
                  for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or mismatched:
        raise ValueError(
            f"{what} do not fit model {_name(model)}: missing {_short(missing)}, "
            f"unexpected {_short(unexpected)}, shape mismatch (file vs model) {_short(mismatched)}"
        )
    target.load_state_dict(state, strict=False)
    spec = getattr(model, "spec", None)
    if whole and isinstance(spec, dict) and hasattr(model, "normalize"):
        spec["mean"] = [float(v) for v in model.normalize.mean.flatten()]
        spec["std"] = [float(v) for v in model.normalize.std.flatten()]
    return model


def _name(model: nn.Module) -> str:
    spec = getattr(model, "spec", None)
    return repr(spec["name"]) if isinstance(spec, dict) and "name" in spec else type(model).__name__


def _short(keys: list[str], limit: int = 6) -> str:
    shown = ", ".join(keys[:limit])
    return f"[{shown}{', ...' if len(keys) > limit else ''}] ({len(keys)})"
