"""The Ray that raydist starts is the one every Ray process of the run finds, whatever else is on the machine.

Ray processes that look a cluster up by themselves (Ray Train's placement-group cleaner and the state API behind
it) read RAY_ADDRESS, else ``ray_current_cluster`` in Ray's temp directory: the last ``ray start`` head. These
tests leave that file naming a dead head (a terminal closed without ``ray stop``) or a live foreign one (this test
session's Ray), run raydist in a child process with that temp directory, and check that nothing goes there.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, tiny_job, write_job

CLEANER_TROUBLE = ("Timed out while waiting for GCS", "Found multiple active Ray instances",
                   "Failed to register placement group with cleaner", "Failed to query Ray Train Controller")

LOOKUP = """
import contextlib, io, json, os, sys, time, ray
from ray.util.placement_group import placement_group
from raydist.cli import main
from raydist.train.driver import start_local_ray

start_local_ray(num_cpus=2, include_dashboard=True, object_store_memory=128 * 1024 * 1024, logging_level="warning")

@ray.remote(num_cpus=0)
class Probe:
    def look(self):
        # what Ray Train's PlacementGroupCleaner does every second: is the controller (here: this actor) alive?
        from ray.dashboard.utils import get_address_for_submission_client
        from ray.train.v2._internal.state.util import is_actor_alive
        return {"api": get_address_for_submission_client(None),
                "alive": bool(is_actor_alive(ray.get_runtime_context().get_actor_id(), timeout=20))}

seen = ray.get(Probe.options(lifetime="detached", name="probe", namespace="t").remote().look.remote(), timeout=120)
seen["dashboard"] = ray._private.worker.get_dashboard_url()
seen["driver_env"] = os.environ.get("RAY_ADDRESS")

# something else holds every CPU (a leaked placement group): the run fails after run.resource_wait_s, saying so
ray.get(placement_group([{"CPU": 2}]).ready())
start, err = time.monotonic(), io.StringIO()
with contextlib.redirect_stderr(err):
    seen["train_rc"] = main(["train", sys.argv[1]])
seen["train_seconds"], seen["train_error"] = time.monotonic() - start, err.getvalue().strip().splitlines()[-1]
print(json.dumps(seen))
"""


def _ray_tmpdir(current_cluster: str) -> str:
    """A short private Ray temp directory (Unix socket paths are limited) whose ray_current_cluster names
    ``current_cluster``."""
    tmp = tempfile.mkdtemp(prefix="rd", dir="/tmp")
    (Path(tmp) / "ray").mkdir()
    (Path(tmp) / "ray" / "ray_current_cluster").write_text(current_cluster)
    return tmp


def _env(tmp: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    env["RAY_TMPDIR"] = tmp
    return env


@pytest.mark.timeout(420)
def test_ray_processes_find_raydists_ray_not_a_dead_head_and_a_run_without_resources_fails(tmp_path):
    """ray_current_cluster names a dead head: an actor's state lookup (as the placement-group cleaner makes)
    still answers from raydist's Ray (before, it timed out after ~60 s: "Timed out while waiting for GCS").
    Then every CPU is taken by someone else's placement group: `raydist train` fails after run.resource_wait_s
    (attempts of 3 s here) with a line saying why, instead of retrying for ever."""
    job = tiny_job(tmp_path, run={"resource_wait_s": 6}, optim={"epochs": 1}, method={"name": "fgsm_rs"})
    job["method"].pop("k")
    tmp = _ray_tmpdir("127.0.0.1:1")  # nothing listens there
    env = {**_env(tmp), "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "3"}
    try:
        proc = subprocess.run([sys.executable, "-c", LOOKUP, str(write_job(tmp_path, job))], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=300)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    assert seen["alive"] is True
    assert seen["api"].rstrip("/").split(":")[-1] == str(seen["dashboard"]).rstrip("/").split(":")[-1]
    assert seen["driver_env"] is None  # the driver's own RAY_ADDRESS still means "a cluster the user named"
    assert not any(t in proc.stdout + proc.stderr for t in CLEANER_TROUBLE)
    assert seen["train_rc"] == 1 and seen["train_seconds"] < 120
    assert "did not get their resources within run.resource_wait_s = 6 s" in seen["train_error"], seen
    assert "free now: 0 CPU" in seen["train_error"]


@pytest.mark.timeout(600)
def test_a_sweep_runs_every_trial_beside_a_foreign_live_ray(tmp_path, ray_session):
    """ray_current_cluster names this test session's Ray, alive and not raydist's: the sweep's trials run on
    raydist's own Ray, each trial's placement group is watched by a working cleaner, and all trials finish."""
    # each trial's worker takes 1.5 of the Ray's 2 CPUs (its trial process 0.01): the second trial starts only if
    # the first one's placement group was freed
    job = tiny_job(tmp_path, model={"width": 4}, method={"name": "fgsm_rs"}, optim={"epochs": 1},
                   scaling={"num_workers": 1, "cpus_per_worker": 1.5},
                   eval={"val_steps": 2, "test_attacks": ["clean"], "test_samples": 32})
    job["method"].pop("k")
    write_job(tmp_path, job, "base.yaml")
    sweep = {"base": "base.yaml", "space": {"optim.lr": {"type": "loguniform", "low": 0.01, "high": 0.2}},
             "search": {"seed": 0}, "scheduler": {"type": "none"},
             "budget": {"num_trials": 2, "max_concurrent_trials": 1},
             "run": {"name": "sw", "output_dir": str(tmp_path / "sweeps")}}
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(sweep))
    tmp = _ray_tmpdir(ray_session.get_runtime_context().gcs_address)
    try:
        proc = subprocess.run([sys.executable, "-m", "raydist.cli", "tune", str(tmp_path / "sweep.yaml")], cwd=ROOT,
                              env=_env(tmp), capture_output=True, text=True, timeout=540)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    with open(tmp_path / "sweeps" / "sw" / "trials.csv") as f:
        states = [row["state"] for row in csv.DictReader(f)]
    assert states == ["completed"] * 2
    trouble = [t for t in CLEANER_TROUBLE if t in out]
    assert not trouble, trouble


def test_resource_wait_becomes_ray_trains_startup_retry_limit(monkeypatch, tmp_path):
    from raydist import config as C
    from raydist.train.driver import build_trainer, startup_retries

    monkeypatch.delenv("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", raising=False)
    assert startup_retries(1800) == 30 and startup_retries(5) == 1 and startup_retries(None) == -1
    cfg = C.validate(tiny_job(tmp_path, run={"resource_wait_s": 300}))
    assert build_trainer(cfg, None).run_config.failure_config.controller_failure_limit == 5
