"""The `raydist` command line.

Every mistake in what the user typed or pointed at is reported as one line naming it, with exit code 2, before
Ray starts; failures during training exit 1.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import Any

from raydist import __version__
from raydist import config as C
from raydist.config import ConfigError

EPILOG = """examples:
  raydist train jobs/digits_fgsm_sdi.yaml
  raydist train jobs/cifar10_fgsm_sdi.yaml --set method.k=10 --set optim.lr=0.05
  raydist train jobs/digits_fgsm_sdi.yaml --resume        # continue an interrupted run
  raydist tune jobs/tune_digits.yaml                      # Ray Tune + Optuna sweep, ASHA early stopping
  raydist compare jobs/compare_digits.yaml                # PGD-AT, FGSM-RS, ..., FGSM-SDI in the papers' table
  raydist eval runs/x/best.pt --attacks clean,pgd20,aa     # robust accuracy on a pool of Ray actors
  raydist eval --model preact_resnet18 --weights model.pth --dataset cifar10 --eps 8/255 \
      --mean 0.4914,0.4822,0.4465 --std 0.2471,0.2435,0.2616  # a model trained elsewhere
  raydist check jobs/cifar10_pgd_at.yaml                  # validate and print the resolved job
  raydist models                                          # list model names
  raydist docs keys > docs/keys.md                        # the job-file key reference, from the schema
  raydist data to-parquet ~/imagenet ~/imagenet-parquet   # class folders -> sharded parquet for streaming
  raydist submit jobs/x.yaml --address http://HEAD:8265 --follow  # run it on a Ray cluster (Ray Jobs API)
  raydist jobs list|status ID|logs ID|stop ID             # submitted jobs (address from RAY_ADDRESS)
