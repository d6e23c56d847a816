"""The per-worker training loop that Ray Train runs on every worker (or in the driver when num_workers=0).

One epoch: every worker trains on its own disjoint shard of the training split (data and augmentation on the
worker's device, metrics summed on the device and read once), then the validation split is sharded the same
way and clean and PGD accuracy are all-reduced, so every worker sees the same numbers and takes the same
decisions (best checkpoint, early stop). Rank 0 writes the run directory and hands Ray Train the checkpoint.
"""

from __future__ import annotations

import copy
import logging
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from raydist.atomic import write_atomic
from raydist.config import method_params, model_params
from raydist.data import DeviceLoader, load_dataset
from raydist.evaluate import accuracy_under_attacks
from raydist.methods import create_method
from raydist.methods.base import fused_optimizer_kwargs
from raydist.models import create_model, model_spec_for, save_checkpoint
from raydist.models.checkpoint import file_sha256, read_checkpoint
from raydist.track import TrainingTracker
from raydist.train import artifacts, ray_checkpoint
from raydist.train.quiet import quiet_loggers
from raydist.train.schedules import build_schedulers
from raydist.train.speed import compile_model, setup_device, use_compile
from raydist.train.watchdog import Watchdog

LAST, BEST = "last.pt", "best.pt"


def _all_reduce(values: dict[str, torch.Tensor]) -> dict[str, float]:
    """Sum each count over workers and read them all with one host synchronisation."""
    keys = sorted(values)
    flat = torch.stack([values[k].double() for k in keys])
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(flat)
    return dict(zip(keys, flat.tolist()))


def _sync_buffers(model: torch.nn.Module) -> None:
    """Give every worker rank 0's buffers (BatchNorm running statistics) before an evaluation. DDP broadcasts them
    at the start of each forward pass, so after the last training step each rank holds the statistics of its own
    last batch; evaluated that way, the all-reduced accuracy would not be that of the weights rank 0 saves."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        for buf in model.buffers():
            dist.broadcast(buf, src=0)


def _autocast(device: torch.device, precision: str):
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    if not use_bf16:
        return None
    return lambda: torch.autocast(device.type, dtype=torch.bfloat16)


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay for the weights, none for learnable activation parameters (decay would pull SmoothReLU's
    alpha down, away from what the data asks for)."""
    from raydist.models.activations import activation_parameters

    act = {id(p) for p in activation_parameters(model)}
    groups = [{"params": [p for p in model.parameters() if id(p) not in act], "weight_decay": weight_decay}]
    if act:
        groups.append({"params": [p for p in model.parameters() if id(p) in act], "weight_decay": 0.0})
    return groups


def _epoch_seed(seed: int, epoch: int, rank: int) -> int:
    # reseeding per epoch makes a resumed run draw exactly what an uninterrupted one would
    return (seed * 1_000_003 + epoch * 1009 + rank) % (2**63)


def _load_resume_state(resume: str | None, session) -> tuple[dict | None, dict | None]:
    """Training state and best weights: from Ray's checkpoint after a worker restart, else from --resume."""
    def read(last_path: Path) -> tuple[dict, dict | None]:
        best_path = last_path.with_name(BEST)
        best = read_checkpoint(best_path) if best_path.exists() else None
        return read_checkpoint(last_path, require=("train_state", "state_dict")), best

    ckpt = session.checkpoint()
    if ckpt is not None:  # best.pt may sit in an earlier checkpoint than the latest (see ray_checkpoint)
        return ray_checkpoint.restore(ckpt, lambda p: read_checkpoint(p, require=("state_dict",)))
    if resume:
        return read(Path(resume))
    return None, None


