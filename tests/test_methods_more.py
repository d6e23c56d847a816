"""Free-AT, FGSM-GA (GradAlign), FGSM-CKPT and TRADES: the recipes their papers give."""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from raydist.methods import FGSMCKPT, FGSMGA, TRADES, FreeAT, create_method
from raydist.methods.fgsm_ckpt import first_misclassified
from raydist.methods.fgsm_ga import gradient_misalignment

EPS = 8 / 255
CLASSES = 4
SIZE = 8
NEW = ["free_at", "fgsm_ga", "fgsm_ckpt", "trades"]
FAST = {"free_at": {"m": 2}, "fgsm_ga": {}, "fgsm_ckpt": {}, "trades": {"steps": 2}}  # fewer passes for speed


def synthetic(n: int, seed: int, size: int = SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """Class = a fixed smooth colour pattern, plus pixel noise."""
    templates = F.interpolate(
        torch.rand(CLASSES, 3, 4, 4, generator=torch.Generator().manual_seed(0)), size=size, mode="bilinear"
    )
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, CLASSES, (n,), generator=g)
    x = (0.25 + 0.5 * templates[y] + 0.15 * torch.randn(n, 3, size, size, generator=g)).clamp(0, 1)
    return x, y


def new_model(seed: int = 0) -> nn.Module:
    """A tiny conv net with BatchNorm: these tests are about recipes, and the CPU is shared."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, CLASSES),
    )


def sgd(model: nn.Module, lr: float = 0.05) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors on a shared 2-core machine: a second intra-op thread only waits for a core
    (10x slower under load).  Restored after this module."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    return synthetic(16, seed=2)


def round_trip(state: dict) -> dict:
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


# -- every new method -----------------------------------------------------------------------------
@pytest.mark.parametrize("name", NEW)
def test_training_example_in_the_eps_ball_and_the_box(batch, name):
    eps = 16 / 255
    x, y = batch
    x = x.clone()
    x[:4] = 0.0
    x[4:8] = 1.0
    model = new_model()
    method = create_method(name, model, sgd(model), epsilon=eps, **FAST[name])
    for _ in range(2):  # Free-AT: also from a carried, non-zero δ
        x_train = method.training_example(x, y)
        assert x_train.shape == x.shape and x_train.grad_fn is None and not x_train.requires_grad
        assert (x_train - x).abs().max() <= eps + 1e-6
        assert x_train.min() >= 0 and x_train.max() <= 1 and (x_train != x).any()
        assert model.training and all(p.grad is None for p in model.parameters())
        method.step(x, y)
        model.zero_grad(set_to_none=True)


@pytest.mark.parametrize("name", ["free_at", "fgsm_ga", "fgsm_ckpt"])
def test_cross_entropy_uses_label_smoothing(batch, name):
    x, y = batch
    model = new_model()
    params = {**FAST[name], **({"grad_align_lambda": 0.0} if name == "fgsm_ga" else {})}
    method = create_method(name, model, sgd(model), epsilon=EPS, label_smoothing=0.2, **params)
    loss, logits = method.step(x, y)
    assert torch.allclose(loss, F.cross_entropy(logits, y, label_smoothing=0.2), atol=1e-6)
    assert not torch.allclose(loss, F.cross_entropy(logits, y), atol=1e-4)


def test_paper_defaults():
    model = new_model()
    opt = sgd(model)
    free = create_method("free_at", model, opt, epsilon=EPS)
    assert free.m == 8 and free.alpha == pytest.approx(EPS) and free.divide_epochs
    ga = create_method("fgsm_ga", model, opt, epsilon=EPS)
    assert ga.grad_align_lambda == 0.2 and ga.alpha == pytest.approx(1.25 * EPS) and not ga.random_start
    ckpt = create_method("fgsm_ckpt", model, opt, epsilon=EPS)
    assert ckpt.c == 3 and ckpt.alpha == pytest.approx(1.25 * EPS) and ckpt.random_start
    trades = create_method("trades", model, opt, epsilon=EPS)
    # train_trades_cifar10.py: --epsilon 0.031 --step-size 0.007 (not eps/4 = 0.00775)
    assert trades.beta == 6.0 and trades.steps == 10 and trades.alpha == pytest.approx(0.007 / 0.031 * EPS)
    assert create_method("trades", model, opt, epsilon=0.031).alpha == pytest.approx(0.007)
    for name, bad in [("free_at", {"m": 0}), ("fgsm_ckpt", {"c": 0}), ("trades", {"beta": -1.0}),
                      ("fgsm_ga", {"grad_align_lambda": -0.1})]:
        with pytest.raises(ValueError, match=f"{next(iter(bad))} must be"):
            create_method(name, model, opt, epsilon=EPS, **bad)


def test_new_methods_under_ddp_match_the_plain_model(tmp_path, batch):
    """World size 1 over gloo: DDP's hooks see the whole gradient (GradAlign's double backward and
    TRADES's two forwards included), so one step equals the same step without DDP."""
    import torch.distributed as dist

    x, y = batch
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        for name in NEW:
            plain = new_model()
            wrapped = nn.parallel.DistributedDataParallel(new_model())
            losses = []
            for model in (plain, wrapped):
                method = create_method(name, model, sgd(model), epsilon=EPS, **FAST[name])
                assert method.attack_model is (model.module if model is wrapped else model)
                torch.manual_seed(5)
                losses.append(method.step(x, y)[0])
            assert torch.allclose(losses[0], losses[1], atol=1e-5), name
            for a, b in zip(plain.parameters(), wrapped.module.parameters()):
                assert torch.allclose(a, b, atol=1e-5), name
    finally:
        dist.destroy_process_group()


