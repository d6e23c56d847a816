"""The plain PyTorch side of the benchmarks: one method's training step in a bare loop, no Ray.

What a user's own script would be, built with the same choices `raydist train` makes (raydist.train.speed:
fused SGD, cuDNN autotuning, torch.compile when the job asks; bf16 autocast and channels_last on CUDA), so the
benchmarks compare the loop around the step and nothing else. Used by train_throughput.py, profile_step.py
and memory.py.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def add_step_args(p: argparse.ArgumentParser, train_size: int) -> None:
    """The arguments every training-step benchmark takes: methods, device, model width, batch, threads, compile."""
    p.add_argument("--methods", default="fgsm_rs,fgsm_sdi,pgd_at", help="comma-separated method names")
    p.add_argument("--gpu", action="store_true", help="CUDA: synthetic CIFAR-sized data, the reference setting")
    p.add_argument("--width", type=int, default=None, help="ResNet-18 base channels (default: 64 GPU, 16 CPU)")
    p.add_argument("--batch-size", type=int, default=None, help="default: 512 GPU, 128 CPU")
    p.add_argument("--train-size", type=int, default=train_size, help="--gpu: synthetic training images")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    p.add_argument("--compile", default="auto", choices=("auto", "true", "false"),
                   help="run.compile (auto: on for CUDA)")


def resolve_step_args(args: argparse.Namespace, prog: str) -> bool:
    """Fill the device-dependent defaults; False (after one line on stderr) when --gpu finds no CUDA device."""
    import torch

    if args.gpu and not torch.cuda.is_available():
        print(f"{prog}: error: --gpu, but torch sees no CUDA device", file=sys.stderr)
        return False
    args.width = args.width or (64 if args.gpu else 16)
    args.batch_size = args.batch_size or (512 if args.gpu else 128)
    args.threads = args.threads or os.cpu_count() or 1
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    return True


def device_name(gpu: bool, threads: int) -> str:
    import torch

    return torch.cuda.get_device_name(0) if gpu else f"CPU ({platform.processor() or 'cpu'}, {threads} threads)"


def bench_job(method: str, *, gpu: bool, out: Path, width: int, batch_size: int, epochs: int, train_size: int,
              threads: int = 1, model: str = "resnet18", image_size: int = 32, compile_: str = "auto",
              compile_mode: str = "default") -> dict[str, Any]:
    """A validated job: synthetic CIFAR-sized data on a GPU (the reference setting), digits on CPU."""
    from raydist import config as C

    data = ({"dataset": "synthetic", "image_size": image_size, "train_size": train_size, "test_size": 256,
             "val_size": 256} if gpu else {"dataset": "digits", "val_size": 200})
    data.update(batch_size=batch_size, eval_batch_size=512, crop=4, flip=True)
    raw = {
        "run": {"name": method, "output_dir": str(out), "seed": 0, "progress": False, "compile": compile_,
                "compile_mode": compile_mode},
        "data": data,
        "model": {"name": model, **({"width": width} if width else {})},
        "method": {"name": method, "epsilon": "8/255"},
        "optim": {"epochs": epochs, "lr": 0.05, "schedule": "cyclic"},
        "scaling": {"num_workers": 1, "use_gpu": gpu, "cpus_per_worker": 1 if gpu else threads},
        "eval": {"val_steps": 1, "test_attacks": ["clean"], "test_samples": 64},
    }
    return C.validate(raw, name_hint=method)


@dataclass
class Plain:
    """Everything one plain training loop holds."""

    device: Any
    loader: Any
    model: Any
    method: Any
    schedulers: list
    compiled: bool


def build(job: dict[str, Any], threads: int = 1) -> Plain:
    """Data on the device, the model, its optimizer and the method, as loop.py builds them."""
    import torch

    from raydist.config import method_params, model_params
    from raydist.data import DeviceLoader, load_dataset
    from raydist.methods import create_method
    from raydist.methods.base import fused_optimizer_kwargs
    from raydist.models import create_model
    from raydist.train.loop import _autocast, _param_groups
    from raydist.train.schedules import build_schedulers
    from raydist.train.speed import compile_model, setup_device, use_compile

    gpu = job["scaling"]["use_gpu"]
    device = torch.device("cuda" if gpu else "cpu")
    if not gpu:
        torch.set_num_threads(threads)
    setup_device(device)
    data, ocfg, mcfg = job["data"], job["optim"], job["model"]
    splits = load_dataset(
        data["dataset"], val_size=data["val_size"], image_size=data["image_size"], num_classes=data["num_classes"],
        channels=data["channels"], train_size=data["train_size"], test_size=data["test_size"])
    loader = DeviceLoader(splits.train_x, splits.train_y, batch_size=data["batch_size"], shuffle=True,
                          augment={"crop": data["crop"], "flip": data["flip"]}, seed=0, device=device, rank=0,
                          world_size=1, channels_last=gpu)
    torch.manual_seed(0)
    extra = model_params(job)
    model = create_model(mcfg["name"], num_classes=splits.num_classes, in_channels=splits.input_size[0],
                         mean=splits.mean, std=splits.std, **extra).to(device)
    if gpu:
        model = model.to(memory_format=torch.channels_last)
    compiled = use_compile(job["run"]["compile"], device)
    net = compile_model(model, job["run"]["compile_mode"]) if compiled else model
    groups = _param_groups(model, ocfg["weight_decay"])
    optimizer = torch.optim.SGD(groups, lr=ocfg["lr"], momentum=ocfg["momentum"], nesterov=ocfg["nesterov"],
                                **fused_optimizer_kwargs(torch.optim.SGD, groups))
    method = create_method(job["method"]["name"], net, optimizer, epsilon=job["method"]["epsilon"],
                           autocast=_autocast(device, job["run"]["precision"]), **method_params(job))
    _, schedulers = build_schedulers(ocfg, method, optimizer, len(loader))
    return Plain(device, loader, model, method, schedulers, compiled)


def write_result(path: str | Path, result: dict[str, Any]) -> None:
    """A benchmark's JSON, written atomically (raydist's own artifact writer), its folder made if missing."""
    from raydist.train.artifacts import write_json

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_json(Path(path), result)


def sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