"""


class _Parser(argparse.ArgumentParser):
    """argparse, but a mistake on the command line is one line (the usage is what --help is for)."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="raydist",
        description="Adversarial training of image classifiers on Ray Train (FGSM-SDI, PGD-AT, FGSM-RS, ...).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"raydist {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    def tracking_arg(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--tracking", default=None, metavar="URI",
                        help="MLflow store: sqlite:///PATH or http://HOST:5000 (sets tracking.uri; default: "
                             "sqlite:///OUTPUT_DIR/mlflow.db)")

    def job_args(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("job", help="job file (YAML), e.g. jobs/digits_fgsm_sdi.yaml")
        sp.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a job key, e.g. --set method.k=10 --set method.epsilon=8/255 (repeatable)")

    t = sub.add_parser("train", help="run adversarial training on Ray Train",
                       description="Train the job's model with its method on Ray Train. Writes OUTPUT_DIR/NAME/: "
                                   "config.yaml, metrics.jsonl, best.pt, last.pt, summary.json, curves.png.")
    job_args(t)
    t.add_argument("--resume", action="store_true", help="continue the run from its last.pt")
    t.add_argument("--overwrite", action="store_true", help="delete an existing run directory and start again")
    tracking_arg(t)

    c = sub.add_parser("check", help="validate a job file and print the resolved config (no training)")
    job_args(c)

    tu = sub.add_parser("tune", help="run a Ray Tune + Optuna sweep over job keys",
                        description="Search a sweep file's space with Optuna (TPE, seeded) and ASHA early stopping; "
                                    "each trial is a Ray Train run. Writes OUTPUT_DIR/NAME/: trials.csv, best.yaml, "
                                    "search.png or pareto.png, optuna.db, trials/.")
    tu.add_argument("sweep", help="sweep file (YAML), e.g. jobs/tune_digits.yaml")
    tu.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="override a key of the base job (repeatable)")
    tu.add_argument("--resume", action="store_true", help="finish an interrupted sweep (finished trials are kept)")
    tu.add_argument("--overwrite", action="store_true", help="delete an existing sweep directory and start again")
    tracking_arg(tu)

    co = sub.add_parser("compare", help="train several methods under one protocol and tabulate them as the papers do",
                        description="Train each method of a compare file as its own Ray Train run (concurrently "
                                    "where the cluster fits them), evaluate best and last checkpoints on Ray "
                                    "evaluation actors, and write OUTPUT_DIR/NAME/: compare.md, compare.json, "
                                    "val_pgd.png, runs/, eval/. Finished runs with an unchanged config are reused.")
    co.add_argument("compare", help="compare file (YAML), e.g. jobs/compare_digits.yaml")
    co.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="override a job key of every method's run, e.g. --set optim.epochs=5 (repeatable)")
    co.add_argument("--resume", action="store_true", help="continue interrupted runs from their last.pt")
    co.add_argument("--overwrite", action="store_true",
                    help="train again runs whose config changed (and interrupted ones), evaluate again evaluations "
                         "whose settings changed; unchanged finished runs are still reused")
    co.add_argument("--workers", type=int, default=None, help="evaluation actors (default: the file's eval.workers)")
    tracking_arg(co)

    ev = sub.add_parser("eval", help="robust accuracy of checkpoints under attacks, on a pool of Ray actors",
                        description="Split the test set into shards and attack them on Ray evaluation actors. Writes "
                                    "OUT/: report.md, report.json, samples.parquet (per sample), eps_curve.png.")
    ev.add_argument("checkpoints", nargs="*", help="raydist checkpoints (best.pt, last.pt), or one torch.export "
                                                   "archive (.pt2) or TorchScript file")
    ev.add_argument("--attacks", default="clean,fgsm,pgd10,pgd20,pgd50,cw20",
                    help="comma-separated: clean, fgsm, pgdN, pgdNxR (R restarts), cw20, apgd-ce, apgd-dlr, apgd-t, "
                         "fab-t, square, aa (default: %(default)s)")
    ev.add_argument("--restarts", type=int, default=None, help="random restarts of every pgdN attack (pgdNxR)")
    byo = ev.add_argument_group("a model trained elsewhere")
    byo.add_argument("--model", default=None, help="registered architecture of --weights (`raydist models`)")
    byo.add_argument("--weights", default=None, help="its state dict (module./_orig_mod./model. prefixes and the "
                                                     "FGSM-SDI, Fast-AT and TRADES layouts are handled)")
    byo.add_argument("--model-fn", default=None, metavar="PACKAGE.MODULE:FUNCTION",
                     help="a function returning the nn.Module (imported from the working directory)")
    byo.add_argument("--model-args", action="append", default=[], metavar="KEY=VALUE",
                     help="keyword argument of --model-fn (repeatable)")
    byo.add_argument("--dataset", default=None, help="the test data, e.g. cifar10 (raydist checkpoints know theirs)")
    byo.add_argument("--num-classes", type=int, default=None, help="checked against the model and the dataset")
    byo.add_argument("--mean", default=None, help="comma-separated, when the model expects normalised input: "
                                                  "raydist normalises inside, attacks stay in [0, 1]")
    byo.add_argument("--std", default=None, help="comma-separated, with --mean")
    ev.add_argument("--robustbench-json", default=None, metavar="PATH",
                    help="also write the result in RobustBench's format")
    ev.add_argument("--eps", default=None, help="L-inf radius, e.g. 8/255 (default: the first checkpoint's)")
    ev.add_argument("--eps-sweep", default=None,
                    help="comma-separated radii for the PGD-20 eps curve, e.g. 2/255,8/255")
    ev.add_argument("--workers", type=int, default=2, help="evaluation actors (default: %(default)s)")
    ev.add_argument("--gpus-per-worker", type=float, default=0.0, help="e.g. 0.25: four actors share a GPU")
    ev.add_argument("--cpus-per-worker", type=float, default=1.0)
    ev.add_argument("--samples", type=int, default=None, help="first N test images (default: all)")
    ev.add_argument("--shard-size", type=int, default=256)
    ev.add_argument("--batch-size", type=int, default=256)
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                    help="the attacks' forward/backward passes; robustness is judged in fp32 either way "
                         "(default: %(default)s: reduced precision can weaken an attack)")
    ev.add_argument("--data-root", default=None, help="where the dataset files are, if not where training had them")
    ev.add_argument("--out", default=None, help="output directory (default: next to the first checkpoint, eval/)")
    ev.add_argument("--resume", action="store_true", help="finish an interrupted evaluation")
    ev.add_argument("--overwrite", action="store_true", help="delete an existing output directory first")
    ev.add_argument("--tracking", default=None, metavar="URI",
                    help="log each attack's accuracy per checkpoint to this MLflow store (default: the store the "
                         "checkpoints' training run logged to, nested under that run)")

    sub.add_parser("models", help="list the model names create_model and job files accept")
    dc = sub.add_parser("docs", help="print generated reference pages (keys: every job-file key, from the schema)")
    dc.add_argument("page", choices=("keys",), help="keys: the job-file key reference (docs/keys.md)")
    sm = sub.add_parser("submit", help="run a job, sweep or compare file on a Ray cluster (Ray Jobs API)",
                        description="Validate FILE here, then submit `raydist train|tune|compare FILE` to the "
                                    "cluster with this project as the job's working directory (runs, data, .venv "
                                    "and checkpoints are not uploaded). run.output_dir must be an absolute path "
                                    "every node sees (a shared filesystem); run.storage_path may be a URI.")
    job_args(sm)
    sm.add_argument("--address", default=None,
                    help="the cluster's dashboard, http://HEAD:8265 (default: $RAY_ADDRESS)")
    sm.add_argument("--follow", action="store_true", help="stream the job's log and exit with its outcome")
    sm.add_argument("--resume", action="store_true", help="pass --resume on: continue the run on the cluster "
                                                          "(e.g. after a lost head node)")
    sm.add_argument("--overwrite", action="store_true", help="pass --overwrite on")
    jb = sub.add_parser("jobs", help="list, inspect, follow or stop submitted jobs")
    jb.add_argument("action", choices=("list", "status", "logs", "stop"))
    jb.add_argument("id", nargs="?", help="submission id (from `raydist submit` or `raydist jobs list`)")
    jb.add_argument("--address", default=None, help="http://HEAD:8265 (default: $RAY_ADDRESS)")
    jb.add_argument("--follow", action="store_true", help="logs: stream until the job ends")
    d = sub.add_parser("data", help="dataset tools: convert class folders to sharded parquet")
    dsub = d.add_subparsers(dest="data_command", metavar="ACTION")
    tp = dsub.add_parser("to-parquet", help="class folders (ImageNet / Tiny ImageNet layout) -> sharded parquet",
                         description="Write the images (encoded bytes) and labels of SRC's train / val / test "
                                     "splits into DST/<split>/part-*.parquet with pyarrow, plus DST/classes.json. "
                                     "val is held out of SRC's train folders; test is SRC's val. Point data.root "
                                     "at DST and set data.stream: true to train from it through Ray Data.")
    tp.add_argument("src", help="dataset folder: train/<class>/*.JPEG and val/<class>/* (or Tiny ImageNet's)")
    tp.add_argument("dst", help="output folder")
    tp.add_argument("--shard-size", type=int, default=None, help="images per parquet file")
    tp.add_argument("--resize", type=int, default=None,
                    help="shrink the short side to this many pixels (default: 1.15 x --image-size; 0: keep the "
                         "source files' bytes)")
    tp.add_argument("--image-size", type=int, default=224, help="the resolution you will train at (224)")
    tp.add_argument("--val-per-class", type=int, default=None, help="validation images held out per class (10)")
    tp.add_argument("--val-size", type=int, default=None, help="validation images held out in all")
    tp.add_argument("--split", action="append", choices=("train", "val", "test"), default=None,
                    help="only this split (repeatable; default: all three)")
    tp.add_argument("--workers", type=int, default=None, help="encoding threads (default: up to 8)")
    tp.add_argument("--overwrite", action="store_true", help="replace existing part files in DST")
    return p


