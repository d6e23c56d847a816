"""`raydist submit` / `raydist jobs` against a real Ray head started with `ray start --head` (dashboard on)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from conftest import free_port

from raydist.cli import main
from raydist.cluster.submit import EXCLUDES, PROJECT, build_submission

ROOT = Path(__file__).resolve().parents[1]
JOB = "jobs/digits_fgsm_sdi.yaml"


def test_submission_is_checked_before_anything_is_sent(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    out = str(tmp_path / "runs")
    sub = build_submission(str(ROOT / JOB), [f"run.output_dir={out}", "method.k=3"])
    assert sub["entrypoint"] == f"python -m raydist.cli train {JOB} --set run.output_dir={out} --set method.k=3"
    assert sub["runtime_env"]["working_dir"] == str(PROJECT) and "/.venv" in EXCLUDES and "/data" in EXCLUDES
    assert sub["submission_id"].startswith("raydist-train-digits_fgsm_sdi-")
    assert build_submission(str(ROOT / "jobs/tune_digits.yaml"), [f"run.output_dir={out}"])["kind"] == "tune"

    cases = [
        ([JOB], "run.output_dir"),  # relative: would land in the job's temporary working directory
        ([JOB, "--set", f"run.output_dir={out}", "--set", "method.kk=1"], "method.kk"),
        (["jobs/nope.yaml", "--set", f"run.output_dir={out}"], "nope.yaml"),
        ([JOB, "--set", "run.storage_path=ckpt", "--set", f"run.output_dir={out}"], "run.storage_path"),
        ([JOB, "--set", "run.output_dir=gs://bucket/runs"], "run.output_dir"),
        ([JOB, "--set", f"run.output_dir={out}", "--resume", "--overwrite"], "--resume"),
        ([JOB, "--set", f"run.output_dir={out}"], "RAY_ADDRESS"),  # no address anywhere
        ([JOB, "--set", f"run.output_dir={out}", "--address", f"http://127.0.0.1:{free_port()}"], "cannot reach"),
    ]
    for args, named in cases:
        assert main(["submit", *args]) == 2
        err = capsys.readouterr().err.strip()
        assert named in err and "\n" not in err, err
    # data that lives only on the cluster is not looked for here
    remote = build_submission(str(ROOT / JOB), [f"run.output_dir={out}", "data.dataset=imagenet",
                                                "data.root=/mnt/cluster-only/imagenet", "data.stream=true"])
    assert "data.root=/mnt/cluster-only/imagenet" in remote["entrypoint"]
    again = build_submission(str(ROOT / JOB), [f"run.output_dir={out}", "run.storage_path=s3://bucket/ckpt"],
                             ("--resume",))
    assert again["entrypoint"].startswith(f"python -m raydist.cli train {JOB} --resume --set")
    outside = tmp_path / "job.yaml"
    outside.write_text((ROOT / JOB).read_text())
    assert main(["submit", str(outside), "--set", f"run.output_dir={out}", "--address", "http://x:8265"]) == 2
    assert "outside the project" in capsys.readouterr().err
    assert not Path(out).exists()


@pytest.fixture(scope="module")
def ray_head():
    """A real single-node Ray cluster in its own processes (`ray start --head --block`), stopped afterwards
    without touching the test session's own Ray instance."""
    port, dash = free_port(), free_port()
    temp = tempfile.mkdtemp(prefix="rayhead", dir="/tmp")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # `python` = this venv's
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "ray"), "start", "--head", f"--port={port}", "--num-cpus=2",
         "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
         f"--temp-dir={temp}", "--block", "--disable-usage-stats",
         # its own agent ports: another Ray (the test session's, a user's) may hold the defaults on this host
         *(f"--{flag}={free_port()}" for flag in ("dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                                                   "metrics-export-port", "runtime-env-agent-port",
                                                   "node-manager-port", "object-manager-port"))],
        env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{dash}"
    deadline = time.time() + 120
    while True:
        try:
            urllib.request.urlopen(f"{url}/api/version", timeout=2)
            break
        except urllib.error.HTTPError:  # answering (401 under Ray's token authentication): it is up
            break
        except OSError:
            if time.time() > deadline or proc.poll() is not None:
                os.killpg(proc.pid, signal.SIGKILL)
                pytest.fail("the Ray head did not come up")
            time.sleep(1)
    yield url
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=10)  # a graceful stop can take half a minute; nothing in it is under test
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
    shutil.rmtree(temp, ignore_errors=True)


