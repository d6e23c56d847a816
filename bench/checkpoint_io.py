"""What the end of an epoch costs in checkpoint I/O: bytes written and the time training waits, per epoch.

Inside a real Ray Train worker (one worker, storage in the run directory, or --storage elsewhere) a model's full
training state (weights, SGD momentum, the rest of last.pt) is checkpointed for --epochs epochs, best.pt improving
only in the first, two ways:

  copies   the previous scheme, kept here as the baseline: write last.pt and best.pt into the run directory,
           copy both into a temporary directory, and report that to Ray Train, which copies it into storage
           while training waits
  raydist  raydist.train.ray_checkpoint: the run directory's files linked into the checkpoint, uploaded in the
           background (linked again into local storage), best.pt only when it changed

Bytes are the worker process's own write_bytes (/proc/self/io) over the epoch, the background upload included
(measured once it has finished); "stall" is how long the epoch's end held training up.

    python bench/checkpoint_io.py [--model wide_resnet34_10] [--epochs 4] [--storage /other/disk]
Writes bench/results/checkpoint_io.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


def _write_bytes() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("write_bytes:"):
            return int(line.split()[1])
    return 0


def _worker(config: dict) -> None:
    import ray.train
    import torch

    from raydist.models import create_model, model_spec_for, save_checkpoint
    from raydist.train import ray_checkpoint

    torch.manual_seed(0)
    model = create_model(config["model"], num_classes=10)
    spec = model_spec_for(config["model"], 10, "relu", 3, [3, 32, 32], [0.5] * 3, [0.5] * 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.rand(2, 3, 32, 32)).sum().backward()
    opt.step()  # momentum buffers: last.pt holds what a real run's does
    run_dir = Path(config["run_dir"])
    rows = []
    for epoch in range(1, config["epochs"] + 1):
        improved = epoch == 1
        before, t0 = _write_bytes(), time.perf_counter()
        save_checkpoint(run_dir / "last.pt", model, model_spec=spec, epoch=epoch,
                        train_state={"epoch": epoch, "optimizer": opt.state_dict()})
        if improved:
            save_checkpoint(run_dir / "best.pt", model, model_spec=spec, epoch=epoch)
        row = {"epoch": epoch}
        if config["strategy"] == "copies":
            tmp = tempfile.mkdtemp(prefix="raydist-ckpt-")
            for name in ("last.pt", "best.pt"):
                shutil.copy2(run_dir / name, Path(tmp) / name)
            ray.train.report(row, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                             checkpoint_dir_name=ray_checkpoint.dir_name(epoch))
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            ray_checkpoint.report(row, run_dir, epoch, improved, ray_checkpoint.dir_name(1))
        stall = time.perf_counter() - t0
        time.sleep(config["train_s"])  # the next epoch's training, during which a background upload runs
        rows.append({"epoch": epoch, "stall_s": stall, "bytes": _write_bytes() - before})
    (run_dir / "rows.json").write_text(json.dumps(rows))


def run(strategy: str, model: str, epochs: int, storage: str | None, train_s: float, out: Path) -> dict:
    from ray.train import CheckpointConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    run_dir = out / strategy
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    TorchTrainer(_worker, train_loop_config={"strategy": strategy, "model": model, "epochs": epochs,
                                             "run_dir": str(run_dir), "train_s": train_s},
                 scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": 1}),
                 run_config=RunConfig(name=f"ckpt_{strategy}", storage_path=storage or str(run_dir / "ray"),
                                      checkpoint_config=CheckpointConfig(num_to_keep=2))).fit()
    rows = json.loads((run_dir / "rows.json").read_text())
    sizes = {name: (run_dir / name).stat().st_size for name in ("last.pt", "best.pt")}
    return {"strategy": strategy, "epochs": rows, "file_bytes": sizes,
            "mean_stall_s": sum(r["stall_s"] for r in rows) / len(rows),
            "mean_bytes_per_epoch": sum(r["bytes"] for r in rows) / len(rows)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="wide_resnet34_10")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--storage", default=None, help="Ray Train storage_path (default: each run directory's ray/)")
    p.add_argument("--train-s", type=float, default=5.0, help="seconds of 'training' between epochs' ends")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "checkpoint_io"))
    args = p.parse_args()
    from plain import write_result

    from raydist.train.driver import start_local_ray

    start_local_ray(num_cpus=2, include_dashboard=True, logging_level="warning")
    out = Path(args.out)
    results = [run(s, args.model, args.epochs, args.storage, args.train_s, out) for s in ("copies", "raydist")]
    for r in results:
        print(f"{r['strategy']:8s}  last.pt {r['file_bytes']['last.pt'] / 1e6:7.1f} MB  best.pt "
              f"{r['file_bytes']['best.pt'] / 1e6:7.1f} MB  written per epoch {r['mean_bytes_per_epoch'] / 1e6:8.1f} MB"
              f"  epoch-end stall {r['mean_stall_s']:.2f} s")
    write_result(ROOT / "bench" / "results" / "checkpoint_io.json", {"model": args.model, "runs": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
