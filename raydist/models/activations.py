"""Activation functions by name, and the smooth-backward switch of SAT.

Smooth adversarial training (SAT, Xie et al.) is an axis that combines with every model, so
every model builder takes its activation as a *name* and builds a fresh module from
:data:`ACTIVATIONS` at every place it needs one (torchvision and timm models get theirs
swapped module by module, see :mod:`raydist.models.swap`).  Models must never call
``F.relu`` directly: swapping modules does nothing for functional calls.

Names (``α`` is set with a keyword, e.g. ``make_activation("elu", alpha=0.5)``, or inside the
name, ``"elu(alpha=0.5)"``, which is how a job file picks it):

=====================  ==============================================  ===========================
name                   f(x)                                            smooth (C¹)?
=====================  ==============================================  ===========================
relu                   max(x, 0)                                       no (the baseline)
softplus               log(1 + eˣ)  (``beta`` as in ``nn.Softplus``)   yes
parametric_softplus    softplus(αx)/α, α = 10                          yes; f' = σ(αx)
silu                   x·σ(x)  (a.k.a. swish)                          yes
gelu                   x·Φ(x)                                          yes
elu                    x ≥ 0: x; x < 0: α(eˣ − 1), α = 1               only for α = 1 (f'(0⁻) = α)
celu                   x ≥ 0: x; x < 0: α(e^{x/α} − 1), α = 1          yes, for every α
mish                   x·tanh(softplus(x))                             yes
smoothrelu             x ≥ 0: x − log(αx + 1)/α; x < 0: 0              yes; α = β² learnable per layer,
                                                                       β starts at 20 (α = 400)
relu_smoothgrad        ReLU forward; backward ReLU or σ(αx), α = 10    forward no; see below
=====================  ==============================================  ===========================

``relu_smoothgrad`` is SAT's controlled experiment: the forward pass is an exact ReLU, and
the backward pass uses either ReLU's derivative (mode ``"relu"``, the default) or the
parametric-Softplus derivative σ(αx) (mode ``"smooth"``).  The mode is switched per model,
separately for the attacker's gradients and for the weight update::

    sat = configure_sat(model, attacker=True, optimizer=False)   # one of the four rows
    with sat.attack():                 # forward + backward of the attack: smooth gradients
        delta = attack(model, x, y)
    with sat.update():                 # forward + backward of the weight step: true ReLU gradients
        loss = criterion(model(x + delta), y)
        loss.backward()
    optimizer.step()

The mode in force **when the forward pass runs** decides the gradient (the autograd graph
records which backward it will use), so keep each forward and its backward inside the same
context.  Outside every context the model is an exact ReLU network, forward and backward, so
evaluation attacks see its true gradients.  ``smooth_backward(model, enabled)`` and
``set_backward_mode(model, mode)`` are the lower-level switches.
"""

from __future__ import annotations

import ast
import contextlib
import inspect
import math
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "ACTIVATIONS",
    "BACKWARD_MODES",
    "ParametricSoftplus",
    "ReLUSmoothGrad",
    "SATSchedule",
    "SmoothReLU",
    "activation_parameters",
    "configure_sat",
    "make_activation",
    "parse_activation",
    "set_backward_mode",
    "smooth_backward",
]

ActivationFactory = Callable[..., nn.Module]
BACKWARD_MODES = ("relu", "smooth")


def _positive(value: float, what: str) -> float:
    value = float(value)
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{what} must be a positive number, got {value}")
    return value


class ParametricSoftplus(nn.Module):
    """``softplus(αx)/α``: Softplus sharpened towards ReLU by α (SAT's choice is α = 10).

    Its derivative is the logistic σ(αx), which is also the backward of ``relu_smoothgrad``.
    """

    def __init__(self, alpha: float = 10.0) -> None:
        super().__init__()
        self.alpha = _positive(alpha, "parametric_softplus alpha")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.softplus(x, beta=self.alpha)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha:g}"


