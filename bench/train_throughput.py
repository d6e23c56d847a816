"""Training throughput: `raydist train` with one Ray Train worker beside a plain PyTorch loop of the same method.

For each method, on the same data, model, batch size, precision and memory format:

  plain    a bare loop in this process: the dataset as one tensor on the device, DeviceLoader's on-device
           augmentation, the method's step and the LR schedule; the hand-written script a user compares with
  raydist  `raydist train` with scaling.num_workers: 1: a Ray Train worker process, the model wrapped by
           prepare_model, the same loop with per-epoch validation, checkpoints and metrics

Both count training images per second of training time (whole epochs after a warm-up epoch; for raydist the
`images_per_sec` of metrics.jsonl, which leaves out validation and checkpointing, as the plain loop has none), so
the ratio is the cost of running the step inside Ray Train. Both make raydist's hot-path choices (bench/plain.py:
fused SGD, and on CUDA bf16 autocast, channels_last, cuDNN autotuning and, with --compile auto, torch.compile);
the plain loop records peak GPU memory. --reference FILE reads the JSON that ../shared/bench/reference_step.py
wrote in the same session and adds raydist's ratio to that hand-written eager script (the issue's 1.5x target).

    python bench/train_throughput.py                                   # CPU: digits, width-16 ResNet-18
    python bench/train_throughput.py --gpu                             # the H100 reference setting below

--gpu: synthetic 32x32 images (50,000, CIFAR-sized), full-width ResNet-18, batch 512, as in the reference script
(`FGSM-RS 26k, FGSM-SDI (k=20) 16k, PGD-10 AT 5.0k images/s` on one H100). Writes JSON and prints a table.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from plain import add_step_args, bench_job, build, device_name, resolve_step_args, sync, write_result  # noqa: E402


def job_for(method: str, args: argparse.Namespace, out: Path) -> dict:
    return bench_job(method, gpu=args.gpu, out=out, width=args.width, batch_size=args.batch_size,
                     epochs=args.epochs, train_size=args.train_size, threads=args.threads, compile_=args.compile,
                     compile_mode=args.compile_mode)


def plain_loop(job: dict, threads: int) -> dict:
    """The method's step in a bare loop, timed over every epoch after the first."""
    import torch
    p = build(job, threads)
    gpu = p.device.type == "cuda"
    if gpu:
        torch.cuda.reset_peak_memory_stats()
    images, seconds, first = 0, 0.0, 0.0
    for epoch in range(job["optim"]["epochs"]):
        p.loader.set_epoch(epoch)
        p.model.train()
        n = torch.zeros((), device=p.device)
        sync(p.device)
        t0 = time.perf_counter()
        for x, y in p.loader:
            loss, logits = p.method.step(x, y)
            for s in p.schedulers:
                s.step()
            n += y.shape[0]
        sync(p.device)
        if epoch > 0:  # the first epoch pays for warm-up (allocator, cuDNN autotuning, compiling)
            seconds += time.perf_counter() - t0
            images += int(n.item())
        else:
            first = time.perf_counter() - t0
    out = {"images_per_sec": images / seconds, "images": images, "seconds": seconds, "first_epoch_seconds": first}
    if gpu:
        out["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return out


# reference_step.py's rows (bf16 + channels_last, eager) for each raydist method
REFERENCE_ROWS = {"fgsm_rs": "fgsm_rs", "fgsm_sdi": "fgsm_sdi_k20", "pgd_at": "pgd10_at", "standard": "clean"}


def read_reference(path: str) -> dict[str, float]:
    """images/s of the hand-written reference loop per raydist method name (its eager bf16 rows)."""
    rows = json.loads(Path(path).read_text())
    out = {}
    for method, name in REFERENCE_ROWS.items():
        hits = [r for r in rows if r.get("method") == name and r.get("bf16") and not r.get("compile")]
        if hits:
            out[method] = float(hits[0]["img_per_s"])
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
    add_step_args(p, train_size=50000)
    p.add_argument("--epochs", type=int, default=3, help="epochs per run, the first one untimed")
    p.add_argument("--compile-mode", default="default",
                   choices=("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"))
    p.add_argument("--reference", default=None, help="reference_step.py's JSON output, run on the same device")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "train_throughput.json"))
    args = p.parse_args(argv)
    if not resolve_step_args(args, "train_throughput"):
        return 2
    import ray
    import torch

    methods = args.methods
    work = Path(tempfile.mkdtemp(prefix="raydist-train-bench-"))
    reference = read_reference(args.reference) if args.reference else {}
    rows = []
    for method in methods:
        job = job_for(method, args, work)
        plain = plain_loop(job, args.threads)
        ours = raydist_run(job)
        rows.append({"method": method, "plain": plain, "raydist": ours,
                     "ratio": ours["images_per_sec"] / plain["images_per_sec"]})
        ref = reference.get(method)
        if ref:
            rows[-1]["reference_images_per_sec"] = ref
            rows[-1]["vs_reference"] = ours["images_per_sec"] / ref
        print(f"{method}: plain {plain['images_per_sec']:.0f} img/s, raydist {ours['images_per_sec']:.0f} img/s "
              f"({rows[-1]['ratio']:.3f}x)", flush=True)
    device = device_name(args.gpu, args.threads)
    result = {"device": device, "torch": torch.__version__, "ray": ray.__version__,
              "model": f"resnet18 width {args.width}", "batch_size": args.batch_size, "compile": args.compile,
              "compile_mode": args.compile_mode,
              "data": "synthetic 32x32" if args.gpu else "digits 32x32", "epochs_timed": args.epochs - 1,
              "rows": rows}
    write_result(args.out, result)
    print(f"\n{device}, {result['model']}, batch {args.batch_size}, {result['data']}, "
          f"{result['epochs_timed']} timed epochs each")
    head = f"{'method':<10} {'plain img/s':>12} {'raydist img/s':>14} {'raydist/plain':>14}"
    print(head + ("  peak GiB" if args.gpu else "") + ("  reference img/s  raydist/reference" if reference else ""))
    for r in rows:
        line = (f"{r['method']:<10} {r['plain']['images_per_sec']:>12.0f} {r['raydist']['images_per_sec']:>14.0f} "
                f"{r['ratio']:>14.3f}")
        if args.gpu:
            line += f"  {r['plain']['peak_memory_gib']:>8.2f}"
        if "vs_reference" in r:
            line += f"  {r['reference_images_per_sec']:>15.0f}  {r['vs_reference']:>17.3f}"
        print(line)
    print(f"written: {args.out}")
    return 0 if all(math.isfinite(r["ratio"]) for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