# -- Free-AT ----------------------------------------------------------------------------------------
def test_free_at_takes_m_optimizer_steps_per_call(batch):
    x, y = batch
    model = new_model()
    opt = sgd(model)
    method = create_method("free_at", model, opt, epsilon=EPS, m=3)
    assert isinstance(method, FreeAT)
    calls = []
    inner_step = opt.step
    opt.step = lambda *a, **k: (calls.append(1), inner_step(*a, **k))[1]
    loss, logits = method.step(x, y)
    assert len(calls) == 3 and method.num_updates == 3 and method.num_steps == 1
    assert loss.dim() == 0 and not loss.requires_grad and logits.shape == (len(y), CLASSES)
    method.step(x, y)
    assert len(calls) == 6 and method.num_updates == 6 and method.num_steps == 2
    assert method.updates_per_step == 3 and method.epoch_divisor == 3
    assert create_method("free_at", model, opt, epsilon=EPS, m=3, divide_epochs=False).epoch_divisor == 1


def test_free_at_carries_delta_between_replays_and_calls():
    """Against the paper's algorithm written out: one δ buffer, sliced to each batch, moved by
    ε·sign(∇δ) after every replay, grown with zeros for a larger batch."""
    m = 2
    batches = [synthetic(16, seed=s) for s in (3, 4)] + [synthetic(10, seed=5), synthetic(20, seed=6)]
    model = new_model()
    method = create_method("free_at", model, sgd(model), epsilon=EPS, m=m)
    ref_model = copy.deepcopy(model)
    ref_opt = sgd(ref_model)

    seen = []  # the input of every replay
    model.register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach().clone()))
    ref_delta = torch.zeros(16, 3, SIZE, SIZE)
    for x, y in batches:
        n = len(x)
        before = None if method.delta is None else method.delta.clone()
        if n > len(ref_delta):
            ref_delta = torch.cat([ref_delta, torch.zeros(n - len(ref_delta), 3, SIZE, SIZE)])
        start = ref_delta[:n].clone()
        for _ in range(m):
            d = ref_delta[:n].clone().requires_grad_(True)
            ref_opt.zero_grad()
            F.cross_entropy(ref_model(torch.clamp(x + d, 0, 1)), y).backward()
            ref_delta[:n] = torch.clamp(ref_delta[:n] + EPS * d.grad.sign(), -EPS, EPS)
            ref_opt.step()
        seen.clear()
        method.step(x, y)

        # each call starts from the δ the previous one left, and each replay from the previous replay's δ
        assert torch.allclose(seen[0], torch.clamp(x + start, 0, 1), atol=1e-6)
        assert not torch.allclose(seen[1], seen[0])
        assert torch.allclose(method.delta, ref_delta, atol=1e-6)
        if before is not None and n < len(before):  # rows past a short batch are kept
            assert torch.equal(method.delta[n:], before[n:])
    assert method.delta.shape[0] == 20 and method.delta.abs().max() <= EPS + 1e-7 and (method.delta != 0).any()
    for a, b in zip(model.parameters(), ref_model.parameters()):
        assert torch.allclose(a, b, atol=1e-5)


def test_free_at_training_example_reads_but_keeps_delta(batch):
    x, y = batch
    model = new_model()
    method = create_method("free_at", model, sgd(model), epsilon=EPS, m=2)
    assert method.delta is None
    method.training_example(x, y)
    assert method.delta is None  # nothing stored
    method.step(x, y)
    delta = method.delta.clone()
    method.training_example(x[:8], y[:8])
    assert torch.equal(method.delta, delta)


