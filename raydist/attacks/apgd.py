"""Auto-PGD (Croce & Hein, "Reliable evaluation of adversarial robustness with an ensemble of diverse
parameter-free attacks", ICML 2020), L∞: APGD-CE, APGD-DLR and the targeted APGD-T.

APGD is PGD without a step size to tune: it starts at 2·eps, moves with momentum 0.75, and at
checkpoints w_j (p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06) of the budget)
halves a sample's step size and restarts it from its best point when (1) fewer than a fraction
rho = 0.75 of the steps since the last checkpoint raised its loss, or (2) its step size was not
halved at the last checkpoint and its best loss has not improved since.  Everything is per sample and
on the device; the only host syncs are one per checkpoint (to stop early once every sample is
misclassified) and one per restart or target (to attack only the points still robust).
"""

from __future__ import annotations

import torch
from torch import nn

from raydist.attacks.core import AutocastFactory, check_eps, eval_mode, full_precision, make_generator, project_linf
from raydist.attacks.losses import (
    PerSampleLoss,
    autocast_for,
    dlr_targeted_loss,
    forward,
    get_loss,
    linf_norm,
    loss_and_grad,
    per_sample,
)

MOMENTUM = 0.75


def checkpoints(n_iter: int) -> dict[int, int]:
    """Iterations (0-based) after which the step size is checked, each with the length of the window
    since the previous check: w_j = ceil(p_j · n_iter) with p_0 = 0, p_1 = 0.22 and
    p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06), as in the paper (exact arithmetic in hundredths;
    for 100 iterations: after 22, 41, 57, 70, 80, 87, 93 and 99 iterations)."""
    p_prev, p = 0, 22
    marks = [0]
    while p <= 100:
        w = -(-p * n_iter // 100)
        if marks[-1] < w <= n_iter:
            marks.append(w)
        p_prev, p = p, p + max(p - p_prev - 3, 6)
    return {w - 1: w - prev for prev, w in zip(marks, marks[1:])}


def linf_random_start(x: torch.Tensor, eps: float, generator: torch.Generator | None) -> torch.Tensor:
    """x + eps·t/‖t‖∞ with t ~ U(-1, 1): a random point on the surface of the L∞ ball (the reference start)."""
    t = 2 * torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype) - 1
    return torch.clamp(x + eps * t / per_sample(linf_norm(t) + 1e-12, t), 0.0, 1.0)