class SmoothReLU(nn.Module):
    """``x − log(αx + 1)/α`` for x ≥ 0 and 0 below, with one learnable α per module.

    f'(x) = αx/(αx + 1) rises continuously from 0, so the function is C¹ (not C²: f''(0⁺) = α);
    it tends to ReLU as α grows.  α is parametrised as in SAT's official code (cihangxie/SmoothAdversarialTraining,
    ResNet/resnet_model.py, ``smoothrelu_fn``): the learnable variable is β, α = β², β starting at 20 (α = 400).
    So α is never negative and moves 2β = 40 times faster than β: one SGD step changes α by about 4β² = 1600
    times what a step on α itself would (SAT's α does move during training; a parametrisation with dα/dθ ≈ 1
    would keep it at ~400).  Half-precision inputs are computed in float32: x − log(1 + αx)/α cancels badly
    near 0.  Exclude ``beta`` from weight decay (see :func:`activation_parameters`), as the official code does
    (its decay pattern matches conv and fc weights only).
    """

    def __init__(self, alpha: float = 400.0, learnable: bool = True) -> None:
        super().__init__()
        alpha = _positive(alpha, "smoothrelu alpha")
        beta = torch.tensor(math.sqrt(alpha))
        if learnable:
            self.beta = nn.Parameter(beta)
        else:
            self.register_buffer("beta", beta)

    @property
    def alpha(self) -> torch.Tensor:
        # β = 0 would make α = 0 and log1p(αx)/α = 0/0; the floor only matters there (where dα/dβ = 0 anyway)
        return self.beta.square().clamp_min(1e-12)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        if dtype in (torch.float16, torch.bfloat16):
            x = x.float()
        alpha = self.alpha.to(x.dtype)
        pos = x.clamp_min(0)  # clamp first: log1p(αx) is NaN for αx < −1, even in an unused branch
        out = pos - torch.log1p(alpha * pos) / alpha
        return out.to(dtype)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha.item():.4g}, learnable={isinstance(self.beta, nn.Parameter)}"


class _ReLUWithSmoothGrad(torch.autograd.Function):
    """ReLU forward, σ(αx) backward (the derivative of softplus(αx)/α).  The backward is written
    in differentiable ops, so double backprop (GradAlign, input-gradient penalties) works too."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, alpha: float) -> torch.Tensor:
        ctx.save_for_backward(x)
        ctx.alpha = alpha
        return x.clamp_min(0)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor) -> tuple[torch.Tensor, None]:
        (x,) = ctx.saved_tensors
        return grad_out * torch.sigmoid(ctx.alpha * x), None


class ReLUSmoothGrad(nn.Module):
    """Exact ReLU forward; backward by ReLU's derivative (``backward_mode="relu"``) or by the
    parametric-Softplus derivative σ(αx) (``"smooth"``).  Switch with :func:`configure_sat`,
    :func:`smooth_backward` or :func:`set_backward_mode`; the mode at forward time counts."""

    def __init__(self, alpha: float = 10.0, backward_mode: str = "relu") -> None:
        super().__init__()
        self.alpha = _positive(alpha, "relu_smoothgrad alpha")
        self.backward_mode = _check_mode(backward_mode)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.backward_mode == "smooth" and torch.is_grad_enabled():
            return _ReLUWithSmoothGrad.apply(x, self.alpha)
        return F.relu(x)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha:g}, backward_mode={self.backward_mode!r}"


ACTIVATIONS: dict[str, ActivationFactory] = {
    "relu": nn.ReLU,
    "softplus": nn.Softplus,
    "parametric_softplus": ParametricSoftplus,
    "silu": nn.SiLU,
    "gelu": nn.GELU,
    "elu": nn.ELU,
    "celu": nn.CELU,
    "mish": nn.Mish,
    "smoothrelu": SmoothReLU,
    "relu_smoothgrad": ReLUSmoothGrad,
}

_NAME_RE = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*(?:\((.*)\))?\s*$", re.DOTALL)


def parse_activation(spec: str) -> tuple[str, dict[str, object]]:
    """Split ``"elu(alpha=0.5)"`` into ``("elu", {"alpha": 0.5})``; a bare name has no kwargs.

    Values are Python literals (numbers, booleans, quoted strings).  The name is not checked
    against :data:`ACTIVATIONS` here; :func:`make_activation` does that.
    """
    if not isinstance(spec, str):
        raise ValueError(f"an activation is named by a string, got {spec!r}")
    match = _NAME_RE.match(spec)
    if match is None:
        raise ValueError(f"cannot parse activation {spec!r}; write e.g. 'elu' or 'elu(alpha=0.5)'")
    name, args = match.group(1), match.group(2)
    if args is None or not args.strip():
        return name, {}
    try:
        call = ast.parse(f"f({args})", mode="eval").body
        if not isinstance(call, ast.Call) or call.args:
            raise ValueError("only keyword arguments")
        kwargs = {kw.arg: ast.literal_eval(kw.value) for kw in call.keywords}
        if None in kwargs:
            raise ValueError("no ** unpacking")
    except (SyntaxError, ValueError) as e:
        raise ValueError(f"cannot parse activation {spec!r}: arguments must be key=literal pairs ({e})") from None
    return name, kwargs


def make_activation(name: str, **kwargs: object) -> nn.Module:
    """Build a new activation module by name (``kwargs`` go to its factory, e.g. ``beta=10``).

    ``name`` may carry keyword arguments itself, ``"parametric_softplus(alpha=5)"``; explicit
    ``kwargs`` override those.  A new module per call, so modules with learnable parameters
    (``smoothrelu``) are never shared by accident.
    """
    base, params = parse_activation(name)
    try:
        factory = ACTIVATIONS[base]
    except KeyError:
        choices = ", ".join(sorted(ACTIVATIONS))
        raise ValueError(f"unknown activation '{base}'; available: {choices}") from None
    params.update(kwargs)
    try:
        accepted = inspect.signature(factory).parameters
    except (TypeError, ValueError):  # pragma: no cover - builtins without a signature
        accepted = None
    if accepted is not None and not any(p.kind is p.VAR_KEYWORD for p in accepted.values()):
        unknown = sorted(set(params) - set(accepted))
        if unknown:
            takes = ", ".join(accepted) or "no arguments"
            raise ValueError(f"activation '{base}' does not take {unknown}; it takes: {takes}")
    return factory(**params)


def activation_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The learnable parameters that live in activation modules (SmoothReLU's α), to put in an
    optimizer group without weight decay."""
    act_types = tuple(ACTIVATIONS.values())
    seen: set[int] = set()
    params = []
    for module in model.modules():
        if isinstance(module, act_types):
            for p in module.parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    params.append(p)
    return params


