"""`raydist submit` and `raydist jobs`: run any raydist file on a Ray cluster through the Ray Jobs API.

The project directory travels as the job's working directory (runtime_env ``working_dir``; data, runs, virtual
environments and checkpoints excluded), and the entrypoint is ``python -m raydist.cli train|tune|compare FILE``
run there, so the cluster runs exactly the code and the job file that were checked here. The file is validated
locally first: a mistake is one line and exit code 2 before anything is uploaded.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from raydist import config as C
from raydist.cluster.storage import is_uri

PROJECT = Path(__file__).resolve().parents[2]
# .gitignore-style patterns, anchored at the project root where a bare name would also hit raydist/data
EXCLUDES = ["/.git", "/.venv", "/.gpu", "/runs", "/data", "/bench/results", "*.pt", "*.parquet", "__pycache__",
            ".pytest_cache", ".ruff_cache", ".hypothesis", "*.egg-info"]
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
AGENT_WAIT_S = 120


def _address(address: str | None) -> str:
    url = address or os.environ.get("RAY_ADDRESS")
    if not url:
        raise C.ConfigError("no cluster address: pass --address http://HEAD:8265 or set RAY_ADDRESS")
    if "://" not in url:
        url = f"http://{url}"
    if not url.startswith(("http://", "https://")):
        raise C.ConfigError(f"--address: the Ray Jobs API needs the dashboard's http(s)://HOST:8265, got {url!r}")
    return url


def client(address: str | None):
    """A JobSubmissionClient for ``address`` (or RAY_ADDRESS); an unreachable cluster is a one-line error.

    A cluster with token authentication (Ray's ``RAY_AUTH_MODE=token``; Ray >= 2.59 starts local clusters so)
    gets the token the way Ray documents for HTTP clients: ``Authorization: Bearer TOKEN``, passed through the
    client's public ``headers`` argument, read from where Ray's own tools keep it (see :func:`_token`)."""
    from ray.job_submission import JobSubmissionClient

    url = _address(address)
    token = _token()
    try:
        return JobSubmissionClient(url, headers={"Authorization": f"Bearer {token}"} if token else None)
    except Exception as err:  # noqa: BLE001 - connection refused, wrong port, not a Ray dashboard ...
        hint = ""
        if "authentication" in str(err).lower() or "unauthorized" in str(err).lower():
            hint = (" (the cluster uses token authentication: set RAY_AUTH_TOKEN to the output of "
                    "`ray get-auth-token` on its head node, or copy that token to ~/.ray/auth_token)")
        raise C.ConfigError(f"cannot reach the Ray Jobs API at {url}: {type(err).__name__}: "
                            f"{str(err).splitlines()[0] if str(err) else ''}{hint}") from None


def kind_of(path: Path) -> str:
    """train, tune or compare, from the file's top-level keys."""
    try:
        raw = C.read_yaml(path)
    except C.ConfigError:  # the command's own check names the mistake
        raw = None
    if isinstance(raw, dict) and "methods" in raw:
        return "compare"
    if isinstance(raw, dict) and ("space" in raw or "base" in raw):
        return "tune"
    return "train"


def _output_dir(kind: str, path: Path, overrides: list[str]) -> str:
    """Validate the file as its command would, and return where it writes."""
    if kind == "train":
        run = C.load_job(path, overrides)["run"]
        if run["storage_path"] is not None and not is_uri(run["storage_path"]):
            _refuse_relative("run.storage_path", run["storage_path"], "a shared path or a URI (s3://, gs://)")
        return run["output_dir"]
    if kind == "tune":
        from raydist.tune.sweep import load_sweep

        return load_sweep(path, overrides)["run"]["output_dir"]
    from raydist.compare.spec import load_compare

    return load_compare(path, overrides)["run"]["output_dir"]  # as written, or the base job's


def _refuse_relative(key: str, value: str, give: str) -> None:
    if not Path(os.path.expanduser(value)).is_absolute():
        raise C.ConfigError(f"{key}: {value!r} is relative, so on the cluster it would land in the job's "
                            f"temporary working directory; give {give}")


def build_submission(path: str, overrides: list[str], flags: tuple[str, ...] = ()) -> dict[str, Any]:
    """Everything `submit` sends: checked here, before any upload. ``flags``: --resume / --overwrite, passed on
    to the command on the cluster (the run directory lives there, so that command checks them)."""
    p = Path(path)
    if not p.is_file():
        raise C.ConfigError(f"file not found: {p}")
    p = p.resolve()
    try:
        rel = p.relative_to(PROJECT)
    except ValueError:
        raise C.ConfigError(f"{p} is outside the project directory {PROJECT}, which is what the cluster receives; "
                            "put the file under it (e.g. in jobs/)") from None
    kind = kind_of(p)
    with C.files_elsewhere():  # data.root and model.pretrained_path are paths on the cluster, not here
        out = _output_dir(kind, p, overrides)
    _refuse_relative("run.output_dir", out, "storage every node sees, e.g. --set run.output_dir=/mnt/shared/runs")
    words = ["python", "-m", "raydist.cli", kind, str(rel), *flags]
    for item in overrides:
        words += ["--set", item]
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return {
        "entrypoint": " ".join(shlex.quote(w) for w in words),
        "runtime_env": {"working_dir": str(PROJECT), "excludes": list(EXCLUDES),
                        "env_vars": {"PYTHONUNBUFFERED": "1", "RAY_DEDUP_LOGS": "0"}},
        "submission_id": f"raydist-{kind}-{p.stem}-{stamp}",
        "metadata": {"raydist": "1", "file": str(rel), "kind": kind},
        "kind": kind,
        "output_dir": out,
    }


def _token() -> str | None:
    """The cluster token from where Ray's documentation says its clients read it, in its order: RAY_AUTH_TOKEN,
    the file RAY_AUTH_TOKEN_PATH names (unreadable or empty: an error, as in Ray), ~/.ray/auth_token; else None."""
    if os.environ.get("RAY_AUTH_TOKEN", "").strip():
        return os.environ["RAY_AUTH_TOKEN"].strip()
    named = os.environ.get("RAY_AUTH_TOKEN_PATH")
    if named:
        try:
            token = Path(os.path.expanduser(named)).read_text().strip()
        except OSError as err:
            raise C.ConfigError(f"RAY_AUTH_TOKEN_PATH: cannot read {named}: {err.strerror or err}") from None
        if not token:
            raise C.ConfigError(f"RAY_AUTH_TOKEN_PATH: {named} is empty")
        return token
    default = Path(os.path.expanduser("~/.ray/auth_token"))
    try:
        return default.read_text().strip() or None
    except OSError:  # no token file: a cluster without token authentication
        return None


def cluster_ray_version(address: str | None) -> str:
    """The Ray version the cluster's dashboard reports (its public GET /api/version)."""
    import json
    import urllib.request

    url = _address(address).rstrip("/") + "/api/version"
    token = _token()
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            return str(json.loads(answer.read())["ray_version"])
    except Exception as err:  # noqa: BLE001 - unreachable, refused, not a Ray dashboard
        raise C.ConfigError(f"cannot read the cluster's Ray version at {url}: {type(err).__name__}: "
                            f"{str(err).splitlines()[0] if str(err) else ''}") from None


def check_same_ray(address: str | None) -> None:
    """The job runs this project's code with the cluster's Ray: a version other than the one it was checked with
    here (Train V2 and Tune APIs move between releases) is refused before anything is uploaded."""
    import ray

    theirs = cluster_ray_version(address)
    if theirs != ray.__version__:
        raise C.ConfigError(f"the cluster runs Ray {theirs}, this machine Ray {ray.__version__}: use the same version "
                            f"on both (pip install 'ray[train,tune,default]=={theirs}' here, or the cluster image "
                            "built from clusters/ with this version)")


def submit(path: str, overrides: list[str], address: str | None, follow: bool, flags: tuple[str, ...] = ()) -> int:
    sub = build_submission(path, overrides, flags)
    jobs = client(address)
    check_same_ray(address)
    deadline = time.time() + AGENT_WAIT_S
    while True:
        try:
            job_id = jobs.submit_job(entrypoint=sub["entrypoint"], runtime_env=sub["runtime_env"],
                                     submission_id=sub["submission_id"], metadata=sub["metadata"])
            break
        except RuntimeError as err:  # a head that has just started has no job agent for a few seconds
            if "No available agent" not in str(err) or time.time() > deadline:
                raise
            time.sleep(2)
    print(f"raydist: submitted {job_id}  ({sub['entrypoint']})", flush=True)
    print(f"raydist: outputs under {sub['output_dir']} on the cluster; `raydist jobs logs {job_id}` for its log",
          flush=True)
    if not follow:
        return 0
    return follow_job(jobs, job_id)


def follow_job(jobs, job_id: str) -> int:
    """Stream the job's log until it ends; exit 0 if it succeeded, 1 otherwise."""

    async def tail() -> None:
        async for chunk in jobs.tail_job_logs(job_id):
            sys.stdout.write(chunk)
            sys.stdout.flush()

    asyncio.run(tail())
    status = str(jobs.get_job_status(job_id))
    while status.split(".")[-1] not in TERMINAL:  # the log can close a moment before the status settles
        time.sleep(0.5)
        status = str(jobs.get_job_status(job_id))
    status = status.split(".")[-1]
    info = jobs.get_job_info(job_id)
    print(f"raydist: job {job_id} {status}" + (f": {info.message}" if status != "SUCCEEDED" and info.message
                                                else ""), flush=True)
    return 0 if status == "SUCCEEDED" else 1


def jobs_command(action: str, job_id: str | None, address: str | None, follow: bool = False) -> int:
    jobs = client(address)
    if action == "list":
        rows = sorted(jobs.list_jobs(), key=lambda j: j.start_time or 0)
        print(f"{'submission id':<46} {'status':<10} {'started':<19} entrypoint")
        for j in rows:
            started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(j.start_time / 1000)) if j.start_time else ""
            print(f"{str(j.submission_id or j.job_id):<46} {str(j.status).split('.')[-1]:<10} {started:<19} "
                  f"{j.entrypoint[:80]}")
        return 0
    if not job_id:
        raise C.ConfigError(f"raydist jobs {action}: give a submission id (see `raydist jobs list`)")
    try:
        if action == "status":
            info = jobs.get_job_info(job_id)
            print(f"{job_id}: {str(info.status).split('.')[-1]}" + (f" ({info.message})" if info.message else ""))
            return 0
        if action == "logs":
            if follow:
                return follow_job(jobs, job_id)
            sys.stdout.write(jobs.get_job_logs(job_id))
            return 0
        if action == "stop":
            stopped = jobs.stop_job(job_id)
            print(f"{job_id}: {'stop requested' if stopped else 'already finished'}")
            return 0
    except RuntimeError as err:  # the Jobs API's answer for an unknown id
        raise C.ConfigError(f"job {job_id}: {str(err).splitlines()[0]}") from None
    raise C.ConfigError(f"unknown action {action!r}; choose list, status, logs or stop")
