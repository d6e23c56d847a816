"""No test can stall the suite: the guards in pyproject.toml and tests/conftest.py, tried on tests made to hang."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time

from conftest import ROOT

HANGS = '''
import signal, time

def test_hangs_in_python():
    time.sleep(600)

def test_runs_after_it():
    assert True

def test_hangs_where_no_signal_reaches():
    # a native kernel that never returns: the alarm pytest-timeout sets is never delivered
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
    time.sleep(600)
'''


def _pytest(tmp_path, *args: str, grace: str = "120") -> tuple[subprocess.CompletedProcess, float]:
    shutil.copy(ROOT / "tests" / "conftest.py", tmp_path / "conftest.py")
    (tmp_path / "pytest.ini").write_text("[pytest]\ntimeout = 2\ntimeout_method = signal\n")
    (tmp_path / "test_hangs.py").write_text(HANGS)
    env = {"RAYDIST_TEST_BACKSTOP_GRACE_S": grace, "PATH": "/usr/bin:/bin"}
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=120)
    return proc, time.monotonic() - start


def test_a_test_past_its_limit_fails_and_the_suite_goes_on(tmp_path):
    proc, _ = _pytest(tmp_path, "-k", "not no_signal")
    assert "1 failed, 1 passed" in proc.stdout, proc.stdout[-2000:]
    assert "Timeout" in proc.stdout and "test_hangs_in_python" in proc.stdout


def test_a_test_stuck_where_no_signal_reaches_ends_the_session_with_its_stack(tmp_path):
    proc, seconds = _pytest(tmp_path, "-k", "no_signal", grace="2")
    assert proc.returncode != 0
    assert seconds < 60  # its limit (2 s) plus the backstop's grace (2 s) plus start-up, not the 600 s sleep
    assert "Timeout (0:00:04)" in proc.stderr and "test_hangs_where_no_signal_reaches" in proc.stderr, proc.stderr
