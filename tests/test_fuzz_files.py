"""The front door, fuzzed: job, sweep and compare files mutated by Hypothesis — wrong types, out-of-range values,
unknown and misplaced keys, deep nesting, YAML oddities (anchors, duplicate keys, tabs, huge numbers, .nan/.inf,
empty, truncated and binary files). Each is either valid or refused with exit code 2 and one line; never a
traceback, never a Ray start.

Files go through the CLI's own entry point (``raydist.cli.main``) in-process, with the part after validation
(training, the sweep, the comparison) replaced by a stub that records that it was reached, and ``ray.init``
replaced by one that fails the test; a few go through the real command line in a subprocess.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from raydist import config as C  # noqa: E402
from raydist.cli import main  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# RAYDIST_FUZZ_EXAMPLES=1000 (and RAYDIST_FUZZ_RANDOM=1 for fresh examples) searches harder
FUZZ = settings(max_examples=int(os.environ.get("RAYDIST_FUZZ_EXAMPLES", "40")), deadline=None,
                derandomize=not os.environ.get("RAYDIST_FUZZ_RANDOM"),
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

BASE_JOB = {
    "run": {"name": "fz", "output_dir": "runs", "seed": 0},
    "data": {"dataset": "digits", "batch_size": 64},
    "model": {"name": "resnet18", "width": 8},
    "method": {"name": "fgsm_sdi", "epsilon": "32/255", "k": 5},
    "optim": {"epochs": 2, "lr": 0.05, "schedule": "cyclic"},
    "scaling": {"num_workers": 1, "cpus_per_worker": 1},
    "eval": {"val_steps": 3, "test_attacks": ["clean", "pgd10"], "test_samples": 64},
}
BASE_SWEEP = {
    "base": "job.yaml",
    "set": {"optim.epochs": 2},
    "space": {"method.k": {"type": "int", "low": 1, "high": 40},
              "optim.lr": {"type": "loguniform", "low": 0.02, "high": 0.3},
              "model.activation": {"type": "choice", "values": ["relu", "softplus"]}},
    "objective": "single",
    "search": {"seed": 0, "initial": [{"method.k": 20}]},
    "scheduler": {"grace_period": 1, "reduction_factor": 2},
    "budget": {"num_trials": 2, "max_concurrent_trials": 1},
}
BASE_COMPARE = {
    "base": "job.yaml",
    "overrides": {"optim.epochs": 2},
    "methods": ["pgd_at", {"name": "fgsm_rs", "alpha": "40/255"}, {"name": "fgsm_sdi", "label": "SDI", "k": 3}],
    "eval": {"attacks": ["clean", "pgd10"], "samples": 32, "budgets": {"pgd10": {"alpha": "2/255"}}, "workers": 1},
    "max_concurrent": 1,
}
HUGE = [2**63, -(2**63) - 1, 10**100, 1e308, -1e308, float("inf"), float("-inf"), float("nan")]

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.sampled_from(HUGE), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12), st.sampled_from(["8/255", "1/0", "0/0", "nan", "-inf", "1e999", "", " ", "~", "yes",
                                           "0x10", "0o7", "1_000", "relu", "fgsm_sdi", "digits", "../x", "a/b"]),
)
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(st.text(max_size=6), inner, max_size=4)),
                      max_leaves=8)
keys = st.one_of(st.text(max_size=10), st.sampled_from(
    ["k", "epochs", "lr", "name", "epsilon", "seed", "num_workers", "type", "low", "high", "values", "when",
     "attacks", "budgets", "label", "set", "base", "space", "methods", "eval", "run", "model", "optim"]))


def _paths(d: dict) -> list[tuple]:
    """Every key path of a nested mapping/list, down to the leaves."""
    out = []
    stack = [((), d)]
    while stack:
        path, node = stack.pop()
        items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
        for k, v in items:
            out.append((*path, k))
            stack.append(((*path, k), v))
    return sorted(out, key=repr)


@st.composite
def mutated(draw, base: dict) -> dict:
    """``base`` with one to three mutations: a value replaced, a key added, a key moved elsewhere, a key dropped,
    or a value nested deeply."""
    doc = copy.deepcopy(base)
    for _ in range(draw(st.integers(1, 3))):
        paths = _paths(doc)
        if not paths:
            doc = draw(values)
            break
        path = draw(st.sampled_from(paths))
        parent = doc
        for k in path[:-1]:
            parent = parent[k]
        if not isinstance(parent, (dict, list)):
            continue
        kind = draw(st.sampled_from(["value", "add", "move", "drop", "nest"]))
        if kind == "value":
            parent[path[-1]] = draw(values)
        elif kind == "add" and isinstance(parent, dict):
            parent[draw(keys)] = draw(values)
        elif kind == "move" and isinstance(parent, dict):
            target = draw(st.sampled_from(paths))
            holder = doc
            for k in target[:-1]:
                holder = holder[k]
            if isinstance(holder, dict) and path[-1] in parent:
                holder[path[-1]] = parent.pop(path[-1])
        elif kind == "drop" and isinstance(parent, dict) and path[-1] in parent:
            del parent[path[-1]]
        elif kind == "nest":
            v = parent[path[-1]]
            for _ in range(draw(st.integers(1, 40))):
                v = [v] if draw(st.booleans()) else {"x": v}
            parent[path[-1]] = v
    return doc


def _dump(doc) -> str:
    return yaml.safe_dump(doc, sort_keys=False, allow_unicode=True)


@st.composite
def odd_text(draw, base: dict) -> bytes:
    """The YAML text of ``base``, damaged the way files are: truncated, a tab, a line repeated (a duplicate key),
    anchors and aliases, a byte-order mark, NULs, random bytes, nothing at all."""
    text = _dump(base)
    kind = draw(st.sampled_from(["truncate", "tab", "duplicate", "anchor", "bom", "nul", "binary", "empty",
                                 "splice"]))
    lines = text.splitlines(keepends=True)
    if kind == "truncate":
        return text.encode()[: draw(st.integers(0, len(text)))]
    if kind == "tab":
        i = draw(st.integers(0, len(lines) - 1))
        lines[i] = "\t" + lines[i].lstrip(" ")
        return "".join(lines).encode()
    if kind == "duplicate":
        i = draw(st.integers(0, len(lines) - 1))
        return "".join(lines[: i + 1] + [lines[i]] + lines[i + 1:]).encode()
    if kind == "anchor":
        extra = draw(st.sampled_from([
            "x: &a [1, 2]\ny: *a\n", "<<: {run: {seed: 1}}\n", "z: &l [&m [*m]]\n",
            "a: &a [x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a]\nc: &c [*b, *b, *b, *b, *b, *b, *b, *b]\n"
            "d: &d [*c, *c, *c, *c, *c, *c, *c, *c]\ne: &e [*d, *d, *d, *d, *d, *d, *d, *d]\n"
            "f: [*e, *e, *e, *e, *e, *e, *e, *e, *e, *e]\n",
            "? [1, 2]\n: 3\n", "!!python/object/apply:os.system [echo hi]\n", "q: !!binary aGk=\n"]))
        return (extra + text).encode()
    if kind == "bom":
        return b"\xef\xbb\xbf" + text.encode()
    if kind == "nul":
        return text.encode() + b"\x00"
    if kind == "binary":
        return draw(st.binary(max_size=64))
    if kind == "empty":
        return draw(st.sampled_from([b"", b"\n", b"---\n", b"...\n", b"null\n", b"[]\n", b"0\n"]))
    i = draw(st.integers(0, len(text)))
    return (text[:i] + draw(st.text(max_size=8)) + text[i:]).encode()


@pytest.fixture
def front_door(tmp_path, monkeypatch, capsys):
    """``run(command, content)``: write the file, run ``raydist COMMAND FILE``, check the outcome's shape and
    return (exit code, stderr). Past validation, a stub stands in for the run; Ray never starts."""
    import ray

    import raydist.compare.runner
    import raydist.train.driver
    import raydist.tune.runner

    started: list[str] = []

    def no_ray(*args, **kwargs):
        started.append("ray")
        raise AssertionError("Ray was started for a file under test")

    # the test session's own Ray may already be up (other tests): what counts is that nothing here starts one
    was_up = ray.is_initialized()
    monkeypatch.setattr(ray, "init", no_ray)
    monkeypatch.setattr(raydist.train.driver, "ensure_ray", no_ray)
    monkeypatch.setattr(raydist.train.driver, "start_local_ray", no_ray)
    monkeypatch.setattr(raydist.train.driver, "run_training", lambda cfg, **kw: {})
    monkeypatch.setattr(raydist.tune.runner, "run_sweep", lambda sweep, **kw: {})
    monkeypatch.setattr(raydist.compare.runner, "run_compare", lambda spec, **kw: {})
    monkeypatch.chdir(tmp_path)
    (tmp_path / "job.yaml").write_text(_dump(BASE_JOB))

    def run(command: str, content: bytes | str, name: str = "file.yaml") -> tuple[int, str]:
        path = tmp_path / name
        path.write_bytes(content.encode() if isinstance(content, str) else content)
        capsys.readouterr()
        code = main([command, str(path)])
        err = capsys.readouterr().err
        assert code in (0, 2), (code, err)
        if code == 2:
            assert err.startswith("raydist: error: ") and err.count("\n") == 1 and len(err) < 4000, err
        else:
            assert err == "", err
        assert not started and ray.is_initialized() == was_up
        return code, err

    return run


def test_the_base_files_are_valid(front_door):
    """The control: unmutated, each file passes, so refusals below come from the mutations."""
    assert front_door("train", _dump(BASE_JOB))[0] == 0
    assert front_door("tune", _dump(BASE_SWEEP))[0] == 0
    assert front_door("compare", _dump(BASE_COMPARE))[0] == 0


@FUZZ
@given(doc=mutated(BASE_JOB))
def test_mutated_job_files(front_door, doc):
    front_door("train", _dump(doc), "job_m.yaml")


@FUZZ
@given(doc=mutated(BASE_SWEEP))
def test_mutated_sweep_files(front_door, doc):
    front_door("tune", _dump(doc))


@FUZZ
@given(doc=mutated(BASE_COMPARE))
def test_mutated_compare_files(front_door, doc):
    front_door("compare", _dump(doc))


@FUZZ
@given(command=st.sampled_from(["train", "tune", "compare"]), data=st.data())
def test_odd_yaml_text(front_door, command, data):
    base = {"train": BASE_JOB, "tune": BASE_SWEEP, "compare": BASE_COMPARE}[command]
    front_door(command, data.draw(odd_text(base)), "odd.yaml")


@pytest.mark.parametrize("command", ["train", "tune", "compare"])
def test_yaml_oddities_are_refused_naming_them(front_door, command):
    base = {"train": BASE_JOB, "tune": BASE_SWEEP, "compare": BASE_COMPARE}[command]
    text = _dump(base)
    first = text.splitlines(keepends=True)[0]
    cases = {
        first + text: "duplicate key",  # PyYAML alone keeps the last and says nothing
        b"\x89PNG\r\n\x1a\n\x00\x00\xff": "not a text file",
        "\t" + text: "line 1",
        "a: &a [x, x]\n" + "".join(f"{c}: &{c} [{', '.join([f'*{p}'] * 9)}]\n"
                                   for p, c in zip("abcdefgh", "bcdefghi")) + text: "too large",
        "[" * 400 + "]" * 400: "nested",
        "x: &a [x, *a]\n" + text: "",  # a self-referencing alias: refused one way or another
    }
    for content, needle in cases.items():
        code, err = front_door(command, content)
        assert code == 2 and needle in err, (content[:40], err)


@pytest.mark.parametrize("where, value", [("optim.lr", ".nan"), ("optim.lr", ".inf"), ("method.k", "1e999"),
                                          ("run.seed", "1.0e+999"), ("method.epsilon", "-.inf")])
def test_non_finite_and_huge_numbers_are_refused(front_door, where, value):
    section, key = where.split(".")
    text = _dump(BASE_JOB).replace(f"  {key}: ", f"  {key}: {value} #", 1)
    code, err = front_door("train", text)
    assert code == 2 and where in err, err


def test_duplicate_keys_inside_sections_and_in_overrides(front_door, tmp_path):
    code, err = front_door("train", "method:\n  name: fgsm_sdi\n  k: 5\n  k: 50\n")
    assert code == 2 and "duplicate key 'k'" in err and "line 4" in err and "line 3" in err, err
    # a merge may override what it brings in: that is not a duplicate
    code, _ = front_door("train", "method: {<<: {name: fgsm_sdi, k: 5}, k: 7}\n")
    assert code == 0
    assert C.parse_yaml("a: 1\nb: 2\n") == {"a": 1, "b": 2}
    with pytest.raises(yaml.YAMLError, match="duplicate key"):
        C.parse_yaml("{a: 1, a: 2}")


def test_the_command_line_itself(tmp_path):
    """A few through the real entry point in a subprocess: one line on stderr, exit 2, no traceback; and
    `raydist models` piped into a reader that stops early ends quietly."""
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "RAY_ADDRESS": ""}
    (tmp_path / "job.yaml").write_text(_dump(BASE_JOB))
    files = {"dup.yaml": _dump(BASE_JOB) + "run: {seed: 1}\n", "bin.yaml": b"\xff\xfe\x00\x01",
             "sweep.yaml": _dump({**BASE_SWEEP, "space": {"method.k": {"type": "int", "low": 9, "high": 2}}})}
    for name, content in files.items():
        (tmp_path / name).write_bytes(content.encode() if isinstance(content, str) else content)
    script = ("import sys\nfrom raydist.cli import main\n"
              "for cmd, f in [('train', 'dup.yaml'), ('compare', 'bin.yaml'), ('tune', 'sweep.yaml')]:\n"
              "    print(main([cmd, f]), file=sys.stderr)\n")
    out = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=120)
    lines = out.stderr.strip().splitlines()
    assert "Traceback" not in out.stderr and lines[1::2] == ["2", "2", "2"], out.stderr
    assert "duplicate key 'run'" in lines[0] and "not a text file" in lines[2] and "space.method.k" in lines[4]

    cli = [sys.executable, "-m", "raydist.cli"]
    proc = subprocess.Popen(cli + ["models"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**env, "PYTHONUNBUFFERED": ""})  # buffered: the pipe error comes at the flush
    proc.stdout.close()  # what `raydist models | head -1` meets once head has its line (here: before the first)
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141 and err == "", err
