"""SAT's controlled experiment inside the training methods: relu_smoothgrad's smooth backward is used for the
attacker's gradients, for the weight update, both or neither, exactly as `smooth_backward` says."""

from __future__ import annotations

import pytest
import torch

from raydist.methods import METHOD_PARAMS, create_method
from raydist.models import create_model
from raydist.models.activations import ReLUSmoothGrad

EPS = 8 / 255
ROWS = {"none": (False, False), "attacker": (True, False), "optimizer": (False, True), "both": (True, True)}
SMALL = {"pgd_at": {"steps": 2}, "trades": {"steps": 2}, "free_at": {"m": 2}, "fgsm_sdi": {"k": 1,
         "generator_width": 4}}


def _recorded_step(method_name: str, row: str) -> list[str]:
    """Run one step and return, in order, 'ZG' for every zero_grad of the model's optimizer and the backward mode
    ('relu' / 'smooth') of every relu_smoothgrad forward that builds a graph."""
    torch.manual_seed(0)
    model = create_model("resnet18", num_classes=4, activation="relu_smoothgrad", width=4)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    events: list[str] = []
    original_zero_grad = opt.zero_grad

    def zero_grad(*a, **kw):
        events.append("ZG")
        return original_zero_grad(*a, **kw)

    opt.zero_grad = zero_grad
    first = next(m for m in model.modules() if isinstance(m, ReLUSmoothGrad))
    first.register_forward_hook(lambda m, i, o: events.append(m.backward_mode) if o.requires_grad else None)
    method = create_method(method_name, model, opt, epsilon=EPS, smooth_backward=row,
                           **SMALL.get(method_name, {}))
    x, y = torch.rand(6, 3, 32, 32), torch.arange(6) % 4
    method.step(x, y)
    method.step(x, y)
    # every module is back in its plain mode after the step
    assert all(m.backward_mode == "relu" for m in model.modules() if isinstance(m, ReLUSmoothGrad))
    return events


@pytest.mark.parametrize("row", list(ROWS))
@pytest.mark.parametrize("method_name", [m for m in METHOD_PARAMS if m not in ("standard", "free_at")])
def test_attack_and_update_use_the_chosen_backward(method_name, row):
    attacker, optimizer = ROWS[row]
    events = _recorded_step(method_name, row)
    last_zg = len(events) - 1 - events[::-1].index("ZG")
    first_zg = events.index("ZG")
    attack = [e for e in events[:first_zg] if e != "ZG"]
    update = [e for e in events[last_zg + 1:] if e != "ZG"]
    assert attack, "the attack built no graph through the activations"
    assert set(attack) == {"smooth" if attacker else "relu"}
    assert update and set(update) == {"smooth" if optimizer else "relu"}


@pytest.mark.parametrize("row", ["none", "both"])
def test_free_at_uses_one_backward_for_both(row):
    events = [e for e in _recorded_step("free_at", row) if e != "ZG"]
    assert set(events) == {"smooth" if row == "both" else "relu"}


def test_free_at_refuses_a_split_row():
    model = create_model("resnet18", num_classes=4, activation="relu_smoothgrad", width=4)
    with pytest.raises(ValueError, match="free_at"):
        create_method("free_at", model, torch.optim.SGD(model.parameters(), lr=0.1), epsilon=EPS,
                      smooth_backward="attacker")


def test_smooth_backward_needs_relu_smoothgrad_and_a_known_row():
    model = create_model("resnet18", num_classes=4, activation="relu", width=4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="relu_smoothgrad"):
        create_method("pgd_at", model, opt, epsilon=EPS, smooth_backward="both")
    with pytest.raises(ValueError, match="smooth_backward"):
        create_method("pgd_at", model, opt, epsilon=EPS, smooth_backward="sometimes")


def test_smooth_attacker_changes_the_example_and_the_plain_one_matches_relu():
    """With the smooth backward the attacker's gradient, hence the PGD example, differs from plain ReLU's; with
    'none' relu_smoothgrad trains exactly like relu."""
    x, y = torch.rand(6, 3, 32, 32), torch.arange(6) % 4
    examples = {}
    for act, row in (("relu", "none"), ("relu_smoothgrad", "none"), ("relu_smoothgrad", "attacker")):
        torch.manual_seed(0)
        model = create_model("resnet18", num_classes=4, activation=act, width=4)
        method = create_method("pgd_at", model, torch.optim.SGD(model.parameters(), lr=0.1), epsilon=EPS,
                               steps=3, smooth_backward=row)
        torch.manual_seed(1)
        with method.sat.attack():
            examples[(act, row)] = method.training_example(x, y)
    assert torch.equal(examples[("relu", "none")], examples[("relu_smoothgrad", "none")])
    assert not torch.equal(examples[("relu", "none")], examples[("relu_smoothgrad", "attacker")])
