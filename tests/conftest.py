"""Shared fixtures: one Ray instance for the whole session, small job files for fast runs."""

from __future__ import annotations

import faulthandler
import os
import sys
from pathlib import Path

import pytest
import yaml

os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("RAY_TRAIN_ENABLE_STATE_TRACKING", "0")

ROOT = Path(__file__).resolve().parents[1]
BACKSTOP_GRACE_S = float(os.environ.get("RAYDIST_TEST_BACKSTOP_GRACE_S", 120))
_STDERR: dict[str, object] = {}


def pytest_configure(config):
    # a copy of the real stderr, taken while output capture is off, for the backstop's stack dump
    _STDERR["file"] = os.fdopen(os.dup(sys.__stderr__.fileno()), "w")


def _limit(item) -> float:
    marker = item.get_closest_marker("timeout")
    if marker is not None and marker.args:
        return float(marker.args[0])
    return float(item.config.getini("timeout") or 600)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """The backstop behind pytest-timeout: a test stuck in native code (where its SIGALRM never reaches Python)
    is ended here, with every thread's stack, BACKSTOP_GRACE_S after its limit; the session fails, CI does not
    stall."""
    out = _STDERR.get("file") or sys.__stderr__
    faulthandler.dump_traceback_later(_limit(item) + BACKSTOP_GRACE_S, exit=True, file=out)
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()


@pytest.fixture(scope="session")
def ray_session():
    """A single local Ray instance (2 CPUs, small object store) shared by every test that needs Ray."""
    import ray

    from raydist.train.driver import start_local_ray

    if not ray.is_initialized():
        # our own instance, as raydist starts it, even when another test has a `ray start` cluster up on this machine
        start_local_ray(num_cpus=2, include_dashboard=True, object_store_memory=256 * 1024 * 1024,
                        logging_level="warning", log_to_driver=True)
    yield ray
    ray.shutdown()


def free_port() -> int:
    """A TCP port nothing listens on now (for a second Ray's head, dashboard and agents)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def tiny_job(tmp_path: Path, **sections) -> dict:
    """A digits job that trains in seconds on one CPU: width-8 ResNet-18 on 16x16 digits (the native images are
    8x8), few epochs, 100 validation images, capped test set."""
    job = {
        "run": {"name": "t", "output_dir": str(tmp_path / "runs"), "seed": 0},
        "data": {"dataset": "digits", "image_size": 16, "val_size": 100, "batch_size": 64, "eval_batch_size": 200,
                 "crop": 2, "flip": False},
        "model": {"name": "resnet18", "width": 8},
        "method": {"name": "fgsm_sdi", "epsilon": "32/255", "k": 5},
        "optim": {"epochs": 2, "lr": 0.05, "schedule": "cyclic"},
        "scaling": {"num_workers": 1, "cpus_per_worker": 1},
        "eval": {"val_steps": 3, "test_attacks": ["clean", "fgsm", "pgd10"], "test_samples": 64},
        # importing MLflow costs every training process seconds; tests/test_tracking.py turns tracking on
        "tracking": {"mlflow": False, "tensorboard": False},
    }
    for sec, values in sections.items():
        job.setdefault(sec, {}).update(values)
    return job


def write_job(tmp_path: Path, job: dict, name: str = "job.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(job))
    return path
