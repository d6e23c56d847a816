"""Multi-node scenarios on one machine, run by tests/test_cluster_faults.py in a process of their own.

A real Ray cluster of three nodes (`ray.cluster_utils.Cluster`: a head with no CPUs for the driver and Train's
controller, two 1-CPU worker nodes) trains small digits jobs through `raydist train`, and faults are injected
from a thread while it runs:

  kill_worker   two workers, one on each node; SIGKILL one training worker's process once Ray has the first
                epoch's checkpoint; then lose the run directory and --resume from Ray's storage (a file:// URI)
  remove_node   a third worker node joins; after the first epoch, remove a node a training worker runs on (a
                spot instance lost; the spare stands in for the replacement an autoscaler would bring)
  elastic       scaling.min_workers 1 of 2: after the first epoch a node a worker runs on is removed and none
                stands by; the run goes on with one worker instead of waiting for a replacement
  probe         the shared-storage probe on every node, for a directory they see and for a marker they do not

Usage: python tests/cluster_faults.py OUT_DIR [SCENARIO ...]; writes OUT_DIR/results.json.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
import traceback
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import free_port, tiny_job  # noqa: E402

WAIT_S = 300
EPOCHS = 2  # the fault strikes in epoch 2, which the restarted group redoes
ELASTIC_EPOCHS = 3  # epoch 1 on two workers, the node lost in epoch 2, epochs 2 and 3 on one


def _train_workers() -> list[dict]:
    # the GCS actor table (no dashboard needed): Ray Train's worker actors that are alive now
    from ray._private.state import actors

    return [a for a in actors().values() if a["ActorClassName"] == "RayTrainWorker" and a["State"] == "ALIVE"]


def _after_first_epoch(run_dir: Path, experiment: Path, fault, record: dict) -> threading.Thread:
    """Start a thread that waits until Ray Train has registered the first epoch's checkpoint (its checkpoint
    manager snapshot in the experiment directory names it) with two live workers, then calls fault()."""

    def wait_then_strike() -> None:
        try:
            deadline = time.time() + WAIT_S
            metrics = run_dir / "metrics.jsonl"
            snapshot = experiment / "checkpoint_manager_snapshot.json"
            while time.time() < deadline:
                if snapshot.exists() and "epoch_0001" in snapshot.read_text() and len(_train_workers()) == 2:
                    break
                time.sleep(0.2)
            else:
                record["fault_error"] = "no first epoch within the deadline"
                return
            time.sleep(1.0)  # into the next epoch's training
            record["epochs_done_at_fault"] = metrics.read_text().count("\n")
            fault(record)
        except Exception:  # noqa: BLE001 - reported to the test through results.json
            record["fault_error"] = traceback.format_exc()

    thread = threading.Thread(target=wait_then_strike, daemon=True)
    thread.start()
    return thread


def _train(out: Path, name: str, epochs: int, scaling: dict | None = None, **run) -> dict:
    from raydist import config as C
    from raydist.train.driver import run_training

    job = tiny_job(out, run={"name": name, **run}, optim={"epochs": epochs},
                   scaling={"num_workers": 2, "cpus_per_worker": 1, **(scaling or {})},
                   eval={"test_attacks": ["clean"], "test_samples": 64})
    path = out / f"{name}.yaml"
    path.write_text(yaml.safe_dump(job))
    return run_training(C.load_job(path, []))


def main() -> int:
    out = Path(sys.argv[1]).resolve()
    scenarios = sys.argv[2:] or ["kill_worker", "remove_node", "probe", "elastic"]  # elastic leaves a node fewer
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("RAY_TRAIN_ENABLE_STATE_TRACKING", "0")

    import ray

    # the dashboard serves the state API that Ray Train's placement-group cleaner polls; free ports keep it clear
    # of this test session's own Ray. Every node's processes start knowing the cluster's address (as
    # raydist.train.driver.start_local_ray does for raydist's own Ray), so the cleaner finds this cluster, not
    # whatever else runs on the machine.
    from ray._private.services import get_node_ip_address
    from ray.cluster_utils import Cluster

    gcs_port = free_port()
    os.environ["RAY_ADDRESS"] = f"{get_node_ip_address()}:{gcs_port}"
    # a worker group waits this long for its resources before Ray Train tries again (elastic: with fewer workers)
    os.environ["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] = "20"
    # a removed node is declared dead after 3 missed 1 s health checks (Ray's default: 5 of 3 s), as a cluster
    # would declare a lost spot instance; only how long the scenarios wait changes
    os.environ.setdefault("RAY_health_check_period_ms", "1000")
    os.environ.setdefault("RAY_health_check_failure_threshold", "3")
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "include_dashboard": True, "dashboard_port": free_port(), "gcs_server_port": gcs_port,
        "dashboard_agent_listen_port": free_port()})
    nodes = [cluster.add_node(num_cpus=1) for _ in range(2)]
    results: dict = {"head": cluster.head_node.node_id}
    try:
        os.environ["RAY_ADDRESS"] = cluster.address  # raydist's driver connects instead of starting a Ray
        ray.init(address=cluster.address, logging_level="warning", log_to_driver=True)
        cluster.wait_for_nodes()

        if "kill_worker" in scenarios:
            rec = results["kill_worker"] = {"nodes": [n.node_id for n in nodes]}

            def kill(r: dict) -> None:
                victim = _train_workers()[0]
                r["killed_pid"], r["killed_node"] = victim["Pid"], victim["Address"]["NodeID"]
                os.kill(victim["Pid"], signal.SIGKILL)

            thread = _after_first_epoch(out / "runs" / "kill_worker", out / "ray_storage" / "kill_worker", kill, rec)
            rec["summary"] = _train(out, "kill_worker", EPOCHS, max_failures=2,
                                    storage_path=(out / "ray_storage").as_uri())  # a file:// URI
            thread.join(timeout=5)
            # the run directory lost, Ray Train's storage kept: --resume rebuilds it from the stored checkpoint
            from raydist import config as C
            from raydist.train.driver import run_training

            (out / "runs" / "kill_worker").rename(out / "runs" / "kill_worker_lost")
            rec["restored"] = run_training(C.load_job(out / "kill_worker.yaml", []), resume=True)

        if "remove_node" in scenarios:
            rec = results["remove_node"] = {}

            # the replacement joins first (Node() cannot start from the fault thread); training needs 2 of the 3
            cluster.add_node(num_cpus=1)

            def remove(r: dict) -> None:
                busy = {w["Address"]["NodeID"] for w in _train_workers()}
                victim = next(n for n in cluster.worker_nodes if n.node_id in busy)
                cluster.remove_node(victim, allow_graceful=False)
                r["removed_node"] = victim.node_id
                r["idle_node"] = next(n.node_id for n in cluster.worker_nodes if n.node_id not in busy)

            thread = _after_first_epoch(out / "runs" / "remove_node", out / "runs" / "remove_node" / "ray" / "train",
                                        remove, rec)
            rec["summary"] = _train(out, "remove_node", EPOCHS, max_failures=2)
            thread.join(timeout=5)

        if "probe" in scenarios:
            from raydist.cluster import storage

            shared = out / "probe"
            storage.check_visible_from_every_node({"run.output_dir": shared})  # raises if any node misses it
            shared.mkdir(exist_ok=True)
            marker = shared / "marker"
            marker.write_text("written by the driver")
            results["probe"] = {
                "alive_nodes": sum(1 for n in ray.nodes() if n["Alive"]),
                "missing_when_shared": storage.nodes_missing(shared, "written by the driver", marker),
                "missing_when_not": storage.nodes_missing(shared, "a token no node has", marker),
                "leftover_markers": [p.name for p in shared.iterdir() if p.name.startswith(storage.MARKER_PREFIX)],
            }
        if "elastic" in scenarios:
            rec = results["elastic"] = {}

            def shrink(r: dict) -> None:
                busy = {w["Address"]["NodeID"] for w in _train_workers()}
                victim = next(n for n in cluster.worker_nodes if n.node_id in busy)
                cluster.remove_node(victim, allow_graceful=False)
                r["removed_node"] = victim.node_id

            thread = _after_first_epoch(out / "runs" / "elastic", out / "runs" / "elastic" / "ray" / "train",
                                        shrink, rec)
            rec["summary"] = _train(out, "elastic", ELASTIC_EPOCHS, scaling={"min_workers": 1, "resize_interval_s": 5},
                                    max_failures=3)
            thread.join(timeout=5)

    except Exception:  # noqa: BLE001
        results["error"] = traceback.format_exc()
    finally:
        (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
        ray.shutdown()
        cluster.shutdown()
    return 0 if "error" not in results else 1


if __name__ == "__main__":
    sys.exit(main())
