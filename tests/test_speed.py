"""The hot-path switches of raydist.train.speed and the fused optimizers: they change speed, never results."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT

from raydist.methods import create_method
from raydist.methods.base import fused_optimizer_kwargs
from raydist.models import create_model
from raydist.train.speed import compile_options, use_compile

COMPILE_TIMEOUT_S = 900  # two cold inductor compiles take ~1 min on an idle 2-core machine


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


def test_a_compiled_model_trains_like_the_eager_one_without_recompiling_each_step():
    """torch.compile (inductor, as run.compile does) under a real method: the input-gradient passes, the weight
    update and FGSM-SDI's generator step all go through the compiled graphs; after the first steps (train-mode
    graphs with and without an input that needs its gradient) nothing compiles again.

    In a child process with a time limit (tests/compiled_cases.py), held to oneDNN's AVX2 kernels at a batch
    size where inductor's channels-last layout deadlocked them (in about one run of three, within four steps): a
    hang there is this test failing, not the suite stalling. Deterministically, every convolution gradient of the
    compiled backward is computed on NCHW tensors; before raydist turned inductor's layout optimisation off on
    CPU, all 20 per step of the standard method were channels-last."""
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2"}
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "compiled_cases.py"), "standard", "fgsm_sdi"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=COMPILE_TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    for method, r in results.items():
        eager, comp = r["eager"], r["compiled"]
        assert all(abs(a - b) < 0.02 * abs(a) for a, b in zip(eager[:3], comp[:3])), (method, eager, comp)
        assert comp[-1] < comp[0] and eager[-1] < eager[0], method
        assert r["frames_at_end"] == r["frames_after_warmup"] >= 1, f"{method}: recompiled after warm-up"
        # what keeps the oneDNN kernel out of reach: the compiled backward gets NCHW tensors, as eager does
        assert r["conv_backward_calls"] >= 20 and r["channels_last_calls"] == 0, (method, r)


def test_cpu_compile_keeps_the_nchw_layout_and_cuda_keeps_its_mode():
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert compile_options("default", cpu) == {"options": {"layout_optimization": False}}
    auto = compile_options("max-autotune", cpu)["options"]
    assert auto["max_autotune"] and not auto["layout_optimization"] and not any(k.startswith("triton") for k in auto)
    assert compile_options("reduce-overhead", cuda) == {"mode": "reduce-overhead"}
    assert compile_options("default", cuda) == {}


def test_channels_last_on_cpu_workers_is_refused_before_anything_runs():
    from raydist import config as C

    base = {"run": {"channels_last": "true"}}
    with pytest.raises(C.ConfigError, match=r"run.channels_last: true needs CUDA workers"):
        C.validate(base)
    assert C.validate({**base, "scaling": {"use_gpu": True}})["run"]["channels_last"] == "true"
    assert C.validate({"run": {"channels_last": "false"}})["run"]["channels_last"] == "false"


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