def test_free_at_state_dict_round_trip(batch):
    x, y = batch
    model = new_model()
    opt = sgd(model)
    method = create_method("free_at", model, opt, epsilon=EPS, m=2)
    fresh = round_trip(method.state_dict())
    assert fresh == {"delta": None, "num_steps": 0, "num_updates": 0}
    for _ in range(2):
        method.step(x, y)
    state = round_trip(method.state_dict())
    assert state["num_steps"] == 2 and state["num_updates"] == 4 and torch.equal(state["delta"], method.delta)

    model2 = copy.deepcopy(model)
    opt2 = sgd(model2)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    resumed = create_method("free_at", model2, opt2, epsilon=EPS, m=2)
    resumed.load_state_dict(state)
    assert resumed.num_steps == 2 and resumed.num_updates == 4
    l1, _ = method.step(x, y)
    l2, _ = resumed.step(x, y)
    assert torch.allclose(l1, l2, atol=1e-6) and torch.allclose(method.delta, resumed.delta, atol=1e-6)
    resumed.load_state_dict(fresh)
    assert resumed.delta is None and resumed.num_steps == 0


# -- FGSM-GA ----------------------------------------------------------------------------------------
def test_gradient_misalignment_known_values():
    g = torch.randn(4, 3, 5, 5)
    other = torch.randn(4, 3, 5, 5)
    orth = other - (other * g).sum((1, 2, 3), keepdim=True) / (g * g).sum((1, 2, 3), keepdim=True) * g
    assert gradient_misalignment(g, g).abs() < 1e-6
    assert gradient_misalignment(g, 3.0 * g).abs() < 1e-6  # scale-free
    assert (gradient_misalignment(g, orth) - 1).abs() < 1e-5
    assert (gradient_misalignment(g, -g) - 2).abs() < 1e-6
    mixed = torch.cat([g[:2], -g[2:]])
    assert (gradient_misalignment(g, mixed) - 1).abs() < 1e-6  # per-sample cosines, averaged

    # a sample with a zero gradient is left out of the mean, and gives no NaN gradient
    g2 = g.clone().requires_grad_(True)
    zero_one = torch.cat([g[:3], torch.zeros(1, 3, 5, 5)])
    value = gradient_misalignment(zero_one, -g2)
    assert (value - 2).abs() < 1e-6
    value.backward()
    assert torch.isfinite(g2.grad).all() and g2.grad[3].abs().max() == 0
    assert gradient_misalignment(torch.zeros(2, 3), torch.ones(2, 3)) == 0


def test_grad_align_vanishes_when_the_loss_gradient_keeps_its_direction(batch):
    """A linear two-class model: ∇ₓCE = (p₁ − [y=1])·(w₁ − w₀) points the same way everywhere."""
    x, y = batch
    y = y % 2
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * SIZE * SIZE, 2))
    method = create_method("fgsm_ga", model, sgd(model), epsilon=EPS)
    assert method.grad_align(x, y).abs() < 1e-5


def test_grad_align_reaches_the_weights_by_double_backprop(batch):
    x, y = batch
    model = new_model()
    method = create_method("fgsm_ga", model, sgd(model), epsilon=EPS)
    value = method.grad_align(x, y)
    assert 0 < value < 2
    grads = torch.autograd.grad(value, list(model.parameters()), allow_unused=True)
    assert all(g is None or torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) for g in grads if g is not None) > 0


def test_fgsm_ga_step_adds_lambda_times_the_term(batch, monkeypatch):
    x, y = batch
    model = new_model()
    method = create_method("fgsm_ga", model, sgd(model), epsilon=EPS, grad_align_lambda=0.5)
    assert isinstance(method, FGSMGA)
    term = torch.tensor(0.3, requires_grad=True)
    monkeypatch.setattr(method, "grad_align", lambda x, y, grad_x=None: term * 1.0)
    loss, logits = method.step(x, y)
    assert torch.allclose(loss, F.cross_entropy(logits, y) + 0.5 * 0.3, atol=1e-6)
    assert term.grad is not None and term.grad == 0.5


def test_fgsm_ga_unwraps_torch_compile_for_the_double_backward():
    from raydist.methods.fgsm_ga import _eager

    model = new_model()
    compiled = torch.compile(model, backend="aot_eager")  # lazy: nothing is compiled here
    assert _eager(compiled) is model and _eager(model) is model


# -- FGSM-CKPT --------------------------------------------------------------------------------------
class MeanModel(nn.Module):
    """Two classes decided by the mean pixel value m: class 1 iff lo < m < hi (a window when
    ``hi`` is set, a threshold ``m > lo`` when not).  Records its mode at every call."""

    def __init__(self, lo: float, hi: float | None = None) -> None:
        super().__init__()
        self.lo, self.hi = lo, hi
        self.scale = nn.Parameter(torch.tensor(10.0))
        self.modes: list[bool] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.modes.append(self.training)
        m = x.flatten(1).mean(1)
        margin = m - self.lo if self.hi is None else torch.minimum(m - self.lo, self.hi - m)
        return torch.stack([torch.zeros_like(m), self.scale * margin], dim=1)


