"""Training throughput: `raydist train` with one Ray Train worker beside a plain PyTorch loop of the same method.

For each method, on the same data, model, batch size, precision and memory format:

  plain    a bare loop in this process: the dataset as one tensor on the device, DeviceLoader's on-device
           augmentation, the method's step and the LR schedule; the hand-written script a user compares with
  raydist  `raydist train` with scaling.num_workers: 1: a Ray Train worker process, the model wrapped by
           prepare_model, the same loop with per-epoch validation, checkpoints and metrics

Both count training images per second of training time (whole epochs after a warm-up epoch; for raydist the
`images_per_sec` of metrics.jsonl, which leaves out validation and checkpointing, as the plain loop has none), so
the ratio is the cost of running the step inside Ray Train. On CUDA both use bf16 autocast and channels_last and
the plain loop records peak GPU memory.

    python bench/train_throughput.py                                   # CPU: digits, width-16 ResNet-18
    python bench/train_throughput.py --gpu                             # the H100 reference setting below

--gpu: synthetic 32x32 images (50,000, CIFAR-sized), full-width ResNet-18, batch 512, as in the reference script
(`FGSM-RS 26k, FGSM-SDI (k=20) 16k, PGD-10 AT 5.0k images/s` on one H100). Writes JSON and prints a table.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def job_for(method: str, args: argparse.Namespace, out: Path) -> dict:
    from raydist import config as C

    data = ({"dataset": "synthetic", "image_size": 32, "train_size": args.train_size, "test_size": 256,
             "val_size": 256} if args.gpu else {"dataset": "digits", "val_size": 200})
    data.update(batch_size=args.batch_size, eval_batch_size=512, crop=4, flip=True)
    raw = {
        "run": {"name": method, "output_dir": str(out), "seed": 0, "progress": False},
        "data": data,
        "model": {"name": "resnet18", "width": args.width},
        "method": {"name": method, "epsilon": "8/255"},
        "optim": {"epochs": args.epochs, "lr": 0.05, "schedule": "cyclic"},
        "scaling": {"num_workers": 1, "use_gpu": args.gpu, "cpus_per_worker": 1 if args.gpu else args.threads},
        "eval": {"val_steps": 1, "test_attacks": ["clean"], "test_samples": 64},
    }
    return C.validate(raw, name_hint=method)


def plain_loop(job: dict, threads: int) -> dict:
    """The method's step in a bare loop, timed over every epoch after the first."""
    import torch

    from raydist.config import method_params
    from raydist.data import DeviceLoader, load_dataset
    from raydist.methods import create_method
    from raydist.models import create_model
    from raydist.train.loop import _autocast, _param_groups
    from raydist.train.schedules import lr_multiplier

    gpu = job["scaling"]["use_gpu"]
    device = torch.device("cuda" if gpu else "cpu")
    if not gpu:
        torch.set_num_threads(threads)
    data, ocfg = job["data"], job["optim"]
    splits = load_dataset(data["dataset"], val_size=data["val_size"], image_size=data["image_size"],
                          num_classes=data["num_classes"], channels=data["channels"], train_size=data["train_size"],
                          test_size=data["test_size"])
    loader = DeviceLoader(splits.train_x, splits.train_y, batch_size=data["batch_size"], shuffle=True,
                          augment={"crop": data["crop"], "flip": data["flip"]}, seed=0, device=device, rank=0,
                          world_size=1, channels_last=gpu)
    torch.manual_seed(0)
    model = create_model("resnet18", num_classes=splits.num_classes, width=job["model"]["width"],
                         in_channels=splits.input_size[0], mean=splits.mean, std=splits.std).to(device)
    if gpu:
        model = model.to(memory_format=torch.channels_last)
        torch.cuda.reset_peak_memory_stats()
    optimizer = torch.optim.SGD(_param_groups(model, ocfg["weight_decay"]), lr=ocfg["lr"], momentum=0.9)
    method = create_method(job["method"]["name"], model, optimizer, epsilon=job["method"]["epsilon"],
                           autocast=_autocast(device, job["run"]["precision"]), **method_params(job))
    multiplier = lr_multiplier(ocfg["schedule"], epochs=ocfg["epochs"], steps_per_epoch=len(loader),
                               milestones=ocfg["milestones"], gamma=ocfg["gamma"], peak=ocfg["peak"])
    schedulers = [torch.optim.lr_scheduler.LambdaLR(o, multiplier) for o in [optimizer, *method.extra_optimizers()]]
    images, seconds = 0, 0.0
    for epoch in range(ocfg["epochs"]):
        loader.set_epoch(epoch)
        model.train()
        n = torch.zeros((), device=device)
        if gpu:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for x, y in loader:
            loss, logits = method.step(x, y)
            for s in schedulers:
                s.step()
            n += y.shape[0]
        if gpu:
            torch.cuda.synchronize()
        if epoch > 0:  # the first epoch pays for warm-up (allocator, cuDNN autotuning, lazy init)
            seconds += time.perf_counter() - t0
            images += int(n.item())
    out = {"images_per_sec": images / seconds, "images": images, "seconds": seconds}
    if gpu:
        out["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return out


def raydist_run(job: dict) -> dict:
    from raydist.train.artifacts import read_metrics
    from raydist.train.driver import run_dir_of, run_training

    t0 = time.perf_counter()
    run_training(job, overwrite=True)
    wall = time.perf_counter() - t0
    rows = read_metrics(run_dir_of(job))[1:]  # after the warm-up epoch, as for the plain loop
    images = sum(r["images_per_sec"] * r["epoch_seconds"] for r in rows)
    seconds = sum(r["epoch_seconds"] for r in rows)
    return {"images_per_sec": images / seconds, "images": round(images), "seconds": seconds, "wall_seconds": wall}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default="fgsm_rs,fgsm_sdi,pgd_at", help="comma-separated method names")
    p.add_argument("--gpu", action="store_true", help="CUDA: synthetic CIFAR-sized data, the reference setting")
    p.add_argument("--epochs", type=int, default=3, help="epochs per run, the first one untimed")
    p.add_argument("--width", type=int, default=None, help="ResNet-18 base channels (default: 64 GPU, 16 CPU)")
    p.add_argument("--batch-size", type=int, default=None, help="default: 512 GPU, 128 CPU")
    p.add_argument("--train-size", type=int, default=50000, help="--gpu: synthetic training images")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for both (default: all cores)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "train_throughput.json"))
    args = p.parse_args(argv)
    import os

    import ray
    import torch

    if args.gpu and not torch.cuda.is_available():
        print("train_throughput: error: --gpu, but torch sees no CUDA device", file=sys.stderr)
        return 2
    args.width = args.width or (64 if args.gpu else 16)
    args.batch_size = args.batch_size or (512 if args.gpu else 128)
    args.threads = args.threads or os.cpu_count() or 1
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    work = Path(tempfile.mkdtemp(prefix="raydist-train-bench-"))
    rows = []
    for method in methods:
        job = job_for(method, args, work)
        plain = plain_loop(job, args.threads)
        ours = raydist_run(job)
        rows.append({"method": method, "plain": plain, "raydist": ours,
                     "ratio": ours["images_per_sec"] / plain["images_per_sec"]})
        print(f"{method}: plain {plain['images_per_sec']:.0f} img/s, raydist {ours['images_per_sec']:.0f} img/s "
              f"({rows[-1]['ratio']:.3f}x)", flush=True)
    device = (torch.cuda.get_device_name(0) if args.gpu
              else f"CPU ({platform.processor() or 'cpu'}, {args.threads} threads)")
    result = {"device": device, "torch": torch.__version__, "ray": ray.__version__,
              "model": f"resnet18 width {args.width}", "batch_size": args.batch_size,
              "data": "synthetic 32x32" if args.gpu else "digits 32x32", "epochs_timed": args.epochs - 1,
              "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"\n{device}, {result['model']}, batch {args.batch_size}, {result['data']}, "
          f"{result['epochs_timed']} timed epochs each")
    head = f"{'method':<10} {'plain img/s':>12} {'raydist img/s':>14} {'raydist/plain':>14}"
    print(head + ("  peak GiB" if args.gpu else ""))
    for r in rows:
        line = (f"{r['method']:<10} {r['plain']['images_per_sec']:>12.0f} {r['raydist']['images_per_sec']:>14.0f} "
                f"{r['ratio']:>14.3f}")
        if args.gpu:
            line += f"  {r['plain']['peak_memory_gib']:>8.2f}"
        print(line)
    print(f"written: {args.out}")
    return 0 if all(math.isfinite(r["ratio"]) for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
