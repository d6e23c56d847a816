"""What a local Ray is started with, and which of its internal messages never reach the user's terminal.

The first thing a newcomer reads is `make demo`'s output; Ray's internal notices there (an ERROR line from the
Train controller's core worker about an actor it restarts itself, a warning that token authentication is on,
matplotlib announcing its font cache) say nothing about the run and look like failures. They stay in Ray's
log files (/tmp/ray/session_latest/logs); only the copy streamed to the driver's terminal is dropped.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
from pathlib import Path

# lines of Ray's worker and actor logs that are not passed on to the driver's terminal
NOISE = (
    # Ray Train's controller starts its PreemptionWatcher actor with max_restarts > 0 and arguments in the object
    # store; the core worker logs that as an ERROR although nothing is wrong (ray-project/ray#53727)
    re.compile(r"core_worker\.cc.*PreemptionWatcher.*max_restarts"),
    # Ray Train's controller sets a Ray Data option Ray Data itself has deprecated (its warning and source line)
    re.compile(r"RayDeprecationWarning: `ExecutionOptions\.exclude_resources` is deprecated"),
    re.compile(r"^\s*self\.exclude_resources = exclude_resources\s*$"),
    re.compile(r"generated new fontManager"),
    re.compile(r"Matplotlib is building the font cache"),
)


def prepare_local_env() -> None:
    """Environment for a local Ray, set before it starts so every worker inherits it (set values are kept)."""
    # the dashboard's Train view (runs, their workers and attempts) needs Ray Train to record its state
    os.environ.setdefault("RAY_TRAIN_ENABLE_STATE_TRACKING", "1")
    # Ray enables token authentication on a new local cluster (a token in ~/.ray/auth_token) and says so in a
    # warning at every start; the protection stays, the warning goes
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    _matplotlib_cache()


def _matplotlib_cache() -> None:
    """A writable font cache that outlives the run (else matplotlib builds one in a fresh temporary directory in
    every worker, and says so)."""
    if os.environ.get("MPLCONFIGDIR"):
        return
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    for d in (cache / "matplotlib", Path(tempfile.gettempdir()) / f"raydist-matplotlib-{os.getuid()}"):
        try:
            d.mkdir(parents=True, exist_ok=True)
        except OSError:
            continue
        if os.access(d, os.W_OK):
            os.environ["MPLCONFIGDIR"] = str(d)
            return


def quiet_loggers() -> None:
    """In any raydist process: matplotlib's font-cache notice is not news."""
    logging.getLogger("matplotlib.font_manager").setLevel(logging.WARNING)


# a notice that opens a traceback: the notice and its traceback are dropped together. Ray Train's controller asks
# the autoscaling coordinator for resources with a short timeout and, on a busy machine, logs each late answer
# with its traceback although it asks again and nothing is lost ("it's safe to ignore this error")
NOISE_BLOCKS = (re.compile(r"Failed to send resource request for train-.*safe to ignore"),)
_TRACEBACK = re.compile(r"^(Traceback |\s|[\w.]+(Error|Exception|Timeout)\b)")


def _keep(line: str) -> bool:
    return not any(p.search(line) for p in NOISE)


def drop_noise(lines: list[str]) -> list[str]:
    """``lines`` (one batch of a worker's log) without NOISE lines and NOISE_BLOCKS with their tracebacks."""
    out, in_block = [], False
    for line in lines:
        if in_block and _TRACEBACK.match(line):
            continue
        in_block = any(p.search(line) for p in NOISE_BLOCKS)
        if not in_block and _keep(line):
            out.append(line)
    return out


def filter_driver_logs() -> None:
    """Drop the NOISE lines from the worker logs Ray streams to this driver (after ``ray.init``)."""
    try:
        from ray._private import worker as ray_worker
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:  # another Ray's internal layout: its messages pass unfiltered
        return
    if not any(name == "ray_print_logs" for name, _ in getattr(dispatcher, "handlers", [])):
        return  # log_to_driver is off
    ignore_prefix = ray_worker._should_ignore_worker_log_prefix(ray_worker.global_worker)

    def filtered(data):
        lines = drop_noise(data.get("lines", []))
        if lines:
            ray_worker.print_to_stdstream({**data, "lines": lines}, ignore_prefix=ignore_prefix)

    dispatcher.remove_handler("ray_print_logs")
    dispatcher.add_handler("ray_print_logs", filtered)  # the name ray.shutdown() removes
