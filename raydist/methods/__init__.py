"""Training methods: how one batch becomes one optimizer step.  Plain PyTorch, no Ray.

``METHODS`` maps config names to classes; ``METHOD_PARAMS`` gives each method's own
parameters and defaults (config validation uses it); ``create_method`` builds one.
"""

from __future__ import annotations

from typing import Any

from torch import nn
from torch.optim import Optimizer

from raydist.methods.base import AutocastFactory, TrainMethod, attack_view
from raydist.methods.fgsm_ckpt import FGSMCKPT
from raydist.methods.fgsm_ga import FGSMGA
from raydist.methods.fgsm_rs import FGSMRS
from raydist.methods.fgsm_sdi import FGSMSDI
from raydist.methods.free_at import FreeAT
from raydist.methods.pgd_at import PGDAT
from raydist.methods.standard import Standard
from raydist.methods.trades import TRADES

METHODS: dict[str, type[TrainMethod]] = {
    cls.name: cls for cls in (Standard, PGDAT, FGSMRS, FGSMSDI, FreeAT, FGSMGA, FGSMCKPT, TRADES)
}
METHOD_PARAMS: dict[str, dict[str, Any]] = {name: dict(cls.PARAMS) for name, cls in METHODS.items()}
COMMON_PARAMS: dict[str, Any] = {"label_smoothing": 0.0}


def create_method(
    name: str,
    model: nn.Module,
    optimizer: Optimizer,
    *,
    epsilon: float,
    autocast: AutocastFactory | None = None,
    smooth_backward: str = "none",
    **params: Any,
) -> TrainMethod:
    """Build method ``name``; ``params`` are its own parameters (see ``METHOD_PARAMS``) or
    ``label_smoothing``.  ``smooth_backward`` (none, attacker, optimizer, both) says where a
    ``relu_smoothgrad`` model uses its smooth backward (SAT).  Unknown names and parameters raise
    ValueError listing the choices."""
    try:
        cls = METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method '{name}'; available: {', '.join(METHODS)}") from None
    allowed = {**COMMON_PARAMS, **cls.PARAMS}
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        own = ", ".join(allowed)
        raise ValueError(f"method '{name}' takes no parameter {unknown}; its parameters: {own}")
    return cls(model, optimizer, epsilon=epsilon, autocast=autocast, smooth_backward=smooth_backward, **params)


__all__ = [
    "COMMON_PARAMS",
    "FGSMCKPT",
    "FGSMGA",
    "FGSMRS",
    "FGSMSDI",
    "FreeAT",
    "METHODS",
    "METHOD_PARAMS",
    "PGDAT",
    "TRADES",
    "Standard",
    "TrainMethod",
    "attack_view",
    "create_method",
]
