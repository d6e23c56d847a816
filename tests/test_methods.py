"""Training methods: training examples, the optimizer step, FGSM-SDI's generator schedule."""

from __future__ import annotations

import copy
import inspect
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from raydist.methods import FGSMSDI, METHOD_PARAMS, METHODS, create_method
from raydist.models import create_model

EPS = 8 / 255
CLASSES = 4


def synthetic(n: int, seed: int, size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Class = a fixed smooth colour pattern, plus pixel noise: learnable in a few dozen steps."""
    templates = F.interpolate(
        torch.rand(CLASSES, 3, 4, 4, generator=torch.Generator().manual_seed(0)), size=size, mode="bilinear"
    )
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, CLASSES, (n,), generator=g)
    x = (0.25 + 0.5 * templates[y] + 0.15 * torch.randn(n, 3, size, size, generator=g)).clamp(0, 1)
    return x, y


def new_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return create_model("resnet18", num_classes=CLASSES, width=8)


def sgd(model: nn.Module, lr: float = 0.05) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)


@pytest.fixture(scope="module")
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    return synthetic(32, seed=2)


@pytest.fixture(scope="module")
def trained() -> nn.Module:
    """A model trained with the ``standard`` method (so this also exercises ``step``)."""
    model = new_model()
    method = create_method("standard", model, sgd(model), epsilon=EPS)
    x, y = synthetic(256, seed=1)
    for _ in range(30):
        idx = torch.randint(0, len(y), (64,))
        method.step(x[idx], y[idx])
    return model


def loss_of(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        out = F.cross_entropy(model(x), y)
    model.train()
    return out


@pytest.mark.parametrize("name", list(METHODS))
def test_training_example_respects_eps_and_box_and_updates_nothing(batch, name):
    x, y = batch
    x = x.clone()
    x[:4] = 0.0  # on the edge of the box
    x[4:8] = 1.0
    model = new_model()
    model.eval()
    method = create_method(name, model, sgd(model), epsilon=EPS)
    weights = copy.deepcopy(model.state_dict(keep_vars=False))
    x_train = method.training_example(x, y)
    assert model.training, "examples are crafted in train mode, as in the papers"
    assert x_train.shape == x.shape and not x_train.requires_grad and x_train.grad_fn is None
    assert (x_train - x).abs().max() <= EPS + 1e-6
    assert x_train.min() >= 0 and x_train.max() <= 1
    if name != "standard":
        assert (x_train != x).any()
    for k, v in model.state_dict().items():
        if "running" not in k and "num_batches" not in k:  # BN statistics may move in train mode
            assert torch.equal(v, weights[k]), k
    assert all(p.grad is None for p in model.parameters())
    assert method.num_steps == 0


def test_standard_step_decreases_the_loss(batch):
    x, y = batch
    model = new_model()
    method = create_method("standard", model, sgd(model, lr=0.02), epsilon=EPS)
    losses = []
    for _ in range(8):
        loss, logits = method.step(x, y)
        assert loss.dim() == 0 and not loss.requires_grad
        assert logits.shape == (len(y), CLASSES) and not logits.requires_grad
        losses.append(loss)
    assert losses[-1] < 0.5 * losses[0]
    assert method.num_steps == 8


@pytest.mark.parametrize("name", list(METHODS))
def test_every_method_steps_and_uses_autocast(batch, name):
    x, y = batch
    entered = []

    class Counting:
        def __enter__(self):
            entered.append(1)

        def __exit__(self, *exc):
            return False

    model = new_model()
    before = [p.detach().clone() for p in model.parameters()]
    method = create_method(name, model, sgd(model), epsilon=EPS, autocast=Counting, label_smoothing=0.1)
    loss, _ = method.step(x, y)
    assert torch.isfinite(loss) and method.num_steps == 1 and entered
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))


def test_bf16_autocast_on_cpu(batch):
    x, y = batch
    model = new_model()
    method = create_method(
        "fgsm_sdi", model, sgd(model), epsilon=EPS, k=1,
        autocast=lambda: torch.autocast("cpu", dtype=torch.bfloat16),
    )
    loss, logits = method.step(x, y)
    assert torch.isfinite(loss) and loss.dtype == torch.float32 and method.generator_steps == 1


def test_default_step_sizes():
    model = new_model()
    opt = sgd(model)
    assert create_method("fgsm_rs", model, opt, epsilon=EPS).alpha == pytest.approx(1.25 * EPS)
    assert create_method("pgd_at", model, opt, epsilon=EPS).alpha == pytest.approx(EPS / 4)
    assert create_method("pgd_at", model, opt, epsilon=EPS).steps == 10
    sdi = create_method("fgsm_sdi", model, opt, epsilon=EPS)
    assert sdi.alpha == pytest.approx(EPS) and sdi.k == 20
    assert create_method("fgsm_rs", model, opt, epsilon=EPS, alpha=0.01).alpha == 0.01


def test_method_params_match_the_constructors():
    assert set(METHODS) == {"standard", "pgd_at", "fgsm_rs", "fgsm_sdi", "free_at", "fgsm_ga", "fgsm_ckpt", "trades"}
    assert METHOD_PARAMS["standard"] == {}
    assert METHOD_PARAMS["pgd_at"] == {"steps": 10, "alpha": None, "random_start": True}
    assert METHOD_PARAMS["fgsm_rs"] == {"alpha": None}
    assert METHOD_PARAMS["fgsm_sdi"] == {"k": 20, "alpha": None, "generator_lr": 1e-3,
                                         "generator_weight_decay": 5e-4, "generator_width": 64,
                                         "generator_schedule": "constant"}
    for name, cls in METHODS.items():
        sig = inspect.signature(cls.__init__).parameters
        for param, default in METHOD_PARAMS[name].items():
            assert sig[param].default == default, (name, param)


def test_create_method_errors():
    model = new_model()
    with pytest.raises(ValueError, match=r"unknown method 'mart'; available: .*fgsm_sdi"):
        create_method("mart", model, sgd(model), epsilon=EPS)
    with pytest.raises(ValueError, match=r"takes no parameter \['k'\].*alpha"):
        create_method("fgsm_rs", model, sgd(model), epsilon=EPS, k=3)
    with pytest.raises(ValueError, match="k must be"):
        create_method("fgsm_sdi", model, sgd(model), epsilon=EPS, k=0)


def test_pgd_at_example_is_stronger_than_fgsm_rs(trained, batch):
    x, y = batch
    torch.manual_seed(0)
    pgd_at = create_method("pgd_at", trained, sgd(trained), epsilon=EPS)
    fgsm_rs = create_method("fgsm_rs", trained, sgd(trained), epsilon=EPS)
    clean = loss_of(trained, x, y)
    rs = torch.stack([loss_of(trained, fgsm_rs.training_example(x, y), y) for _ in range(3)]).mean()
    pgd = torch.stack([loss_of(trained, pgd_at.training_example(x, y), y) for _ in range(3)]).mean()
    assert pgd > rs > clean


def test_fgsm_sdi_generator_steps_every_k_target_steps(batch):
    x, y = batch
    model = new_model()
    method = create_method("fgsm_sdi", model, sgd(model), epsilon=EPS, k=3)
    assert isinstance(method, FGSMSDI) and method.extra_optimizers() == []  # its Adam keeps a constant lr
    changed_at = []
    for t in range(10):
        before = [p.detach().clone() for p in method.generator.parameters()]
        method.step(x, y)
        if any(not torch.equal(b, p) for b, p in zip(before, method.generator.parameters())):
            changed_at.append(t)
    assert changed_at == [0, 3, 6, 9]
    assert method.generator_steps == 4 and method.num_steps == 10
    assert not method.generator.training


def test_fgsm_sdi_generator_ascends_the_loss_and_leaves_target_grads(trained, batch):
    x, y = batch
    model = copy.deepcopy(trained).eval()  # eval: the target's loss depends on G only
    method = FGSMSDI(model, sgd(model), epsilon=EPS, k=1, generator_lr=1e-4)
    grad_sign = method._grad_sign(x, y)

    def adv_loss() -> torch.Tensor:
        method.generator.train()
        with torch.no_grad():
            return F.cross_entropy(model(method._adversarial(x, y, grad_sign)), y)

    before = adv_loss()
    for _ in range(3):
        method._update_generator(x, y, grad_sign)
    assert adv_loss() > before
    assert all(p.grad is None for p in model.parameters())
    assert not model.training


def test_fgsm_sdi_state_dict_round_trip(batch):
    x, y = batch
    model = new_model()
    opt = sgd(model)
    method = create_method("fgsm_sdi", model, opt, epsilon=EPS, k=2)
    for _ in range(3):
        method.step(x, y)
    buf = io.BytesIO()
    torch.save(method.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    assert state["generator_steps"] == 2 and state["num_steps"] == 3

    model2 = copy.deepcopy(model)
    opt2 = sgd(model2)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))  # load_state_dict may alias tensors
    torch.manual_seed(123)  # a different generator init, overwritten by the load
    resumed = create_method("fgsm_sdi", model2, opt2, epsilon=EPS, k=2)
    resumed.load_state_dict(state)
    assert resumed.generator_steps == 2 and resumed.num_steps == 3
    # both now take the same step 3 (no generator update) and step 4 (generator update)
    for _ in range(2):
        l1, _ = method.step(x, y)
        l2, _ = resumed.step(x, y)
        assert torch.allclose(l1, l2, atol=1e-6)
    for a, b in zip(method.generator.parameters(), resumed.generator.parameters()):
        assert torch.allclose(a, b, atol=1e-6)
    assert resumed.generator_steps == method.generator_steps == 3
    with pytest.raises(ValueError, match="no extra state"):
        create_method("standard", model, opt, epsilon=EPS).load_state_dict({"x": 1})


def test_fgsm_sdi_under_ddp(tmp_path, batch):
    """World size 1 over gloo: the broadcast / all-reduce paths and DDP unwrapping run."""
    import torch.distributed as dist

    x, y = batch
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        model = nn.parallel.DistributedDataParallel(new_model())
        method = create_method("fgsm_sdi", model, sgd(model), epsilon=EPS, k=2)
        assert method.attack_model is model.module
        for _ in range(3):
            loss, _ = method.step(x, y)
        assert torch.isfinite(loss) and method.generator_steps == 2
    finally:
        dist.destroy_process_group()