def _failure_exits_1(what: str, work: Callable[[], Any], *, root_cause: bool = False) -> int:
    """Run ``work``; a ConfigError goes on to main (exit 2), any other failure is one line and exit 1
    (``root_cause``: name the innermost ``__cause__``, e.g. the worker's error under Ray Train's wrapper)."""
    try:
        work()
    except ConfigError:
        raise
    except Exception as err:  # noqa: BLE001 - report any failure in one line, exit 1
        while root_cause and (err.__cause__ is not None or getattr(err, "controller_failure", None) is not None):
            err = err.__cause__ if err.__cause__ is not None else err.controller_failure  # Ray Train's wrapper
        print(f"raydist: {what} failed: {type(err).__name__}: {err}".splitlines()[0], file=sys.stderr)
        return 1
    return 0


def _with_tracking(args: argparse.Namespace) -> list[str]:
    """--tracking URI is tracking.uri, set last."""
    if args.tracking is None:
        return list(args.overrides)
    if not args.tracking.strip():
        raise ConfigError("--tracking: empty; give an MLflow URI such as sqlite:///runs/mlflow.db")
    import json

    return [*args.overrides, f"tracking.uri={json.dumps(args.tracking)}"]


def _cmd_docs(args: argparse.Namespace) -> int:
    from raydist.keys_doc import key_reference

    print(key_reference(), end="")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from raydist.config import load_job

    cfg = load_job(args.job, _with_tracking(args))
    from raydist.train.driver import run_training

    return _failure_exits_1("training", lambda: run_training(cfg, overwrite=args.overwrite, resume=args.resume),
                            root_cause=True)


