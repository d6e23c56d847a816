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
- ``compile_model`` on CPU keeps the model's NCHW layout (inductor's ``layout_optimization`` off), and
  ``check_channels_last`` refuses channels-last on CPU: oneDNN's 1x1 weight-gradient kernel (torch 2.14.1 ships
  oneDNN 3.12) hangs with AVX2 kernels and crashes with AVX-512 ones on channels-last tensors of a stride-2 1x1
  convolution — ResNet's shortcut — with two threads. Smallest case: ``aten.convolution_backward`` of a
  1x1/stride-2 convolution, input [30, 4, 16, 16] and gradient [30, 8, 8, 8] both channels-last, 2 threads,
  ``ONEDNN_MAX_CPU_ISA=AVX2`` (hangs; batch 30, 34, 43, 44, 63, 64 of 1-64 at 16x16, most at 32x32); with AVX-512
  kernels, input [37, 8, 32, 32] segfaults. NCHW tensors at the same shapes, and one thread, run clean. Inductor's
  layout optimisation turns a CPU model's convolutions channels-last, which is how a compiled run met the kernel
  while eager NCHW runs never do.
"""

from __future__ import annotations

import torch
from torch import nn


def use_compile(setting: str, device: torch.device) -> bool:
    """``run.compile``: "true", "false", or "auto" (on for CUDA only)."""
    return setting == "true" or (setting == "auto" and device.type == "cuda")


def compile_options(mode: str, device: torch.device) -> dict:
    """``torch.compile`` keyword arguments for ``run.compile_mode`` on ``device``.

    On CUDA, the mode as given. On CPU, the mode's inductor options plus ``layout_optimization: False`` (see the
    module docstring: channels-last gradients reach a oneDNN kernel that hangs or crashes); torch takes a mode or
    options, not both, so the mode is spelled out as its options."""
    if device.type != "cpu":
        return {} if mode == "default" else {"mode": mode}
    from torch._inductor import list_mode_options

    mode_options = {} if mode == "default" else list_mode_options(mode)
    options = {k: v for k, v in mode_options.items()
               if not k.startswith("triton.")}  # CUDA graphs and Triton settings mean nothing on CPU
    options["layout_optimization"] = False
    return {"options": options}


def compile_model(model: nn.Module, mode: str, device: torch.device | None = None) -> nn.Module:
    """``torch.compile`` with ``run.compile_mode`` ("default" leaves torch's own default).

    Static shapes: DeviceLoader's batches come in at most two sizes (N / batches rounded up and down), so two
    specialised graphs per kind of pass beat one graph with a symbolic batch dimension, and CUDA graphs
    (reduce-overhead) need static shapes anyway. ``device`` defaults to where the model's parameters are."""
    if device is None:
        first = next(model.parameters(), None)
        device = first.device if first is not None else torch.device("cpu")
    return torch.compile(model, dynamic=False, **compile_options(mode, device))


def channels_last_problem(setting: str, use_gpu: bool) -> str | None:
    """Why ``run.channels_last`` cannot be honoured, or None: channels-last on CPU workers meets the oneDNN kernel
    the module docstring describes (a hang or a crash, not a slowdown), so it is refused before anything runs."""
    if setting == "true" and not use_gpu:
        return ("run.channels_last: true needs CUDA workers (scaling.use_gpu: true): on CPU, oneDNN's weight gradient "
                "of channels-last 1x1 stride-2 convolutions hangs (AVX2) or crashes (AVX-512) with 2+ threads; "
                "use auto (NCHW on CPU)")
    return None


def setup_device(device: torch.device) -> None:
    """Per-process switches for fast CUDA training; nothing changes on CPU."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
