"""Batch augmentation on the device: random crop after zero padding, and horizontal flip.

Vectorized over the batch (per-sample offsets via ``torch.gather``, flips via ``torch.where``) and driven
by a device ``torch.Generator``, so it runs where the data lives with no Python loop over samples and no
host synchronization — the airbench recipe that keeps small-image training input-bound on nothing.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

AUGMENT_KEYS = frozenset({"crop", "flip"})


def validate_augment(augment: dict[str, Any] | None) -> dict[str, Any]:
    """Normalize an augment spec to {'crop': int >= 0, 'flip': bool}; reject unknown keys early."""
    spec = dict(augment or {})
    unknown = set(spec) - AUGMENT_KEYS
    if unknown:
        raise ValueError(f"unknown augment keys {sorted(unknown)}; allowed: {sorted(AUGMENT_KEYS)}")
    crop = spec.get("crop", 0) or 0
    if isinstance(crop, bool) or not isinstance(crop, int) or crop < 0:
        raise ValueError(f"augment crop is a padding in pixels (int >= 0), got {crop!r}")
    return {"crop": crop, "flip": bool(spec.get("flip", False))}


def crop_offsets(batch: int, padding: int, gen: torch.Generator, device: torch.device) -> torch.Tensor:
    """Per-sample (dy, dx) window offsets into the padded image, each in [0, 2 * padding]."""
    return torch.randint(0, 2 * padding + 1, (batch, 2), generator=gen, device=device)


def crop_at(x: torch.Tensor, padding: int, offsets: torch.Tensor) -> torch.Tensor:
    """Crop each image of ``x`` [B, C, H, W] at its ``offsets`` [B, 2] from the zero-padded image.

    Offset (padding, padding) is the identity; (dy, dx) shifts content by (padding - dy, padding - dx).
    """
    b, c, h, w = x.shape
    padded = F.pad(x, (padding, padding, padding, padding))
    rows = offsets[:, 0, None] + torch.arange(h, device=x.device)  # [B, H]
    cols = offsets[:, 1, None] + torch.arange(w, device=x.device)  # [B, W]
    rows = rows[:, None, :, None].expand(b, c, h, padded.shape[-1])
    out = torch.gather(padded, 2, rows)  # [B, C, H, W + 2p]
    cols = cols[:, None, None, :].expand(b, c, h, w)
    return torch.gather(out, 3, cols)


def random_crop(x: torch.Tensor, padding: int, gen: torch.Generator) -> torch.Tensor:
    """Random translation by up to ``padding`` pixels each way, filling with zeros (standard CIFAR crop)."""
    if padding == 0 or x.shape[0] == 0:
        return x
    return crop_at(x, padding, crop_offsets(x.shape[0], padding, gen, x.device))


def random_flip(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Mirror each image left-right with probability 1/2."""
    flip = torch.rand(x.shape[0], generator=gen, device=x.device) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(3), x)


def augment_batch(x: torch.Tensor, spec: dict[str, Any], gen: torch.Generator) -> torch.Tensor:
    """Apply a validated augment spec (see ``validate_augment``) to a batch; works on uint8 or float."""
    if spec["crop"]:
        x = random_crop(x, spec["crop"], gen)
    if spec["flip"]:
        x = random_flip(x, gen)
    return x
