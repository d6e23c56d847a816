"""`raydist compare`: several training methods under one protocol, trained on Ray Train and evaluated on the Ray
evaluation actors, tabulated in the papers' layout (best and last checkpoint, clean / PGD / C&W / APGD / AA
accuracy, training time) with the validation-PGD-per-epoch figure that shows catastrophic overfitting."""

from raydist.compare.spec import load_compare

__all__ = ["load_compare"]
