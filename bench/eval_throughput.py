"""Evaluation throughput of `raydist eval`: images/s per attack with 1, 2, 4 ... actors sharing the machine.

Runs the real evaluation path (Ray actors, shards, per-sample parquet, report) on a checkpoint and times it end to
end, so actor start-up and the parquet writes are included. On a GPU the actors share it with fractional GPUs
(--gpus-per-worker = 1 / actors); without one they run on CPU with one thread each.

    python bench/eval_throughput.py --checkpoint runs/demo/digits_fgsm_sdi/best.pt --attacks pgd10,pgd50,aa
    python bench/eval_throughput.py --synthetic --width 64 --samples 4096 --gpu     # the H100 reference setting

--synthetic builds a randomly initialised ResNet-18 (CIFAR layout, `--width` base channels) on synthetic 32x32
images: PGD's cost does not depend on the weights, so that is the reference setting for PGD-10 / PGD-50 (the plain
PyTorch reference does 1.15k images/s of PGD-50 on one H100). AutoAttack's cost does (it attacks only the points
still robust), so time it on a trained checkpoint. Writes a JSON file and prints a table.
"""

from __future__ import annotations

import argparse
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from plain import write_result  # noqa: E402


def synthetic_checkpoint(path: Path, width: int, samples: int) -> Path:
    import torch

    from raydist.data import load_dataset
    from raydist.models import create_model, model_spec_for, save_checkpoint

    data = {"dataset": "synthetic", "image_size": 32, "num_classes": 10, "channels": 3, "train_size": 64,
            "test_size": samples}
    splits = load_dataset("synthetic", **{k: v for k, v in data.items() if k != "dataset"})
    torch.manual_seed(0)
    model = create_model("resnet18", num_classes=10, width=width, mean=splits.mean, std=splits.std)
    spec = model_spec_for("resnet18", 10, "relu", 3, [3, 32, 32], list(splits.mean), list(splits.std), width=width)
    return save_checkpoint(path, model, model_spec=spec, epsilon=8 / 255, method="none", dataset="synthetic",
                           data=data, epoch=0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="a raydist checkpoint (its test split is evaluated)")
    src.add_argument("--synthetic", action="store_true", help="random ResNet-18 on synthetic 32x32 images")
    p.add_argument("--width", type=int, default=64, help="--synthetic: ResNet-18 base channels")
    p.add_argument("--samples", type=int, default=512, help="test images per measurement")
    p.add_argument("--attacks", default="pgd10,pgd50", help="comma-separated attack names")
    p.add_argument("--actors", default="1,2,4", help="comma-separated actor counts")
    p.add_argument("--gpu", action="store_true", help="actors share one GPU (fractional GPUs)")
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--eps", default="8/255")
    p.add_argument("--precision", default="fp32",
                   help="comma-separated: fp32, bf16 (the attacks' passes; each row says which)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "eval_throughput.json"))
    args = p.parse_args(argv)

    import ray
    import torch

    from raydist.attacks.losses import PRECISIONS
    from raydist.config import parse_fraction
    from raydist.evaluate.runner import run_evaluation

    if args.gpu and not torch.cuda.is_available():
        print("bench: --gpu given but CUDA is not available", file=sys.stderr)
        return 2
    eps = parse_fraction(args.eps, "--eps")
    attacks = [a.strip() for a in args.attacks.split(",") if a.strip()]
    counts = [int(a) for a in args.actors.split(",")]
    precisions = [a.strip() for a in args.precision.split(",") if a.strip()]
    if any(pr not in PRECISIONS for pr in precisions):
        print(f"bench: --precision takes {' and/or '.join(PRECISIONS)}, got {args.precision}", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="raydist-bench-"))
    ckpt = (synthetic_checkpoint(work / "synthetic.pt", args.width, args.samples) if args.synthetic
            else Path(args.checkpoint))
    if not ray.is_initialized():
        ray.init(address="local", logging_level="warning", include_dashboard=False)
    cpus = int(ray.cluster_resources().get("CPU", 1))
    rows = []
    try:
        # untimed warm-up: the first actors of a session pay for cold imports and file caches
        run_evaluation([str(ckpt)], ["clean"], eps, work / "warmup", workers=1, samples=min(32, args.samples),
                       gpus_per_worker=1.0 if args.gpu else 0.0)
        for attack in attacks:
            for precision in precisions:
                for n in counts:
                    out = work / f"{attack}_{precision}_{n}"
                    shard = max(1, -(-args.samples // (2 * n)))  # two shards per actor: all busy, little tail
                    t0 = time.perf_counter()
                    report = run_evaluation([str(ckpt)], [attack], eps, out, workers=n,
                                            gpus_per_worker=(1.0 / n) if args.gpu else 0.0,
                                            cpus_per_worker=max(1, cpus // n) if not args.gpu else 1.0,
                                            shard_size=shard, batch_size=args.batch_size, samples=args.samples,
                                            precision=precision)
                    wall = time.perf_counter() - t0
                    n_images = report["rows"][0]["n"]
                    rows.append({"attack": attack, "precision": precision, "actors": n, "images": n_images,
                                 "seconds": wall, "images_per_sec": n_images / wall,
                                 "accuracy": report["rows"][0]["accuracy"][attack]})
                    shutil.rmtree(out, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    device = torch.cuda.get_device_name(0) if args.gpu else f"CPU ({platform.processor() or 'cpu'}, {cpus} cores)"
    result = {"device": device, "torch": torch.__version__, "ray": ray.__version__,
              "model": f"resnet18 width {args.width} (synthetic)" if args.synthetic else str(ckpt),
              "batch_size": args.batch_size, "eps": eps, "rows": rows}
    write_result(args.out, result)
    print(f"\n{device}, {result['model']}, {args.samples} images, eps {args.eps}")
    print(f"{'attack':<8} {'precision':>9} {'actors':>6} {'seconds':>8} {'images/s':>9} {'robust acc':>10}")
    for r in rows:
        print(f"{r['attack']:<8} {r['precision']:>9} {r['actors']:>6} {r['seconds']:>8.1f} "
              f"{r['images_per_sec']:>9.1f} {100 * r['accuracy']:>9.2f}%")
    print(f"written: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
