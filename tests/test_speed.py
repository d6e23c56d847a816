"""The hot-path switches of raydist.train.speed and the fused optimizers: they change speed, never results."""

from __future__ import annotations

import pytest
import torch

from raydist.methods import create_method
from raydist.methods.base import fused_optimizer_kwargs
from raydist.models import create_model
from raydist.train.speed import compile_model, use_compile


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model("resnet18", num_classes=10, width=4, in_channels=1, mean=(0.5,), std=(0.5,))


def _batch(n: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.rand(n, 1, 16, 16, generator=g), torch.randint(0, 10, (n,), generator=g)


def test_compile_is_on_for_cuda_only_under_auto():
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert use_compile("auto", cuda) and not use_compile("auto", cpu)
    assert use_compile("true", cpu) and not use_compile("false", cuda)


def test_fused_sgd_and_adam_take_the_same_steps_as_foreach():
    x, y = _batch()
    for cls, kw in ((torch.optim.SGD, {"lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4, "nesterov": True}),
                    (torch.optim.Adam, {"lr": 1e-3, "weight_decay": 5e-4})):
        results = []
        for fused in (False, True):
            model = _model()
            params = list(model.parameters())
            extra = fused_optimizer_kwargs(cls, params) if fused else {"foreach": True}
            assert ("fused" in extra) == fused
            opt = cls(params, **kw, **extra)
            for _ in range(3):
                opt.zero_grad()
                torch.nn.functional.cross_entropy(model(x), y).backward()
                opt.step()
            results.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
        assert torch.allclose(results[0], results[1], atol=1e-5), (results[0] - results[1]).abs().max()


def test_fused_is_not_asked_of_an_optimizer_or_tensor_that_cannot_do_it():
    class NoFused(torch.optim.Optimizer):
        def __init__(self, params, lr=0.1):
            super().__init__(params, {"lr": lr})

    assert fused_optimizer_kwargs(NoFused, [torch.zeros(2, requires_grad=True)]) == {}
    assert fused_optimizer_kwargs(torch.optim.SGD, []) == {}
    assert fused_optimizer_kwargs(torch.optim.SGD, [{"params": [torch.zeros(2, requires_grad=True)]}]) == {
        "fused": True}


@pytest.mark.parametrize("method", ["standard", "fgsm_sdi"])
def test_a_compiled_model_trains_like_the_eager_one_without_recompiling_each_step(method):
    """torch.compile (inductor, as run.compile would on CUDA) under a real method: the input-gradient passes,
    the weight update and FGSM-SDI's generator step all go through the compiled graphs; after the first steps
    (train-mode graphs with and without an input that needs its gradient) nothing compiles again."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    x, y = _batch()
    kw = {"k": 3, "generator_width": 4} if method == "fgsm_sdi" else {}
    losses = {}
    for compiled in (False, True):
        model = _model()
        net = compile_model(model, "default") if compiled else model
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        torch.manual_seed(2)
        m = create_method(method, net, opt, epsilon=8 / 255, **kw)
        out = []
        for i in range(7):
            if compiled and i == 4:  # steps 0 and 3 updated the generator: every kind of pass has run
                frames = counters["frames"]["ok"]
            out.append(m.step(x, y)[0].item())
        losses[compiled] = out
        if compiled:
            assert counters["frames"]["ok"] == frames, "recompiled after warm-up"
            assert frames >= 1
    eager, comp = losses[False], losses[True]
    assert all(abs(a - b) < 0.02 * abs(a) for a, b in zip(eager[:3], comp[:3])), (eager, comp)
    assert comp[-1] < comp[0] and eager[-1] < eager[0]


@pytest.mark.parametrize("method,kw,model_passes,generator_passes", [
    ("standard", {}, [1, 1, 1], [0, 0, 0]),
    ("fgsm_rs", {}, [2, 2, 2], [0, 0, 0]),
    ("pgd_at", {"steps": 10}, [11, 11, 11], [0, 0, 0]),
    # FGSM-SDI: sign of ∇x, the FGSM step from x + η, the weight update; every k-th step the generator's
    # ascent adds its own FGSM step and the forward it differentiates through (the sign is reused)
    ("fgsm_sdi", {"k": 2, "generator_width": 4}, [5, 3, 5], [2, 1, 2]),
])
def test_each_step_makes_only_the_passes_its_algorithm_needs(method, kw, model_passes, generator_passes):
    model = _model()
    m = create_method(method, model, torch.optim.SGD(model.parameters(), lr=0.01), epsilon=8 / 255, **kw)
    counts = {"model": 0, "generator": 0}
    model.register_forward_hook(lambda *_: counts.__setitem__("model", counts["model"] + 1))
    if hasattr(m, "generator"):
        m.generator.register_forward_hook(lambda *_: counts.__setitem__("generator", counts["generator"] + 1))
    seen = []
    x, y = _batch(8)
    for _ in range(3):
        counts.update(model=0, generator=0)
        m.step(x, y)
        seen.append((counts["model"], counts["generator"]))
    assert seen == list(zip(model_passes, generator_passes))
