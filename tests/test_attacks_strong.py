"""The strong attacks (CW, APGD-CE/DLR/T, FAB-T, Square, AutoAttack, L2 PGD) on a tiny CNN adversarially
trained on a learnable synthetic problem, checked against deliberately simple per-sample reference
implementations written here from the papers."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from raydist.attacks import (
    ATTACKS,
    apgd,
    apgd_targeted,
    autoattack,
    autoattack_details,
    cw,
    dlr_loss,
    dlr_targeted_loss,
    fab_targeted,
    get_attack,
    margin_loss,
    pgd,
    run_attack,
    square,
)
from raydist.attacks.apgd import checkpoints
from raydist.attacks.fab import fab_run, project_linf_hyperplane_box
from raydist.attacks.square import p_schedule

EPS = 12 / 255
EPS_L2 = 1.0  # about as strong as 12/255 in L∞ on 3x16x16 inputs
CLASSES = 10
SIZE = 16
STRONG = ("cw20", "apgd-ce", "apgd-dlr", "apgd-t", "fab-t", "square", "aa")
# budgets small enough for a 2-core CPU; every attack still does real work at these
SMALL: dict[str, dict] = {
    "cw20": {},
    "apgd-ce": {"n_iter": 10},
    "apgd-dlr": {"n_iter": 10},
    "apgd-t": {"n_iter": 10, "n_target_classes": 3},
    "fab-t": {"n_iter": 10, "n_target_classes": 3},
    "square": {"n_queries": 300},
    "aa": {"n_iter": 10, "n_target_classes": 2, "fab_n_iter": 10, "n_queries": 50},
}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run fastest single-threaded, above all on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def synthetic(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Class = a fixed smooth colour pattern, plus pixel noise."""
    templates = F.interpolate(
        torch.rand(CLASSES, 3, 4, 4, generator=torch.Generator().manual_seed(0)), size=SIZE, mode="bilinear"
    )
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, CLASSES, (n,), generator=g)
    x = (0.25 + 0.5 * templates[y] + 0.15 * torch.randn(n, 3, SIZE, SIZE, generator=g)).clamp(0, 1)
    return x, y


def tiny_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(128, CLASSES),
    )


@pytest.fixture(scope="module")
def trained() -> nn.Module:
    return adversarially_trained()


