"""torch.compile on CPU, run by tests/test_speed.py in a child process with its own time limit.

A compiled CPU step runs native code (inductor's kernels, oneDNN) that can hang or crash the process it runs in
(see raydist.train.speed); in a child, such a failure is one failed test with its output, never a stalled or
crashed test session. Prints one JSON line: for each method, the eager and compiled losses of the same steps and
how many frames dynamo compiled before and after warm-up, and how many of the compiled backward's convolution
gradients were computed on channels-last tensors (the layout that meets the oneDNN bug; raydist keeps it at 0).

    python tests/compiled_cases.py standard fgsm_sdi
"""

from __future__ import annotations

import json
import sys

import torch

from raydist.methods import create_method
from raydist.models import create_model
from raydist.train.speed import compile_model

# 30: a batch at which the width-4 model's 1x1 stride-2 shortcut (4 -> 8 channels at 16x16) deadlocked in oneDNN's
# AVX2 weight-gradient kernel when inductor made the tensors channels-last (the test runs with
# ONEDNN_MAX_CPU_ISA=AVX2, so every x86-64 CPU takes the AVX2 path)
BATCH = 30


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model("resnet18", num_classes=10, width=4, in_channels=1, mean=(0.5,), std=(0.5,))


class _ConvBackwardSpy:
    """Records the memory layout of every convolution weight/input gradient the compiled backward asks aten for
    (inductor's generated code calls ``torch.ops.aten.convolution_backward.default`` by name at run time)."""

    def __enter__(self):
        self.packet = torch.ops.aten.convolution_backward
        self.original = self.packet.default
        self.calls: list[bool] = []  # per call: were the gradient and the input channels-last?

        def spy(grad, inp, *rest):
            self.calls.append(not (grad.is_contiguous() and inp.is_contiguous()))
            return self.original(grad, inp, *rest)

        self.packet.default = spy
        return self

    def __exit__(self, *exc) -> None:
        self.packet.default = self.original


def run(method: str) -> dict:
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    g = torch.Generator().manual_seed(1)
    x, y = torch.rand(BATCH, 1, 16, 16, generator=g), torch.randint(0, 10, (BATCH,), generator=g)
    kw = {"k": 3, "generator_width": 4} if method == "fgsm_sdi" else {}
    out: dict = {}
    for compiled in (False, True):
        model = _model()
        net = compile_model(model, "default", torch.device("cpu")) if compiled else model
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        torch.manual_seed(2)
        m = create_method(method, net, opt, epsilon=8 / 255, **kw)
        losses = []
        for i in range(7):
            if compiled and i == 4:  # steps 0 and 3 updated the generator: every kind of pass has run
                out["frames_after_warmup"] = counters["frames"]["ok"]
            if compiled and i == 5:  # warmed up: watch what the compiled backward hands oneDNN
                with _ConvBackwardSpy() as spy:
                    losses.append(m.step(x, y)[0].item())
                out["conv_backward_calls"], out["channels_last_calls"] = len(spy.calls), sum(spy.calls)
                continue
            losses.append(m.step(x, y)[0].item())
        out["compiled" if compiled else "eager"] = losses
    out["frames_at_end"] = counters["frames"]["ok"]
    return out


if __name__ == "__main__":
    torch.set_num_threads(2)  # the deadlock needs two OpenMP threads
    print(json.dumps({method: run(method) for method in sys.argv[1:]}), flush=True)
