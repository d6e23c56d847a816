"""Where a run keeps its files, and the check that a multi-node run can reach them.

Two places, on purpose:

- ``run.output_dir`` holds the run directory (best.pt, last.pt, metrics.jsonl, curves.png, summary.json). It is a
  directory on disk that rank 0 writes and the driver reads, so on a multi-node cluster it must be a shared
  filesystem (NFS, EFS, Filestore, a PVC with ReadWriteMany).
- ``run.storage_path`` is Ray Train's own storage (``RunConfig(storage_path=...)``): the checkpoints it restarts a
  failed worker group from. It may be a local path, a shared path or any URI pyarrow opens (s3://, gs://, hdfs://,
  abfs://, file://). Default: ``<run directory>/ray``.

Ray itself notices a node-local path only when a remote worker first reports a checkpoint, after an epoch of
compute. :func:`check_visible_from_every_node` asks every alive node before anything starts.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

# the value checks live in config (job validation); this module is what touches the filesystems
from raydist.config import URI_SCHEMES, ConfigError, check_output_dir, check_storage_path, is_uri  # noqa: F401

DEFAULT_SUBDIR, DEFAULT_NAME = "ray", "train"
MARKER_PREFIX = ".raydist-visible-"
PROBE_TIMEOUT_S = 120


def ray_storage(cfg: dict[str, Any], run_dir: Path) -> tuple[str, str]:
    """(storage_path, name) for Ray Train's RunConfig: the experiment lives at storage_path/name."""
    path = cfg["run"]["storage_path"]
    if path is None:
        return str(run_dir / DEFAULT_SUBDIR), DEFAULT_NAME
    return path, cfg["run"]["name"]


def _filesystem(path: str):
    import pyarrow.fs

    if is_uri(path):
        return pyarrow.fs.FileSystem.from_uri(path)
    return pyarrow.fs.LocalFileSystem(), path


def experiment_exists(storage_path: str, name: str) -> bool:
    import pyarrow.fs

    fs, base = _filesystem(storage_path)
    return fs.get_file_info(f"{base}/{name}").type != pyarrow.fs.FileType.NotFound


def delete_experiment(storage_path: str, name: str) -> None:
    if experiment_exists(storage_path, name):
        fs, base = _filesystem(storage_path)
        fs.delete_dir(f"{base}/{name}")


def describe(storage_path: str, name: str) -> str:
    return f"{storage_path.rstrip('/')}/{name}"


def _sees(marker: str, token: str) -> tuple[str, bool]:
    """Runs on one node: does it read the token the driver wrote?"""
    import ray

    try:
        seen = Path(marker).read_text() == token
    except OSError:
        seen = False
    return ray.get_runtime_context().get_node_id(), seen


def _alive_nodes() -> dict[str, str]:
    """node id → address of every alive Ray node."""
    import ray

    return {n["NodeID"]: n.get("NodeManagerAddress", "?") for n in ray.nodes() if n.get("Alive")}


def nodes_missing(directory: Path, token: str, marker: Path, nodes: dict[str, str] | None = None) -> list[str]:
    """Ask every alive node (or ``nodes``) whether it reads ``token`` at ``marker``; returns the addresses of
    those that do not."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = _alive_nodes() if nodes is None else nodes
    probe = ray.remote(num_cpus=0, max_retries=0)(_sees)
    refs = [probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False)).remote(
        str(marker), token) for node_id in nodes]
    try:
        answers = dict(ray.get(refs, timeout=PROBE_TIMEOUT_S))
    except ray.exceptions.GetTimeoutError:
        raise ConfigError(f"could not ask every Ray node whether it sees {directory} within "
                          f"{PROBE_TIMEOUT_S}s") from None
    return [f"{nodes[n]} ({n[:8]})" for n in nodes if not answers.get(n, False)]


def check_visible_from_every_node(places: dict[str, Path]) -> None:
    """On a cluster of several nodes, refuse (ConfigError naming the key) a directory some node cannot see.

    ``places``: config key → local directory (created if missing). URIs are not probed: every node reaches
    object storage the same way. A single-node Ray needs no check.
    """
    nodes = _alive_nodes()
    if len(nodes) < 2:
        return
    for key, directory in places.items():
        directory.mkdir(parents=True, exist_ok=True)
        token = uuid.uuid4().hex
        marker = directory / f"{MARKER_PREFIX}{token}"
        marker.write_text(token)
        try:
            missing = nodes_missing(directory, token, marker, nodes)
        finally:
            marker.unlink(missing_ok=True)
        if missing:
            hint = "or a URI such as s3://bucket/raydist" if key == "run.storage_path" else "e.g. /mnt/shared/runs"
            raise ConfigError(f"{key}: {directory} is node-local: {len(missing)} Ray node(s) cannot see it "
                              f"({', '.join(missing)}); a multi-node run needs a directory every node shares "
                              f"({hint})")