def adversarially_trained() -> nn.Module:
    """FGSM-RS adversarial training at 8/255: attacked at 12/255 the attacks' strengths differ visibly."""
    torch.manual_seed(0)
    model = tiny_cnn()
    x, y = synthetic(512, seed=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    eps = 8 / 255
    for _ in range(100):
        idx = torch.randint(0, len(y), (64,))
        xb, yb = x[idx], y[idx]
        xr = (xb + (2 * torch.rand_like(xb) - 1) * eps).clamp(0, 1).requires_grad_(True)
        (g,) = torch.autograd.grad(F.cross_entropy(model(xr), yb), xr)
        xb = torch.min(torch.max(xr + 1.25 * eps * g.sign(), xb - eps), xb + eps).clamp(0, 1).detach()
        loss = F.cross_entropy(model(xb), yb)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.zero_grad(set_to_none=True)
    return model.eval()


@pytest.fixture(scope="module")
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    return synthetic(48, seed=2)


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def correct(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x).argmax(1) == y


def assert_valid(x_adv: torch.Tensor, x: torch.Tensor, eps: float, norm: str = "linf") -> None:
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype and x_adv.device == x.device
    assert not x_adv.requires_grad and x_adv.grad_fn is None
    dist = (x_adv - x).flatten(1).abs().amax(1) if norm == "linf" else (x_adv - x).flatten(1).norm(dim=1)
    assert dist.max() <= eps + 1e-6
    assert x_adv.min() >= 0 and x_adv.max() <= 1


# ---- deliberately simple references: one sample at a time, Python loops, written from the papers ----


def _margin_ref(logits: torch.Tensor, y: int) -> torch.Tensor:
    """max_{j != y} z_j - z_y via a sort (as in Rice et al.'s CW loss)."""
    z = logits[0]
    top2 = z.sort(descending=True).values[:2]
    other = top2[1] if z.argmax() == y else top2[0]
    return other - z[y]


def ref_pgd(model, x, y, eps, alpha, steps, loss="ce", norm="linf"):
    out = []
    for xi, yi in zip(x, y.tolist()):
        xi = xi[None]
        xa = xi.clone()
        for _ in range(steps):
            xa.requires_grad_(True)
            logits = model(xa)
            value = F.cross_entropy(logits, torch.tensor([yi])) if loss == "ce" else _margin_ref(logits, yi)
            (g,) = torch.autograd.grad(value, xa)
            with torch.no_grad():
                if norm == "linf":
                    xa = torch.min(torch.max(xa + alpha * g.sign(), xi - eps), xi + eps).clamp(0, 1)
                else:
                    xa = xa + alpha * g / g.norm()
                    d = xa - xi
                    xa = (xi + d * min(1.0, eps / d.norm().item())).clamp(0, 1)
        out.append(xa.detach())
    return torch.cat(out)


def ref_apgd_ce(model, x, y, eps, n_iter, seed):
    """Algorithm 1 of Croce & Hein (2020), one sample at a time, with its own random start."""
    p = [0.0, 0.22]
    while p[-1] + max(p[-1] - p[-2] - 0.03, 0.06) <= 1.0 + 1e-9:
        p.append(p[-1] + max(p[-1] - p[-2] - 0.03, 0.06))
    w = sorted({math.ceil(pj * n_iter - 1e-9) for pj in p if 0 < math.ceil(pj * n_iter - 1e-9) <= n_iter})
    gen = torch.Generator().manual_seed(seed)
    return torch.cat([_ref_apgd_one(model, xi[None], yi[None], eps, n_iter, w, gen) for xi, yi in zip(x, y)])


def _ref_apgd_one(model, xi, yi, eps, n_iter, w, gen):
    def f_and_grad(z):
        z = z.clone().requires_grad_(True)
        logits = model(z)
        value = F.cross_entropy(logits, yi)
        (g,) = torch.autograd.grad(value, z)
        return value.item(), g, logits.argmax(1).item() != yi.item()

    def proj(z):
        return torch.min(torch.max(z, xi - eps), xi + eps).clamp(0, 1)

    x_k = proj(xi + eps * (2 * torch.rand(xi.shape, generator=gen) - 1))
    f_k, g_k, wrong = f_and_grad(x_k)
    x_max, f_max, g_max = x_k, f_k, g_k
    found = x_k if wrong else None
    eta, x_prev = 2 * eps, x_k
    last_w, ups, eta_at_last, f_max_at_last = 0, 0, None, None
    for k in range(n_iter):
        z = proj(x_k + eta * g_k.sign())
        a = 0.75 if k > 0 else 1.0
        x_new = proj(x_k + a * (z - x_k) + (1 - a) * (x_k - x_prev))
        f_new, g_new, wrong = f_and_grad(x_new)
        if wrong:
            found = x_new
        ups += f_new > f_k
        x_prev, x_k, f_k, g_k = x_k, x_new, f_new, g_new
        if f_new > f_max:
            x_max, f_max, g_max = x_new, f_new, g_new
        if k + 1 in w:  # checkpoint: halve the step and go back to the best point?
            cond1 = ups < 0.75 * (k + 1 - last_w)
            cond2 = eta_at_last is not None and eta == eta_at_last and f_max == f_max_at_last
            eta_at_last, f_max_at_last = eta, f_max
            if cond1 or cond2:
                eta /= 2
                x_k, f_k, g_k = x_max, f_max, g_max
            last_w, ups = k + 1, 0
    return found if found is not None else x_max


# ---- every attack: a valid adversarial batch, the model left as it was ----


@pytest.mark.parametrize("name", STRONG)
def test_attacks_return_valid_batches_and_never_beat_clean(trained, batch, name):
    x, y = batch
    y = torch.cat([(y[:4] + 1) % CLASSES, y[4:]])  # four points misclassified to begin with
    x_adv = run_attack(name, trained, x, y, EPS, seed=0, **SMALL[name])
    assert_valid(x_adv, x, EPS)
    assert (x_adv != x).any()
    ok_clean = correct(trained, x, y)
    ok_adv = correct(trained, x_adv, y)
    assert not (ok_adv & ~ok_clean).any(), "an attack must not fix a misclassified point"
    assert ok_adv.float().mean() < ok_clean.float().mean()
    # points misclassified to begin with are left alone by the AutoAttack-style attacks
    assert (~ok_clean).sum() >= 4
    if name != "cw20":
        assert torch.equal(x_adv[~ok_clean], x[~ok_clean])


@pytest.mark.parametrize("name", STRONG)
def test_mode_state_and_global_rng_are_left_alone(trained, batch, name):
    x, y = batch[0][:16], batch[1][:16]
    trained.train()
    frozen_bn = trained[1]
    frozen_bn.eval()  # a submodule deliberately in eval mode must stay so
    stats = frozen_bn.running_mean.clone()
    rng = torch.get_rng_state()
    try:
        with torch.no_grad():  # evaluators often call attacks under no_grad
            a = run_attack(name, trained, x, y, EPS, seed=3, **SMALL[name])
        b = run_attack(name, trained, x, y, EPS, seed=3, **SMALL[name])
        assert trained.training and trained[0].training and not frozen_bn.training
    finally:
        trained.eval()
    assert torch.equal(torch.get_rng_state(), rng)
    assert torch.equal(frozen_bn.running_mean, stats)
    assert all(p.grad is None for p in trained.parameters())
    assert torch.equal(a, b), "the same seed gives the same result"


@pytest.mark.parametrize("name", STRONG)
def test_zero_radius_changes_nothing(trained, batch, name):
    x, y = batch[0][:8], batch[1][:8]
    assert torch.equal(run_attack(name, trained, x, y, 0.0, seed=0, **SMALL[name]), x)


def test_fp32_by_default_bf16_on_request(trained, batch):
    x, y = batch[0][:8], batch[1][:8]
    seen: list[torch.dtype] = []
    hook = trained[0].register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    try:
        for name in STRONG:
            with torch.autocast("cpu", dtype=torch.bfloat16):  # an outer autocast does not leak in
                run_attack(name, trained, x, y, EPS, seed=0, **SMALL[name])
            assert set(seen) == {torch.float32}, name
            seen.clear()
            x_adv = run_attack(name, trained, x, y, EPS, seed=0, precision="bf16", **SMALL[name])
            assert set(seen) == {torch.bfloat16}, name
            seen.clear()
            assert_valid(x_adv, x, EPS)
    finally:
        hook.remove()
    with pytest.raises(ValueError, match="precision"):
        apgd(trained, x, y, EPS, precision="fp8")


# ---- agreement with the simple references ----


def test_pgd_and_cw_agree_with_a_per_sample_reference(trained, batch):
    x, y = batch
    for loss, norm, eps, alpha in (("ce", "linf", EPS, EPS / 4), ("margin", "linf", EPS, EPS / 4),
                                   ("ce", "l2", EPS_L2, EPS_L2 / 4)):
        ours = pgd(trained, x, y, eps, alpha, 10, random_start=False, loss=loss, norm=norm)
        ref = ref_pgd(trained, x, y, eps, alpha, 10, loss=loss, norm=norm)
        assert_valid(ours, x, eps, norm)
        agree = (correct(trained, ours, y) == correct(trained, ref, y)).float().mean().item()
        assert agree >= 1 - 2 / len(y), (loss, norm, agree)
    # the registered CW-20 (random start) lands where the reference CW-20 from x does
    ref = accuracy(trained, ref_pgd(trained, x, y, EPS, EPS / 4, 20, loss="margin"), y)
    assert abs(accuracy(trained, run_attack("cw20", trained, x, y, EPS, seed=0), y) - ref) <= 3 / len(y)
    assert torch.equal(cw(trained, x, y, EPS, seed=1), run_attack("cw20", trained, x, y, EPS, seed=1))


def test_apgd_ce_agrees_with_the_papers_algorithm(trained, batch):
    x, y = batch[0][:32], batch[1][:32]
    ours = accuracy(trained, apgd(trained, x, y, EPS, n_iter=30, seed=0), y)
    ref = accuracy(trained, ref_apgd_ce(trained, x, y, EPS, 30, seed=0), y)
    assert abs(ours - ref) <= 2 / len(y), (ours, ref)


def test_square_agrees_with_a_per_image_reference(trained, batch):
    """The reference draws its randomness in the same order (stripes, then per query: rows, columns, signs
    for the whole batch) but searches each image on its own, as the paper's code does."""
    x, y = batch
    n_queries, seed = 60, 5
    ours = square(trained, x, y, EPS, n_queries=n_queries, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    n, c, h, w = x.shape
    stripes = torch.randint(0, 2, (n, c, 1, w), generator=gen).float() * 2 - 1
    draws = []
    for i in range(n_queries):
        side = min(max(round(math.sqrt(p_schedule(i, n_queries) * h * w)), 1), h)
        top = (torch.rand(n, generator=gen) * (h - side + 1)).long()
        left = (torch.rand(n, generator=gen) * (w - side + 1)).long()
        signs = torch.randint(0, 2, (n, c, 1, 1), generator=gen).float() * 2 - 1
        draws.append((side, top, left, signs))
    ref = x.clone()
    with torch.no_grad():
        for j in range(n):
            xj, yj = x[j : j + 1], y[j].item()
            if trained(xj).argmax().item() != yj:
                continue
            best = (xj + EPS * stripes[j : j + 1]).clamp(0, 1)
            m = -_margin_ref(trained(best), yj).item()
            for side, top, left, signs in draws:
                if m <= 0:
                    break
                cand = best.clone()
                t, l = top[j].item(), left[j].item()
                cand[:, :, t : t + side, l : l + side] = xj[:, :, t : t + side, l : l + side] + EPS * signs[j]
                cand = cand.clamp(0, 1)
                m_new = -_margin_ref(trained(cand), yj).item()
                if m_new < m:
                    best, m = cand, m_new
            ref[j] = best[0]
    assert_valid(ours, x, EPS)
    assert (correct(trained, ours, y) == correct(trained, ref, y)).float().mean() >= 1 - 1 / n
    assert (ours - ref).abs().max() < 1e-5


def test_fab_projection_is_the_minimal_linf_step_in_the_box():
    """Checked against bisection on the radius, an independent way to solve the same problem."""
    g = torch.Generator().manual_seed(0)
    p = torch.rand(64, 40, generator=g)
    w = torch.randn(64, 40, generator=g) * (torch.rand(64, 40, generator=g) > 0.2)
    c = torch.randn(64, generator=g) * 2
    c[0], c[1] = 0.0, -1e3  # nothing to do; out of reach of the whole box
    d = project_linf_hyperplane_box(p, w, c)
    assert (p + d).min() >= -1e-6 and (p + d).max() <= 1 + 1e-6

    def reach(r: float, i: int) -> float:  # the largest |<w, δ>| with ‖δ‖∞ <= r inside the box
        room = torch.where(w[i] * c[i] > 0, 1 - p[i], p[i])
        return (w[i].abs() * torch.minimum(room, torch.tensor(r))).sum().item()

    for i in range(64):
        if reach(1.0, i) < abs(c[i].item()):  # infeasible: the box corner that comes closest
            assert i == 1
            assert abs((w[i] * d[i]).sum().item() + reach(1.0, i)) < 1e-4
            continue
        lo, hi = 0.0, 1.0
        for _ in range(60):
            mid = (lo + hi) / 2
            lo, hi = (lo, mid) if reach(mid, i) >= abs(c[i].item()) else (mid, hi)
        assert abs((w[i] * d[i]).sum().item() - c[i].item()) < 1e-4
        assert abs(d[i].abs().max().item() - hi) < 1e-4


def test_fab_finds_small_adversarials_and_counts_only_those_within_eps(trained, batch):
    x, y = batch
    ok = correct(trained, x, y)
    xs, ys = x[ok], y[ok]
    with torch.no_grad():
        target = trained(xs).argsort(1, descending=True)[:, 1]
    best, norm = fab_run(trained, xs, ys, target, xs, 30)
    found = norm.isfinite()
    assert found.float().mean() > 0.5
    assert not correct(trained, best[found], ys[found]).any()
    assert torch.allclose((best - xs).flatten(1).abs().amax(1)[found], norm[found])
    # FAB minimizes the perturbation: its adversarials are no larger than what PGD needs
    broken_by_pgd = ~correct(trained, pgd(trained, xs, ys, EPS, EPS / 4, 10, seed=0), ys)
    assert (norm[broken_by_pgd] <= EPS * 1.5).float().mean() > 0.8
    # a sample is broken at eps only by an adversarial within eps
    small = norm[found].median().item()  # half of the found adversarials lie within it
    x_adv = fab_targeted(trained, x, y, small, n_iter=30, n_target_classes=1)
    assert_valid(x_adv, x, small)
    assert abs(accuracy(trained, x_adv, y) - (1 - ((norm <= small).sum().item() + (~ok).sum().item()) / len(y))) < 1e-6
    assert 0 < (norm <= small).sum() < found.sum()


# ---- strength: more effort never helps the model, the ensemble is the strongest ----


def test_more_steps_or_restarts_never_raise_robust_accuracy(trained, batch):
    x, y = batch
    for norm, eps in (("linf", EPS), ("l2", EPS_L2)):
        accs = [accuracy(trained, pgd(trained, x, y, eps, eps / 4, s, seed=0, norm=norm), y) for s in (1, 5, 20)]
        assert accs[0] >= accs[1] >= accs[2], (norm, accs)
        one = pgd(trained, x, y, eps, eps / 8, 3, seed=1, norm=norm)
        three = pgd(trained, x, y, eps, eps / 8, 3, restarts=3, seed=1, norm=norm)  # its first restart is `one`
        assert_valid(three, x, eps, norm)
        assert not (correct(trained, three, y) & ~correct(trained, one, y)).any()
    accs = [accuracy(trained, cw(trained, x, y, EPS, steps=s, seed=0), y) for s in (2, 20)]
    assert accs[0] >= accs[1]
    one, three = (accuracy(trained, apgd(trained, x, y, EPS, n_iter=5, n_restarts=r, seed=2), y) for r in (1, 3))
    assert three <= one
    few, many = (accuracy(trained, apgd(trained, x, y, EPS, n_iter=n, seed=2), y) for n in (5, 30))
    assert many <= few


def test_apgd_ce_is_at_least_as_strong_as_pgd10(trained, batch):
    x, y = batch
    pgd10 = sum(accuracy(trained, run_attack("pgd10", trained, x, y, EPS, seed=s), y) for s in range(2)) / 2
    apgd_ce = sum(accuracy(trained, apgd(trained, x, y, EPS, n_iter=20, seed=s), y) for s in range(2)) / 2
    assert apgd_ce <= pgd10
    assert accuracy(trained, run_attack("fgsm", trained, x, y, EPS), y) > pgd10


def test_autoattack_is_at_most_the_minimum_of_its_parts(trained, batch):
    x, y = batch
    budget = {"n_iter": 10, "n_target_classes": 3, "fab_n_iter": 10, "n_queries": 100}
    x_aa, log = autoattack_details(trained, x, y, EPS, seed=4, **budget)
    assert_valid(x_aa, x, EPS)
    assert list(log) == ["clean", "apgd-ce", "apgd-t", "fab-t", "square"]
    assert torch.equal(log["square"], correct(trained, x_aa, y))
    parts = {
        "apgd-ce": apgd(trained, x, y, EPS, n_iter=10, seed=4),
        "apgd-t": apgd_targeted(trained, x, y, EPS, n_iter=10, n_target_classes=3, seed=4),
        "fab-t": fab_targeted(trained, x, y, EPS, n_iter=10, n_target_classes=3, seed=4),
        "square": square(trained, x, y, EPS, n_queries=100, seed=4),
    }
    robust_aa = correct(trained, x_aa, y)
    for name, x_part in parts.items():
        robust_part = correct(trained, x_part, y)
        # each part, run alone with the same seed, breaks no point that the ensemble leaves standing
        assert not (robust_aa & ~robust_part).any(), name
    assert robust_aa.float().mean() <= min(correct(trained, xp, y).float().mean() for xp in parts.values())
    assert (log["clean"] >= log["apgd-ce"]).all() and (log["apgd-ce"] >= log["apgd-t"]).all()
    assert torch.equal(autoattack(trained, x, y, EPS, seed=4, **budget), x_aa)


# ---- the pieces ----


def test_dlr_losses():
    z = torch.tensor([[3.0, 1.0, 0.5, -1.0], [0.0, 2.0, 1.0, 0.5]])
    y = torch.tensor([0, 0])
    assert torch.allclose(dlr_loss(z, y), torch.tensor([-(3 - 1) / (3 - 0.5), -(0 - 2) / (2 - 0.5)]))
    t = torch.tensor([2, 1])
    assert torch.allclose(
        dlr_targeted_loss(z, y, t), torch.tensor([-(3 - 0.5) / (3 + 0.25), -(0 - 2) / (2 - 0.25)])
    )
    assert torch.allclose(margin_loss(z, y), torch.tensor([1 - 3.0, 2 - 0.0]))
    # shift and scale invariant, unlike cross-entropy and the margin
    assert torch.allclose(dlr_loss(7 * z + 3, y), dlr_loss(z, y))
    assert torch.allclose(dlr_targeted_loss(7 * z + 3, y, t), dlr_targeted_loss(z, y, t))
    with pytest.raises(ValueError, match="at least 3 classes"):
        dlr_loss(torch.zeros(1, 2), torch.tensor([0]))
    with pytest.raises(ValueError, match="at least 4 classes"):
        dlr_targeted_loss(torch.zeros(1, 3), torch.tensor([0]), torch.tensor([1]))


def test_apgd_checkpoints_and_square_schedule_follow_the_papers():
    assert [k + 1 for k in checkpoints(100)] == [22, 41, 57, 70, 80, 87, 93, 99]
    assert list(checkpoints(100).values()) == [22, 19, 16, 13, 10, 7, 6, 6]
    assert all(1 <= k + 1 <= n for n in (1, 3, 10, 1000) for k in checkpoints(n))
    assert [p_schedule(i, 10000) for i in (0, 10, 11, 50, 51, 8000, 8001)] == [0.8, 0.8, 0.4, 0.4, 0.2,
                                                                              0.8 / 256, 0.8 / 512]
    assert p_schedule(251, 5000, rescale=True) == 0.8 / 16  # rescaled: query 251 of 5000 counts as 502 of 10000
    assert p_schedule(251, 5000) == 0.8 / 8  # AutoAttack's (resc_schedule=False): the 10 000-query schedule


# the side of the square at query i of AutoAttack's 5000 on a 32x32 image, worked out by hand from the Square
# code's p_selection (p_init 0.8; p halves after queries 10, 50, 200, 500, 1000, 2000, 4000) and its
# s = round(sqrt(p * h * w)): AutoAttack's Square never rescales the schedule to its 5000 queries
OFFICIAL_SIDES_32 = {0: 29, 10: 29, 11: 20, 50: 20, 51: 14, 200: 14, 201: 10, 500: 10, 501: 7, 1000: 7, 1001: 5,
                     2000: 5, 2001: 4, 4000: 4, 4001: 3, 4500: 3, 4999: 3}


def test_square_side_follows_autoattack_schedule(trained, batch, monkeypatch):
    """Inside AutoAttack (and by default) the side at query i is the official one: 3 px over the last 1000 of
    5000 queries at 32x32. Rescaling the schedule to n_queries (the Square code's standalone default, which
    raydist used inside AutoAttack before) shrinks it twice as fast, to 1 px over the same queries."""
    import importlib

    square_mod = importlib.import_module("raydist.attacks.square")  # the module (the package exports the function)

    for i, side in OFFICIAL_SIDES_32.items():
        assert square_mod.square_side(i, 5000, 32, 32) == side, i
    assert {square_mod.square_side(i, 5000, 32, 32, rescale=True) for i in range(4001, 5000)} == {1}
    assert square_mod.square_side(0, 5000, 4, 4) == 4  # never larger than the image

    seen = []
    real = square_mod.square_side

    def spy(i, n_queries, h, w, p_init=0.8, rescale=False):
        seen.append((i, n_queries, rescale))
        return real(i, n_queries, h, w, p_init, rescale)

    monkeypatch.setattr(square_mod, "square_side", spy)
    x, y = batch
    autoattack_details(trained, x, y, EPS, attacks=["square"], n_queries=40, seed=0)
    assert seen and all(n == 40 and not rescale for _, n, rescale in seen)
    seen.clear()
    square(trained, x, y, EPS, n_queries=40, seed=0, rescale_schedule=True)
    assert seen and all(rescale for _, _, rescale in seen)


def test_square_is_black_box(trained, batch):
    """Square reads scores only: a model whose backward pass fails does not bother it."""

    class NoGradient(torch.autograd.Function):
        @staticmethod
        def forward(ctx, t):
            return t.clone()

        @staticmethod
        def backward(ctx, grad):
            raise RuntimeError("no gradients here")

    class Wrapped(nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, t):
            return self.net(NoGradient.apply(t))

    x, y = batch
    model = Wrapped(trained)
    x_adv = square(model, x, y, EPS, n_queries=30, seed=0)
    assert_valid(x_adv, x, EPS)
    with pytest.raises(RuntimeError, match="no gradients"):
        apgd(model, x, y, EPS, n_iter=2)


def test_registry_names_budgets_and_bad_arguments(trained, batch):
    x, y = batch[0][:8], batch[1][:8]
    assert set(STRONG) <= set(ATTACKS) and {"clean", "fgsm", "pgd10", "pgd20", "pgd50"} <= set(ATTACKS)
    # positional seed still works; budgets go through run_attack as keywords
    a = run_attack("apgd-ce", trained, x, y, EPS, 0, n_iter=3)
    assert torch.equal(a, apgd(trained, x, y, EPS, n_iter=3, seed=0))
    assert torch.equal(run_attack("cw7", trained, x, y, EPS, seed=1), cw(trained, x, y, EPS, steps=7, seed=1))
    assert torch.equal(
        run_attack("pgd5", trained, x, y, 0.5, seed=2, norm="l2", restarts=2),
        pgd(trained, x, y, 0.5, 0.5 / 4, 5, seed=2, norm="l2", restarts=2),
    )
    assert torch.equal(run_attack("pgd3", trained, x, y, EPS, seed=4), pgd(trained, x, y, EPS, EPS / 4, 3, seed=4))
    for bad in ("cw", "cw0", "apgd", "fab"):
        with pytest.raises(ValueError, match="unknown attack"):
            get_attack(bad)
    with pytest.raises(TypeError):
        run_attack("apgd-ce", trained, x, y, EPS, seed=0, n_iterations=3)
    with pytest.raises(ValueError, match="n_iter"):
        apgd(trained, x, y, EPS, n_iter=0)
    with pytest.raises(ValueError, match="component"):
        autoattack(trained, x, y, EPS, attacks=("apgd-ce", "pgd"))
    with pytest.raises(ValueError, match="eps"):
        square(trained, x, y, -1.0)
    with pytest.raises(ValueError, match="norm"):
        pgd(trained, x, y, EPS, EPS / 4, 2, norm="l1")
