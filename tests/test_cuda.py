"""The CUDA hot path: no host synchronisation inside a training step, bf16 + channels_last + fused SGD, torch.compile
through Triton, and the attacks in both precisions. Skipped without a GPU (CI has none); bench/gpu_check.sh runs
these first on a GPU machine."""

from __future__ import annotations

import pytest
import torch

from raydist.attacks import run_attack
from raydist.methods import create_method
from raydist.methods.base import fused_optimizer_kwargs
from raydist.models import create_model
from raydist.train.loop import _autocast
from raydist.train.speed import compile_model, setup_device

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

KW = {"fgsm_sdi": {"k": 2}, "pgd_at": {"steps": 3}}


def _setup(method: str, compiled: bool = False):
    device = torch.device("cuda")
    setup_device(device)
    torch.manual_seed(0)
    model = create_model("resnet18", num_classes=10, width=16).to(device).to(memory_format=torch.channels_last)
    net = compile_model(model, "default") if compiled else model
    params = list(model.parameters())
    opt = torch.optim.SGD(params, lr=0.05, momentum=0.9, **fused_optimizer_kwargs(torch.optim.SGD, params))
    assert opt.defaults.get("fused")
    m = create_method(method, net, opt, epsilon=8 / 255, autocast=_autocast(device, "auto"), **KW.get(method, {}))
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.rand(64, 3, 32, 32, device=device, generator=g).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (64,), device=device, generator=g)
    return m, x, y


@pytest.mark.parametrize("method", ["standard", "fgsm_rs", "fgsm_sdi", "pgd_at", "free_at", "trades"])
def test_a_training_step_never_waits_for_the_gpu(method):
    m, x, y = _setup(method)
    for _ in range(2):  # warm-up: cuDNN plans, lazy allocations, the generator's first update
        m.step(x, y)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):  # FGSM-SDI with k=2: both kinds of step
            loss, logits = m.step(x, y)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(loss).item() and logits.dtype in (torch.float32, torch.bfloat16)


@pytest.mark.parametrize("method", ["fgsm_rs", "fgsm_sdi"])
def test_compiled_step_on_cuda_matches_eager(method):
    losses = {}
    for compiled in (False, True):
        m, x, y = _setup(method, compiled)
        losses[compiled] = [m.step(x, y)[0].item() for _ in range(4)]
    assert all(abs(a - b) < 0.05 * abs(a) for a, b in zip(losses[False][:2], losses[True][:2])), losses


@pytest.mark.parametrize("attack", ["pgd20", "apgd-ce", "aa"])
def test_bf16_attacks_run_on_cuda_and_stay_in_the_ball(attack):
    model = create_model("resnet18", num_classes=10, width=16).cuda().eval()
    x = torch.rand(32, 3, 32, 32, device="cuda")
    y = torch.randint(0, 10, (32,), device="cuda")
    kw = {"n_iter": 10} if attack == "apgd-ce" else ({"n_iter": 10, "n_queries": 50} if attack == "aa" else {})
    for precision in ("fp32", "bf16"):
        adv = run_attack(attack, model, x, y, 8 / 255, seed=0, precision=precision, **kw)
        assert adv.dtype == torch.float32 and (adv - x).abs().max() <= 8 / 255 + 1e-6
        assert adv.min() >= 0 and adv.max() <= 1