def _cmd_tune(args: argparse.Namespace) -> int:
    from raydist.tune.sweep import load_sweep

    sweep = load_sweep(args.sweep, _with_tracking(args))
    from raydist.tune.runner import run_sweep

    return _failure_exits_1("sweep", lambda: run_sweep(sweep, overwrite=args.overwrite, resume=args.resume))


def _cmd_compare(args: argparse.Namespace) -> int:
    from raydist.compare.spec import load_compare

    if args.workers is not None and args.workers < 1:
        raise ConfigError(f"--workers: must be >= 1, got {args.workers}")
    spec = load_compare(args.compare, _with_tracking(args))
    from raydist.compare.runner import run_compare

    return _failure_exits_1("compare", lambda: run_compare(spec, overwrite=args.overwrite, resume=args.resume,
                                                           workers=args.workers))


def _cmd_eval(args: argparse.Namespace) -> int:
    from pathlib import Path

    for name, value, low in (("--workers", args.workers, 1), ("--shard-size", args.shard_size, 1),
                             ("--batch-size", args.batch_size, 1), ("--samples", args.samples, 1)):
        if value is not None and value < low:
            raise ConfigError(f"{name}: must be >= {low}, got {value}")
    if args.gpus_per_worker < 0 or args.cpus_per_worker <= 0:
        raise ConfigError("--gpus-per-worker must be >= 0 and --cpus-per-worker > 0")
    attacks = [a.strip() for a in args.attacks.split(",") if a.strip()]
    if args.restarts is not None:
        import re

        if args.restarts < 1:
            raise ConfigError(f"--restarts: must be >= 1, got {args.restarts}")
        if not any(re.fullmatch(r"pgd[0-9]+", a) for a in attacks):
            raise ConfigError("--restarts: applies to pgdN attacks, and --attacks has none")
        attacks = [f"{a}x{args.restarts}" if re.fullmatch(r"pgd[0-9]+", a) else a for a in attacks]
    sweep = [C.parse_fraction(e, "--eps-sweep") for e in args.eps_sweep.split(",")] if args.eps_sweep else []
    eps = C.parse_fraction(args.eps, "--eps") if args.eps is not None else None
    from raydist.evaluate.sources import foreign_source

    def floats(text: str | None, flag: str) -> list[float] | None:
        if text is None:
            return None
        try:
            return [float(C.parse_fraction(v, flag)) for v in text.split(",")]
        except ConfigError:
            raise
        except (TypeError, ValueError):
            raise ConfigError(f"{flag}: expected comma-separated numbers, got {text!r}") from None

    source = foreign_source(positional=args.checkpoints, model=args.model, weights=args.weights,
                            model_fn=args.model_fn, model_args=args.model_args, mean=floats(args.mean, "--mean"),
                            std=floats(args.std, "--std"), num_classes=args.num_classes, dataset=args.dataset)
    if source is None and not args.checkpoints:
        raise ConfigError("give raydist checkpoints, or a model trained elsewhere (--model NAME --weights FILE, "
                          "--model-fn, or a .pt2 / TorchScript file) with --dataset")
    if args.robustbench_json and Path(args.robustbench_json).exists() and not args.overwrite:
        raise ConfigError(f"--robustbench-json {args.robustbench_json} already exists (--overwrite replaces it)")
    if source is not None:
        if eps is None:
            raise ConfigError("--eps: give the radius for a model trained elsewhere, e.g. --eps 8/255")
        out = Path(args.out) if args.out else (Path(source["path"]).resolve().parent / "eval" if source.get("path")
                                               else Path("eval").resolve())
        from raydist.evaluate.runner import run_evaluation

        data = {"dataset": args.dataset, **({"root": args.data_root} if args.data_root else {})}
        return _failure_exits_1("evaluation", lambda: run_evaluation(
            [source], attacks, eps, out, workers=args.workers, gpus_per_worker=args.gpus_per_worker,
            cpus_per_worker=args.cpus_per_worker, shard_size=args.shard_size, batch_size=args.batch_size,
            samples=args.samples, seed=args.seed, eps_sweep=sweep, resume=args.resume, overwrite=args.overwrite,
            precision=args.precision, data=data, robustbench_json=args.robustbench_json))
    if eps is None:
        from raydist.models.checkpoint import CheckpointError, read_checkpoint

        first = Path(args.checkpoints[0])
        try:
            recorded = read_checkpoint(first).get("epsilon")
        except CheckpointError as err:
            raise ConfigError(str(err)) from None
        if not isinstance(recorded, (int, float)) or isinstance(recorded, bool):
            raise ConfigError(f"{first}: no epsilon recorded; pass --eps")
        eps = float(recorded)
    out = Path(args.out) if args.out else Path(args.checkpoints[0]).resolve().parent / "eval"
    from raydist.evaluate.runner import run_evaluation

    return _failure_exits_1("evaluation", lambda: run_evaluation(
        args.checkpoints, attacks, eps, out, workers=args.workers, gpus_per_worker=args.gpus_per_worker,
        cpus_per_worker=args.cpus_per_worker, shard_size=args.shard_size, batch_size=args.batch_size,
        samples=args.samples, seed=args.seed, eps_sweep=sweep, resume=args.resume, overwrite=args.overwrite,
        data_root=args.data_root, precision=args.precision, tracking=args.tracking or True,
        robustbench_json=args.robustbench_json, data={"dataset": args.dataset} if args.dataset else None))


