"""Hot-path choices the training loop (and the plain-loop benchmark beside it) make the same way.

What they decide, and why:
- ``fused_optimizer_kwargs`` (raydist.methods.base, since methods build optimizers too): the optimizer's update
  as one fused kernel per step instead of foreach kernels over every parameter.
- ``use_compile``: ``run.compile: auto`` compiles on CUDA, where fewer, fused kernels pay back the compile in
  the first epoch (the reference loop on an H100: FGSM-SDI 16k -> 20k images/s), and not on CPU, where a cold
  compile cost 16-23 s on two cores against a step 8-27% faster (bench/profile_step.py --compile true): a
  minute-long CPU run never earns it back.
- ``setup_device``: cuDNN autotuning, since every training batch but the last has the same shape. TF32 stays
  off: the validation and test attacks are fp32 on purpose (reduced precision can weaken an attack).
"""

from __future__ import annotations

import torch
from torch import nn


def use_compile(setting: str, device: torch.device) -> bool:
    """``run.compile``: "true", "false", or "auto" (on for CUDA only)."""
    return setting == "true" or (setting == "auto" and device.type == "cuda")


def compile_model(model: nn.Module, mode: str) -> nn.Module:
    """``torch.compile`` with ``run.compile_mode`` ("default" leaves torch's own default).

    Static shapes: DeviceLoader's batches come in at most two sizes (N / batches rounded up and down), so two
    specialised graphs per kind of pass beat one graph with a symbolic batch dimension, and CUDA graphs
    (reduce-overhead) need static shapes anyway."""
    kwargs = {} if mode == "default" else {"mode": mode}
    return torch.compile(model, dynamic=False, **kwargs)


def setup_device(device: torch.device) -> None:
    """Per-process switches for fast CUDA training; nothing changes on CPU."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