def test_first_misclassified():
    wrong = torch.tensor([[0, 0, 1, 0], [1, 0, 1, 0], [0, 1, 1, 0]], dtype=torch.bool)
    assert first_misclassified(wrong).tolist() == [1, 2, 0, 3]


def test_ckpt_picks_the_first_misclassified_checkpoint_per_sample():
    """Checkpoints sit at mean + 0.1·i (ε = 0.3, c = 3, δ = +ε); class 1 (wrong) iff the mean is in
    (0.45, 0.55).  Sample 0 is wrong at checkpoint 1 but right again at 2: the first one counts."""
    eps = 0.3
    model = MeanModel(0.45, 0.55)
    method = FGSMCKPT(model, sgd(model), epsilon=eps, c=3)
    means = torch.tensor([0.40, 0.30, 0.20, 0.05, 0.50])
    x = means.view(-1, 1, 1, 1).expand(-1, 3, 4, 4).clone()
    y = torch.zeros(5, dtype=torch.long)
    delta = torch.full_like(x, eps)
    start_wrong = torch.tensor([False, False, False, False, True])
    model.modes.clear()
    x_train, index = method.checkpoint_example(x, y, delta, start_wrong)
    assert index.tolist() == [1, 2, 3, 3, 0]  # 1st; 2nd; none before the full step; none; clean x
    assert torch.allclose(x_train, x + index.view(-1, 1, 1, 1) / 3 * delta)
    assert model.modes == [False, False] and model.training  # c − 1 inferences in eval mode, mode restored


def test_ckpt_training_example_end_to_end():
    """FGSM from a zero start on a threshold model moves every pixel up by ε; each sample trains
    on the first checkpoint across the threshold, the clean x if it is already across."""
    eps = 0.3
    model = MeanModel(0.5)
    method = FGSMCKPT(model, sgd(model), epsilon=eps, c=3, random_start=False)
    means = torch.tensor([0.45, 0.35, 0.25, 0.05, 0.55])
    x = means.view(-1, 1, 1, 1).expand(-1, 3, 4, 4).clone()
    y = torch.zeros(5, dtype=torch.long)
    x_train = method.training_example(x, y)
    expected = torch.tensor([1, 2, 3, 3, 0]) / 3 * eps
    assert torch.allclose(x_train, x + expected.view(-1, 1, 1, 1), atol=1e-6)
    loss, logits = method.step(x, y)  # the base class's step trains on it
    assert torch.isfinite(loss) and method.num_steps == 1


# -- TRADES -----------------------------------------------------------------------------------------
def test_trades_loss_decomposition():
    torch.manual_seed(0)
    model = new_model()
    method = create_method("trades", model, sgd(model), epsilon=EPS, beta=6.0, label_smoothing=0.1)
    assert isinstance(method, TRADES)
    logits_nat, logits_adv = torch.randn(8, CLASSES), torch.randn(8, CLASSES)
    y = torch.randint(0, CLASSES, (8,))
    loss, natural, robust = method.loss_terms(logits_nat, logits_adv, y)
    assert torch.allclose(loss, natural + 6.0 * robust)
    assert torch.allclose(natural, F.cross_entropy(logits_nat, y, label_smoothing=0.1))
    p_nat = F.softmax(logits_nat, 1)
    kl = (p_nat * (F.log_softmax(logits_nat, 1) - F.log_softmax(logits_adv, 1))).sum(1).mean()
    assert torch.allclose(robust, kl, atol=1e-6) and robust > 0
    assert method.loss_terms(logits_nat, logits_nat, y)[2].abs() < 1e-6


def test_trades_step_trains_on_that_loss(batch):
    x, y = batch
    model = new_model()
    method = create_method("trades", model, sgd(model), epsilon=EPS, steps=3)
    torch.manual_seed(1)
    x_adv = method.training_example(x, y)
    probe = copy.deepcopy(model)  # forwards here must not move the BN statistics the attack reads
    with torch.no_grad():  # train mode, as the step's forwards (BN batch statistics)
        expected, _, robust = method.loss_terms(probe(x), probe(x_adv), y)
        logits_adv = probe(x_adv)
    torch.manual_seed(1)  # the same random start
    loss, logits = method.step(x, y)
    assert torch.allclose(loss, expected, atol=1e-5) and torch.allclose(logits, logits_adv, atol=1e-5)
    assert robust > 0


def test_trades_attack_raises_the_kl(batch):
    x, y = batch
    model = new_model().eval()
    method = create_method("trades", model, sgd(model), epsilon=EPS, steps=5)
    model.eval()

    def kl(x_other: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return method.loss_terms(model(x), model(x_other), y)[2]

    x_adv = method.training_example(x, y)
    model.eval()
    assert kl(x_adv) > 10 * kl((x + 0.001 * torch.randn_like(x)).clamp(0, 1))
