"""Square Attack (Andriushchenko et al., "Square Attack: a query-efficient black-box adversarial attack
via random search", ECCV 2020), L∞, score-based: it only reads the model's outputs, never a gradient.

Start from vertical stripes of ±eps; then, per query, pick a random square window per image whose side
covers a fraction p of the image (p shrinks on a fixed schedule), set it to ±eps with a random sign per
channel, and keep the change if the margin z_y - max_{j != y} z_j went down.  A sample is done once
its margin is <= 0.

The p schedule is the paper's, written for 10 000 queries, and by default *not* rescaled to ``n_queries``:
AutoAttack builds its Square with ``resc_schedule=False`` (fra31/auto-attack, autoattack.py), so at its 5000
queries the squares shrink only to p_init/128 (3 px at 32x32 over the last 1000 queries). The Square code's own
default rescales (query i of n counts as query i·10000/n: 1 px over the same queries); ``rescale_schedule=True``
gives that.  Deliberate deviation from AutoAttack's square.py: each image draws its own window and signs, as the
paper's own code does (max-andr/square-attack, attack.py, a loop over images); AutoAttack's batched code draws one
window and one sign per channel for the whole batch. Per-image draws keep a point's result independent of which
other points share its shard.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from raydist.attacks.core import AutocastFactory, check_eps, eval_mode, full_precision, make_generator, project_linf
from raydist.attacks.losses import autocast_for, forward, margin_loss, per_sample


def p_schedule(i: int, n_queries: int, p_init: float = 0.8, rescale: bool = False) -> float:
    """Fraction of pixels the square covers at query ``i`` (0-based): the paper's piecewise-constant halvings at
    queries 10, 50, 200, 500, 1000, 2000, 4000, 6000 and 8000. ``rescale`` stretches them over ``n_queries``
    instead of 10 000 (the Square code's default; AutoAttack switches it off)."""
    if rescale:
        i = int(i / n_queries * 10000)
    for bound, div in ((10, 1), (50, 2), (200, 4), (500, 8), (1000, 16), (2000, 32), (4000, 64), (6000, 128),
                       (8000, 256)):
        if i <= bound:
            return p_init / div
    return p_init / 512


def square_side(i: int, n_queries: int, h: int, w: int, p_init: float = 0.8, rescale: bool = False) -> int:
    """Side in pixels of the square tried at query ``i`` on an h x w image: round(sqrt(p·h·w)), at least 1 and at
    most the image (as the reference computes it from p · features / channels)."""
    return min(max(int(round(math.sqrt(p_schedule(i, n_queries, p_init, rescale) * h * w))), 1), h, w)


def _random_sign(shape: tuple[int, ...], x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    return torch.randint(0, 2, shape, generator=generator, device=x.device).to(x.dtype) * 2 - 1


def square_attack(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    robust: torch.Tensor,
    x_adv: torch.Tensor,
    *,
    n_queries: int = 5000,
    p_init: float = 0.8,
    rescale_schedule: bool = False,
    compact_every: int = 10,
    generator: torch.Generator | None = None,
    autocast: AutocastFactory | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Square on the points where ``robust`` is True; returns the updated (x_adv, robust).

    Every sample's random draws are made for the whole batch, so its run does not depend on which
    others are attacked; the set of points still being attacked is shrunk every ``compact_every``
    queries (one host sync each), and points already broken are frozen in between.  Points never
    broken keep their lowest-margin point.  Low level: mode and precision are the caller's."""
    x, robust, x_adv = x.detach(), robust.clone(), x_adv.clone()
    n, c, h, w = x.shape
    stripes = _random_sign((n, c, 1, w), x, generator)
    idx = robust.nonzero().squeeze(1)
    if idx.numel() == 0:
        return x_adv, robust
    xs, ys = x[idx], y[idx]
    best = torch.clamp(xs + eps * stripes[idx], 0.0, 1.0)
    margin = -margin_loss(forward(model, best, autocast), ys)  # z_y - max_{j != y} z_j
    active = torch.arange(idx.numel(), device=x.device)
    rows, cols = torch.arange(h, device=x.device), torch.arange(w, device=x.device)
    for i in range(n_queries):
        if i % compact_every == 0:
            active = active[margin[active] > 0]
            if active.numel() == 0:
                break
        side = square_side(i, n_queries, h, w, p_init, rescale_schedule)
        top = (torch.rand(n, generator=generator, device=x.device) * (h - side + 1)).long()
        left = (torch.rand(n, generator=generator, device=x.device) * (w - side + 1)).long()
        signs = _random_sign((n, c, 1, 1), x, generator)
        a = idx[active]  # this batch's rows of the draws
        inside = ((rows >= top[a, None]) & (rows < top[a, None] + side))[:, :, None] & (
            (cols >= left[a, None]) & (cols < left[a, None] + side)
        )[:, None, :]
        cur = best[active]
        cand = project_linf(cur + 2 * eps * inside[:, None].to(x.dtype) * signs[a], xs[active], eps)
        cand_margin = -margin_loss(forward(model, cand, autocast), ys[active])
        better = (cand_margin < margin[active]) & (margin[active] > 0)
        best[active] = torch.where(per_sample(better, cand), cand, cur)
        margin[active] = torch.where(better, cand_margin, margin[active])
    x_adv[idx] = best
    robust[idx] = forward(model, best, autocast).argmax(1) == ys
    return x_adv, robust


def square(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    *,
    n_queries: int = 5000,
    p_init: float = 0.8,
    rescale_schedule: bool = False,
    seed: int | None = None,
    precision: str = "fp32",
) -> torch.Tensor:
    """Square Attack under L∞ for evaluation, AutoAttack's settings by default (5000 queries, p_init 0.8, the p
    schedule not rescaled to ``n_queries``; ``rescale_schedule=True`` for the Square code's standalone default).

    Attacks only the correctly classified points; returns a detached batch in the eps-ball and the box
    (the lowest-margin point found for each attacked sample, x for the others).  Eval mode (restored
    after), fp32 unless ``precision="bf16"``, random search driven by a local RNG seeded by ``seed``."""
    check_eps(eps)
    if n_queries < 1:
        raise ValueError(f"n_queries must be >= 1, got {n_queries}")
    with eval_mode(model), full_precision(x.device):
        autocast = autocast_for(precision, x.device)
        robust = forward(model, x, autocast).argmax(1) == y
        x_adv, _ = square_attack(model, x, y, eps, robust, x.detach(), n_queries=n_queries, p_init=p_init,
                                 rescale_schedule=rescale_schedule, generator=make_generator(seed, x.device),
                                 autocast=autocast)
        return x_adv
