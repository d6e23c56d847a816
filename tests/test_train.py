"""`raydist train` end to end on Ray Train: run directory, checkpoints, sharding, resume, and robustness."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import ROOT, tiny_job, write_job

from raydist import config as C
from raydist.cli import main
from raydist.models import load_checkpoint

pytestmark = pytest.mark.usefixtures("ray_session")


def _rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_train_writes_a_complete_run_directory(tmp_path, capsys):
    path = write_job(tmp_path, tiny_job(tmp_path))
    assert main(["train", str(path)]) == 0
    out = capsys.readouterr().out
    run_dir = tmp_path / "runs" / "t"
    for name in ("config.yaml", "metrics.jsonl", "best.pt", "last.pt", "summary.json", "curves.png"):
        assert (run_dir / name).is_file(), name
    rows = _rows(run_dir)
    assert [r["epoch"] for r in rows] == [1, 2]
    for key in ("train_loss", "train_acc", "images_per_sec", "val_clean_acc", "val_pgd_acc"):
        assert all(r[key] >= 0 for r in rows), key
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["attacks"] == ["clean", "fgsm", "pgd10"] and summary["n_test"] == 64
    for which in ("best", "last"):
        acc = summary[which]["accuracy"]
        assert 0 <= acc["pgd10"] <= acc["clean"] <= 1
        assert summary[which]["sha256"] == hashlib.sha256((run_dir / f"{which}.pt").read_bytes()).hexdigest()
    assert "PGD-10" in out and "best" in out and "last" in out  # the printed table
    assert "ETA" in out  # the per-epoch progress line

    # checkpoints are self-describing: no job file needed to rebuild the model
    model, ckpt = load_checkpoint(run_dir / "last.pt")
    assert ckpt["model"]["name"] == "resnet18" and ckpt["model"]["num_classes"] == 10
    assert ckpt["epsilon"] == pytest.approx(32 / 255) and ckpt["epoch"] == 2
    assert model(torch.rand(2, 3, 16, 16)).shape == (2, 10)
    ts = ckpt["train_state"]
    assert {"optimizer", "schedulers", "method", "epoch", "torch_rng"} <= set(ts)
    assert "generator" in str(list(ts["method"]))  # FGSM-SDI's generator state travels with the run
    best_model, best = load_checkpoint(run_dir / "best.pt")
    assert best["epoch"] == summary["best"]["epoch"]


def test_two_ray_workers_see_each_sample_once_per_epoch(tmp_path):
    """Real Ray Train workers, each building the loader from its own rank: disjoint shards covering the set."""
    import ray.train
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    out = tmp_path / "seen"
    out.mkdir()

    def loop(config):
        from raydist.data import DeviceLoader

        ctx = ray.train.get_context()
        n = config["n"]
        loader = DeviceLoader(torch.zeros(n, 1, 4, 4, dtype=torch.uint8), torch.arange(n), batch_size=8,
                              rank=ctx.get_world_rank(), world_size=ctx.get_world_size(), seed=3)
        for epoch in range(2):
            loader.set_epoch(epoch)
            seen = torch.cat([y for _, y in loader]).tolist()
            with open(os.path.join(config["out"], f"r{ctx.get_world_rank()}_e{epoch}.json"), "w") as f:
                json.dump({"seen": seen, "batches": len(loader)}, f)
            ray.train.report({"epoch": epoch})

    TorchTrainer(loop, train_loop_config={"n": 101, "out": str(out)},
                 scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1}),
                 run_config=RunConfig(storage_path=str(tmp_path / "ray"), name="shard")).fit()
    for epoch in range(2):
        r0 = json.loads((out / f"r0_e{epoch}.json").read_text())
        r1 = json.loads((out / f"r1_e{epoch}.json").read_text())
        assert not set(r0["seen"]) & set(r1["seen"])
        assert sorted(r0["seen"] + r1["seen"]) == list(range(101))
        assert r0["batches"] == r1["batches"]  # DDP needs the same number of steps on every worker


def test_two_worker_ddp_training(tmp_path):
    """DDP across two Ray workers runs to the end, and the test accuracy in summary.json is that of last.pt's
    weights (BatchNorm statistics included: each rank's differ after training until rank 0's are broadcast)."""
    from raydist.data import DeviceLoader, load_dataset
    from raydist.evaluate import accuracy_under_attacks

    job = tiny_job(tmp_path, scaling={"num_workers": 2}, optim={"epochs": 1},
                   eval={"test_attacks": ["clean", "pgd10"], "test_samples": 32})
    assert main(["train", str(write_job(tmp_path, job))]) == 0
    summary = json.loads((tmp_path / "runs" / "t" / "summary.json").read_text())
    assert summary["n_test"] == 32
    rows = _rows(tmp_path / "runs" / "t")
    assert len(rows) == 1
    data = job["data"]
    splits = load_dataset("digits", val_size=data["val_size"], image_size=data["image_size"])
    model, _ = load_checkpoint(tmp_path / "runs" / "t" / "last.pt")
    counts = accuracy_under_attacks(model, DeviceLoader(splits.test_x[:32], splits.test_y[:32], batch_size=32,
                                                        shuffle=False), ["clean"], 32 / 255)
    assert summary["last"]["accuracy"]["clean"] == counts["clean"].item() / 32


def _buffers_after_training(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from raydist.models import create_model
    from raydist.train.loop import _sync_buffers

    def gathered() -> list[torch.Tensor]:
        stats = torch.cat([b.flatten().double() for b in model.buffers()])
        everyone = [torch.zeros_like(stats) for _ in range(world)]
        dist.all_gather(everyone, stats)
        return everyone

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = create_model("resnet18", num_classes=10, width=4)
    ddp = DistributedDataParallel(model)
    torch.manual_seed(1 + rank)  # each rank its own batch, as each trains on its own shard
    ddp(torch.rand(8, 3, 16, 16)).sum().backward()
    before = gathered()
    _sync_buffers(model)
    after = gathered()
    if rank == 0:
        torch.save({"before": before, "after": after}, out)
    dist.destroy_process_group()


def test_evaluation_sees_rank_0s_batchnorm_statistics_on_every_rank(tmp_path):
    """After a DDP training step each rank's BatchNorm statistics are those of its own last batch; the loop
    broadcasts rank 0's (those last.pt / best.pt hold) before every validation and test."""
    import torch.multiprocessing as mp
    from conftest import free_port

    out = str(tmp_path / "stats.pt")
    mp.spawn(_buffers_after_training, args=(2, free_port(), out), nprocs=2, join=True)
    stats = torch.load(out, weights_only=True)
    assert not torch.equal(*stats["before"])
    assert torch.equal(*stats["after"])