def _workers(rank: int, world: int, device: torch.device, images: torch.Tensor, first_epoch: int) -> list[dict]:
    """Where each worker ran and how many training images it processed since it (re)started; every rank
    takes part, rank 0's copy is written to summary.json."""
    import os
    import socket

    mine = {"rank": rank, "node_id": ray.get_runtime_context().get_node_id(),
            "node_ip": ray.util.get_node_ip_address(), "host": socket.gethostname(), "pid": os.getpid(),
            "device": str(device), "images": int(images.item()), "first_epoch": first_epoch}
    if world > 1 and dist.is_available() and dist.is_initialized():
        everyone: list[Any] = [None] * world
        dist.all_gather_object(everyone, mine)
        return sorted(everyone, key=lambda w: w["rank"])
    return [mine]


def _fmt_time(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def _say(line: str) -> None:
    """Print once: Ray Train's print patch would tee print() to its logger and the console twice."""
    sys.__stdout__.write(line + "\n")
    sys.__stdout__.flush()


def _progress_line(row: dict[str, Any], epochs: int, eta: float) -> str:
    done = int(20 * row["epoch"] / epochs)
    bar = "#" * done + "." * (20 - done)
    return (f"[{bar}] epoch {row['epoch']}/{epochs}  loss {row['train_loss']:.3f}  "
            f"train {100 * row['train_acc']:.1f}%  val clean {100 * row['val_clean_acc']:.1f}%  "
            f"val PGD-{row['val_steps']} {100 * row['val_pgd_acc']:.1f}%  "
            f"{row['images_per_sec']:.0f} img/s  elapsed {_fmt_time(row['elapsed'])}  ETA {_fmt_time(eta)}")


def _quiet_ray_train() -> None:
    """Ray Train logs every report at INFO through a logger named by its file path, which its own
    LoggingConfig level does not reach; our per-epoch line already says what matters."""
    quiet_loggers()
    try:
        from ray.train.v2._internal.execution import context as train_context

        logging.getLogger(train_context.__file__).setLevel(logging.WARNING)
    except ImportError:  # internal layout of another Ray version
        pass


class _TrainSession:
    """What the loop asks of Ray Train: its place in the worker group, the checkpoint to restart from, its share
    of the streamed datasets, DDP, and where each epoch's metrics and checkpoint go."""

    def __init__(self) -> None:
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()

    def device(self, use_gpu: bool) -> torch.device:
        return ray.train.torch.get_device() if use_gpu else torch.device("cpu")

    def checkpoint(self):
        return ray.train.get_checkpoint()

    def shard(self, split: str):
        return ray.train.get_dataset_shard(split)

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        return ray.train.torch.prepare_model(model, move_to_device=False)

    def report(self, row: dict[str, Any], checkpoint: dict[str, Any] | None) -> None:
        """Every rank reports; rank 0 passes the epoch's files as Ray Train's checkpoint (``checkpoint``: run_dir,
        epoch, with_best, best_in; see raydist.train.ray_checkpoint)."""
        if checkpoint is None:
            ray.train.report(row, checkpoint=None)
            return
        ray_checkpoint.report(row, **checkpoint)


class _TuneTrialSession:
    """A sweep trial with ``scaling.num_workers: 0`` trains inside its Tune trial process, one worker, with no
    Ray Train controller or worker actors to start. Ray refuses its Train API inside a Tune function
    (ray-project/ray#49454), so here the epoch goes to ``ray.tune.report`` and the trial's last.pt is its
    checkpoint (an interrupted sweep's trial resumes from it)."""

    rank, world = 0, 1

    def __init__(self, datasets: dict[str, Any] | None = None) -> None:
        self.datasets = datasets or {}

    def device(self, use_gpu: bool) -> torch.device:
        return torch.device("cuda", 0) if use_gpu else torch.device("cpu")  # Ray shows the trial only its GPU

    def checkpoint(self):
        return None

    def shard(self, split: str):
        return self.datasets[split]

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        return model

    def report(self, row: dict[str, Any], checkpoint: dict[str, Any] | None) -> None:
        from ray import tune as ray_tune

        ray_tune.report(row)


def _data_feed(job: dict[str, Any], common: dict[str, Any], seed: int, session) -> dict[str, Any]:
    """Loaders for train / val / test and what the model needs to know of the data.

    In memory (default): the dataset's uint8 splits on the device, this worker's disjoint shard each epoch
    (DeviceLoader). Streamed (data.stream): this worker's share of the Ray Datasets the driver passed to the
    trainer, decoded and augmented by Ray Data (random resized crop + flip for train, resize + center crop else).
    """
    data, ecfg = job["data"], job["eval"]
    if data["stream"]:
        from raydist.data import IMAGENET_MEAN, IMAGENET_STD, StreamingLoader, describe_parquet, shard_rows
        from raydist.data.common import default_root
        from raydist.data.imagenet import locate_image_dataset

        info = describe_parquet(locate_image_dataset(data["dataset"], default_root(data["root"])))
        world = common["world_size"]
        n_test = info.counts["test"] if ecfg["test_samples"] is None else min(ecfg["test_samples"],
                                                                               info.counts["test"])
        kw = {"device": common["device"], "channels_last": common["channels_last"]}

        def stream(split: str, batch: int, rows: int, **extra: Any) -> StreamingLoader:
            return StreamingLoader(session.shard(split), batch_size=batch,  # eval splits: unequal, nothing dropped
                                   num_rows=shard_rows(rows, world, equal=split == "train"), **kw, **extra)

        return {
            "num_classes": len(info.classes), "input_size": (3, data["image_size"], data["image_size"]),
            "mean": IMAGENET_MEAN, "std": IMAGENET_STD,
            "train": stream("train", data["batch_size"], info.counts["train"], local_shuffle_buffer_size=
                            4 * data["batch_size"]),
            "val": stream("val", data["eval_batch_size"], info.counts["val"]),
            "test": stream("test", data["eval_batch_size"], n_test),
        }
    splits = load_dataset(
        data["dataset"], root=data["root"], download=data["download"], val_size=data["val_size"],
        image_size=data["image_size"], num_classes=data["num_classes"], channels=data["channels"],
        train_size=data["train_size"], test_size=data["test_size"],
    )
    augment = {"crop": data["crop"], "flip": data["flip"]}
    n_test = len(splits.test_y) if ecfg["test_samples"] is None else min(ecfg["test_samples"], len(splits.test_y))
    return {
        "num_classes": splits.num_classes, "input_size": splits.input_size, "mean": splits.mean, "std": splits.std,
        "train": DeviceLoader(splits.train_x, splits.train_y, batch_size=data["batch_size"], shuffle=True,
                              augment=augment, seed=seed, **common),
        "val": DeviceLoader(splits.val_x, splits.val_y, batch_size=data["eval_batch_size"], shuffle=False, **common),
        "test": DeviceLoader(splits.test_x[:n_test], splits.test_y[:n_test], batch_size=data["eval_batch_size"],
                             shuffle=False, **common),
    }


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point. ``config``: {"job": resolved job config, "run_dir": str, "resume": str|None,
    "final_test": bool (default true)}; a sweep trial in its own process adds "tune_trial": true and, with
    data.stream, "datasets" (see _TuneTrialSession); "tracking": where rank 0 logs (raydist.track). A watchdog
    reports a step that stalls (run.stall_*)."""
    _quiet_ray_train()
    run = config["job"]["run"]
    watchdog = Watchdog(run.get("stall_warning_s"), fail_after_s=run.get("stall_timeout_s"))
    with watchdog, TrainingTracker(config) as tracker:
        _train(config, watchdog, tracker)


@dataclass
class _Setup:
    """What every step of a worker's run works with: its place, its data, its model and how it learns."""

    job: dict[str, Any]
    run_dir: Path
    session: Any  # _TrainSession or _TuneTrialSession
    rank: int
    world: int
    device: torch.device
    model: torch.nn.Module  # what trains: compiled and DDP-wrapped where asked
    base_model: torch.nn.Module  # the plain module: what is evaluated and saved
    spec: dict[str, Any]
    meta: dict[str, Any]  # travels with every checkpoint
    optimizer: torch.optim.Optimizer
    method: Any
    schedulers: list
    epochs: int
    updates_per_step: int
    train: Any
    val: Any
    test: Any


@dataclass
class _Progress:
    """Where the run stands; restored by _resume and written into every last.pt."""

    start_epoch: int = 0
    # best.pt: highest validation PGD accuracy (ties: higher clean), or the reverse with eval.select: clean
    best_score: tuple = (-1.0, -1.0)
    best_epoch: int = 0
    peak_pgd: float = 0.0
    train_seconds: float = 0.0
    stopped: bool = False
    best_weights: dict | None = None
    history: list = field(default_factory=list)  # metrics.jsonl's rows (rank 0)
    last_done: int = 0
    best_holder: str | None = None  # the Ray checkpoint of this group's that holds best.pt
    images_here: torch.Tensor | None = None  # this worker's own share, read once at the end


def _train(config: dict[str, Any], watchdog: Watchdog, tracker: TrainingTracker) -> None:
    """Set up, resume, then one epoch and its checkpoint at a time, then the final test."""
    s = _set_up(config)
    p = _resume(s, config.get("resume"))
    tracker.start(s.rank, s.job, s.run_dir)
    loop_start = time.perf_counter()
    for epoch in range(p.start_epoch, s.epochs):
        if p.stopped:
            break
        row, improved = _epoch(s, p, epoch, watchdog)
        checkpoint = _checkpoint(s, p, row, improved, tracker, loop_start) if s.rank == 0 else None
        s.session.report(row, checkpoint)
    if config.get("final_test", True):  # sweep trials select on validation only and skip the test set
        watchdog.beat("final test")
        workers = _workers(s.rank, s.world, s.device, p.images_here, p.start_epoch + 1)
        _final_test(s, p, workers, watchdog)
    tracker.finish()


def _set_up(config: dict[str, Any]) -> _Setup:
    """The worker's device and threads, its data, the model (compiled, DDP), optimizer, method and schedules."""
    job = config["job"]
    run, data, mcfg, ocfg = job["run"], job["data"], job["model"], job["optim"]
    in_trial = bool(config.get("tune_trial"))
    session = _TuneTrialSession(config.get("datasets")) if in_trial else _TrainSession()
    rank, world = session.rank, session.world
    device = session.device(job["scaling"]["use_gpu"])
    if device.type == "cpu" and (job["scaling"]["num_workers"] > 0 or in_trial):
        torch.set_num_threads(max(1, int(job["scaling"]["cpus_per_worker"])))
    channels_last = run["channels_last"] == "true" or (run["channels_last"] == "auto" and device.type == "cuda")
    seed = run["seed"]
    eps = job["method"]["epsilon"]

    common = {"device": device, "rank": rank, "world_size": world, "channels_last": channels_last}
    feed = _data_feed(job, common, seed, session)
    extra = model_params(job)
    torch.manual_seed(seed)  # identical initial weights on every worker
    model = create_model(mcfg["name"], num_classes=feed["num_classes"], activation=mcfg["activation"],
                         in_channels=feed["input_size"][0], mean=feed["mean"], std=feed["std"],
                         pretrained_path=mcfg["pretrained_path"], **extra)
    spec = model_spec_for(mcfg["name"], feed["num_classes"], mcfg["activation"], feed["input_size"][0],
                          list(feed["input_size"]), list(feed["mean"]), list(feed["std"]), **extra)
    model = model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    base_model = model
    setup_device(device)
    if use_compile(run["compile"], device):
        model = compile_model(model, run["compile_mode"], device)
    model = session.prepare(model)

    groups = _param_groups(base_model, ocfg["weight_decay"])
    optimizer = torch.optim.SGD(groups, lr=ocfg["lr"], momentum=ocfg["momentum"], nesterov=ocfg["nesterov"],
                                **fused_optimizer_kwargs(torch.optim.SGD, groups))
    method = create_method(job["method"]["name"], model, optimizer, epsilon=eps,
                           autocast=_autocast(device, run["precision"]),
                           label_smoothing=job["method"]["label_smoothing"], smooth_backward=mcfg["smooth_backward"],
                           **method_params(job))
    # Free-AT replays each minibatch m times inside one step() and, as in its paper, runs epochs / m epochs;
    # every schedule lands on the fraction of the run it names (train/schedules.py)
    updates_per_step = getattr(method, "updates_per_step", 1)
    epochs, schedulers = build_schedulers(ocfg, method, optimizer, len(feed["train"]))
    # the data section travels with the checkpoint so `raydist eval` finds the same test split
    meta = {"epsilon": eps, "method": job["method"]["name"], "dataset": data["dataset"], "data": dict(data)}
    return _Setup(job=job, run_dir=Path(config["run_dir"]), session=session, rank=rank, world=world, device=device,
                  model=model, base_model=base_model, spec=spec, meta=meta, optimizer=optimizer, method=method,
                  schedulers=schedulers, epochs=epochs, updates_per_step=updates_per_step,
                  train=feed["train"], val=feed["val"], test=feed["test"])


def _resume(s: _Setup, resume: str | None) -> _Progress:
    """Continue from Ray's checkpoint after a worker restart, else from --resume's last.pt, else start afresh;
    rank 0 rebuilds a lost run directory from the checkpoint and drops metrics rows never checkpointed."""
    p = _Progress(images_here=torch.zeros((), device=s.device, dtype=torch.float64))
    state, best_ckpt = _load_resume_state(resume, s.session)
    if state is not None:
        ts = state["train_state"]
        s.base_model.load_state_dict(state["state_dict"])
        s.optimizer.load_state_dict(ts["optimizer"])
        for sched, sd in zip(s.schedulers, ts["schedulers"]):
            sched.load_state_dict(sd)
        s.method.load_state_dict(ts["method"])
        p.start_epoch, p.best_score, p.best_epoch = ts["epoch"], tuple(ts["best_score"]), ts["best_epoch"]
        for sched in s.schedulers:
            # the schedule's place is the epoch boundary it stopped at: with another number of workers (an elastic
            # run that shrank or grew) an epoch has another number of steps, and the saved step count would land
            # the lr elsewhere on the schedule
            sched.last_epoch = p.start_epoch * len(s.train) * s.updates_per_step
        p.peak_pgd = ts["peak_pgd"]
        p.train_seconds, p.stopped = ts["train_seconds"], ts["stopped"]
        if best_ckpt is not None:
            p.best_weights = best_ckpt["state_dict"]
        if s.rank == 0:
            # a run directory lost while Ray's storage kept the checkpoint: rebuild it from the checkpoint
            for name, ckpt in ((LAST, state), (BEST, best_ckpt)):
                if ckpt is not None and not (s.run_dir / name).exists():
                    write_atomic(s.run_dir / name, lambda f, c=ckpt: torch.save(c, f))
            if not artifacts.read_metrics(s.run_dir):
                for row in ts.get("history", []):
                    artifacts.append_metrics(s.run_dir, row)
            _say(f"resuming {s.run_dir.name} after epoch {p.start_epoch}/{s.epochs}")
    if s.rank == 0:  # drop rows of an epoch that a failed attempt recorded but never checkpointed
        artifacts.truncate_metrics(s.run_dir, p.start_epoch)
        p.history = artifacts.read_metrics(s.run_dir)
    p.last_done = p.start_epoch
    return p


def _epoch(s: _Setup, p: _Progress, epoch: int, watchdog: Watchdog) -> tuple[dict[str, Any], bool]:
    """Train one epoch on this worker's shard, validate (clean and PGD, all-reduced), keep the best weights and
    apply the early-stop guard; returns the epoch's metrics row and whether it is the best so far."""
    ecfg, seed, eps = s.job["eval"], s.job["run"]["seed"], s.job["method"]["epsilon"]
    device, epochs = s.device, s.epochs
    torch.manual_seed(_epoch_seed(seed, epoch, s.rank))
    s.train.set_epoch(epoch)
    s.model.train()
    sums = {"loss": torch.zeros((), device=device), "correct": torch.zeros((), device=device),
            "n": torch.zeros((), device=device)}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for x, y in watchdog.beating(s.train, f"epoch {epoch + 1}/{epochs}, training step"):
        loss, logits = s.method.step(x, y)
        for _ in range(s.updates_per_step):
            for sched in s.schedulers:
                sched.step()
        sums["loss"] += loss.float() * y.shape[0]
        sums["correct"] += (logits.argmax(1) == y).sum()
        sums["n"] += y.shape[0]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    epoch_seconds = time.perf_counter() - t0
    p.train_seconds += epoch_seconds
    p.images_here += sums["n"]
    tr = _all_reduce(sums)
    val_attacks = ["clean", f"pgd{ecfg['val_steps']}"]
    _sync_buffers(s.base_model)  # the model rank 0 saves below is the one validated
    batches = watchdog.beating(s.val, f"epoch {epoch + 1}/{epochs}, validation batch")
    val = _all_reduce(accuracy_under_attacks(s.base_model, batches, val_attacks, eps, seed=seed + epoch))
    watchdog.beat(f"epoch {epoch + 1}/{epochs}, checkpoint and report")
    if not math.isfinite(tr["loss"]):
        raise FloatingPointError(f"training loss is {tr['loss']} at epoch {epoch + 1}: the run diverged")

    row = {
        "epoch": epoch + 1,
        "train_loss": tr["loss"] / tr["n"],
        "train_acc": tr["correct"] / tr["n"],
        "val_clean_acc": val["clean"] / val["n"],
        "val_pgd_acc": val[val_attacks[1]] / val["n"],
        "val_steps": ecfg["val_steps"],
        "lr": s.optimizer.param_groups[0]["lr"],
        "images_per_sec": tr["n"] / max(epoch_seconds, 1e-9),
        "epoch_seconds": epoch_seconds,
        "elapsed": p.train_seconds,
        "workers": s.world,  # an elastic run's size can change between epochs
    }
    score = (row["val_pgd_acc"], row["val_clean_acc"])
    if ecfg["select"] == "clean":
        score = score[::-1]
    improved = score > p.best_score
    if improved:
        p.best_score, p.best_epoch = score, epoch + 1
        p.best_weights = {k: v.detach().to("cpu", copy=True) for k, v in s.base_model.state_dict().items()}
    p.peak_pgd = max(p.peak_pgd, row["val_pgd_acc"])
    if ecfg["guard_drop"] is not None and p.peak_pgd - row["val_pgd_acc"] > ecfg["guard_drop"]:
        p.stopped = True
    row.update(best_epoch=p.best_epoch, stopped=p.stopped)
    p.last_done = epoch + 1
    return row, improved


def _checkpoint(s: _Setup, p: _Progress, row: dict[str, Any], improved: bool, tracker: TrainingTracker,
                loop_start: float) -> dict[str, Any]:
    """Rank 0: last.pt (and best.pt when it improved), the metrics row, its plot and progress line; returns what
    Ray Train's checkpoint of this epoch holds (see raydist.train.ray_checkpoint)."""
    run, mcfg, epoch = s.job["run"], s.job["model"], row["epoch"]
    t_ckpt = time.perf_counter()
    train_state = {
        "epoch": epoch, "optimizer": s.optimizer.state_dict(),
        "schedulers": [sched.state_dict() for sched in s.schedulers], "method": s.method.state_dict(),
        "best_score": list(p.best_score), "best_epoch": p.best_epoch, "peak_pgd": p.peak_pgd,
        "train_seconds": p.train_seconds,
        "stopped": p.stopped, "torch_rng": torch.get_rng_state(),
        "history": [*p.history, row],  # metrics.jsonl's rows, to rebuild a lost run directory
    }
    save_checkpoint(s.run_dir / LAST, s.base_model, model_spec=s.spec, epoch=epoch, metrics=row,
                    train_state=train_state, **s.meta)
    if improved:
        save_checkpoint(s.run_dir / BEST, s.base_model, model_spec=s.spec, epoch=epoch, metrics=row,
                        method_state=s.method.state_dict(), **s.meta)
    row["checkpoint_seconds"] = time.perf_counter() - t_ckpt  # what training waits for at the epoch's end
    artifacts.append_metrics(s.run_dir, row)
    tracker.epoch(row)
    p.history.append(row)
    artifacts.plot_curves(s.run_dir, p.history, title=f"{run['name']}: {s.job['method']['name']}, "
                                                      f"{mcfg['name']} ({mcfg['activation']})")
    # best.pt travels in an epoch's Ray checkpoint when it changed, and in the first one a (re)started
    # group reports (an earlier run's checkpoints may be gone)
    with_best = (s.run_dir / BEST).exists() and (improved or p.best_holder is None)
    if with_best:
        p.best_holder = ray_checkpoint.dir_name(epoch)
    if run["progress"]:
        per_epoch = (time.perf_counter() - loop_start) / (epoch - p.start_epoch)  # validation included
        remaining = 0 if p.stopped else (s.epochs - epoch) * per_epoch
        _say(_progress_line(row, s.epochs, remaining))
        if p.stopped:
            _say(f"validation PGD accuracy fell {100 * (p.peak_pgd - row['val_pgd_acc']):.1f} points below "
                 f"its peak of {100 * p.peak_pgd:.1f}%: stopping (eval.guard_drop); "
                 f"best.pt is epoch {p.best_epoch}")
    return {"run_dir": s.run_dir, "epoch": epoch, "with_best": with_best, "best_in": p.best_holder}


def _final_test(s: _Setup, p: _Progress, workers: list[dict], watchdog: Watchdog) -> None:
    """Evaluate the last and the best weights on the test set (never used for selection); rank 0 writes it."""
    job, run_dir, base_model, spec, meta = s.job, s.run_dir, s.base_model, s.spec, s.meta
    attacks = list(job["eval"]["test_attacks"])
    if "clean" not in attacks:
        attacks.insert(0, "clean")
    eps = job["method"]["epsilon"]
    seed = job["run"]["seed"]
    results = {}
    last_weights = copy.deepcopy(base_model.state_dict())
    for which, weights in (("last", None), ("best", p.best_weights)):
        if weights is not None:
            base_model.load_state_dict(weights)
        _sync_buffers(base_model)  # the weights in rank 0's last.pt / best.pt, on every rank
        batches = watchdog.beating(s.test, f"final test of {which}.pt, batch")
        counts = _all_reduce(accuracy_under_attacks(base_model, batches, attacks, eps, seed=seed + 7919))
        results[which] = {"accuracy": {a: counts[a] / counts["n"] for a in attacks}, "n": int(counts["n"])}
    base_model.load_state_dict(last_weights)
    if s.rank != 0:
        return
    results["last"]["epoch"] = p.last_done
    results["best"]["epoch"] = p.best_epoch if p.best_weights is not None else p.last_done
    for which, name in (("last", LAST), ("best", BEST)):  # the weights each row is of
        if (run_dir / name).is_file():
            results[which]["sha256"] = file_sha256(run_dir / name)
    summary = {
        "run": job["run"]["name"], "method": meta["method"], "model": f"{spec['name']} ({spec['activation']})",
        "dataset": meta["dataset"], "epsilon": eps, "epsilon_text": _eps_text(eps), "attacks": attacks,
        "n_test": results["last"]["n"], "train_minutes": p.train_seconds / 60.0,
        "best": results["best"], "last": results["last"], "workers": workers,
    }
    artifacts.write_json(run_dir / artifacts.SUMMARY, summary)


def _eps_text(eps: float) -> str:
    k = eps * 255
    return f"{round(k)}/255" if abs(k - round(k)) < 1e-6 else f"{eps:g}"
