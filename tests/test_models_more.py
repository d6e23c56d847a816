"""The larger model zoo: WRN, ResNeXt, EfficientNet (CIFAR and ImageNet), torchvision ResNets,
activation swapping, pretrained weights from local files, optional timm models.

Big ImageNet models are built on the meta device (structure and parameter counts, no memory,
no initialisation); a few run a forward pass on a 64x64 image."""

from __future__ import annotations

import sys
import types

import pytest
import torch
from torch import nn

from raydist.models import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    MODEL_NAMES,
    ReLUSmoothGrad,
    SmoothReLU,
    builder_kwargs,
    configure_sat,
    count_parameters,
    create_model,
    functional_activation_calls,
    list_models,
    load_checkpoint,
    save_checkpoint,
    swap_activations,
)
from raydist.models.registry import Normalize

CIFAR_NEW = {  # small settings for forward passes on CPU
    "wide_resnet34_10": {"width": 1},
    "wide_resnet28_10": {"width": 1},
    "resnext29_32x4d": {"cardinality": 4, "bottleneck_width": 2, "width": 4},
    "efficientnet_b0_cifar": {"width_mult": 0.5, "depth_mult": 0.5},
}
RESNETS = {  # name: blocks (3 activations each, plus the stem's)
    "resnet50": 16, "resnet101": 33, "resnet152": 50,
    "resnext50_32x4d": 16, "resnext50_32x8d": 16, "resnext101_32x8d": 33,
}
EFFICIENTNETS = {  # name: (resolution, nn.SiLU modules in torchvision's own build)
    "efficientnet_b0": (224, 49), "efficientnet_b1": (240, 69), "efficientnet_b2": (260, 69),
    "efficientnet_b3": (300, 78), "efficientnet_b4": (380, 96), "efficientnet_b5": (456, 116),
    "efficientnet_b6": (528, 134), "efficientnet_b7": (600, 163),
}
IMAGENET = {**{n: 224 for n in RESNETS}, **{n: r for n, (r, _) in EFFICIENTNETS.items()}}
FORWARD_IMAGENET = ["resnet50", "resnext50_32x4d", "efficientnet_b0", "efficientnet_b2"]
OTHER_ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.SiLU, nn.GELU, nn.ELU, nn.Softplus, nn.Mish, nn.Hardswish)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-5, atol: float = 1e-7) -> None:
    """``torch.testing.assert_close`` without its import cost (it pulls in torch.distributed)."""
    expected = torch.as_tensor(expected, dtype=actual.dtype).expand_as(actual)
    assert torch.allclose(actual, expected, rtol=rtol, atol=atol), f"max |diff| {(actual - expected).abs().max()}"


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """On a shared 2-core machine extra intra-op threads only fight each other (10x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def on_meta(name: str, **kw) -> nn.Module:
    with torch.device("meta"):
        return create_model(name, **kw)


def count(model: nn.Module, kind) -> int:  # noqa: ANN001
    return sum(isinstance(m, kind) for m in model.modules())


# -- registry ----------------------------------------------------------------------------------


def test_list_models_reports_size_params_and_description():
    rows = {r["name"]: r for r in list_models()}
    assert set(CIFAR_NEW) | set(IMAGENET) | {"resnet18", "preact_resnet18"} <= set(rows)
    for name in CIFAR_NEW:
        assert rows[name]["input_size"] == (3, 32, 32)
    for name, res in IMAGENET.items():
        assert rows[name]["input_size"] == (3, res, res)
    for row in rows.values():
        assert row["description"] and isinstance(row["num_params"], int) and row["num_params"] > 0
    assert rows["wide_resnet34_10"]["num_params"] == 46_160_474  # the well-known WRN-34-10 size
    assert rows["resnet50"]["num_params"] == 23_528_522  # torchvision's, with a 10-class head
    assert builder_kwargs("wide_resnet34_10") == {"depth": 34, "width": 10, "dropout": 0.0}


def test_declared_parameter_counts_of_the_cifar_models():
    """``raydist models`` shows declared counts without building; they must stay true
    (the ImageNet models are checked in test_imagenet_models_swap_every_activation)."""
    rows = {r["name"]: r["num_params"] for r in list_models()}
    for name in ("resnet18", "preact_resnet18", *CIFAR_NEW):
        assert count_parameters(name) == rows[name], name


def test_builder_kwargs_are_checked_and_listed():
    with pytest.raises(ValueError, match=r"'efficientnet_b0' does not take \['width'\]; .*stochastic_depth_prob"):
        create_model("efficientnet_b0", width=8)
    with pytest.raises(ValueError, match="6n \\+ 4"):
        create_model("wide_resnet34_10", depth=30)
    wrn_16_2 = on_meta("wide_resnet34_10", depth=16, width=2)
    assert wrn_16_2.spec["kwargs"] == {"depth": 16, "width": 2}
    assert n_params(wrn_16_2) < n_params(on_meta("wide_resnet34_10")) / 50


# -- CIFAR-size models -------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(CIFAR_NEW))
def test_cifar_models_classify_with_any_activation(name):
    torch.manual_seed(0)
    kw = CIFAR_NEW[name]
    relu_model = create_model(name, **kw).eval()
    gelu_model = create_model(name, activation="gelu", **kw).eval()
    assert isinstance(next(iter(gelu_model.children())), Normalize)
    x = torch.rand(2, 3, 32, 32)
    assert gelu_model(x).shape == (2, 10)
    assert create_model(name, num_classes=200, **kw).eval()(torch.rand(1, 3, 64, 64)).shape == (1, 200)
    n_act = count(relu_model, nn.ReLU) + count(relu_model, nn.SiLU)
    assert n_act > 10 and count(gelu_model, nn.GELU) == n_act
    assert count(gelu_model, OTHER_ACTIVATIONS) == n_act  # only the GELUs: no ReLU/SiLU left
    calls = functional_activation_calls(gelu_model, x)
    assert set(calls) == {"gelu"} and calls["gelu"] == n_act  # and no functional relu/silu either
    relu_model.load_state_dict(gelu_model.state_dict())
    assert not torch.allclose(relu_model(x), gelu_model(x), rtol=1e-3, atol=0)  # (untrained EfficientNet
    # logits are ~1e-10 in eval mode: its depthwise-conv init shrinks the signal until BN is trained)


def test_efficientnet_cifar_downsamples_8x_and_is_silu_when_asked():
    model = create_model("efficientnet_b0_cifar", activation="silu", **CIFAR_NEW["efficientnet_b0_cifar"]).eval()
    assert count(model, nn.SiLU) > 10 and count(model, nn.ReLU) == 0
    assert model.net.features[0][0].stride == (1, 1)
    assert model.net.features(torch.rand(1, 3, 32, 32)).shape[-2:] == (4, 4)
    assert count(model, nn.Sigmoid) > 0  # the squeeze-excitation gates are not activations to swap


# -- ImageNet-size models ----------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(IMAGENET))
def test_imagenet_models_swap_every_activation(name):
    model = on_meta(name, activation="smoothrelu")  # meta device: no memory, no initialisation
    expected = 1 + 3 * RESNETS[name] if name in RESNETS else EFFICIENTNETS[name][1]
    alphas = [m.beta for m in model.modules() if isinstance(m, SmoothReLU)]
    assert len(alphas) == expected and len({id(a) for a in alphas}) == expected  # one α per place
    assert count(model, OTHER_ACTIVATIONS) == 0  # no nn.ReLU / nn.SiLU left behind
    declared = {r["name"]: r["num_params"] for r in list_models()}[name]
    assert n_params(model) == declared + expected  # the declared count (ReLU, 10 classes) plus the α's
    assert model.spec["input_size"] == [3, IMAGENET[name], IMAGENET[name]]
    assert model.normalize.mean.device.type == "meta"


def test_imagenet_models_keep_torchvision_parameter_names():
    """So torchvision-format weight files load with ``pretrained_path``."""
    import torchvision.models as tvm

    for name in ("resnet50", "resnext50_32x4d", "efficientnet_b0"):
        with torch.device("meta"):
            theirs = getattr(tvm, name)(weights=None, num_classes=10).state_dict()
        ours = on_meta(name, activation="silu").net.state_dict()
        assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}, name


@pytest.mark.parametrize("name", FORWARD_IMAGENET)
def test_imagenet_models_run_on_small_images(name):
    torch.manual_seed(0)
    model = create_model(name, activation="gelu").eval()
    x = torch.rand(1, 3, 64, 64)
    assert model(x).shape == (1, 10)
    calls = functional_activation_calls(model, x)
    assert set(calls) == {"gelu"} and calls["gelu"] == count(model, nn.GELU)


def test_resnext29_stage_widths_are_the_papers_for_every_cardinality():
    """The ResNeXt paper's CIFAR models (facebookresearch/ResNeXt, models/resnext.lua): stage outputs 256, 512,
    1024 whatever C x d; ResNeXt-29 8x64d has 34.4M and 16x64d 68.1M parameters (the paper's Table 7). The
    2·C·d outputs of kuangliu's layout gave 8x64d 1024/2048/4096 channels."""
    from raydist.models.registry import count_parameters

    for c, d, millions in ((8, 64, 34.4), (16, 64, 68.1), (32, 4, 4.78)):
        assert count_parameters("resnext29_32x4d", cardinality=c, bottleneck_width=d) / 1e6 == pytest.approx(
            millions, abs=0.06), (c, d)
        with torch.device("meta"):
            net = create_model("resnext29_32x4d", cardinality=c, bottleneck_width=d).net
        outs = [stage[-1].conv3.out_channels for stage in net.stages]
        groups = [stage[0].conv2.out_channels for stage in net.stages]
        assert outs == [256, 512, 1024] and groups == [c * d, 2 * c * d, 4 * c * d]


@pytest.mark.parametrize("name, kw, last_bn", [
    ("resnet18", {"width": 4}, "bn2"),
    ("resnext29_32x4d", {"cardinality": 2, "bottleneck_width": 2, "width": 2}, "bn3"),
])
def test_zero_init_residual_starts_every_block_as_its_shortcut(name, kw, last_bn):
    """SAT's ResNets (resnet_model.py: get_bn(zero_init=True) on each block's last BN): γ = 0, so each block's
    residual branch adds nothing at initialisation. Off by default."""
    torch.manual_seed(0)
    model = create_model(name, zero_init_residual=True, **kw)
    blocks = [m for m in model.modules() if hasattr(m, last_bn) and hasattr(m, "shortcut")]
    assert len(blocks) == (8 if name == "resnet18" else 9)
    for block in blocks:
        assert torch.count_nonzero(getattr(block, last_bn).weight) == 0
        h = torch.randn(2, block.conv1.in_channels, 8, 8)
        block.eval()
        with torch.no_grad():
            assert torch.allclose(block(h), block.act3(block.shortcut(h)) if name != "resnet18"
                                  else block.act2(block.shortcut(h)))
    assert model.spec["kwargs"]["zero_init_residual"] is True
    plain = create_model(name, **kw)
    assert all(torch.count_nonzero(getattr(b, last_bn).weight) > 0
               for b in plain.modules() if hasattr(b, last_bn) and hasattr(b, "shortcut"))
    from raydist.models.registry import builder_kwargs

    assert {"resnet50", "resnext50_32x4d", "resnext50_32x8d"} <= {  # torchvision's own zero_init_residual
        n for n in ("resnet50", "resnext50_32x4d", "resnext50_32x8d", "efficientnet_b0")
        if "zero_init_residual" in builder_kwargs(n)}


def test_zero_init_residual_is_a_job_key_checked_per_model():
    from raydist import config as C

    cfg = C.validate({"model": {"name": "resnet18", "width": 8, "zero_init_residual": True}})
    assert C.model_params(cfg) == {"width": 8, "zero_init_residual": True}
    assert C.model_params(C.validate({"model": {"name": "resnet18"}})) == {}
    for name in ("preact_resnet18", "efficientnet_b0"):
        with pytest.raises(C.ConfigError, match=rf"model.zero_init_residual: model '{name}' has no BatchNorm"):
            C.validate({"model": {"name": name, "zero_init_residual": True}})


def test_imagenet_defaults_and_other_channel_counts():
    model = on_meta("efficientnet_b3")
    assert model.spec["mean"] == pytest.approx(IMAGENET_MEAN) and model.spec["std"] == pytest.approx(IMAGENET_STD)
    assert model.spec["input_size"] == [3, 300, 300]
    assert create_model("resnext29_32x4d", cardinality=2, bottleneck_width=1).spec["mean"] == [0.5] * 3
    for name, stem in (("resnet50", lambda n: n.conv1), ("efficientnet_b0", lambda n: n.features[0][0])):
        gray = on_meta(name, in_channels=1)
        assert stem(gray.net).in_channels == 1 and gray.spec["input_size"][0] == 1
        assert gray.spec["mean"] == pytest.approx([sum(IMAGENET_MEAN) / 3])
    tiny = create_model("efficientnet_b0", in_channels=1, mean=0.5, std=0.5).eval()
    assert tiny(torch.rand(1, 1, 32, 32)).shape == (1, 10)


def test_relu_smoothgrad_reaches_torchvision_models():
    model = on_meta("efficientnet_b1", activation="relu_smoothgrad")
    assert count(model, ReLUSmoothGrad) == EFFICIENTNETS["efficientnet_b1"][1]
    sat = configure_sat(model, attacker=True, optimizer=False)
    with sat.attack():
        assert {m.backward_mode for m in model.modules() if isinstance(m, ReLUSmoothGrad)} == {"smooth"}


def test_swap_activations_on_a_foreign_model():
    class Swish(nn.Module):  # stands in for timm's own activation classes
        def forward(self, x):
            return x * torch.sigmoid(x)

    shared = nn.ReLU()
    net = nn.Sequential(nn.Linear(4, 4), shared, nn.Linear(4, 4), shared, Swish(), nn.Sigmoid(), nn.Linear(4, 2))
    assert swap_activations(net, "smoothrelu") == 3
    assert [type(m).__name__ for m in net] == ["Linear", "SmoothReLU", "Linear", "SmoothReLU", "SmoothReLU",
                                               "Sigmoid", "Linear"]
    assert net[1] is not net[3]  # a shared module becomes one per place
    with pytest.raises(ValueError, match="unknown activation"):
        swap_activations(net, "swish")


# -- pretrained weights and checkpoints --------------------------------------------------------

SMALL = {"cardinality": 2, "bottleneck_width": 2, "width": 2}


def _model(**kw) -> nn.Module:
    torch.manual_seed(0)
    model = create_model("resnext29_32x4d", **{**SMALL, **kw})
    with torch.no_grad():
        model.train()(torch.rand(8, 3, 32, 32))  # non-trivial BN statistics
    return model.eval()


def test_pretrained_path_loads_local_weights(tmp_path):
    source = _model(mean=0.4, std=0.3)
    x = torch.rand(2, 3, 32, 32)
    ckpt = save_checkpoint(tmp_path / "best.pt", source)
    from_ckpt = create_model("resnext29_32x4d", pretrained_path=ckpt, **SMALL).eval()
    assert_close(from_ckpt(x), source(x))  # normalization comes from the checkpoint
    assert from_ckpt.spec["mean"] == pytest.approx([0.4] * 3) and "pretrained_path" not in from_ckpt.spec["kwargs"]
    # a backbone state_dict (torchvision style), wrapped and DDP-prefixed as training scripts save it
    backbone = {f"module.{k}": v for k, v in source.net.state_dict().items()}
    torch.save({"state_dict": backbone, "epoch": 3}, tmp_path / "backbone.pth")
    from_sd = create_model("resnext29_32x4d", mean=0.4, std=0.3, pretrained_path=str(tmp_path / "backbone.pth"),
                           **SMALL).eval()
    assert_close(from_sd(x), source(x))
    # ReLU weights into a SmoothReLU model: the α the file lacks keep their initial 400
    smooth = create_model("resnext29_32x4d", activation="smoothrelu", pretrained_path=ckpt, **SMALL)
    assert {round(m.alpha.item()) for m in smooth.modules() if isinstance(m, SmoothReLU)} == {400}
    assert_close(smooth.net.conv1.weight, source.net.conv1.weight)


def test_pretrained_path_errors_name_the_file(tmp_path):
    missing = tmp_path / "nope.pth"
    with pytest.raises(FileNotFoundError, match=f"pretrained weights not found: {missing}"):
        create_model("resnext29_32x4d", pretrained_path=missing, **SMALL)
    ckpt = save_checkpoint(tmp_path / "c10.pt", _model())
    wrong_head = rf"{ckpt} do not fit model 'resnext29_32x4d'.*net.fc.weight \(10, 32\) vs \(100"
    with pytest.raises(ValueError, match=wrong_head):
        create_model("resnext29_32x4d", num_classes=100, pretrained_path=ckpt, **SMALL)
    with pytest.raises(ValueError, match=rf"{ckpt} do not fit model 'resnet18': missing \[net.layer1.*unexpected"):
        create_model("resnet18", pretrained_path=ckpt)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not weights")
    with pytest.raises(ValueError, match=f"cannot read pretrained weights {garbage}"):
        create_model("resnext29_32x4d", pretrained_path=garbage, **SMALL)
    empty = tmp_path / "empty.pth"
    torch.save({"epoch": 1}, empty)
    with pytest.raises(ValueError, match=f"{empty} hold no state_dict"):
        create_model("resnext29_32x4d", pretrained_path=empty, **SMALL)


@pytest.mark.parametrize("name", ["resnext29_32x4d", "efficientnet_b0_cifar"])
def test_checkpoint_round_trip_with_a_learnable_activation(tmp_path, name):
    kw = SMALL if name == "resnext29_32x4d" else CIFAR_NEW[name]
    torch.manual_seed(0)
    model = create_model(name, activation="smoothrelu(alpha=50)", num_classes=5, **kw)
    with torch.no_grad():
        model.train()(torch.rand(4, 3, 32, 32))
        next(m for m in model.modules() if isinstance(m, SmoothReLU)).beta.fill_(7.0)  # "learned"
    model.eval()
    loaded, ckpt = load_checkpoint(save_checkpoint(tmp_path / "m.pt", model, epoch=1))
    assert ckpt["model"]["activation"] == "smoothrelu(alpha=50)" and ckpt["model"]["kwargs"] == kw
    x = torch.rand(2, 3, 32, 32)
    assert torch.equal(loaded(x), model(x))


# -- timm --------------------------------------------------------------------------------------


def _fake_timm() -> types.ModuleType:
    class Swish(nn.Module):
        def forward(self, x):
            return x * torch.sigmoid(x)

    def create(name, pretrained, num_classes, in_chans, hidden=8):  # noqa: ANN001
        assert pretrained is False
        return nn.Sequential(nn.Conv2d(in_chans, hidden, 3), nn.ReLU(), nn.Conv2d(hidden, hidden, 3), Swish(),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(hidden, num_classes))

    timm = types.ModuleType("timm")
    timm.is_model = lambda name: name == "fakenet"
    timm.create_model = create
    timm.models = types.SimpleNamespace(
        get_pretrained_cfg=lambda name: {"input_size": (3, 160, 160), "mean": (0.1, 0.2, 0.3), "std": (0.5,) * 3}
    )
    return timm


def test_timm_models_by_prefix(monkeypatch):
    try:
        import timm  # noqa: F401
    except ImportError:
        monkeypatch.setitem(sys.modules, "timm", _fake_timm())
        name, kw = "timm/fakenet", {"hidden": 4}
    else:  # pragma: no cover - depends on the environment
        name, kw = "timm/resnet18", {}
    model = create_model(name, num_classes=7, activation="gelu", **kw).eval()
    assert name not in MODEL_NAMES
    assert count(model, nn.ReLU) == 0 and count(model, nn.GELU) > 0
    assert model(torch.rand(1, 3, 64, 64)).shape == (1, 7)
    assert model.spec["name"] == name and len(model.spec["input_size"]) == 3
    with pytest.raises(ValueError, match="timm has no model"):
        create_model("timm/no_such_net_xyz")


def test_timm_prefix_without_timm(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # import timm -> ImportError
    with pytest.raises(ValueError, match="need timm installed"):
        create_model("timm/resnet18")


def test_fake_timm_takes_its_normalization_from_the_pretrained_cfg(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", _fake_timm())
    model = create_model("timm/fakenet", in_channels=3, hidden=4)
    assert model.spec["mean"] == pytest.approx([0.1, 0.2, 0.3]) and model.spec["input_size"] == [3, 160, 160]
    assert count(model, nn.ReLU) == 2 and count(model, nn.Sigmoid) == 0  # relu asked: Swish became ReLU
