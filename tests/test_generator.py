"""FGSM-SDI's generator is the reference's One_Layer_Attacker (jiaxiaojunQAQ/FGSM-SDI, attacker.py) and keeps
the reference's constant Adam lr; what would have caught the post-activation generator and the scheduled lr."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from raydist.config import validate
from raydist.methods import create_method
from raydist.models import create_model
from raydist.models.generator import SDIGenerator
from raydist.train.schedules import build_schedulers

EPS = 8 / 255


def _layers(gen: nn.Module) -> list[tuple]:
    """Every leaf module in forward order with what shapes its output."""
    out = []
    for m in gen.modules():
        if isinstance(m, nn.Conv2d):
            out.append(("conv", m.in_channels, m.out_channels, m.kernel_size, m.bias is not None))
        elif isinstance(m, nn.BatchNorm2d):
            out.append(("bn", m.num_features, m.affine, m.eps))
        elif isinstance(m, (nn.ReLU, nn.PReLU)):
            out.append((type(m).__name__,))
    return out


def test_layers_are_the_reference_one_layer_attacker():
    gen = SDIGenerator(in_channels=3, hidden=64)
    assert _layers(gen) == [
        ("conv", 6, 64, (3, 3), False), ("bn", 64, True, 1e-3), ("ReLU",),        # BasicConv2d(6, 64)
        ("bn", 64, False, 1e-5), ("PReLU",), ("conv", 64, 64, (3, 3), True),     # GenBlock(64, 64), pre-act
        ("bn", 64, False, 1e-5), ("PReLU",), ("conv", 64, 64, (3, 3), True),
        ("bn", 64, False, 1e-5), ("conv", 64, 3, (3, 3), True),                  # BN(affine=False), conv 64->3
    ]
    # the reference's parameters, in its order of use (its unused scale_last left out)
    assert [tuple(p.shape) for p in gen.parameters()] == [
        (64, 6, 3, 3), (64,), (64,), (1,), (64, 64, 3, 3), (64,), (1,), (64, 64, 3, 3), (64,), (3, 64, 3, 3), (3,)]
    # the residual convs: xavier-uniform with gain sqrt(2), bound gain * sqrt(6 / (fan_in + fan_out))
    bound = math.sqrt(2) * math.sqrt(6 / (2 * 64 * 9))
    for conv in (gen.block.conv1, gen.block.conv2):
        w = conv.weight.detach()
        # torch's default (kaiming-uniform, a = sqrt 5) would give a bound of 1/sqrt(fan_in), 2.4x smaller
        assert bound >= w.abs().max() > 0.99 * bound
        assert w.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.05)


def test_block_is_residual_and_pre_activation():
    torch.manual_seed(0)
    gen = SDIGenerator(hidden=8)
    h = torch.randn(4, 8, 6, 6)
    for conv in (gen.block.conv1, gen.block.conv2):
        nn.init.zeros_(conv.weight), nn.init.zeros_(conv.bias)
    assert torch.equal(gen.block(h), h)  # identity shortcut, nothing after the sum


def test_initial_output_statistics_match_the_reference():
    """Freshly initialised in train mode the reference gives mean |g| = 0.39 and 1.2% of outputs above 0.9
    (measured on digits and on uniform images, 10 seeds); the post-activation generator gave 0.56 and 14%."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(64, 3, 32, 32, generator=g)
    sign = torch.randint(0, 2, x.shape, generator=g).float() * 2 - 1
    means, tails = [], []
    for seed in range(3):
        torch.manual_seed(seed)
        gen = SDIGenerator(3, 64).train()
        with torch.no_grad():
            out = gen(x, sign)
        means.append(out.abs().mean().item())
        tails.append((out.abs() > 0.9).float().mean().item())
    assert all(0.34 < m < 0.44 for m in means), means
    assert all(t < 0.03 for t in tails), tails


def test_generator_sees_the_raw_image_whatever_the_model_normalises():
    """The reference's utils.py sets mean 0 and std 1: its generator sees the [0, 1] image (so does ours, and the
    model's own normalisation does not reach it); a generator has no state besides its layers."""
    torch.manual_seed(0)
    model = create_model("resnet18", num_classes=4, width=4, mean=(0.3, 0.4, 0.5), std=(0.2, 0.25, 0.3))
    method = create_method("fgsm_sdi", model, torch.optim.SGD(model.parameters(), lr=0.1), epsilon=EPS,
                           generator_width=4)
    gen = method.generator.eval()
    assert all(k.startswith(("stem.", "block.", "head.")) for k in gen.state_dict())
    x = torch.rand(2, 3, 8, 8)
    sign = torch.ones_like(x)
    with torch.no_grad():
        direct = torch.tanh(gen.head(gen.block(gen.stem(torch.cat([x, sign], 1)))))
        assert torch.equal(gen(x, sign), direct)


@pytest.mark.parametrize("schedule, follows", [("constant", False), ("model", True)])
def test_generator_lr_is_constant_unless_asked_to_follow_the_model(schedule, follows):
    """With the 30-epoch cyclic protocol the model's lr starts at 0; the reference's generator Adam stays at 1e-3
    (its scheduler never reaches its milestones). Before the fix its first update ran at lr 0."""
    torch.manual_seed(0)
    model = create_model("resnet18", num_classes=4, width=4)
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    method = create_method("fgsm_sdi", model, opt, epsilon=EPS, generator_width=4, generator_schedule=schedule)
    optim = validate({"optim": {"epochs": 30, "schedule": "cyclic", "lr": 0.2, "peak": 0.5}})["optim"]
    _, schedulers = build_schedulers(optim, method, opt, batches_per_epoch=10)
    assert len(schedulers) == (2 if follows else 1)
    gen_lrs, model_lrs = [], []
    for _ in range(150):
        gen_lrs.append(method.generator_optimizer.param_groups[0]["lr"])
        model_lrs.append(opt.param_groups[0]["lr"])
        for s in schedulers:
            s.step()
    assert model_lrs[0] == 0.0 and model_lrs[-1] == pytest.approx(0.2, rel=0.02)
    if follows:
        assert gen_lrs[0] == 0.0 and gen_lrs[-1] == pytest.approx(1e-3, rel=0.02)
    else:
        assert set(gen_lrs) == {1e-3}
    with pytest.raises(ValueError, match="generator_schedule"):
        create_method("fgsm_sdi", model, opt, epsilon=EPS, generator_schedule="cyclic")
