"""Multi-node training and fault tolerance on a real three-node Ray cluster on this machine.

tests/cluster_faults.py builds the cluster (`ray.cluster_utils.Cluster`) in a process of its own, since this
session's Ray is already up, and runs every scenario once; each test below checks one scenario's outcome.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from cluster_faults import ELASTIC_EPOCHS, EPOCHS
from conftest import tiny_job

from raydist.data import load_dataset
from raydist.models import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
# the first test pays for the whole cluster run (the module fixture below, itself limited to 1200 s)
pytestmark = pytest.mark.timeout(1500)


@pytest.fixture(scope="module")
def outcome(tmp_path_factory):
    out = tmp_path_factory.mktemp("cluster")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "cluster_faults.py"), str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=1200)
    results_path = out / "results.json"
    assert results_path.is_file(), proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads(results_path.read_text())
    assert "error" not in results, results["error"] + "\n" + proc.stdout[-3000:]
    return out, results, proc.stdout


def _epochs(run_dir: Path) -> list[int]:
    return [json.loads(line)["epoch"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _n_train() -> int:
    return len(load_dataset("digits", val_size=tiny_job(ROOT)["data"]["val_size"]).train_y)


def test_two_workers_train_on_two_nodes(outcome):
    out, results, stdout = outcome
    rec = results["kill_worker"]
    workers = rec["summary"]["workers"]
    assert [w["rank"] for w in workers] == [0, 1]
    assert {w["node_id"] for w in workers} == set(rec["nodes"])  # one worker on each worker node
    assert results["head"] not in {w["node_id"] for w in workers}
    # each sample once per epoch, split between the nodes, and both did a real share of it
    n = (EPOCHS - workers[0]["first_epoch"] + 1) * _n_train()
    assert sum(w["images"] for w in workers) == n
    assert all(w["images"] >= 0.45 * n for w in workers)
    assert "2 workers on 2 node(s)" in stdout


def _check_recovered(run_dir: Path, rec: dict, epochs: int) -> None:
    assert "fault_error" not in rec, rec.get("fault_error")
    assert 1 <= rec["epochs_done_at_fault"] < epochs  # the fault struck mid-run
    assert _epochs(run_dir) == list(range(1, epochs + 1))  # every epoch once, in order
    _, last = load_checkpoint(run_dir / "last.pt")
    assert last["epoch"] == epochs
    assert (run_dir / "best.pt").is_file() and (run_dir / "summary.json").is_file()
    workers = rec["summary"]["workers"]
    # the restarted worker group resumed from the last checkpoint, not from epoch 1
    assert all(2 <= w["first_epoch"] <= rec["epochs_done_at_fault"] + 1 for w in workers)
    assert sum(w["images"] for w in workers) == (epochs - workers[0]["first_epoch"] + 1) * _n_train()


def test_a_killed_worker_process_restarts_the_group_from_the_last_checkpoint(outcome):
    out, results, _ = outcome
    rec = results["kill_worker"]
    lost = out / "runs" / "kill_worker_lost"  # the run directory as the run left it, moved away below
    _check_recovered(lost, rec, EPOCHS)
    assert rec["killed_pid"] not in {w["pid"] for w in rec["summary"]["workers"]}
    # run.storage_path as a file:// URI: Ray Train kept its checkpoints there
    stored = sorted(p.name for p in (out / "ray_storage" / "kill_worker").glob("epoch_*"))
    assert stored and stored[-1] == f"epoch_{EPOCHS:04d}"
    assert not (out / "runs" / "kill_worker" / "ray").exists()
    # ...from which --resume rebuilt the run directory after it was lost
    restored, rebuilt = rec["restored"], out / "runs" / "kill_worker"
    assert restored["best"]["epoch"] == rec["summary"]["best"]["epoch"]
    assert restored["last"]["accuracy"] == rec["summary"]["last"]["accuracy"]
    assert load_checkpoint(rebuilt / "last.pt")[1]["epoch"] == EPOCHS and (rebuilt / "best.pt").is_file()
    # every row as the run wrote it, except the last epoch's checkpoint_seconds: that is measured after its
    # checkpoint was written, so the checkpoint cannot hold it
    def rows(path: Path) -> list[dict]:
        return [json.loads(line) for line in path.read_text().splitlines()]

    before, after = rows(lost / "metrics.jsonl"), rows(rebuilt / "metrics.jsonl")
    assert after[:-1] == before[:-1]
    assert {k: v for k, v in after[-1].items() if k != "checkpoint_seconds"} == \
        {k: v for k, v in before[-1].items() if k != "checkpoint_seconds"}


def test_a_lost_node_is_replaced_and_the_run_finishes(outcome):
    out, results, _ = outcome
    rec = results["remove_node"]
    _check_recovered(out / "runs" / "remove_node", rec, EPOCHS)
    nodes = {w["node_id"] for w in rec["summary"]["workers"]}
    assert rec["removed_node"] not in nodes and len(nodes) == 2
    assert rec["idle_node"] in nodes  # the group came back on the node that stood idle


def test_an_elastic_run_goes_on_with_fewer_workers(outcome):
    """scaling.min_workers: a lost node with no replacement does not stop the run; it continues on one worker from
    its last checkpoint, every epoch done once, the lr schedule on its epochs."""
    out, results, _ = outcome
    rec = results["elastic"]
    assert "fault_error" not in rec, rec.get("fault_error")
    run_dir = out / "runs" / "elastic"
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == list(range(1, ELASTIC_EPOCHS + 1))
    sizes = [r["workers"] for r in rows]
    assert sizes[0] == 2 and sizes[-1] == 1, sizes
    # the same schedule as a fixed-size run: cyclic lr over its epochs, whatever the number of steps per epoch
    import yaml

    from raydist.train.schedules import lr_multiplier

    optim = yaml.safe_load((run_dir / "config.yaml").read_text())["optim"]
    assert optim["schedule"] == "cyclic" and optim["epochs"] == ELASTIC_EPOCHS
    at = lr_multiplier("cyclic", epochs=ELASTIC_EPOCHS, steps_per_epoch=1000, milestones=None, gamma=optim["gamma"],
                       peak=optim["peak"])  # at an epoch's end the cyclic lr does not depend on its steps
    for r in rows:
        assert abs(r["lr"] - optim["lr"] * at(r["epoch"] * 1000)) < 1e-6, (r["epoch"], r["lr"])
    assert (run_dir / "summary.json").is_file()


def test_the_storage_probe_asks_every_node(outcome):
    _, results, _ = outcome
    probe = results["probe"]
    assert probe["missing_when_shared"] == []
    assert len(probe["missing_when_not"]) == probe["alive_nodes"] >= 3
    assert probe["leftover_markers"] == []
