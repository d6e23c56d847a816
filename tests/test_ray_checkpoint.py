"""An epoch's files become Ray Train's checkpoint by hard links, and a restart finds best.pt where the pointer says."""

from __future__ import annotations

import json
import os

import ray.train

from raydist.train import ray_checkpoint as rc


def test_staging_links_the_files_and_a_later_write_leaves_the_snapshot_intact(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "last.pt").write_bytes(b"epoch 3 state")
    (run_dir / "best.pt").write_bytes(b"epoch 2 weights")
    staged = rc.stage(run_dir, 3, with_best=False, best_in="epoch_0002")
    assert sorted(p.name for p in staged.iterdir()) == ["last.pt", rc.POINTER]
    assert os.stat(staged / "last.pt").st_ino == os.stat(run_dir / "last.pt").st_ino  # a link: no bytes written
    assert json.loads((staged / rc.POINTER).read_text()) == {"best_in": "epoch_0002"}
    # the next epoch replaces last.pt atomically (a new file renamed over it): the staged link keeps epoch 3
    (run_dir / "last.tmp").write_bytes(b"epoch 4 state")
    os.replace(run_dir / "last.tmp", run_dir / "last.pt")
    assert (staged / "last.pt").read_bytes() == b"epoch 3 state"
    assert sorted(p.name for p in rc.stage(run_dir, 4, with_best=True, best_in="epoch_0004").iterdir()) == [
        "best.pt", "last.pt", rc.POINTER]


def test_checkpoints_holding_best_rank_first_newest_first():
    scores = {e: rc.keep_score(e, holds) for e, holds in ((1, True), (2, False), (3, True), (4, False))}
    assert sorted(scores, key=scores.get, reverse=True) == [3, 1, 4, 2]


def test_a_restart_reads_best_from_the_checkpoint_the_pointer_names(tmp_path):
    experiment = tmp_path / "train"
    for epoch, files in ((2, {"last.pt": b"L2", "best.pt": b"B2"}), (4, {"last.pt": b"L4"})):
        d = experiment / rc.dir_name(epoch)
        d.mkdir(parents=True)
        for name, data in files.items():
            (d / name).write_bytes(data)
        (d / rc.POINTER).write_text(json.dumps({"best_in": "epoch_0002"}))
    last, best = rc.restore(ray.train.Checkpoint(str(experiment / "epoch_0004")), lambda p: p.read_bytes())
    assert (last, best) == (b"L4", b"B2")
    last, best = rc.restore(ray.train.Checkpoint(str(experiment / "epoch_0002")), lambda p: p.read_bytes())
    assert (last, best) == (b"L2", b"B2")