def _cmd_check(args: argparse.Namespace) -> int:
    from raydist.config import dump, load_job

    print(dump(load_job(args.job, args.overrides)), end="")
    return 0


def _cmd_models(_: argparse.Namespace) -> int:
    from raydist.models import list_models

    rows = list_models()
    width = max(len(r["name"]) for r in rows)
    for r in rows:
        size = "x".join(str(s) for s in r["input_size"])
        params = f"{r['num_params'] / 1e6:6.2f}M" if r.get("num_params") else "      ?"
        print(f"{r['name'].ljust(width)}  input {size:<11} params {params}  {r.get('description', '')}")
    return 0


def _cmd_submit(args: argparse.Namespace) -> int:
    from raydist.cluster.submit import submit

    if args.resume and args.overwrite:
        raise ConfigError("--resume and --overwrite exclude each other")
    flags = tuple(f for f, on in (("--resume", args.resume), ("--overwrite", args.overwrite)) if on)
    return submit(args.job, args.overrides, args.address, args.follow, flags)


def _cmd_jobs(args: argparse.Namespace) -> int:
    from raydist.cluster.submit import jobs_command

    return jobs_command(args.action, args.id, args.address, follow=args.follow)


def _cmd_data(args: argparse.Namespace) -> int:
    if args.data_command != "to-parquet":
        raise ConfigError("raydist data: give an action, e.g. `raydist data to-parquet SRC DST`")
    from raydist.data import DataError, folder_to_parquet
    from raydist.data.parquet import DEFAULT_SHARD_SIZE

    try:
        written = folder_to_parquet(args.src, args.dst, split=args.split,
                                    shard_size=args.shard_size or DEFAULT_SHARD_SIZE,
                                    resize="auto" if args.resize is None else (args.resize or None),
                                    image_size=args.image_size,
                                    num_workers=args.workers, val_size=args.val_size,
                                    val_per_class=args.val_per_class, overwrite=args.overwrite)
    except DataError as err:
        raise ConfigError(str(err)) from None
    print("written: " + ", ".join(f"{split} {n} images" for split, n in written.items()) + f" -> {args.dst}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    handler = {"train": _cmd_train, "tune": _cmd_tune, "compare": _cmd_compare, "eval": _cmd_eval,
               "check": _cmd_check, "models": _cmd_models, "data": _cmd_data, "submit": _cmd_submit,
               "jobs": _cmd_jobs, "docs": _cmd_docs}[args.command]
    try:
        code = handler(args)
        sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's last flush
        return code
    except ConfigError as err:
        print(f"raydist: error: {err}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        return _reader_went_away()


def _reader_went_away() -> int:
    """The reader of stdout closed it (`raydist models | head -1`): end quietly, as a command killed by SIGPIPE
    does (exit 141), with stdout pointed at /dev/null so the interpreter's last flush finds nothing to write."""
    import os

    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # stdout is not a file descriptor (captured): nothing left to flush into it
        pass
    return 141


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
