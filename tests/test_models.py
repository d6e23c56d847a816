"""Models: registry, activations, builders, the FGSM-SDI generator, checkpoints."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from raydist.models import (
    ACTIVATIONS,
    MODEL_NAMES,
    SDIGenerator,
    create_model,
    list_models,
    load_checkpoint,
    make_activation,
    model_spec_for,
    register_model,
    save_checkpoint,
    unwrap_model,
)
from raydist.models import registry as registry_mod
from raydist.models.checkpoint import CheckpointError
from raydist.models.registry import Normalize

SMALL = {"width": 8}
# The two CIFAR ResNet-18s these tests describe; the rest of the zoo (other sizes, other kwargs)
# is covered by tests/test_models_more.py.
PAPER_MODELS = ("resnet18", "preact_resnet18")


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def test_registry_lists_the_paper_models():
    names = [m["name"] for m in list_models()]
    assert {"resnet18", "preact_resnet18"} <= set(names)
    assert set(names) == set(MODEL_NAMES)
    for m in list_models():
        assert m["description"]
        if m["name"] in PAPER_MODELS:
            assert m["input_size"] == (3, 32, 32)


@pytest.mark.parametrize("name", PAPER_MODELS)
def test_every_model_builds_and_classifies(name):
    torch.manual_seed(0)
    model = create_model(name, num_classes=10, **SMALL)
    out = model(torch.rand(3, 3, 32, 32))
    assert out.shape == (3, 10)
    assert isinstance(next(iter(model.children())), Normalize), "normalization must come first"
    # other resolutions work too (adaptive pooling), e.g. 64x64 Tiny ImageNet
    assert create_model(name, num_classes=200, **SMALL)(torch.rand(2, 3, 64, 64)).shape == (2, 200)


@pytest.mark.parametrize("name", PAPER_MODELS)
def test_width_shrinks_the_model(name):
    full = n_params(create_model(name))
    small = n_params(create_model(name, width=16))
    assert 11_000_000 < full < 11_300_000  # ResNet-18 size
    assert small * 12 < full  # ~16x fewer parameters


@pytest.mark.parametrize("name", PAPER_MODELS)
def test_activation_argument_replaces_every_relu(name):
    relu_model = create_model(name, **SMALL)
    silu_model = create_model(name, activation="silu", **SMALL)
    n_relu = sum(isinstance(m, nn.ReLU) for m in relu_model.modules())
    assert n_relu > 10
    assert not any(isinstance(m, nn.ReLU) for m in silu_model.modules())
    assert sum(isinstance(m, nn.SiLU) for m in silu_model.modules()) == n_relu
    # the swap changes the function, not just the module names
    relu_model.load_state_dict(silu_model.state_dict())
    x = torch.rand(2, 3, 32, 32)
    assert not torch.allclose(relu_model.eval()(x), silu_model.eval()(x))


def test_unknown_model_and_activation_list_the_choices():
    with pytest.raises(ValueError, match=r"unknown model 'resnet19'; available: .*resnet18"):
        create_model("resnet19")
    with pytest.raises(ValueError, match=r"unknown activation 'swish'.*silu"):
        create_model("resnet18", activation="swish")
    with pytest.raises(ValueError, match="swish"):
        make_activation("swish")


def test_activations_table():
    assert {"relu", "softplus", "silu", "gelu"} <= set(ACTIVATIONS)
    sp = make_activation("softplus", beta=10)
    assert isinstance(sp, nn.Softplus) and sp.beta == 10
    assert make_activation("relu") is not make_activation("relu")


def test_normalization_inside_the_model():
    model = create_model("resnet18", mean=(0.1, 0.2, 0.3), std=0.25, **SMALL)
    assert model.normalize.mean.flatten().tolist() == pytest.approx([0.1, 0.2, 0.3])
    assert model.normalize.std.flatten().tolist() == pytest.approx([0.25] * 3)
    assert model.spec["mean"] == pytest.approx([0.1, 0.2, 0.3])
    x = torch.rand(1, 3, 8, 8)
    assert torch.allclose(model.normalize(x), (x - model.normalize.mean) / 0.25)
    gray = create_model("resnet18", in_channels=1, **SMALL)
    assert gray(torch.rand(2, 1, 32, 32)).shape == (2, 10)
    assert gray.spec["input_size"] == [1, 32, 32]
    with pytest.raises(ValueError, match="mean has 2 values"):
        create_model("resnet18", mean=(0.5, 0.5), **SMALL)


def test_register_model_adds_a_builder():
    @register_model("tiny_test_net", input_size=(1, 8, 8), description="test only")
    def tiny(num_classes, activation, in_channels, hidden=4):
        return nn.Sequential(
            nn.Flatten(), nn.Linear(in_channels * 64, hidden), make_activation(activation),
            nn.Linear(hidden, num_classes),
        )

    try:
        assert "tiny_test_net" in MODEL_NAMES  # live view
        model = create_model("tiny_test_net", num_classes=3, in_channels=1, activation="gelu", hidden=5)
        assert model(torch.rand(2, 1, 8, 8)).shape == (2, 3)
        assert model.spec["kwargs"] == {"hidden": 5}
        with pytest.raises(ValueError, match="already registered"):
            register_model("tiny_test_net")(tiny)
    finally:
        registry_mod._REGISTRY.pop("tiny_test_net", None)


def test_generator_shape_and_range():
    torch.manual_seed(0)
    gen = SDIGenerator()
    x = torch.rand(4, 3, 32, 32)
    out = gen(x, torch.randn_like(x).sign())
    assert out.shape == x.shape and out.abs().max() <= 1.0
    convs = [m for m in gen.modules() if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels) for c in convs] == [(6, 64), (64, 64), (64, 64), (64, 3)]
    assert SDIGenerator(in_channels=1, hidden=16)(x[:, :1], x[:, :1]).shape == (4, 1, 32, 32)


# -- checkpoints -------------------------------------------------------------------------------


def _trained_ish(name: str = "resnet18") -> nn.Module:
    torch.manual_seed(0)
    model = create_model(name, num_classes=5, activation="silu", mean=(0.4, 0.5, 0.6), std=0.2, **SMALL)
    model.train()
    with torch.no_grad():
        model(torch.rand(8, 3, 32, 32))  # move BN running stats away from their init
    return model.eval()


@pytest.mark.parametrize("name", PAPER_MODELS)
def test_checkpoint_round_trip_gives_identical_outputs(tmp_path, name):
    model = _trained_ish(name)
    path = save_checkpoint(tmp_path / "sub" / "best.pt", model, epoch=7, metrics={"pgd10": 0.5})
    loaded, ckpt = load_checkpoint(path)
    assert not loaded.training
    assert ckpt["format"] == "raydist/1" and ckpt["epoch"] == 7 and ckpt["metrics"] == {"pgd10": 0.5}
    assert ckpt["model"]["name"] == name and ckpt["model"]["activation"] == "silu"
    x = torch.rand(4, 3, 32, 32)
    assert torch.equal(loaded(x), model(x))
    assert [p.name for p in tmp_path.joinpath("sub").iterdir()] == ["best.pt"]  # no temp files left


def test_checkpoint_strips_wrapper_prefixes(tmp_path):
    model = _trained_ish()

    class Compiled(nn.Module):  # stands in for torch.compile's OptimizedModule
        def __init__(self, inner):
            super().__init__()
            self._orig_mod = inner

    wrapped = nn.DataParallel(Compiled(model))
    assert unwrap_model(wrapped) is model
    spec = model_spec_for("resnet18", 5, "silu", 3, (3, 32, 32), (0.4, 0.5, 0.6), (0.2,) * 3, width=8)
    assert spec == model.spec
    path = save_checkpoint(tmp_path / "w.pt", wrapped, model_spec=spec)
    keys = torch.load(path, weights_only=True)["state_dict"].keys()
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in keys)
    loaded, _ = load_checkpoint(path)
    x = torch.rand(2, 3, 32, 32)
    assert torch.equal(loaded(x), model(x))


def test_checkpoint_errors_name_the_path(tmp_path):
    missing = tmp_path / "nope.pt"
    with pytest.raises(CheckpointError, match=f"checkpoint not found: {missing}"):
        load_checkpoint(missing)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"this is not a checkpoint")
    with pytest.raises(ValueError, match=str(garbage)):
        load_checkpoint(garbage)
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {}}, foreign)
    with pytest.raises(ValueError, match=rf"{foreign} is not a raydist checkpoint"):
        load_checkpoint(foreign)
    broken = tmp_path / "broken.pt"
    model = _trained_ish()
    save_checkpoint(broken, model)
    ckpt = torch.load(broken, weights_only=True)
    ckpt["model"]["kwargs"] = {"width": 16}  # spec no longer matches the weights
    torch.save(ckpt, broken)
    with pytest.raises(ValueError, match=rf"{broken} does not match"):
        load_checkpoint(broken)
    with pytest.raises(ValueError, match="model_spec"):
        save_checkpoint(tmp_path / "x.pt", nn.Linear(2, 2))
