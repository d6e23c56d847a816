"""A watchdog beside the training loop: a stalled step is reported, not waited on in silence.

A step that never returns — a native kernel that deadlocks (see raydist.train.speed for the oneDNN case that
motivated this), a collective waiting for a rank that is gone — leaves the loop's own progress line silent
forever. The loop calls :meth:`Watchdog.beat` with where it is (epoch, step, phase) every step; a daemon thread
warns when no beat has come for ``warn_after_s``, naming that place and the Python stack the loop is stuck
in, and repeats the warning while the stall lasts. With ``fail_after_s`` it ends the process after that long,
so Ray Train's failure handling (``run.max_failures``) restarts the worker group from its last checkpoint or
fails the run, instead of holding the GPUs forever. Pure Python and no Ray: a thread, a lock and a clock.
"""

from __future__ import annotations

import os
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")

STALL_EXIT_CODE = 75  # what the process exits with when fail_after_s runs out (EX_TEMPFAIL: worth a retry)


def _fmt(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 60} min {seconds % 60:02d} s" if seconds >= 60 else f"{seconds} s"


class Watchdog:
    """Watches the thread that creates it (the training loop's).

    ``say`` prints one report (default: stderr); ``exit`` ends the process (default: ``os._exit``, since a thread
    stuck in native code cannot be interrupted and would block a normal exit).
    """

    def __init__(self, warn_after_s: float | None, *, fail_after_s: float | None = None,
                 say: Callable[[str], None] | None = None, exit: Callable[[int], None] | None = None,
                 check_every_s: float | None = None) -> None:
        self.warn_after_s, self.fail_after_s = warn_after_s, fail_after_s
        self._say = say or (lambda line: (sys.__stderr__.write(line + "\n"), sys.__stderr__.flush()))
        self._exit = exit or os._exit
        limits = [s for s in (warn_after_s, fail_after_s) if s]
        self._every = check_every_s or (max(0.05, min(30.0, min(limits) / 4)) if limits else None)
        self._watched = threading.get_ident()
        self._lock = threading.Lock()
        self._where, self._last, self._warned_at = "starting", time.monotonic(), None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.reports: list[str] = []  # every warning it gave, for the caller and tests

    def __enter__(self) -> Watchdog:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        if self._every is None or self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="raydist-watchdog", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def beat(self, where: str) -> None:
        """The loop made progress and is now at ``where`` (e.g. "epoch 3/30, training step 17/391")."""
        with self._lock:
            if self._warned_at is not None:
                stalled = time.monotonic() - self._last
                self._report(f"raydist: moving again after {_fmt(stalled)} (now at {where})")
            self._where, self._last, self._warned_at = where, time.monotonic(), None

    def beating(self, items: Iterable[T], label: str) -> Iterator[T]:
        """Iterate ``items``, beating as each one is handed out ("LABEL i/N"), so a stall while the loop works on
        item i is reported there."""
        try:
            total = f"/{len(items)}"  # type: ignore[arg-type]
        except TypeError:  # a stream of unknown length
            total = ""
        for i, item in enumerate(items):
            self.beat(f"{label} {i + 1}{total}")
            yield item

    def _stack(self) -> str:
        frame = sys._current_frames().get(self._watched)
        if frame is None:
            return "(the loop's thread has ended)"
        frames = traceback.extract_stack(frame)[-4:]
        return " <- ".join(f"{os.path.relpath(f.filename) if 'raydist' in f.filename else os.path.basename(f.filename)}"
                           f":{f.lineno} {f.name}" for f in reversed(frames))

    def _report(self, line: str) -> None:
        self.reports.append(line)
        self._say(line)

    def _run(self) -> None:
        while not self._stop.wait(self._every):
            with self._lock:
                now = time.monotonic()
                stalled = now - self._last
                if self.fail_after_s and stalled >= self.fail_after_s:
                    self._report(f"raydist: no progress for {_fmt(stalled)} at {self._where}; stuck in "
                                 f"{self._stack()}; ending this process (run.stall_timeout_s) so Ray Train can "
                                 "restart the worker group from the last checkpoint or fail the run")
                    self._exit(STALL_EXIT_CODE)
                    return
                due = self.warn_after_s and stalled >= self.warn_after_s and (
                    self._warned_at is None or now - self._warned_at >= self.warn_after_s)
                if due:
                    self._warned_at = now
                    self._report(f"raydist: warning: no progress for {_fmt(stalled)} at {self._where}; stuck in "
                                 f"{self._stack()} (a hung native kernel or a collective waiting for a lost "
                                 "worker? run.stall_timeout_s ends such a worker)")
