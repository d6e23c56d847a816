"""Experiment tracking: every run, sweep and comparison in MLflow, and every run's per-epoch scalars in TensorBoard
event files inside its run directory.

MLflow and TensorBoard are optional (``pip install raydist[tracking]``). Tracking never fails a run: a missing
package, a store that cannot be opened, a server that is down or refuses is one warning line, and the numbers stay
in ``metrics.jsonl`` and ``summary.json``. Only the process that writes the run directory (rank 0) logs.

The MLflow run of a run directory is recorded in it (``tracking.json``), so a resumed or restarted run goes on
logging to the same MLflow run, and ``raydist eval`` of its checkpoints nests its evaluation under it.
"""

from raydist.track.context import TrackingContext, tracking_context
from raydist.track.hooks import (
    TrainingTracker,
    finish_compare,
    finish_sweep,
    log_evaluation,
    start_compare,
    start_sweep,
)
from raydist.track.store import RECORD, read_record

__all__ = [
    "RECORD",
    "TrackingContext",
    "TrainingTracker",
    "finish_compare",
    "finish_sweep",
    "log_evaluation",
    "read_record",
    "start_compare",
    "start_sweep",
    "tracking_context",
]