# -- smooth backward (SAT's controlled experiment) ---------------------------------------------


def _check_mode(mode: str) -> str:
    if mode not in BACKWARD_MODES:
        raise ValueError(f"backward mode must be one of {BACKWARD_MODES}, got {mode!r}")
    return mode


def _smoothgrad_modules(model: nn.Module) -> list[ReLUSmoothGrad]:
    return [m for m in model.modules() if isinstance(m, ReLUSmoothGrad)]


def set_backward_mode(model: nn.Module, mode: str) -> int:
    """Set every ``relu_smoothgrad`` module in ``model`` (DDP/compile wrappers included) to
    ``"relu"`` or ``"smooth"``; returns how many modules were set."""
    _check_mode(mode)
    modules = _smoothgrad_modules(model)
    for m in modules:
        m.backward_mode = mode
    return len(modules)


@contextlib.contextmanager
def smooth_backward(model: nn.Module, enabled: bool = True) -> Iterator[nn.Module]:
    """Within the block, ``relu_smoothgrad`` modules use the smooth backward (``enabled``) or
    the exact ReLU backward (not ``enabled``); the previous modes come back on exit, so blocks nest."""
    modules = _smoothgrad_modules(model)
    previous = [m.backward_mode for m in modules]
    mode = "smooth" if enabled else "relu"
    for m in modules:
        m.backward_mode = mode
    try:
        yield model
    finally:
        for m, prev in zip(modules, previous):
            m.backward_mode = prev


@dataclass(frozen=True)
class SATSchedule:
    """Where the smooth backward applies: to the attacker's input gradients, to the weight
    update, both or neither (the four rows of SAT's controlled experiment).

    Training methods wrap attack generation in ``with schedule.attack():`` and the forward +
    backward of the weight step in ``with schedule.update():``.  Harmless on models without
    ``relu_smoothgrad`` modules when both flags are off.
    """

    model: nn.Module
    attacker: bool
    optimizer: bool

    @property
    def row(self) -> str:
        """``"neither"``, ``"attacker"``, ``"optimizer"`` or ``"both"``."""
        return {(False, False): "neither", (True, False): "attacker", (False, True): "optimizer"}.get(
            (self.attacker, self.optimizer), "both"
        )

    def attack(self) -> contextlib.AbstractContextManager[nn.Module]:
        """Context for computing the attacker's gradients (smooth iff ``attacker``)."""
        return smooth_backward(self.model, self.attacker)

    def update(self) -> contextlib.AbstractContextManager[nn.Module]:
        """Context for the forward + backward of the weight update (smooth iff ``optimizer``)."""
        return smooth_backward(self.model, self.optimizer)


def configure_sat(model: nn.Module, attacker: bool, optimizer: bool) -> SATSchedule:
    """The SAT controlled experiment's switch for ``model`` (built with ``activation="relu_smoothgrad"``).

    Raises ``ValueError`` if a smooth backward is asked for but the model has no
    ``relu_smoothgrad`` module, since the flag would silently do nothing.
    """
    attacker, optimizer = bool(attacker), bool(optimizer)
    if (attacker or optimizer) and not _smoothgrad_modules(model):
        raise ValueError(
            "configure_sat: the model has no 'relu_smoothgrad' activations, so a smooth backward "
            "would change nothing; build it with activation='relu_smoothgrad'"
        )
    return SATSchedule(model, attacker, optimizer)
