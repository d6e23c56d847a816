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

    def _model(self, path: str, blob: list) -> torch.nn.Module:
        """The checkpoint named ``path``, built once from its bytes (``blob``: a one-element list holding the
        object-store reference, so the bytes are fetched only the first time this actor meets the checkpoint)."""
        if path not in self.models:
            import ray

            from raydist.models import load_checkpoint

            data = blob[0] if isinstance(blob[0], bytes) else ray.get(blob[0])
            model, _ = load_checkpoint(path, device=str(self.device), data=data)
            if self.channels_last:
                model = model.to(memory_format=torch.channels_last)
            self.models[path] = model.eval()
        return self.models[path]

    def evaluate(self, path: str, blob: list, attack: str, start: int, end: int, eps: float, batch_size: int,
                 seed: int, attack_kwargs: dict[str, Any] | None = None,
                 precision: str = "fp32") -> dict[str, np.ndarray]:
        """Per-sample outcomes of ``attack`` on test images [start, end). ``precision`` is the attack's own
        forward passes (bf16 autocast when asked); whether a point is still classified right is always
        judged in fp32."""
        from raydist.attacks import run_attack

        model = self._model(path, blob)
        kwargs = dict(attack_kwargs or {})
        if precision != "fp32":
            kwargs["precision"] = precision
        preds, robust = [], []
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
            else:
                x_adv = run_attack(attack, model, x, y, eps, seed=seed + b0, **kwargs)
                with torch.no_grad():
                    ok = model(x_adv).argmax(1) == y
            preds.append(clean.cpu())
            robust.append(ok.cpu())
        return {
            "index": np.arange(start, end),
            "label": np.array(self.y[start:end]),
            "clean_pred": torch.cat(preds).numpy(),
            "robust": torch.cat(robust).numpy(),
        }

    def ping(self) -> int:
        import os

        return os.getpid()
