"""SAT activations: each forward value and derivative against its formula, smoothness at 0,
SmoothReLU's learnable α, and the smooth-backward switch of SAT's controlled experiment."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from raydist.models import (
    ACTIVATIONS,
    ParametricSoftplus,
    ReLUSmoothGrad,
    SmoothReLU,
    activation_parameters,
    configure_sat,
    create_model,
    make_activation,
    parse_activation,
    set_backward_mode,
    smooth_backward,
)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-5, atol: float = 1e-7) -> None:
    """``torch.testing.assert_close`` without its import cost (it pulls in torch.distributed)."""
    expected = torch.as_tensor(expected, dtype=actual.dtype).expand_as(actual)
    assert torch.allclose(actual, expected, rtol=rtol, atol=atol), f"max |diff| {(actual - expected).abs().max()}"


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These tests are tiny; on a shared 2-core machine extra threads only fight each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def sig(x):
    return torch.sigmoid(x)


def softplus_ref(x):
    return torch.log1p(torch.exp(x))


def phi(x):  # standard normal pdf and cdf
    return torch.exp(-0.5 * x**2) / math.sqrt(2 * math.pi), 0.5 * (1 + torch.erf(x / math.sqrt(2)))


def _gelu(x):
    pdf, cdf = phi(x)
    return x * cdf, cdf + x * pdf


def _mish(x):
    sp = softplus_ref(x)
    t = torch.tanh(sp)
    return x * t, t + x * (1 - t**2) * sig(x)


def _elu(a):
    return lambda x: (torch.where(x > 0, x, a * torch.expm1(x)), torch.where(x > 0, 1.0, a * torch.exp(x)))


def _celu(a):
    return lambda x: (torch.where(x > 0, x, a * torch.expm1(x / a)), torch.where(x > 0, 1.0, torch.exp(x / a)))


def _smoothrelu(a):
    return lambda x: (
        torch.where(x > 0, x - torch.log1p(a * x.clamp_min(0)) / a, 0.0),
        torch.where(x > 0, a * x / (1 + a * x.clamp_min(0)), 0.0),
    )


def _psoftplus(a):
    return lambda x: (softplus_ref(a * x) / a, sig(a * x))


# (activation spec, f and f' as formulas, C¹ at 0?)
CASES = [
    ("relu", lambda x: (x.clamp_min(0), (x > 0).double()), False),
    ("softplus", lambda x: (softplus_ref(x), sig(x)), True),
    ("parametric_softplus", _psoftplus(10.0), True),
    ("parametric_softplus(alpha=3)", _psoftplus(3.0), True),
    ("silu", lambda x: (x * sig(x), sig(x) * (1 + x * (1 - sig(x)))), True),
    ("gelu", _gelu, True),
    ("elu", _elu(1.0), True),
    ("elu(alpha=2.0)", _elu(2.0), False),  # α ≠ 1: f'(0⁻) = α, f'(0⁺) = 1
    ("celu", _celu(1.0), True),
    ("celu(alpha=0.5)", _celu(0.5), True),  # CELU is C¹ for every α
    ("mish", _mish, True),
    ("smoothrelu", _smoothrelu(400.0), True),
    ("smoothrelu(alpha=2.5)", _smoothrelu(2.5), True),
    ("relu_smoothgrad", lambda x: (x.clamp_min(0), (x > 0).double()), False),  # default mode: exact ReLU
]
SMOOTH = [c for c in CASES if c[2]]

X = torch.cat([torch.linspace(-6, 6, 120), torch.tensor([-1e-3, 1e-3, 0.05, -0.05, 30.0, -30.0])]).double()


def test_the_table_holds_the_sat_activations():
    assert {
        "relu", "softplus", "parametric_softplus", "silu", "gelu", "elu", "celu", "mish", "smoothrelu",
        "relu_smoothgrad",
    } <= set(ACTIVATIONS)
    assert {base for base, _ in (parse_activation(c[0]) for c in CASES)} == set(ACTIVATIONS)  # every one tested


@pytest.mark.parametrize("spec,formula,smooth", CASES, ids=[c[0] for c in CASES])
def test_forward_and_derivative_match_the_formula(spec, formula, smooth):
    act = make_activation(spec).double()
    x = X.clone().requires_grad_(True)
    y = act(x)
    (dy,) = torch.autograd.grad(y.sum(), x)
    f, df = formula(X)
    assert_close(y.detach(), f, rtol=1e-7, atol=1e-8)
    assert_close(dy, df.expand_as(dy).double(), rtol=1e-7, atol=1e-8)


@pytest.mark.parametrize("spec", [c[0] for c in SMOOTH])
def test_gradcheck_in_float64(spec):
    act = make_activation(spec).double()
    x = (torch.randn(24, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 2).requires_grad_(True)
    assert torch.autograd.gradcheck(act, (x,))
    assert torch.autograd.gradgradcheck(act, (x,))


@pytest.mark.parametrize("spec,formula,smooth", CASES, ids=[c[0] for c in CASES])
def test_derivative_is_continuous_at_zero_exactly_for_the_smooth_ones(spec, formula, smooth):
    act = make_activation(spec).double()
    x = torch.tensor([-1e-9, 1e-9], dtype=torch.float64, requires_grad=True)
    (d,) = torch.autograd.grad(act(x).sum(), x)
    jump = (d[1] - d[0]).abs().item()
    if smooth:
        assert jump < 1e-5, f"{spec}: f'(0⁻)={d[0].item()}, f'(0⁺)={d[1].item()}"
    else:
        assert jump > 0.5


def test_parametric_names_and_errors():
    assert parse_activation("elu") == ("elu", {})
    assert parse_activation(" parametric_softplus( alpha = 5 ) ") == ("parametric_softplus", {"alpha": 5})
    assert make_activation("elu(alpha=0.5)").alpha == 0.5
    assert make_activation("elu(alpha=0.5)", alpha=0.25).alpha == 0.25  # explicit kwargs win
    sp = make_activation("parametric_softplus")
    assert isinstance(sp, ParametricSoftplus) and sp.alpha == 10.0
    assert make_activation("smoothrelu").alpha.item() == pytest.approx(400.0)
    with pytest.raises(ValueError, match="unknown activation 'swish'"):
        make_activation("swish(alpha=1)")
    with pytest.raises(ValueError, match=r"activation 'elu' does not take \['beta'\]; it takes: alpha"):
        make_activation("elu(beta=1)")
    with pytest.raises(ValueError, match="cannot parse activation"):
        make_activation("elu(alpha=)")
    with pytest.raises(ValueError, match="cannot parse activation"):
        make_activation("elu(alpha=os.system)")
    with pytest.raises(ValueError, match="positive"):
        make_activation("parametric_softplus(alpha=0)")
    with pytest.raises(ValueError, match="positive"):
        make_activation("smoothrelu(alpha=-1)")
    with pytest.raises(ValueError, match="backward mode"):
        make_activation("relu_smoothgrad(backward_mode='soft')")
    # a model built from a parametrised name records it in its spec
    model = create_model("resnet18", activation="parametric_softplus(alpha=5)", width=4)
    assert model.spec["activation"] == "parametric_softplus(alpha=5)"
    assert {m.alpha for m in model.modules() if isinstance(m, ParametricSoftplus)} == {5}


# -- SmoothReLU's learnable α ------------------------------------------------------------------


def test_smoothrelu_alpha_gradient_matches_the_formula():
    act = SmoothReLU(alpha=3.0).double()
    x = torch.linspace(-2, 3, 50, dtype=torch.float64)
    act(x).sum().backward()
    a = act.alpha.detach()
    pos = x.clamp_min(0)
    d_alpha = (torch.log1p(a * pos) / a**2 - pos / (a * (1 + a * pos))).sum()
    assert_close(act.beta.grad, d_alpha * 2 * act.beta.detach())  # α = β²
    beta = act.beta.detach().clone().requires_grad_(True)
    xs = (torch.rand(10, dtype=torch.float64) * 4 - 1).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda v, b: functional_call(act, {"beta": b}, (v,)), (xs, beta))


def test_smoothrelu_is_parametrised_as_in_sat_official_code():
    """SAT's smoothrelu_fn: learnable β starting at 20, α = β². One SGD step of lr η on β moves α by about
    4β²·η·∂L/∂α = 1600·η·∂L/∂α, where a parametrisation with dα/dθ ≈ 1 (raydist's softplus one before) moved
    it by η·∂L/∂α and α stayed at ~400 for the whole run."""
    act = SmoothReLU()
    assert [n for n, _ in act.named_parameters()] == ["beta"]
    assert act.beta.item() == 20.0 and act.alpha.item() == 400.0
    x = torch.rand(1000) * 0.05  # where f depends on α
    act(x).sum().backward()
    g_beta = act.beta.grad.item()
    a = torch.tensor(400.0, requires_grad=True)
    (g_alpha,) = torch.autograd.grad((x - torch.log1p(a * x) / a).sum(), a)  # ∂L/∂α at α = 400 (x >= 0)
    g_alpha = g_alpha.item()
    assert g_beta == pytest.approx(2 * 20.0 * g_alpha, rel=1e-4)
    lr = 1e-3
    with torch.no_grad():
        act.beta -= lr * act.beta.grad
    moved = act.alpha.item() - 400.0
    assert moved == pytest.approx(-1600 * lr * g_alpha, rel=0.01)
    with torch.no_grad():  # α = β² can never turn negative, however far β moves
        act.beta.fill_(-3.0)
    assert act.alpha.item() == pytest.approx(9.0)
    y = act(torch.linspace(-1, 5, 100))
    assert torch.isfinite(y).all() and (y >= -1e-6).all()


def test_smoothrelu_is_one_alpha_per_layer_and_listed_for_no_weight_decay():
    model = create_model("resnet18", activation="smoothrelu", width=4)
    acts = [m for m in model.modules() if isinstance(m, SmoothReLU)]
    assert len(acts) == 17
    params = activation_parameters(model)
    assert len(params) == 17 and len({id(p) for p in params}) == 17
    assert {id(p) for p in params} == {id(m.beta) for m in acts}
    assert activation_parameters(create_model("resnet18", width=4)) == []
    frozen = SmoothReLU(learnable=False)
    assert list(frozen.parameters()) == [] and "beta" in frozen.state_dict()


def test_smoothrelu_in_half_precision():
    x = torch.linspace(-1, 1, 101)
    act = SmoothReLU()
    y16 = act(x.bfloat16())
    assert y16.dtype == torch.bfloat16
    assert_close(y16.float(), act(x).detach(), rtol=1e-2, atol=1e-3)


# -- ReLU forward, smooth backward ---------------------------------------------------------------


def test_relu_smoothgrad_forward_is_relu_and_backward_follows_the_mode():
    x = torch.linspace(-3, 3, 60, dtype=torch.float64)
    act = ReLUSmoothGrad()
    for mode, expected in [("relu", (x > 0).double()), ("smooth", torch.sigmoid(10 * x))]:
        act.backward_mode = mode
        xg = x.clone().requires_grad_(True)
        y = act(xg)
        assert_close(y.detach(), F.relu(x))
        (g,) = torch.autograd.grad(y.sum(), xg)
        assert_close(g, expected)
    act.backward_mode = "smooth"
    with torch.no_grad():
        assert_close(act(x), F.relu(x))
    # the smooth backward is parametric Softplus's derivative
    xg = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(ReLUSmoothGrad(alpha=4, backward_mode="smooth")(xg).sum(), xg)
    xs = x.clone().requires_grad_(True)
    (g_sp,) = torch.autograd.grad(ParametricSoftplus(alpha=4)(xs).sum(), xs)
    assert_close(g, g_sp)


def test_relu_smoothgrad_supports_double_backward():
    """GradAlign-style penalties differentiate an input gradient again."""
    act = ReLUSmoothGrad(alpha=10, backward_mode="smooth")
    x = torch.linspace(-1, 1, 21, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(act(x).sum(), x, create_graph=True)
    (gg,) = torch.autograd.grad(g.sum(), x)
    s = torch.sigmoid(10 * x.detach())
    assert_close(gg, 10 * s * (1 - s))  # the second derivative of softplus(10x)/10


def test_mode_switches_set_restore_and_nest():
    model = create_model("resnet18", activation="relu_smoothgrad", width=4)
    acts = [m for m in model.modules() if isinstance(m, ReLUSmoothGrad)]
    assert len(acts) == 17 and {m.backward_mode for m in acts} == {"relu"}  # exact ReLU by default
    with smooth_backward(model):
        assert {m.backward_mode for m in acts} == {"smooth"}
        with smooth_backward(model, enabled=False):
            assert {m.backward_mode for m in acts} == {"relu"}
        assert {m.backward_mode for m in acts} == {"smooth"}
    assert {m.backward_mode for m in acts} == {"relu"}
    with pytest.raises(RuntimeError, match="boom"), smooth_backward(model):
        raise RuntimeError("boom")
    assert {m.backward_mode for m in acts} == {"relu"}
    assert set_backward_mode(nn.DataParallel(model), "smooth") == 17  # reaches through wrappers
    assert {m.backward_mode for m in acts} == {"smooth"}
    assert set_backward_mode(model, "relu") == 17
    with pytest.raises(ValueError, match="backward mode"):
        set_backward_mode(model, "softplus")


@pytest.mark.parametrize("attacker,optimizer", [(False, False), (True, False), (False, True), (True, True)])
def test_configure_sat_gives_the_four_rows(attacker, optimizer):
    torch.manual_seed(0)
    model = create_model("resnet18", activation="relu_smoothgrad", width=4).eval()
    reference = create_model("resnet18", width=4).eval()  # the same network with plain ReLU
    reference.load_state_dict(model.state_dict())
    x, y = torch.rand(4, 3, 16, 16), torch.tensor([0, 1, 2, 3])

    def input_grad(m):
        xg = x.clone().requires_grad_(True)
        return torch.autograd.grad(F.cross_entropy(m(xg), y), xg)[0]

    def weight_grad(m):
        m.zero_grad()
        F.cross_entropy(m(x), y).backward()
        return m.net.conv1.weight.grad.clone()

    sat = configure_sat(model, attacker=attacker, optimizer=optimizer)
    assert sat.row == {(False, False): "neither", (True, False): "attacker",
                       (False, True): "optimizer", (True, True): "both"}[(attacker, optimizer)]
    with sat.attack():
        gx = input_grad(model)
    with sat.update():
        gw = weight_grad(model)
    assert torch.allclose(gx, input_grad(reference)) is not attacker
    assert torch.allclose(gw, weight_grad(reference)) is not optimizer
    assert_close(model(x), reference(x))  # the forward pass is ReLU throughout
    assert {m.backward_mode for m in model.modules() if isinstance(m, ReLUSmoothGrad)} == {"relu"}


def test_configure_sat_refuses_a_model_without_smoothgrad_activations():
    model = create_model("resnet18", width=4)
    with pytest.raises(ValueError, match="relu_smoothgrad"):
        configure_sat(model, attacker=True, optimizer=False)
    sat = configure_sat(model, attacker=False, optimizer=False)  # the baseline row is a no-op
    with sat.attack(), sat.update():
        pass
