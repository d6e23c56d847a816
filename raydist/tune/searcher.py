"""The sweep's Optuna searcher: Ray Tune's OptunaSearch, told the truth about trials ASHA stopped early."""

from __future__ import annotations

import logging
from typing import Any

from optuna.trial import TrialState
from ray.tune.search.optuna import OptunaSearch

logger = logging.getLogger(__name__)


class StoppedArePruned(OptunaSearch):
    """OptunaSearch that tells Optuna a trial ASHA stopped early is PRUNED, not COMPLETE with its last values.

    With "training time down" as an objective, a trial stopped after one epoch would otherwise dominate on time
    and pull NSGA-II toward the configurations ASHA killed; TPE, too, ranks pruned trials below finished ones. A
    run that stopped itself (eval.guard_drop) ran its own course: COMPLETE. Module level, so Tune can pickle it
    into the experiment state for --resume."""

    def __init__(self, *args: Any, epochs: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._epochs = epochs

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        stopped_early = (not error and result is not None and not result.get("stopped")
                         and int(result.get("epoch", self._epochs)) < self._epochs)
        if not stopped_early or trial_id in self._completed_trials:
            return super().on_trial_complete(trial_id, result, error)
        try:
            self._ot_study.tell(self._ot_trials[trial_id], state=TrialState.PRUNED)
        except Exception as exc:  # noqa: BLE001 - as OptunaSearch itself does: a refused tell is a warning
            logger.warning(exc)
        self._completed_trials.add(trial_id)
