"""GPU memory of adversarial training: peak memory per method and model, and the largest batch that fits.

For each model (its own input size: 32x32 for the CIFAR models, 224x224 for EfficientNet-B0) and method, one
training step at --batch (the first step is the heaviest: FGSM-SDI updates its generator there, and SGD makes
its momentum buffers) with raydist's hot-path settings (bf16 autocast, channels_last, fused SGD, eager), and the
peak of torch.cuda.max_memory_allocated. Then, for --search-method, the largest batch whose step fits on the
device: doubling until a step runs out of memory, then bisecting to within 1/16.

    python bench/memory.py --gpu                                   # ResNet-18, WRN-34-10, EfficientNet-B0
    python bench/memory.py --gpu --models resnet18 --max-batch 65536

Writes bench/results/memory.json and prints a table. Needs CUDA (CPU memory is not what limits a batch).
"""

from __future__ import annotations

import argparse
import gc
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from plain import ROOT, bench_job, build, write_result  # noqa: E402

INPUT = {"efficientnet_b0": 224}  # everything else here is a 32x32 model
DEFAULT_BATCH = {"efficientnet_b0": 128}


def largest_fitting(fits: Callable[[int], bool], start: int, max_batch: int, resolution: int = 16) -> int:
    """The largest batch ``b <= max_batch`` with ``fits(b)``, assuming fitting is monotone in the batch size;
    0 if not even ``start`` fits. Doubles from ``start``, then bisects until the gap is under 1/``resolution``
    of the answer."""
    if not fits(start):
        lo, hi = 0, start  # below start: bisect down
        while hi - lo > max(1, lo // resolution):
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if mid and fits(mid) else (lo, mid)
        return lo
    lo = start
    while lo < max_batch:
        nxt = min(2 * lo, max_batch)
        if not fits(nxt):
            hi = nxt
            break
        lo = nxt
    else:
        return lo
    while hi - lo > max(1, lo // resolution):
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


class StepProbe:
    """One model + method on the GPU; ``peak(batch)`` runs one training step on random data of that batch."""

    def __init__(self, model: str, method: str, work: Path) -> None:
        size = INPUT.get(model, 32)
        self.job = bench_job(method, gpu=True, out=work, width=None, batch_size=8, epochs=1, train_size=16,
                             model=model, image_size=size, compile_="false")
        self.p = build(self.job)
        self.size, self.classes = size, 10

    def peak(self, batch: int) -> float:
        """Peak GiB allocated during one step at ``batch``; raises torch.cuda.OutOfMemoryError when it does
        not fit (after freeing what the failed step held)."""
        import torch

        dev = self.p.device
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
        x = y = None
        try:
            x = torch.rand(batch, 3, self.size, self.size, device=dev).contiguous(memory_format=torch.channels_last)
            y = torch.randint(0, self.classes, (batch,), device=dev)
            self.p.method.num_steps = 0  # FGSM-SDI: this step updates the generator too, the heaviest kind
            self.p.method.step(x, y)
            torch.cuda.synchronize(dev)
            return torch.cuda.max_memory_allocated(dev) / 2**30
        finally:
            del x, y
            self.p.method.optimizer.zero_grad(set_to_none=True)

    def fits(self, batch: int) -> bool:
        import torch

        try:
            self.peak(batch)
            return True
        except torch.cuda.OutOfMemoryError:
            gc.collect()
            torch.cuda.empty_cache()
            return False


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpu", action="store_true", help="required: the figures are GPU memory")
    p.add_argument("--models", default="resnet18,wide_resnet34_10,efficientnet_b0")
    p.add_argument("--methods", default="standard,fgsm_rs,fgsm_sdi,pgd_at")
    p.add_argument("--batch", type=int, default=None, help="batch for the peak figures (default 512; B0: 128)")
    p.add_argument("--search-method", default="fgsm_sdi", help="the method whose largest batch is searched")
    p.add_argument("--max-batch", type=int, default=32768, help="stop doubling here")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "memory.json"))
    args = p.parse_args(argv)
    import torch

    if not args.gpu or not torch.cuda.is_available():
        print("memory: error: needs --gpu and a CUDA device (it measures GPU memory)", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="raydist-memory-"))
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    rows, largest = [], {}
    for model in models:
        batch = args.batch or DEFAULT_BATCH.get(model, 512)
        for method in methods:
            probe = StepProbe(model, method, work)
            t0 = time.perf_counter()
            try:
                gib = probe.peak(batch)
            except torch.cuda.OutOfMemoryError:
                gib = float("nan")
            rows.append({"model": model, "method": method, "batch": batch, "peak_gib": gib,
                         "gib_per_1k_images": gib / batch * 1000, "seconds": time.perf_counter() - t0})
            print(f"{model:<18} {method:<9} batch {batch:>6}: peak {gib:7.2f} GiB", flush=True)
            if method == args.search_method:
                t0 = time.perf_counter()
                best = largest_fitting(probe.fits, batch, args.max_batch)
                largest[model] = {"method": method, "largest_batch": best, "capped": best >= args.max_batch,
                                  "peak_gib": probe.peak(best) if best else float("nan"),
                                  "seconds": time.perf_counter() - t0}
                print(f"{model:<18} {method:<9} largest batch {best}"
                      f"{' (the --max-batch cap)' if best >= args.max_batch else ''}", flush=True)
            del probe
            gc.collect()
            torch.cuda.empty_cache()
    total = torch.cuda.get_device_properties(0).total_memory / 2**30
    result = {"device": torch.cuda.get_device_name(0), "device_gib": total, "torch": torch.__version__,
              "precision": "bf16 autocast, channels_last, eager", "rows": rows, "largest_batch": largest}
    write_result(args.out, result)
    print(f"\n{result['device']} ({total:.0f} GiB)")
    for model, r in largest.items():
        print(f"{model}: largest {r['method']} batch {r['largest_batch']} ({r['peak_gib']:.1f} GiB peak)")
    print(f"written: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
