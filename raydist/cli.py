"""The `raydist` command line.

Every mistake in what the user typed or pointed at is reported as one line naming it, with exit code 2, before
Ray starts; failures during training exit 1.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from raydist import __version__
from raydist import config as C
from raydist.config import ConfigError

EPILOG = """examples:
  raydist train jobs/digits_fgsm_sdi.yaml
  raydist train jobs/cifar10_fgsm_sdi.yaml --set method.k=10 --set optim.lr=0.05
  raydist train jobs/digits_fgsm_sdi.yaml --resume        # continue an interrupted run
  raydist tune jobs/tune_digits.yaml                      # Ray Tune + Optuna sweep, ASHA early stopping
  raydist check jobs/cifar10_pgd_at.yaml                  # validate and print the resolved job
  raydist models                                          # list model names
"""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="raydist",
        description="Adversarial training of image classifiers on Ray Train (FGSM-SDI, PGD-AT, FGSM-RS, ...).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"raydist {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

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

    sub.add_parser("models", help="list the model names create_model and job files accept")
    return p


def _cmd_train(args: argparse.Namespace) -> int:
    from raydist.config import load_job

    cfg = load_job(args.job, args.overrides)
    from raydist.train.driver import run_training

    try:
        run_training(cfg, overwrite=args.overwrite, resume=args.resume)
    except ConfigError:
        raise
    except Exception as err:  # noqa: BLE001 - report any training failure in one line, exit 1
        cause = err
        while cause.__cause__ is not None:
            cause = cause.__cause__
        print(f"raydist: training failed: {type(cause).__name__}: {cause}".splitlines()[0], file=sys.stderr)
        return 1
    return 0


def _cmd_tune(args: argparse.Namespace) -> int:
    from raydist.tune.sweep import load_sweep

    sweep = load_sweep(args.sweep, args.overrides)
    from raydist.tune.runner import run_sweep

    try:
        run_sweep(sweep, overwrite=args.overwrite, resume=args.resume)
    except C.ConfigError:
        raise
    except Exception as err:  # noqa: BLE001 - one line, exit 1
        print(f"raydist: sweep failed: {type(err).__name__}: {err}".splitlines()[0], file=sys.stderr)
        return 1
    return 0


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


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    handler = {"train": _cmd_train, "tune": _cmd_tune, "check": _cmd_check, "models": _cmd_models}[args.command]
    try:
        return handler(args)
    except ConfigError as err:
        print(f"raydist: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
