"""Robustness evaluation: accuracy under attacks, shared by `raydist train` and the evaluation actors."""

from raydist.evaluate.metrics import accuracy_under_attacks

__all__ = ["accuracy_under_attacks"]