def test_in_process_mode_with_compile_in_a_child_process(tmp_path, ray_session):
    """num_workers=0 runs the loop in the driver, here with run.compile true (what run.compile auto does on CUDA):
    the compiled model trains, and its checkpoint holds the plain model's weights. The width-8 model's digits
    batches (61 and 62 images) are the case that crashed with AVX-512 kernels and channels-last tensors (see
    raydist.train.speed). A child process with a time limit, joined to this session's Ray: native code that
    hangs or crashes fails this test, not the session."""
    job = tiny_job(tmp_path, run={"name": "local", "compile": "true"}, scaling={"num_workers": 0},
                   data={"image_size": 32, "val_size": 200}, model={"width": 8}, optim={"epochs": 1},
                   method={"name": "fgsm_rs"},
                   eval={"test_attacks": ["clean"], "test_samples": 32})
    job["method"].pop("k")
    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    proc = subprocess.run([sys.executable, "-m", "raydist.cli", "train", str(write_job(tmp_path, job, "local.yaml"))],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = tmp_path / "runs" / "local"
    assert (run_dir / "summary.json").is_file()
    (row,) = _rows(run_dir)
    assert row["train_loss"] > 0 and 0 <= row["val_clean_acc"] <= 1
    ckpt = torch.load(run_dir / "last.pt", map_location="cpu", weights_only=True)
    assert not any("_orig_mod" in k or k.startswith("module.") for k in ckpt["state_dict"])
    model, _ = load_checkpoint(run_dir / "last.pt")
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, 10)


def test_resume_after_the_driver_is_killed(tmp_path, ray_session):
    """Kill `raydist train` mid-run; --resume finishes the run with every epoch recorded exactly once."""
    job = tiny_job(tmp_path, optim={"epochs": 3}, eval={"test_attacks": ["clean"], "test_samples": 32})
    path = write_job(tmp_path, job)
    run_dir = tmp_path / "runs" / "t"
    env = dict(os.environ, RAY_ADDRESS=ray_session.get_runtime_context().gcs_address, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "raydist.cli", "train", str(path)], env=env, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 240
        while time.time() < deadline:
            if (run_dir / "metrics.jsonl").exists() and len(_rows(run_dir)) >= 1:
                break
            if proc.poll() is not None:
                pytest.fail("training ended before it could be interrupted")
            time.sleep(0.2)
        else:
            pytest.fail("no first epoch within the deadline")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    done_before = len(_rows(run_dir))
    assert 1 <= done_before < 3
    assert not (run_dir / "summary.json").exists()

    assert main(["train", str(path)]) == 2  # the interrupted run is not overwritten by accident
    assert main(["train", str(path), "--resume"]) == 0
    rows = _rows(run_dir)
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert (run_dir / "summary.json").is_file()
    _, last = load_checkpoint(run_dir / "last.pt")
    assert last["epoch"] == 3


def test_resume_refuses_a_changed_job(tmp_path, capsys):
    path = write_job(tmp_path, tiny_job(tmp_path, optim={"epochs": 1}, eval={"test_attacks": ["clean"]}))
    run_dir = tmp_path / "runs" / "t"
    run_dir.mkdir(parents=True)  # what an interrupted run leaves: its resolved job and a checkpoint
    (run_dir / "config.yaml").write_text(C.dump(C.load_job(path)))
    torch.save({"train_state": {"epoch": 1}}, run_dir / "last.pt")
    assert main(["train", str(path), "--resume", "--set", "method.k=9"]) == 2
    assert "method.k" in capsys.readouterr().err
    assert not (run_dir / "summary.json").exists() and (run_dir / "last.pt").is_file()  # nothing was touched
