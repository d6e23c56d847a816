"""The training loop's watchdog: a stalled step is reported with where it is, and can end the worker."""

from __future__ import annotations

import threading
import time

from raydist.train.watchdog import STALL_EXIT_CODE, Watchdog


def _stuck_in_a_kernel(seconds: float) -> None:
    time.sleep(seconds)  # stands for a native call that does not return


def test_a_stall_is_reported_with_the_step_and_the_code_it_is_stuck_in():
    lines: list[str] = []
    with Watchdog(0.2, say=lines.append, check_every_s=0.05) as dog:
        for _ in dog.beating(range(3), "epoch 2/5, training step"):
            pass  # quick steps: no warning
        assert lines == []
        dog.beat("epoch 2/5, training step 3/3")
        _stuck_in_a_kernel(0.5)
        dog.beat("epoch 2/5, validation batch 1/2")
    warnings = [line for line in lines if "warning" in line]
    assert warnings, lines
    first = warnings[0]
    assert "no progress for" in first and "epoch 2/5, training step 3/3" in first
    assert "_stuck_in_a_kernel" in first and "test_watchdog.py" in first
    assert len(warnings) >= 2, "a stall that lasts is reported again"
    assert "moving again" in lines[-1] and "validation batch 1/2" in lines[-1]


def test_beating_names_each_item_of_a_loader_with_its_count():
    seen: list[str] = []
    dog = Watchdog(None)
    dog.beat = seen.append  # type: ignore[method-assign]
    assert list(dog.beating(["a", "b"], "epoch 1/1, training step")) == ["a", "b"]
    assert seen == ["epoch 1/1, training step 1/2", "epoch 1/1, training step 2/2"]
    assert list(dog.beating(iter("xy"), "stream")) == ["x", "y"]  # unknown length: no total
    assert seen[-1] == "stream 2"


def test_stall_timeout_ends_the_process_with_its_own_code():
    lines: list[str] = []
    exited = threading.Event()
    codes: list[int] = []

    def fake_exit(code: int) -> None:
        codes.append(code)
        exited.set()

    with Watchdog(None, fail_after_s=0.2, say=lines.append, exit=fake_exit, check_every_s=0.05) as dog:
        dog.beat("final test of best.pt, batch 1/4")
        assert exited.wait(5)
    assert codes == [STALL_EXIT_CODE]
    assert "final test of best.pt, batch 1/4" in lines[-1] and "ending this process" in lines[-1]


def test_no_limits_means_no_thread():
    dog = Watchdog(None)
    with dog:
        assert dog._thread is None
