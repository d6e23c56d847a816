"""Accuracy under a list of attacks over a loader, kept on the device until the caller reads it.

Plain PyTorch: the training loop calls it on each worker's shard of the validation and test splits and
all-reduces the counts; the evaluation actors call it on their shards.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import nn

from raydist.attacks import run_attack


@torch.no_grad()
def _correct(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (model(x).argmax(1) == y).sum()


def accuracy_under_attacks(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    attacks: Sequence[str],
    eps: float,
    *,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Correct-prediction counts per attack (0-d tensors on the model's device) plus ``n``, the sample count.

    The model is evaluated in eval mode and its previous mode is restored. Each batch gets its own attack
    seed so random starts differ between batches but a rerun is identical.
    """
    was_training = model.training
    model.eval()
    counts: dict[str, torch.Tensor] = {}
    n = None
    try:
        for i, (x, y) in enumerate(batches):
            for name in attacks:
                x_eval = x if name == "clean" else run_attack(name, model, x, y, eps, seed=seed * 100003 + i)
                c = _correct(model, x_eval, y)
                counts[name] = counts[name] + c if name in counts else c
            size = torch.tensor(y.shape[0], device=y.device)
            n = size if n is None else n + size
    finally:
        model.train(was_training)
    if n is None:
        raise ValueError("no samples to evaluate")
    counts["n"] = n
    return counts
