"""Evaluation actors: each holds the test split and the models it has been asked about, and attacks one shard.

A shard is a contiguous range of test indices for one (checkpoint, attack) pair. The result is per sample —
index, label, clean prediction, whether the attack failed to flip it — so the driver can write it to parquet as
it arrives and resume an interrupted evaluation shard by shard.

Nothing is read from the actor's own disk: the driver puts the test split and every checkpoint's bytes into
Ray's object store once, so an actor on any node of a cluster without a shared filesystem can work (each node
fetches an object once; NumPy arrays are read in place, not copied per actor).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

# float slack when checking an adversarial batch against its threat model (pixels are multiples of 1/255)
BOUND_TOLERANCE = 1e-5


class ThreatModelError(RuntimeError):
    """An attack returned a point outside the eps-ball around its input or outside [0, 1]: counting it would
    misstate robustness, so the evaluation stops."""


def check_threat_model(x: torch.Tensor, x_adv: torch.Tensor, eps: float, attack: str, first: int) -> torch.Tensor:
    """Per-sample L-inf norm of ``x_adv - x`` after checking that every adversarial example lies in the eps-ball
    (up to BOUND_TOLERANCE) and in [0, 1]; raises ThreatModelError naming the attack and the first bad sample
    (``first``: the batch's first test index). NaN counts as outside."""
    if x_adv.shape != x.shape:
        raise ThreatModelError(f"{attack} returned a batch of shape {tuple(x_adv.shape)} for inputs of shape "
                               f"{tuple(x.shape)}")
    delta = (x_adv.detach().float() - x.float()).flatten(1)
    norm = delta.abs().amax(1)
    low = x_adv.detach().float().flatten(1).amin(1)
    high = x_adv.detach().float().flatten(1).amax(1)
    ok = (norm <= eps + BOUND_TOLERANCE) & (low >= -BOUND_TOLERANCE) & (high <= 1 + BOUND_TOLERANCE)
    if not bool(ok.all()):
        i = int((~ok).nonzero()[0, 0])
        raise ThreatModelError(
            f"{attack} returned an adversarial example outside its threat model for test image {first + i}: "
            f"L-inf distance {float(norm[i]):.6g} (eps {eps:.6g}), pixel range [{float(low[i]):.6g}, "
            f"{float(high[i]):.6g}] (must be in [0, 1]); not counted, the evaluation stops")
    return norm


class EvalWorker:
    """Plain class; the runner wraps it with ``ray.remote`` (fractional GPUs let several share one device).

    ``test``: the test split as ``{"x": uint8 array N x C x H x W, "y": int64 array N}``.
    """

    def __init__(self, test: dict[str, np.ndarray], use_gpu: bool, threads: int = 1) -> None:
        from raydist.train.speed import setup_device

        if not use_gpu:
            torch.set_num_threads(max(1, threads))
        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        self.x, self.y = test["x"], test["y"]
        self.models: dict[str, torch.nn.Module] = {}
        self.channels_last = self.device.type == "cuda"  # faster convolutions on CUDA; same numbers
        setup_device(self.device)  # cuDNN autotuning: every batch but a shard's last has the same shape

    def _model(self, source: str | dict[str, Any], blob: list) -> torch.nn.Module:
        """The model of ``source`` (a raydist checkpoint's path, or a model source: raydist.evaluate.sources),
        built once from its file's bytes (``blob``: a one-element list holding the object-store reference, None
        for a source without a file, so the bytes are fetched only the first time this actor meets it)."""
        import json

        key = source if isinstance(source, str) else json.dumps(source, sort_keys=True)
        if key not in self.models:
            import ray

            from raydist.evaluate.sources import build

            data = None if not blob or blob[0] is None else blob[0] if isinstance(blob[0], bytes) else ray.get(blob[0])
            model = build(source, self.device, data=data)
            kind = "raydist" if isinstance(source, str) else source["kind"]
            if self.channels_last and kind in ("raydist", "weights"):
                model = model.to(memory_format=torch.channels_last)
            self.models[key] = model
        return self.models[key]

    def evaluate(self, path: str | dict[str, Any], blob: list, attack: str, start: int, end: int, eps: float,
                 batch_size: int,
                 seed: int, attack_kwargs: dict[str, Any] | None = None,
                 precision: str = "fp32") -> dict[str, np.ndarray]:
        """Per-sample outcomes of ``attack`` on test images [start, end). ``precision`` is the attack's own
        forward passes (bf16 autocast when asked); whether a point is still classified right is always
        judged in fp32. ``path``: a raydist checkpoint, or a model source (see raydist.evaluate.sources)."""
        from raydist.attacks import run_attack

        model = self._model(path, blob)
        kwargs = dict(attack_kwargs or {})
        if precision != "fp32":
            kwargs["precision"] = precision
        preds, robust, norms = [], [], []
        for b0 in range(start, end, batch_size):
            b1 = min(end, b0 + batch_size)
            x = torch.from_numpy(np.array(self.x[b0:b1])).to(self.device).float().div_(255)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            y = torch.from_numpy(np.array(self.y[b0:b1])).to(self.device)
            with torch.no_grad():
                clean = model(x).argmax(1)
            if attack == "clean":
                ok = clean == y
                norm = torch.zeros(len(y))
            else:
                x_adv = run_attack(attack, model, x, y, eps, seed=seed + b0, **kwargs)
                norm = check_threat_model(x, x_adv, eps, attack, b0)  # before anything is counted
                with torch.no_grad():
                    ok = model(x_adv).argmax(1) == y
            preds.append(clean.cpu())
            robust.append(ok.cpu())
            norms.append(norm.cpu().float())
        return {
            "index": np.arange(start, end),
            "label": np.array(self.y[start:end]),
            "clean_pred": torch.cat(preds).numpy(),
            "robust": torch.cat(robust).numpy(),
            "linf": torch.cat(norms).numpy(),  # the perturbation's L-inf norm (FAB's minimal norms)
        }

    def ping(self) -> int:
        import os

        return os.getpid()
