"""Standard (non-adversarial) training: the baseline every robustness table starts from."""

from __future__ import annotations

from torch import Tensor

from raydist.methods.base import TrainMethod


class Standard(TrainMethod):
    """Trains on the clean batch; ``epsilon`` is accepted for a uniform interface and unused."""

    name = "standard"

    def training_example(self, x: Tensor, y: Tensor) -> Tensor:
        self._train_mode()  # same contract as the other methods
        return x.detach()