def test_submit_follow_runs_the_job_on_the_cluster(tmp_path, ray_head, capsys, monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", ray_head)  # the address comes from the environment too
    out = tmp_path / "runs"
    sets = [f"run.output_dir={out}", "optim.epochs=1", "scaling.cpus_per_worker=1", "eval.test_samples=32",
            "eval.test_attacks=clean,pgd3", "eval.val_steps=2", "data.image_size=16", "data.val_size=100"]
    args = ["submit", JOB, "--follow"]
    for s in sets:
        args += ["--set", s]
    assert main(args) == 0
    printed = capsys.readouterr().out
    job_id = printed.split("submitted ", 1)[1].split()[0]
    assert "epoch 1/1" in printed and f"job {job_id} SUCCEEDED" in printed
    summary = json.loads((out / "digits_fgsm_sdi" / "summary.json").read_text())
    assert summary["method"] == "fgsm_sdi" and summary["n_test"] == 32

    assert main(["jobs", "status", job_id]) == 0
    assert "SUCCEEDED" in capsys.readouterr().out
    assert main(["jobs", "list"]) == 0
    assert job_id in capsys.readouterr().out
    assert main(["jobs", "logs", job_id]) == 0
    assert "epoch 1/1" in capsys.readouterr().out
    assert main(["jobs", "status", "raydist-no-such-job"]) == 2
    assert "raydist-no-such-job" in capsys.readouterr().err

    # the uploaded working directory is complete: the package imports from it (not from this checkout)
    from raydist.cluster.submit import client as jobs_client

    sub = build_submission(JOB, [f"run.output_dir={out}"])
    client = jobs_client(ray_head)  # with the cluster's token, as raydist's own commands send it
    probe = client.submit_job(entrypoint='python -c "import raydist.data, raydist.attacks; print(raydist.__file__)"',
                              runtime_env=sub["runtime_env"])
    deadline = time.time() + 120
    while str(client.get_job_status(probe)).split(".")[-1] not in ("SUCCEEDED", "FAILED", "STOPPED"):
        assert time.time() < deadline
        time.sleep(1)
    logs = client.get_job_logs(probe)
    assert str(client.get_job_status(probe)).endswith("SUCCEEDED"), logs
    assert "runtime_resources" in logs and str(PROJECT) not in logs

    # a job that fails on the cluster: --follow exits 1 with its status
    assert main(["submit", JOB, "--follow", "--set", f"run.output_dir={out}"]) == 1  # the run directory exists
    assert "FAILED" in capsys.readouterr().out


def test_submit_refuses_a_cluster_with_another_ray_version(tmp_path, ray_head, capsys, monkeypatch):
    import ray

    from raydist.cluster.submit import cluster_ray_version

    assert cluster_ray_version(ray_head) == ray.__version__
    monkeypatch.setattr(ray, "__version__", "2.52.0")  # as if this machine had another Ray than the cluster
    assert main(["submit", JOB, "--address", ray_head, "--set", f"run.output_dir={tmp_path / 'runs'}"]) == 2
    err = capsys.readouterr().err
    real = cluster_ray_version(ray_head)
    assert err.count("\n") == 1 and f"the cluster runs Ray {real}, this machine Ray 2.52.0" in err, err


class _TokenDashboard:
    """A stand-in for a token-authenticated dashboard: /api/version answers only with the right bearer token,
    and every request's Authorization header is kept for the test to look at."""

    def __init__(self, token: str) -> None:
        import http.server
        import threading

        seen: list[str | None] = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server's name
                seen.append(self.headers.get("Authorization"))
                ok = self.headers.get("Authorization") == f"Bearer {token}"
                body = json.dumps({"ray_version": "2.60.0", "version": "4"} if ok else {"error": "unauthorized"})
                self.send_response(200 if ok else 401)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(body.encode())

            def log_message(self, *args):  # quiet
                pass

        self.seen = seen
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"


def test_the_token_travels_in_the_authorization_header(tmp_path, monkeypatch):
    """The token reaches the cluster through the Jobs client's public ``headers`` argument (as Ray documents for
    HTTP clients), read from RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token in that order; nothing in
    Ray's private modules is called and the process's RAY_AUTH_MODE is left as the user set it."""
    import raydist.cluster.submit as S

    assert "ray._private" not in Path(S.__file__).read_text()
    dash = _TokenDashboard("sekret")
    home = tmp_path / "home"
    (home / ".ray").mkdir(parents=True)
    monkeypatch.setenv("HOME", str(home))
    for var in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(var, raising=False)
    try:
        with pytest.raises(S.C.ConfigError, match="cannot reach the Ray Jobs API"):
            S.client(dash.url)  # no token anywhere: refused by the cluster, one line
        # (a process that runs a token-authenticated Ray of its own, as this test session may, has Ray's client
        # add that Ray's token: still not the cluster's)
        assert dash.seen[-1] != "Bearer sekret"
        (home / ".ray" / "auth_token").write_text("sekret\n")
        S.client(dash.url)  # ~/.ray/auth_token
        assert dash.seen[-1] == "Bearer sekret" and "RAY_AUTH_MODE" not in os.environ
        named = tmp_path / "tok"
        named.write_text("other")
        monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(named))  # before the default file
        with pytest.raises(S.C.ConfigError):
            S.client(dash.url)
        assert dash.seen[-1] == "Bearer other"
        monkeypatch.setenv("RAY_AUTH_TOKEN", "sekret")  # before both files
        S.client(dash.url)
        assert dash.seen[-1] == "Bearer sekret"
        assert S.cluster_ray_version(dash.url) == "2.60.0"
        monkeypatch.delenv("RAY_AUTH_TOKEN")
        named.write_text("")
        with pytest.raises(S.C.ConfigError, match="RAY_AUTH_TOKEN_PATH: .* is empty"):
            S.client(dash.url)
    finally:
        dash.server.shutdown()
