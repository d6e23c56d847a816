"""FAB-T: the targeted Fast Adaptive Boundary attack (Croce & Hein, "Minimally distorted adversarial
examples with a fast adaptive boundary attack", ICML 2020), L∞, as run inside AutoAttack.

FAB looks for the *smallest* perturbation that changes the decision: at each step it linearizes the
boundary between the true class y and a target class t at the current iterate, projects both the
iterate and the original point onto that hyperplane (within the [0, 1] box, minimal L∞ norm), and
moves to a convex combination of the two projections biased towards the original point; once an
iterate is adversarial it is pulled back towards the original point.  For a robustness evaluation a
sample counts as broken only when the smallest adversarial found lies within eps.
"""

from __future__ import annotations

import torch
from torch import nn

from raydist.attacks.core import AutocastFactory, check_eps, eval_mode, full_precision, make_generator, project_linf
from raydist.attacks.losses import autocast_for, forward, linf_norm, loss_and_grad, per_sample


def project_linf_hyperplane_box(p: torch.Tensor, w: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """The δ of smallest L∞ norm with <w, δ> = c and p + δ in [0, 1], per row of ``p``, ``w`` ([B, D]).

    For a radius r the largest reachable <w, δ>·sign(c) is g(r) = Σ |w_i|·min(r, room_i), room_i being
    how far coordinate i can move in the helpful direction before leaving the box; g is piecewise
    linear and increasing, so the answer is found exactly from its values at the sorted rooms.
    Rows where even the whole box falls short of c get the box corner that comes closest."""
    target = c.abs()
    direction = torch.sign(w) * torch.sign(c)[:, None]
    room = torch.where(direction > 0, 1.0 - p, p)
    weight = w.abs()
    room_sorted, order = room.sort(dim=1)
    weight_sorted = weight.gather(1, order)
    total = weight.sum(1)
    cum_w = weight_sorted.cumsum(1)
    cum_wr = (weight_sorted * room_sorted).cumsum(1)
    reach = cum_wr + room_sorted * (total[:, None] - cum_w)  # g at each breakpoint, nondecreasing
    k = (reach < target[:, None]).sum(1)  # first breakpoint with g >= |c|
    prev = (k - 1).clamp(min=0)[:, None]
    below_wr = torch.where(k > 0, cum_wr.gather(1, prev).squeeze(1), torch.zeros_like(total))
    below_w = torch.where(k > 0, cum_w.gather(1, prev).squeeze(1), torch.zeros_like(total))
    r = (target - below_wr) / (total - below_w).clamp(min=1e-12)
    r = torch.where(k >= p.shape[1], room_sorted[:, -1], r)
    return direction * torch.minimum(room, r[:, None])


def fab_run(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    target: torch.Tensor,
    x_start: torch.Tensor,
    n_iter: int,
    *,
    alpha_max: float = 0.1,
    eta: float = 1.05,
    beta: float = 0.9,
    stop_below: float | None = None,
    check_every: int = 10,
    autocast: AutocastFactory | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One targeted FAB run (y against ``target``) from ``x_start``; returns (best, norm): each sample's
    smallest-L∞ misclassified iterate and its distance to x (inf and the start where none was found).

    With ``stop_below``, stops (checking every ``check_every`` iterations) once every sample has an
    adversarial within that radius: later iterations could only shrink perturbations already inside it.
    Low level: the model's mode is left alone."""
    x = x.detach()
    x0 = x.flatten(1)
    x1 = x_start.detach()
    best = x1.clone()
    norm = torch.full(y.shape, float("inf"), device=x.device)

    def logit_gap(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return logits.gather(1, target[:, None]).squeeze(1) - logits.gather(1, labels[:, None]).squeeze(1)

    for i in range(n_iter):
        _, gap, grad = loss_and_grad(model, x1, y, logit_gap, autocast)  # boundary: gap = 0
        w, p1 = grad.flatten(1), x1.flatten(1)
        d1 = project_linf_hyperplane_box(p1, w, -gap)
        d2 = project_linf_hyperplane_box(x0, w, (w * (p1 - x0)).sum(1) - gap)
        a1 = d1.abs().amax(1).clamp(min=1e-8)
        a2 = d2.abs().amax(1).clamp(min=1e-8)
        alpha = (a1 / (a1 + a2)).clamp(0.0, alpha_max)[:, None]
        x1 = torch.clamp((p1 + eta * d1) * (1 - alpha) + (x0 + eta * d2) * alpha, 0.0, 1.0).view_as(x)
        adv = forward(model, x1, autocast).argmax(1) != y
        dist = linf_norm(x1 - x)
        improved = adv & (dist < norm)
        best = torch.where(per_sample(improved, x), x1, best)
        norm = torch.where(improved, dist, norm)
        x1 = torch.where(per_sample(adv, x), x + beta * (x1 - x), x1)
        if stop_below is not None and (i + 1) % check_every == 0 and bool((norm <= stop_below).all()):
            break
    return best, norm


def fab_attack(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    robust: torch.Tensor,
    x_adv: torch.Tensor,
    *,
    n_target_classes: int = 9,
    n_iter: int = 100,
    n_restarts: int = 1,
    alpha_max: float = 0.1,
    eta: float = 1.05,
    beta: float = 0.9,
    generator: torch.Generator | None = None,
    autocast: AutocastFactory | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """FAB-T on the points where ``robust`` is True; returns the updated (x_adv, robust).

    Targets the 2nd, 3rd, ... highest-scoring clean classes in turn, each on the points still robust;
    the first restart starts at x, later ones at a random point at L∞ distance eps/2 (drawn for the
    whole batch, so a sample's run does not depend on the others).  A sample is broken only by an
    adversarial within eps, which then replaces its row of ``x_adv``.  Low level: mode and precision
    are the caller's."""
    x, robust, x_adv = x.detach(), robust.clone(), x_adv.clone()
    ranked = forward(model, x, autocast).argsort(1, descending=True)
    for k in range(1, min(n_target_classes, ranked.shape[1] - 1) + 1):
        for restart in range(n_restarts):
            start = x
            if restart > 0:
                t = 2 * torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype) - 1
                start = torch.clamp(x + 0.5 * eps * t / per_sample(linf_norm(t) + 1e-12, t), 0.0, 1.0)
            idx = robust.nonzero().squeeze(1)
            if idx.numel() == 0:
                return x_adv, robust
            xi, yi = x[idx], y[idx]
            best, norm = fab_run(model, xi, yi, ranked[idx, k], start[idx], n_iter, alpha_max=alpha_max, eta=eta,
                                 beta=beta, stop_below=eps, autocast=autocast)
            best = project_linf(best, xi, eps)
            broken = (norm <= eps) & (forward(model, best, autocast).argmax(1) != yi)
            x_adv[idx] = torch.where(per_sample(broken, best), best, x_adv[idx])
            robust[idx] = ~broken
    return x_adv, robust


def fab_targeted(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    *,
    n_target_classes: int = 9,
    n_iter: int = 100,
    n_restarts: int = 1,
    alpha_max: float = 0.1,
    eta: float = 1.05,
    beta: float = 0.9,
    seed: int | None = None,
    precision: str = "fp32",
) -> torch.Tensor:
    """FAB-T under L∞ for evaluation, with the paper's (and AutoAttack's) defaults.

    Attacks only the correctly classified points; returns a detached batch in the eps-ball and the box:
    the smallest adversarial found where it lies within eps, x itself elsewhere.  Eval mode (restored
    after), fp32 unless ``precision="bf16"``, restarts after the first start at random points drawn from
    a local RNG seeded by ``seed``."""
    check_eps(eps)
    for name, value in (("n_target_classes", n_target_classes), ("n_iter", n_iter), ("n_restarts", n_restarts)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    with eval_mode(model), full_precision(x.device):
        autocast = autocast_for(precision, x.device)
        robust = forward(model, x, autocast).argmax(1) == y
        x_adv, _ = fab_attack(model, x, y, eps, robust, x.detach(), n_target_classes=n_target_classes,
                              n_iter=n_iter, n_restarts=n_restarts, alpha_max=alpha_max, eta=eta, beta=beta,
                              generator=make_generator(seed, x.device), autocast=autocast)
        return x_adv
