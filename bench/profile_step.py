"""Where a training step's time goes: the PyTorch profiler over a method's steps in the plain loop (no Ray).

For each method: milliseconds per step (timed without the profiler), the share of the step in each phase the
methods name for the profiler (raydist.example = crafting the training example, raydist.generator = FGSM-SDI's
generator ascent, raydist.update = the weight update's forward and backward, raydist.optimizer = the SGD step),
the operators that take the most time, and, with --compile, what the first (compiling) step cost. On a GPU the
shares and operators are device (kernel) time, on CPU they are CPU time.

    python bench/profile_step.py                                  # CPU: digits, width-16 ResNet-18, batch 128
    python bench/profile_step.py --gpu --methods fgsm_sdi         # the reference setting on a GPU
    python bench/profile_step.py --compile true                   # the same, compiled

Writes bench/results/profile.json and one Chrome trace per method (profile_<method>.trace.json, open in
chrome://tracing or Perfetto).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # the profiler's own start/stop lines
sys.path.insert(0, str(Path(__file__).resolve().parent))
from plain import ROOT, add_step_args, bench_job, build, device_name, resolve_step_args, sync, write_result  # noqa: E402

PHASES = ("raydist.example", "raydist.generator", "raydist.update", "raydist.optimizer")


def _micros(evt, *names: str) -> float:
    """The first of ``names`` a profiler event average has, in microseconds (device-time attributes were
    renamed from cuda_* to device_* across torch versions)."""
    return next((float(getattr(evt, n)) for n in names if hasattr(evt, n)), 0.0)


def _device_time(evt) -> float:
    return _micros(evt, "device_time_total", "cuda_time_total")


def _self_time(evt, gpu: bool) -> float:
    if gpu:
        return _micros(evt, "self_device_time_total", "self_cuda_time_total")
    return float(evt.self_cpu_time_total)


def profile_method(method: str, args: argparse.Namespace, work: Path) -> dict:
    from torch.profiler import ProfilerActivity, profile

    job = bench_job(method, gpu=args.gpu, out=work, width=args.width, batch_size=args.batch_size, epochs=1,
                    train_size=args.train_size, threads=args.threads, compile_=args.compile)
    p = build(job, args.threads)
    p.loader.set_epoch(0)
    need = args.warmup + 2 * args.steps
    # one batch shape (DeviceLoader's batches differ by at most one image; a second shape would be a second
    # compiled graph and cuDNN plan inside the timed steps)
    batches = list(p.loader)
    batches = [(x, y) for x, y in batches if x.shape[0] == batches[0][0].shape[0]][:need]
    while len(batches) < need:  # a small set: go round again
        batches += batches[: need - len(batches)]
    p.model.train()
    sync(p.device)
    t0 = time.perf_counter()
    p.method.step(*batches[0])
    sync(p.device)
    first_step = time.perf_counter() - t0
    for x, y in batches[1 : args.warmup]:
        p.method.step(x, y)
    sync(p.device)
    timed = batches[args.warmup : args.warmup + args.steps]
    t0 = time.perf_counter()
    for x, y in timed:
        p.method.step(x, y)
    sync(p.device)
    ms = 1000 * (time.perf_counter() - t0) / len(timed)

    gpu = p.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if gpu else [])
    with profile(activities=activities) as prof:
        for x, y in batches[args.warmup + args.steps :]:
            p.method.step(x, y)
        sync(p.device)
    trace = Path(args.out).parent / f"profile_{method}.trace.json"
    prof.export_chrome_trace(str(trace))
    averages = prof.key_averages()
    phases = {}
    for evt in averages:
        if evt.key in PHASES:
            phases[evt.key] = (_device_time(evt) if gpu else float(evt.cpu_time_total)) / args.steps / 1000
    step_ms = sum(v for k, v in phases.items() if k != "raydist.generator") or 1.0  # generator: inside example
    ops = [e for e in averages if not e.key.startswith(("raydist.", "ProfilerStep"))]
    ops.sort(key=lambda e: _self_time(e, gpu), reverse=True)
    total_self = sum(_self_time(e, gpu) for e in ops) or 1.0
    top = [{"op": e.key, "ms_per_step": _self_time(e, gpu) / args.steps / 1000,
            "share": _self_time(e, gpu) / total_self, "calls_per_step": e.count / args.steps} for e in ops[: args.top]]
    return {"method": method, "ms_per_step": ms, "images_per_sec": args.batch_size / ms * 1000,
            "first_step_seconds": first_step, "compiled": p.compiled,
            "phases_ms": phases, "phase_share": {k: v / step_ms for k, v in phases.items()},
            "top_ops": top, "trace": str(trace)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_step_args(p, train_size=8192)
    p.add_argument("--steps", type=int, default=20,
                   help="steps timed, then as many profiled (FGSM-SDI: a multiple of k holds its share of "
                        "generator updates)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--top", type=int, default=8, help="operators listed per method")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "profile.json"))
    args = p.parse_args(argv)
    if not resolve_step_args(args, "profile_step"):
        return 2
    import torch

    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="raydist-profile-"))
    rows = [profile_method(m, args, work) for m in args.methods]
    device = device_name(args.gpu, args.threads)
    result = {"device": device, "torch": torch.__version__, "model": f"resnet18 width {args.width}",
              "batch_size": args.batch_size, "compile": args.compile, "rows": rows}
    write_result(args.out, result)
    kind = "device" if args.gpu else "CPU"
    print(f"{device}, {result['model']}, batch {args.batch_size}, compile {args.compile}; shares of {kind} time")
    for r in rows:
        shares = ", ".join(f"{k.split('.')[1]} {100 * v:.0f}%" for k, v in r["phase_share"].items()
                           if k != "raydist.generator")
        if "raydist.generator" in r["phase_share"]:
            shares += f" (the generator's updates: {100 * r['phase_share']['raydist.generator']:.0f}%, in example)"
        print(f"\n{r['method']}: {r['ms_per_step']:.1f} ms/step ({r['images_per_sec']:.0f} img/s), first step "
              f"{r['first_step_seconds']:.1f} s{' (compiling)' if r['compiled'] else ''}; {shares}")
        for op in r["top_ops"]:
            print(f"  {100 * op['share']:5.1f}%  {op['ms_per_step']:8.2f} ms  {op['calls_per_step']:6.1f} calls  "
                  f"{op['op']}")
    print(f"\nwritten: {args.out} and one trace per method beside it")
    return 0


if __name__ == "__main__":
    sys.exit(main())
