"""The driver side of `raydist train`: the run directory, Ray start-up and the TorchTrainer."""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path
from typing import Any

from raydist import config as C
from raydist.cluster import storage
from raydist.track import tracking_context
from raydist.train import artifacts, quiet, ray_checkpoint
from raydist.train.loop import BEST, LAST, train_loop_per_worker


def run_dir_of(cfg: dict[str, Any]) -> Path:
    return (Path(cfg["run"]["output_dir"]) / cfg["run"]["name"]).resolve()


def check_run_dir(cfg: dict[str, Any], *, overwrite: bool = False, resume: bool = False) -> str | None:
    """Check the run directory can be used, changing nothing; returns the checkpoint to resume from, if any.

    Nothing the user made is replaced silently: an existing run needs --resume (continue it) or --overwrite
    (delete it and start again). Every refusal is a ConfigError, raised before Ray starts.
    """
    run_dir = run_dir_of(cfg)
    if overwrite and resume:
        raise C.ConfigError("--resume and --overwrite exclude each other")
    if resume:
        last = run_dir / LAST
        if not last.exists():  # a directory in its place is named as one below
            if cfg["run"]["storage_path"] is not None and storage.experiment_exists(*storage.ray_storage(cfg, run_dir)):
                return None  # the run directory is gone, Ray Train's storage is not: Ray restores from it
            raise C.ConfigError(f"--resume: no checkpoint to resume at {last}")
        saved_path = run_dir / artifacts.CONFIG
        if saved_path.is_file():
            saved = C.mapping(C.read_yaml(saved_path, "--resume: "), f"--resume: {saved_path}")
            diff = C.differences(saved, cfg, ignore_sections=("run", *C.TRACKING_SECTIONS))
            diff = [d for d in diff if not d.startswith("optim.epochs")]
            if diff:
                raise C.ConfigError(f"--resume: the job differs from {saved_path} in {', '.join(diff)}")
        _check_loadable(last, cfg)
        if (run_dir / BEST).exists():
            _check_loadable(run_dir / BEST, cfg, require=("state_dict",))
        return str(last)
    if run_dir.exists() and any(run_dir.iterdir()) and not overwrite:
        raise C.ConfigError(f"run directory {run_dir} already exists "
                            "(--resume continues it, --overwrite deletes it and starts again)")
    if cfg["run"]["storage_path"] is not None and not overwrite:
        # Ray Train restores a run it finds at storage_path/name, so a fresh run must not start on top of one
        path, name = storage.ray_storage(cfg, run_dir)
        if storage.experiment_exists(path, name):
            raise C.ConfigError(f"run.storage_path: {storage.describe(path, name)} already holds Ray Train "
                                "checkpoints of a run with this name (--resume continues it, --overwrite deletes it)")
    return None


def create_run_dir(cfg: dict[str, Any], *, overwrite: bool = False) -> Path:
    """Create (or, with --overwrite, recreate) the run directory and write the resolved config into it."""
    run_dir = run_dir_of(cfg)
    if overwrite and run_dir.exists():
        shutil.rmtree(run_dir)
    if overwrite and cfg["run"]["storage_path"] is not None:
        storage.delete_experiment(*storage.ray_storage(cfg, run_dir))
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / artifacts.CONFIG).write_text(C.dump(cfg))
    return run_dir


def _check_loadable(path: Path, cfg: dict[str, Any], require: tuple[str, ...] = ("train_state", "state_dict")) -> None:
    """The checkpoint a resume starts from: readable, safe, whole, and of this job's model, dataset and method
    (a last.pt copied from another run would otherwise fail inside the workers, or train on from it)."""
    from raydist.models.checkpoint import CheckpointError, check_fits, read_checkpoint

    try:
        ckpt = read_checkpoint(path, require=require)
        check_fits(ckpt, path)
    except CheckpointError as err:
        raise C.ConfigError(f"--resume: {err}") from None
    spec, job = ckpt["model"], cfg["model"]
    theirs = {"model.name": spec.get("name"), "model.activation": spec.get("activation"),
              "model builder arguments": spec.get("kwargs"), "data.dataset": ckpt.get("dataset"),
              "method.name": ckpt.get("method")}
    ours = {"model.name": job["name"], "model.activation": job["activation"],
            "model builder arguments": C.model_params(cfg), "data.dataset": cfg["data"]["dataset"],
            "method.name": cfg["method"]["name"]}
    differ = [f"{k} {theirs[k]!r}, not {ours[k]!r}" for k in ours if theirs[k] is not None and theirs[k] != ours[k]]
    if differ:
        raise C.ConfigError(f"--resume: {path} is from another run ({'; '.join(differ)}); resume it with its own "
                            "job file, or --overwrite to start this one again")


