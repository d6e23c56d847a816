"""Crash consistency: a writer killed (SIGKILL) in the middle of rewriting last.pt / best.pt, a parquet part or a
sweep's trials.csv leaves the previous version readable; metrics.jsonl never yields a torn row."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from raydist.atomic import append_line, read_lines, write_atomic
from raydist.train import artifacts

ROOT = Path(__file__).resolve().parents[1]

# each child rewrites one file in a loop, version after version, and prints a version once it is written
WRITERS = {
    "checkpoint": """
import torch
from raydist.models import create_model, save_checkpoint
model = create_model("resnet18", num_classes=10, width=4, in_channels=1)
i = 0
while True:
    save_checkpoint(TARGET, model, epoch=i, big=torch.full((1_000_000,), float(i)))
    print(i, flush=True); i += 1
""",
    "parquet": """
import pyarrow as pa, pyarrow.parquet as pq
from raydist.atomic import write_atomic
i = 0
while True:
    t = pa.table({"v": pa.array([i] * 1_000_000, pa.int64())})
    write_atomic(TARGET, lambda f: pq.write_table(t, f, compression="none"))
    print(i, flush=True); i += 1
""",
    "trials_csv": """
from raydist.tune.report import write_trials_csv
i = 0
while True:
    write_trials_csv(TARGET, [{"trial": f"t{j}", "state": "DONE", "epochs": i} for j in range(50_000)],
                     ["trial", "state", "epochs"])
    print(i, flush=True); i += 1
""",
}


def _read(kind: str, path: Path) -> int:
    """The version in the file, checking that the whole file is that one version."""
    if kind == "checkpoint":
        from raydist.models.checkpoint import read_checkpoint

        ckpt = read_checkpoint(path)
        assert bool((ckpt["big"] == float(ckpt["epoch"])).all()) and ckpt["big"].numel() == 1_000_000
        return ckpt["epoch"]
    if kind == "parquet":
        import pyarrow.parquet as pq

        v = pq.read_table(path).column("v").to_pylist()
        assert len(v) == 1_000_000 and len(set(v)) == 1
        return v[0]
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 50_000 and len({r["epochs"] for r in rows}) == 1 and rows[-1]["trial"] == "t49999"
    return int(rows[0]["epochs"])


@pytest.mark.parametrize("kind", list(WRITERS))
def test_a_writer_killed_mid_write_leaves_the_previous_version(tmp_path, kind):
    target = tmp_path / {"checkpoint": "last.pt", "parquet": "part-00000.parquet", "trials_csv": "trials.csv"}[kind]
    code = f"TARGET = {str(target)!r}\n" + WRITERS[kind]
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    for delay in (0.5,):  # kill halfway through a write, after the first versions are on disk
        proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env)
        try:
            done = [int(proc.stdout.readline()) for _ in range(2)]
            started = time.monotonic()
            done.append(int(proc.stdout.readline()))
            per_write = time.monotonic() - started
            time.sleep(delay * per_write)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        version = _read(kind, target)
        assert version >= done[-1], (kind, version, done)
    # a killed writer leaves at most its hidden temporary file, never a file the readers glob for
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == [target.name]


def test_replacing_a_file_keeps_earlier_hard_links_on_the_old_version(tmp_path):
    """Ray Train's checkpoint directory hard-links last.pt: a later write must not change what it linked."""
    path = write_atomic(tmp_path / "last.pt", b"epoch 1")
    os.link(path, tmp_path / "linked.pt")
    write_atomic(path, lambda f: f.write(b"epoch 2"))
    assert (tmp_path / "linked.pt").read_bytes() == b"epoch 1" and path.read_bytes() == b"epoch 2"
    with pytest.raises(ZeroDivisionError):
        write_atomic(path, lambda f: (f.write(b"half"), 1 / 0))  # a failed write leaves the file and no litter
    assert path.read_bytes() == b"epoch 2" and sorted(p.name for p in tmp_path.iterdir()) == ["last.pt", "linked.pt"]


def test_metrics_never_yield_a_torn_row(tmp_path):
    """A row cut short by a crash (no newline) is not read, and the next append cuts it off."""
    artifacts.append_metrics(tmp_path, {"epoch": 1, "val_pgd_acc": 0.5})
    with open(tmp_path / artifacts.METRICS, "a") as f:
        f.write('{"epoch": 2, "val_pgd_a')  # what a writer killed mid-append leaves
    assert artifacts.read_metrics(tmp_path) == [{"epoch": 1, "val_pgd_acc": 0.5}]
    artifacts.append_metrics(tmp_path, {"epoch": 2, "val_pgd_acc": 0.6})
    text = (tmp_path / artifacts.METRICS).read_text()
    assert [json.loads(line)["epoch"] for line in text.splitlines()] == [1, 2]
    artifacts.truncate_metrics(tmp_path, 1)
    assert artifacts.read_metrics(tmp_path) == [{"epoch": 1, "val_pgd_acc": 0.5}]
    (tmp_path / "x.jsonl").write_text('{"a": 1}\n\n{"a": 2')
    assert read_lines(tmp_path / "x.jsonl") == ['{"a": 1}'] and read_lines(tmp_path / "none.jsonl") == []
    with pytest.raises(ValueError, match="single line"):
        append_line(tmp_path / "x.jsonl", "a\nb")
    (tmp_path / artifacts.METRICS).write_text('{"epoch": 1}\nnot json\n')  # damage in the middle: named
    with pytest.raises(ValueError, match=r"metrics.jsonl line 2: not a JSON row"):
        artifacts.read_metrics(tmp_path)