def apgd_run(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    loss_fn: PerSampleLoss,
    x_start: torch.Tensor,
    n_iter: int,
    *,
    rho: float = 0.75,
    autocast: AutocastFactory | None = None,
    early_stop: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One APGD run of ``n_iter`` iterations from ``x_start`` on every sample of the batch.

    Returns (x_adv, fooled, x_best, loss_best): the last misclassified iterate of each sample (its
    start if it never was), whether it ever was misclassified, and its highest-loss iterate and loss.
    Low level: the model's mode is left alone."""
    x = x.detach()
    x_adv = x_start.detach()
    logits, loss, grad = loss_and_grad(model, x_adv, y, loss_fn, autocast)
    fooled = logits.argmax(1) != y
    x_fooled = x_adv.clone()
    x_best, loss_best, grad_best = x_adv.clone(), loss.clone(), grad.clone()
    step = torch.full_like(loss, 2.0 * eps)
    x_prev, loss_prev = x_adv, loss
    n_up = torch.zeros_like(loss)
    reduced_last = torch.ones_like(fooled)
    loss_best_last = loss_best.clone()
    checks = checkpoints(n_iter)
    for i in range(n_iter):
        a = MOMENTUM if i > 0 else 1.0
        z = project_linf(x_adv + per_sample(step, x) * grad.sign(), x, eps)
        x_prev, x_adv = x_adv, project_linf(x_adv + a * (z - x_adv) + (1 - a) * (x_adv - x_prev), x, eps)
        logits, loss, grad = loss_and_grad(model, x_adv, y, loss_fn, autocast)
        wrong = logits.argmax(1) != y
        x_fooled = torch.where(per_sample(wrong, x), x_adv, x_fooled)
        fooled = fooled | wrong
        n_up = n_up + (loss > loss_prev).to(n_up.dtype)
        loss_prev = loss
        better = loss > loss_best
        x_best = torch.where(per_sample(better, x), x_adv, x_best)
        grad_best = torch.where(per_sample(better, x), grad, grad_best)
        loss_best = torch.where(better, loss, loss_best)
        if i in checks:
            reduce = (n_up < rho * checks[i]) | (~reduced_last & (loss_best_last >= loss_best))
            reduced_last, loss_best_last = reduce, loss_best.clone()
            n_up = torch.zeros_like(n_up)
            step = torch.where(reduce, step / 2, step)
            x_adv = torch.where(per_sample(reduce, x), x_best, x_adv)
            grad = torch.where(per_sample(reduce, x), grad_best, grad)
            loss_prev = torch.where(reduce, loss_best, loss_prev)
            if early_stop and bool(fooled.all()):
                break
    return x_fooled, fooled, x_best, loss_best


def apgd_attack(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    robust: torch.Tensor,
    x_adv: torch.Tensor,
    *,
    loss: str | PerSampleLoss = "ce",
    n_iter: int = 100,
    n_restarts: int = 1,
    n_target_classes: int | None = None,
    rho: float = 0.75,
    generator: torch.Generator | None = None,
    autocast: AutocastFactory | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """APGD on the points where ``robust`` is True; returns the updated (x_adv, robust).

    Untargeted on ``loss`` when ``n_target_classes`` is None, else targeted DLR towards the 2nd, 3rd,
    ... highest-scoring clean classes in turn.  Each restart (and target) attacks only the points
    still robust; its random start is drawn for the whole batch, so a sample's trajectory does not
    depend on which other samples are still being attacked (AutoAttack relies on this).  Samples
    never misclassified keep their highest-loss point.  Low level: mode and precision are the caller's.
    """
    x, robust, x_adv = x.detach(), robust.clone(), x_adv.clone()
    best_loss = torch.full(y.shape, float("-inf"), device=x.device)
    if n_target_classes is None:
        targets: list[torch.Tensor | None] = [None] * n_restarts
    else:
        ranked = forward(model, x, autocast).argsort(1, descending=True)
        n_targets = min(n_target_classes, ranked.shape[1] - 1)
        targets = [ranked[:, k] for k in range(1, n_targets + 1) for _ in range(n_restarts)]
    for target in targets:
        start = linf_random_start(x, eps, generator)
        idx = robust.nonzero().squeeze(1)
        if idx.numel() == 0:
            break
        loss_fn = get_loss(loss) if target is None else _towards(target[idx])
        x_fooled, fooled, x_best, loss_best = apgd_run(
            model, x[idx], y[idx], eps, loss_fn, start[idx], n_iter, rho=rho, autocast=autocast
        )
        keep = ~fooled & (loss_best > best_loss[idx])
        merged = torch.where(per_sample(keep, x_best), x_best, x_adv[idx])
        x_adv[idx] = torch.where(per_sample(fooled, x_fooled), x_fooled, merged)
        best_loss[idx] = torch.where(keep, loss_best, best_loss[idx])
        robust[idx] = ~fooled
    return x_adv, robust


def _towards(target: torch.Tensor) -> PerSampleLoss:
    def loss_fn(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return dlr_targeted_loss(logits, y, target)

    return loss_fn


def _check(eps: float, **counts: int) -> None:
    check_eps(eps)
    for name, value in counts.items():
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")


def apgd(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    *,
    loss: str | PerSampleLoss = "ce",
    n_iter: int = 100,
    n_restarts: int = 1,
    rho: float = 0.75,
    seed: int | None = None,
    precision: str = "fp32",
) -> torch.Tensor:
    """APGD-CE (``loss="ce"``) or APGD-DLR (``loss="dlr"``) under L∞, for evaluation.

    Attacks only the correctly classified points; returns a detached batch in the eps-ball and the
    box: a misclassified point where one was found, the highest-loss point otherwise, x itself for
    points misclassified to begin with.  Eval mode (restored after), fp32 unless ``precision="bf16"``,
    random starts from a local RNG seeded by ``seed``."""
    _check(eps, n_iter=n_iter, n_restarts=n_restarts)
    with eval_mode(model), full_precision(x.device):
        autocast = autocast_for(precision, x.device)
        robust = forward(model, x, autocast).argmax(1) == y
        x_adv, _ = apgd_attack(model, x, y, eps, robust, x.detach(), loss=loss, n_iter=n_iter,
                               n_restarts=n_restarts, rho=rho, generator=make_generator(seed, x.device),
                               autocast=autocast)
        return x_adv


def apgd_targeted(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    *,
    n_target_classes: int = 9,
    n_iter: int = 100,
    n_restarts: int = 1,
    rho: float = 0.75,
    seed: int | None = None,
    precision: str = "fp32",
) -> torch.Tensor:
    """APGD-T under L∞: targeted DLR towards each of the ``n_target_classes`` (capped at classes - 1)
    most likely other classes in turn, ``n_iter`` iterations each, on the points still robust.

    Same guarantees and return convention as :func:`apgd`.  Needs at least 4 classes."""
    _check(eps, n_iter=n_iter, n_restarts=n_restarts, n_target_classes=n_target_classes)
    with eval_mode(model), full_precision(x.device):
        autocast = autocast_for(precision, x.device)
        robust = forward(model, x, autocast).argmax(1) == y
        x_adv, _ = apgd_attack(model, x, y, eps, robust, x.detach(), n_iter=n_iter, n_restarts=n_restarts,
                               n_target_classes=n_target_classes, rho=rho,
                               generator=make_generator(seed, x.device), autocast=autocast)
        return x_adv