def ensure_ray(cfg: dict[str, Any] | None = None) -> None:
    """Connect to RAY_ADDRESS if set, else start a local single-node Ray of our own (unless this process already
    has one). A cluster that `ray start` left running on this machine is used only when RAY_ADDRESS names it."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
        quiet.filter_driver_logs()
    else:
        # the dashboard hosts the state API that Ray Train's placement-group cleaner polls
        start_local_ray(include_dashboard=True, log_to_driver=True, object_store_memory=object_store_bytes(cfg),
                        logging_level="warning")


SMALL_OBJECT_STORE_MB = 512


def object_store_bytes(cfg: dict[str, Any] | None) -> int | None:
    """The object store of the local Ray raydist starts: RAYDIST_OBJECT_STORE_MB when set (0: Ray's default, 30%
    of memory); else Ray's default for a job that streams data through Ray Data (decoded batches live there), and
    512 MB for everything else (in-memory datasets and checkpoints do not pass through it)."""
    env = os.environ.get("RAYDIST_OBJECT_STORE_MB")
    if env is not None:
        try:
            mb = int(env)
        except ValueError:
            raise C.ConfigError(f"RAYDIST_OBJECT_STORE_MB={env!r}: give a whole number of MB") from None
        if mb < 0:
            raise C.ConfigError(f"RAYDIST_OBJECT_STORE_MB={env!r}: give a whole number of MB")
        return mb * 1024 * 1024 or None
    if cfg is not None and cfg.get("data", {}).get("stream"):
        return None
    return SMALL_OBJECT_STORE_MB * 1024 * 1024


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


def start_local_ray(**init_kwargs: Any) -> str:
    """Start a local Ray that every Ray process of the run finds; returns its GCS address.

    Ray components that look a cluster up by themselves (Ray Train's placement-group cleaner, the state API
    behind it) read RAY_ADDRESS, else the file ``ray_current_cluster`` in Ray's temp directory, which names the
    last ``ray start`` head on the machine: a dead one (a terminal killed without ``ray stop``) made the cleaner
    time out and die, leaking each finished sweep trial's placement group until the next trials waited forever
    for CPUs; a live foreign one answered that the controller did not exist, so the cleaner removed a running
    trial's placement group. So the GCS port is chosen here and the raylet (and through it every worker, actor
    and agent) is started with RAY_ADDRESS naming this instance; the driver's own environment is left as it
    was (RAY_ADDRESS there means "a cluster the user named")."""
    import ray
    from ray._private.services import get_node_ip_address

    quiet.prepare_local_env()  # the dashboard's Train view on, Ray's start-up notices off (raydist.train.quiet)
    saved = {k: os.environ.get(k) for k in ("RAY_ADDRESS", "RAY_GCS_SERVER_PORT")}
    last_error: Exception | None = None
    for _ in range(3):  # a port taken between the probe and the GCS binding it: try another
        port = _free_port()
        address = f"{get_node_ip_address()}:{port}"
        os.environ.update(RAY_ADDRESS=address, RAY_GCS_SERVER_PORT=str(port))
        try:
            ray.init(address="local", **init_kwargs)
            break
        except (ConnectionError, RuntimeError) as err:
            last_error = err
            ray.shutdown()
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
    else:
        raise RuntimeError(f"could not start a local Ray: {last_error}")
    quiet.filter_driver_logs()
    return ray.get_runtime_context().gcs_address


def check_resources(cfg: dict[str, Any]) -> None:
    """On a local Ray, refuse a scaling section the machine cannot satisfy (Ray would wait forever)."""
    import ray

    if os.environ.get("RAY_ADDRESS"):
        return  # a cluster may autoscale to meet the request
    sc = cfg["scaling"]
    if sc["num_workers"] == 0:
        if sc["use_gpu"]:
            import torch

            if not torch.cuda.is_available():
                raise C.ConfigError("scaling.use_gpu: true, but this machine has no CUDA GPU")
        return
    total = ray.cluster_resources()
    workers = sc["min_workers"] or sc["num_workers"]  # an elastic run starts on as few as min_workers
    need_cpu = workers * sc["cpus_per_worker"]
    if need_cpu > total.get("CPU", 0) + 1e-9:
        raise C.ConfigError(f"scaling: {workers} workers x {sc['cpus_per_worker']:g} CPUs need "
                            f"{need_cpu:g} CPUs, this Ray cluster has {total.get('CPU', 0):g} "
                            "(lower scaling.num_workers or scaling.cpus_per_worker)")
    if sc["use_gpu"]:
        need_gpu = workers * sc["gpus_per_worker"]
        if need_gpu > total.get("GPU", 0) + 1e-9:
            raise C.ConfigError(f"scaling.use_gpu: {workers} workers x {sc['gpus_per_worker']:g} GPUs "
                                f"need {need_gpu:g} GPUs, this Ray cluster has {total.get('GPU', 0):g}")


def check_shared_storage(cfg: dict[str, Any]) -> None:
    """On a multi-node cluster, refuse a run directory or checkpoint storage that some node cannot see."""
    places = {"run.output_dir": run_dir_of(cfg).parent}
    path = cfg["run"]["storage_path"]
    if path is not None and not storage.is_uri(path):
        places["run.storage_path"] = Path(path)
    storage.check_visible_from_every_node(places)


def streamed_datasets(cfg: dict[str, Any]) -> dict[str, Any] | None:
    """With data.stream: lazy Ray Datasets of the parquet copy's train / val / test splits (decoded and augmented
    by Ray Data tasks, re-run every epoch); Ray Train hands each worker a disjoint share of each, equal for train
    (streaming.data_config), covering every row for val and test."""
    data = cfg["data"]
    if not data["stream"]:
        return None
    from raydist.data import image_dataset
    from raydist.data.common import default_root
    from raydist.data.imagenet import locate_image_dataset

    path = locate_image_dataset(data["dataset"], default_root(data["root"]))
    size = data["image_size"]
    test = image_dataset(path, "test", image_size=size)
    if cfg["eval"]["test_samples"] is not None:
        test = test.limit(cfg["eval"]["test_samples"])
    return {"train": image_dataset(path, "train", image_size=size, flip=data["flip"]),
            "val": image_dataset(path, "val", image_size=size), "test": test}


def startup_retries(wait_s: float | None) -> int:
    """Ray Train's ``controller_failure_limit`` for ``run.resource_wait_s``: each attempt to start the worker group
    waits RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S (60 s by default) for its placement group, then is retried; by
    default without end, which on a busy or broken cluster is a run that waits in silence for ever."""
    if wait_s is None:
        return -1
    per_attempt = float(os.environ.get("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", 60.0))
    return max(1, math.ceil(wait_s / per_attempt))


def fit(trainer, cfg: dict[str, Any]):
    """``trainer.fit()``, with a run that never got its workers' resources reported as such (Ray Train says "the
    worker group startup timed out after 60 s", each of its attempts, behind "controller error")."""
    from ray.train.v2.api.exceptions import ControllerError

    try:
        return trainer.fit()
    except ControllerError as err:
        from ray.train.v2._internal.exceptions import WorkerGroupStartupTimeoutError

        if not isinstance(err.controller_failure, WorkerGroupStartupTimeoutError):
            raise
        import ray

        sc = cfg["scaling"]
        need = f"{sc['num_workers']} worker(s) x {sc['cpus_per_worker']:g} CPU" + (
            f" + {sc['gpus_per_worker']:g} GPU" if sc["use_gpu"] else "")
        free = ray.available_resources()
        raise RuntimeError(f"the Ray Train workers ({need}) did not get their resources within run.resource_wait_s "
                           f"= {cfg['run']['resource_wait_s']:g} s; free now: {free.get('CPU', 0):g} CPU, "
                           f"{free.get('GPU', 0):g} GPU") from None


