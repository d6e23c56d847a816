"""How an epoch's last.pt and best.pt become Ray Train's checkpoint, and how a restarted worker group gets them back.

Each epoch rank 0 writes last.pt (and best.pt when it improved) into the run directory, once, atomically (a new
file renamed over the old one). Ray Train then needs its own copy in ``run.storage_path`` to restart a failed
worker group. What it gets, and what that costs:

- The checkpoint directory handed to ``ray.train.report`` holds hard links to those files, not copies: no bytes
  written, and since every write of last.pt replaces the file (a new inode), a link stays a consistent snapshot
  while the upload reads it in the background.
- The upload is asynchronous (``CheckpointUploadMode.ASYNC``): the next epoch trains while it runs. Into local
  storage (the default ``<run dir>/ray``, or any path) the upload links the files too; into object storage
  (s3://, gs://, ...) it copies them.
- best.pt goes into an epoch's checkpoint only when it changed; every checkpoint carries ``raydist_best.json``
  naming the checkpoint that holds the current best.pt, and Ray Train keeps that one as well as the latest
  (``checkpoint_score_attribute``: the epoch, ranked first where best.pt is).

Before, each epoch wrote both files three times over (run directory, a temporary copy, Ray's copy), best.pt
unchanged or not, and training waited for all of it.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

POINTER = "raydist_best.json"
KEEP = "raydist_keep"  # the metric Ray Train's CheckpointConfig ranks checkpoints by
LAST, BEST = "last.pt", "best.pt"


def dir_name(epoch: int) -> str:
    return f"epoch_{epoch:04d}"


def keep_score(epoch: int, holds_best: bool) -> float:
    """Checkpoints holding best.pt rank above all others, the newest first; among the rest the newest first
    (Ray Train keeps the latest checkpoint in any case)."""
    return epoch + (1_000_000 if holds_best else 0)


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another filesystem, or one without hard links
        shutil.copy2(src, dst)


def stage(run_dir: Path, epoch: int, with_best: bool, best_in: str | None) -> Path:
    """A directory beside the run's files holding this epoch's checkpoint as links: last.pt, best.pt when it
    changed this epoch, and the pointer to the checkpoint that holds the current best.pt."""
    staged = run_dir / f".ray-{dir_name(epoch)}"
    shutil.rmtree(staged, ignore_errors=True)  # left by a worker that died before its upload
    staged.mkdir()
    _link_or_copy(run_dir / LAST, staged / LAST)
    if with_best:
        _link_or_copy(run_dir / BEST, staged / BEST)
    (staged / POINTER).write_text(json.dumps({"best_in": best_in}))
    return staged


def upload(checkpoint, checkpoint_dir_name: str):
    """Ray Train's ``checkpoint_upload_fn``: links into local storage, copies into any other."""
    import pyarrow.fs
    import ray.train

    storage = ray.train.get_context().get_storage()
    fs, dest = storage.storage_filesystem, f"{storage.experiment_fs_path}/{checkpoint_dir_name}"
    if isinstance(fs, pyarrow.fs.LocalFileSystem):
        Path(dest).mkdir(parents=True, exist_ok=True)
        for f in Path(checkpoint.path).iterdir():
            target = Path(dest) / f.name
            if target.exists():
                target.unlink()
            _link_or_copy(f, target)
    else:
        pyarrow.fs.copy_files(checkpoint.path, dest, destination_filesystem=fs)
    return ray.train.Checkpoint(dest, filesystem=fs)


def report(row: dict[str, Any], run_dir: Path, epoch: int, with_best: bool, best_in: str | None) -> None:
    """Rank 0's ``ray.train.report`` with this epoch's checkpoint, uploaded in the background."""
    import ray.train
    from ray.train import CheckpointUploadMode

    staged = stage(run_dir, epoch, with_best, best_in)
    ray.train.report({**row, KEEP: keep_score(epoch, with_best)},
                     checkpoint=ray.train.Checkpoint.from_directory(str(staged)),
                     checkpoint_dir_name=dir_name(epoch), checkpoint_upload_mode=CheckpointUploadMode.ASYNC,
                     delete_local_checkpoint_after_upload=True, checkpoint_upload_fn=upload)


def restore(checkpoint, read) -> tuple[Any, Any]:
    """(last, best) from the checkpoint Ray Train restarted a worker group with; ``read(path)`` loads one file.
    best.pt comes from the checkpoint the pointer names, which Ray Train kept beside the latest."""
    import ray.train

    with checkpoint.as_directory() as d:
        last = read(Path(d) / LAST)
        best = read(Path(d) / BEST) if (Path(d) / BEST).exists() else None
        pointer = Path(d) / POINTER
        best_in = json.loads(pointer.read_text()).get("best_in") if pointer.exists() else None
    if best is None and best_in:
        holder = ray.train.Checkpoint(f"{str(checkpoint.path).rstrip('/').rsplit('/', 1)[0]}/{best_in}",
                                      filesystem=checkpoint.filesystem)
        with holder.as_directory() as d:
            best = read(Path(d) / BEST) if (Path(d) / BEST).exists() else None
    return last, best
