"""TensorBoard event files in a run directory, so ``tensorboard --logdir runs`` shows every run, sweep trial and
compared method side by side (its run names are the run directories' paths under runs/)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any


class EventWriter:
    """Per-epoch scalars into RUN_DIR/events.out.tfevents.*; a no-op without the tensorboard package."""

    def __init__(self, run_dir: str | Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard is an optional extra (pip install raydist[tracking])
            self.writer = None
            return
        self.writer = SummaryWriter(log_dir=str(run_dir), flush_secs=30)

    def scalars(self, values: dict[str, Any], step: int) -> None:
        if self.writer is None:
            return
        for key, value in values.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(float(value)):
                self.writer.add_scalar(key, float(value), step)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