def scaling_kwargs(sc: dict[str, Any]) -> dict[str, Any]:
    """A fixed number of workers, or with scaling.min_workers Ray Train's elastic range: after a lost node the run
    restarts from its last checkpoint on the workers that fit now (at least min_workers) instead of waiting for a
    replacement, and every resize_interval_s a healthy run checks whether it can grow back (restarting from its
    last checkpoint on more workers). Each worker keeps data.batch_size, so the global batch follows the number
    of workers; the lr schedule stays on its epochs (see the loop's resume)."""
    if sc["min_workers"] is None:
        return {"num_workers": sc["num_workers"]}
    return {"num_workers": (sc["min_workers"], sc["num_workers"]),
            "elastic_resize_monitor_interval_s": sc["resize_interval_s"]}


def build_trainer(cfg: dict[str, Any], resume: str | None, callbacks: list | None = None, final_test: bool = True,
                  tracking: dict[str, Any] | None = None):
    """The Ray Train V2 TorchTrainer for a resolved job config (``callbacks``: e.g. Tune's report callback;
    ``tracking``: where rank 0 logs, see raydist.track; default: the job's tracking section)."""
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    sc = cfg["scaling"]
    resources = {"CPU": sc["cpus_per_worker"]}
    if sc["use_gpu"]:
        resources["GPU"] = sc["gpus_per_worker"]
    run_dir = run_dir_of(cfg)
    storage_path, name = storage.ray_storage(cfg, run_dir)
    datasets = streamed_datasets(cfg)
    extra = {}
    if datasets is not None:  # train split equally, val / test unequally: evaluation reads every image once
        from raydist.data.streaming import data_config

        extra["dataset_config"] = data_config()
    return TorchTrainer(
        train_loop_per_worker,
        datasets=datasets,
        **extra,
        train_loop_config={"job": cfg, "run_dir": str(run_dir), "resume": resume, "final_test": final_test,
                           "tracking": tracking or tracking_context(cfg["tracking"], run_dir.parent)},
        scaling_config=ScalingConfig(**scaling_kwargs(sc), use_gpu=sc["use_gpu"],
                                     resources_per_worker=resources if sc["num_workers"] else None),
        run_config=RunConfig(
            name=name,
            storage_path=storage_path,
            failure_config=FailureConfig(max_failures=cfg["run"]["max_failures"],
                                         controller_failure_limit=startup_retries(cfg["run"]["resource_wait_s"])),
            # the latest checkpoint (always kept) and the one holding best.pt (see raydist.train.ray_checkpoint)
            checkpoint_config=CheckpointConfig(num_to_keep=2, checkpoint_score_attribute=ray_checkpoint.KEEP,
                                               checkpoint_score_order="max"),
            logging_config=LoggingConfig(log_level="WARNING"),  # our own per-epoch line says what matters
            callbacks=callbacks or None,
        ),
    )


def _workers_text(sc: dict[str, Any]) -> str:
    n, low = sc["num_workers"], sc["min_workers"]
    return f"{low} to {n} (elastic)" if low is not None and low < n else str(n)


def run_training(cfg: dict[str, Any], *, overwrite: bool = False, resume: bool = False) -> dict[str, Any]:
    """Train one job end to end; returns summary.json's content and prints the table."""
    resume_path = check_run_dir(cfg, overwrite=overwrite, resume=resume)
    ensure_ray(cfg)
    check_resources(cfg)
    check_shared_storage(cfg)
    run_dir = create_run_dir(cfg, overwrite=overwrite and not resume)
    print(f"raydist: training {cfg['method']['name']} on {cfg['data']['dataset']} with "
          f"{_workers_text(cfg['scaling'])} Ray Train worker(s); run directory {run_dir}", flush=True)
    fit(build_trainer(cfg, resume_path), cfg)
    summary = json.loads((run_dir / artifacts.SUMMARY).read_text())
    print("\n" + artifacts.format_table(summary))
    print(f"\nrun directory: {run_dir} (best.pt, last.pt, metrics.jsonl, curves.png, summary.json)")
    return summary
