"""clusters/: the Ray cluster launcher configs (AWS, GCP) and the KubeRay manifests.

Launcher configs go through Ray's own checks: its JSON schema (ray/autoscaler/ray-schema.json) and the
prepare_config + validate_config pair that `ray up` runs before it talks to a cloud. RayCluster specs go through
the code Ray's autoscaler uses on Kubernetes to turn a RayCluster into its node types. On top of that: the
things these files promise in clusters/README.md (GPU and spot node types, resources that match the machines,
the project installed on every node, shared storage, token authentication), and every job file, path and
`raydist submit|train` command the docs mention."""

from __future__ import annotations

import copy
import json
import re
import shlex
from pathlib import Path

import pytest
import yaml

from raydist import config as C

ROOT = Path(__file__).resolve().parents[1]
CLUSTERS = ROOT / "clusters"
YAML_FILES = sorted(p for p in CLUSTERS.rglob("*") if p.suffix in (".yaml", ".yml"))


def _docs(path: Path) -> list:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


LAUNCHERS = [p for p in YAML_FILES if any(isinstance(d, dict) and "available_node_types" in d for d in _docs(p))]
KUBERAY = [(p, d) for p in YAML_FILES for d in _docs(p)
           if isinstance(d, dict) and str(d.get("apiVersion", "")).startswith("ray.io/")]
RAYCLUSTERS = [(p, d) for p, d in KUBERAY if d.get("kind") == "RayCluster"]
RAYJOBS = [(p, d) for p, d in KUBERAY if d.get("kind") == "RayJob"]
# every RayCluster spec: the RayCluster's own and each RayJob's rayClusterSpec
CLUSTER_SPECS = ([(f"{_rel(p)}:{d['metadata']['name']}", d["spec"]) for p, d in RAYCLUSTERS]
                 + [(f"{_rel(p)}:{d['metadata']['name']}.rayClusterSpec", d["spec"]["rayClusterSpec"])
                    for p, d in RAYJOBS])

# vCPUs and GPUs of the machine types the launcher configs use (AWS and GCP instance type documentation).
# A node type's `resources` must match its machine; add a row when you use another one.
AWS_INSTANCES = {
    "m5.2xlarge": (8, 0), "m5.4xlarge": (16, 0),
    "g5.2xlarge": (8, 1), "g5.4xlarge": (16, 1), "g5.8xlarge": (32, 1), "g5.12xlarge": (48, 4),
    "g6.4xlarge": (16, 1), "p4d.24xlarge": (96, 8), "p5.48xlarge": (192, 8),
}
GCP_MACHINES = {"n1-standard-8": 8, "n1-standard-16": 16, "n1-standard-32": 32, "a2-highgpu-1g": 12,
                "a2-highgpu-8g": 96}
GCP_BUNDLED_GPUS = {"a2-highgpu-1g": 1, "a2-highgpu-8g": 8}  # A100s come with the machine type


def _load(path: Path) -> dict:
    (doc,) = _docs(path)
    return doc


def _ray_schema() -> dict:
    import ray.autoscaler

    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


def _worker_types(cfg: dict) -> dict:
    return {k: v for k, v in cfg["available_node_types"].items() if k != cfg["head_node_type"]}


def _is_spot(provider: str, node_config: dict) -> bool:
    if provider == "aws":
        return (node_config.get("InstanceMarketOptions") or {}).get("MarketType") == "spot"
    scheduling = node_config.get("scheduling") or {}
    return scheduling.get("provisioningModel") == "SPOT" or scheduling.get("preemptible") is True


def _machine(provider: str, node_config: dict) -> tuple[str, int, int]:
    """(machine type, vCPUs, GPUs) of a node type's node_config."""
    if provider == "aws":
        name = node_config["InstanceType"]
        assert name in AWS_INSTANCES, f"{name}: add its vCPUs and GPUs to AWS_INSTANCES"
        return (name, *AWS_INSTANCES[name])
    name = node_config["machineType"]
    assert name in GCP_MACHINES, f"{name}: add its vCPUs to GCP_MACHINES"
    gpus = sum(int(a.get("acceleratorCount", 0)) for a in node_config.get("guestAccelerators", []))
    return name, GCP_MACHINES[name], gpus + GCP_BUNDLED_GPUS.get(name, 0)


def test_the_cluster_files_are_there():
    for name in ("aws.yaml", "gcp.yaml", "README.md", "local.md", "kuberay/raycluster.yaml",
                 "kuberay/rayjob.yaml", "kuberay/shared-storage.yaml", "kuberay/Dockerfile"):
        assert (CLUSTERS / name).is_file(), name
    assert {p.name for p in LAUNCHERS} == {"aws.yaml", "gcp.yaml"}
    assert RAYCLUSTERS and RAYJOBS


@pytest.mark.parametrize("path", YAML_FILES, ids=_rel)
def test_every_yaml_file_parses_to_mappings(path):
    docs = _docs(path)
    assert docs, f"{_rel(path)} is empty"
    assert all(isinstance(d, dict) for d in docs)


# ---------------------------------------------------------------------------------------------- cluster launcher


@pytest.mark.parametrize("path", LAUNCHERS, ids=_rel)
def test_launcher_config_matches_rays_schema(path):
    jsonschema = pytest.importorskip("jsonschema")
    jsonschema.validate(_load(path), _ray_schema())  # additionalProperties: false catches misspelt keys


@pytest.mark.parametrize("path", LAUNCHERS, ids=_rel)
def test_launcher_config_passes_what_ray_up_checks_first(path):
    """`ray up` fills in the provider's defaults, merges the setup commands, then validates (schema, head type,
    min_workers against max_workers) before it touches the cloud: the same two calls here."""
    pytest.importorskip("jsonschema")
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = prepare_config(copy.deepcopy(_load(path)))
    validate_config(cfg)
    install = [c for c in cfg["head_setup_commands"] if "pip install" in c and "~/raydist" in c]
    assert install, "the head does not install the project"
    for name, node_type in _worker_types(cfg).items():
        commands = node_type.get("worker_setup_commands", cfg["worker_setup_commands"])
        assert any("pip install" in c and "~/raydist" in c for c in commands), f"{name} does not install it"


@pytest.mark.parametrize("path", LAUNCHERS, ids=_rel)
def test_launcher_node_types_gpu_spot_and_resources(path):
    cfg = _load(path)
    provider = cfg["provider"]["type"]
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert not _is_spot(provider, head["node_config"]), "the head must be on-demand: losing it ends the cluster"
    assert cfg["max_workers"] > 0 and cfg["idle_timeout_minutes"] > 0

    gpu_spot, gpu_on_demand = {}, {}
    for name, node_type in types.items():
        machine, vcpus, gpus = _machine(provider, node_type["node_config"])
        res = node_type["resources"]
        if node_type is head:
            assert res.get("CPU") in (0, vcpus) and not res.get("GPU"), f"{name}: {res}"
            continue
        assert res.get("CPU") == vcpus, f"{name}: {machine} has {vcpus} vCPUs, resources say {res.get('CPU')}"
        assert res.get("GPU", 0) == gpus, f"{name}: {machine} has {gpus} GPUs, resources say {res.get('GPU', 0)}"
        assert node_type.get("min_workers", 0) <= node_type.get("max_workers", cfg["max_workers"])
        if gpus:
            (gpu_spot if _is_spot(provider, node_type["node_config"]) else gpu_on_demand)[name] = node_type
        if provider == "gcp":
            scheduling = node_type["node_config"].get("scheduling", {})
            # the Compute API takes an object; Ray's own examples wrongly use a list (ray-project/ray#46248)
            assert isinstance(scheduling, dict), f"{name}: scheduling must be a mapping"
            if gpus or _is_spot(provider, node_type["node_config"]):
                assert scheduling.get("onHostMaintenance") == "TERMINATE", name
            if _is_spot(provider, node_type["node_config"]):
                assert scheduling.get("automaticRestart") is not True, name

    assert gpu_spot, "no spot / preemptible GPU worker type"
    assert gpu_on_demand, "no on-demand GPU worker type to fall back to"
    # spot first: an on-demand GPU type never outranks a spot type of the same machine
    for name, od in gpu_on_demand.items():
        machine = _machine(provider, od["node_config"])[0]
        for spot_name, spot in gpu_spot.items():
            if _machine(provider, spot["node_config"])[0] == machine:
                assert spot.get("priority", 0) > od.get("priority", 0), (spot_name, name)


@pytest.mark.parametrize("path", LAUNCHERS, ids=_rel)
def test_launcher_ships_and_installs_the_project(path):
    cfg = _load(path)
    assert cfg["file_mounts"].get("~/raydist") == ".", "file_mounts must copy the repository root to ~/raydist"
    setup = " ; ".join(cfg["setup_commands"])
    assert re.search(r"pip install [^;]*-e ~/raydist", setup), setup
    assert "torch" in setup and "download.pytorch.org/whl/cpu" in setup, "torch for GPU and CPU nodes"
    # the 6 GB .venv, runs/ and data/ stay home, but no source directory may be excluded with them: an
    # unanchored pattern matches at any depth, and `data` would drop the raydist/data package
    assert ".gitignore" in cfg.get("rsync_filter", []) or "/.venv" in cfg.get("rsync_exclude", [])
    source_dirs = {p.name for p in (ROOT / "raydist").rglob("*") if p.is_dir()} | {"raydist", "jobs"}
    for pattern in cfg.get("rsync_exclude", []):
        if not pattern.startswith("/"):
            assert pattern.strip("/") not in source_dirs, f"rsync_exclude {pattern!r} drops source directories"


@pytest.mark.parametrize("path", LAUNCHERS, ids=_rel)
def test_launcher_start_commands_and_token(path):
    cfg = _load(path)
    head = " ; ".join(cfg["head_start_ray_commands"])
    worker = " ; ".join(cfg["worker_start_ray_commands"])
    for flag in ("ray start --head", "--port=6379", "--autoscaling-config=~/ray_bootstrap_config.yaml",
                 "--dashboard-host=0.0.0.0"):
        assert flag in head, flag
    assert "ray start --address=$RAY_HEAD_IP:6379" in worker
    if "~/.ray/auth_token" in cfg["file_mounts"]:
        # a node joining a token-protected head presents the token only with RAY_AUTH_MODE=token
        assert "RAY_AUTH_MODE=token" in head and "RAY_AUTH_MODE=token" in worker


@pytest.mark.parametrize("path", LAUNCHERS, ids=_rel)
def test_launcher_mounts_shared_storage_into_the_container(path):
    """README: run.output_dir=/mnt/shared/... is the storage every node sees."""
    cfg = _load(path)
    assert "--volume /mnt/shared:/mnt/shared" in cfg["docker"]["run_options"]
    assert any("mkdir -p /mnt/shared" in c for c in cfg["initialization_commands"])


# ---------------------------------------------------------------------------------------------------- KubeRay


def _containers(pod_template: dict) -> list[dict]:
    return pod_template["spec"]["containers"]


def _groups(spec: dict) -> list[tuple[str, dict]]:
    return [("head", spec["headGroupSpec"])] + [(g["groupName"], g) for g in spec.get("workerGroupSpecs", [])]


@pytest.mark.parametrize("path, doc", KUBERAY, ids=[f"{_rel(p)}:{d.get('kind')}" for p, d in KUBERAY])
def test_kuberay_api_version_and_kind(path, doc):
    assert doc["apiVersion"] == "ray.io/v1"
    assert doc["kind"] in ("RayCluster", "RayJob")
    assert doc["metadata"]["name"]


@pytest.mark.parametrize("name, spec", CLUSTER_SPECS, ids=[n for n, _ in CLUSTER_SPECS])
def test_kuberay_cluster_spec(name, spec):
    assert spec["enableInTreeAutoscaling"] is True
    assert spec.get("authOptions", {}).get("mode") == "token"
    head = spec["headGroupSpec"]
    assert isinstance(head["rayStartParams"], dict)
    assert head["rayStartParams"].get("dashboard-host") == "0.0.0.0"
    ports = {p["containerPort"] for p in _containers(head["template"])[0]["ports"]}
    assert {6379, 8265, 10001} <= ports

    names = [g["groupName"] for g in spec["workerGroupSpecs"]]
    assert len(names) == len(set(names)), names
    gpu_groups = []
    for group_name, group in _groups(spec):
        pod = group["template"]["spec"]
        volumes = {v["name"] for v in pod.get("volumes", [])}
        for container in pod["containers"] + pod.get("initContainers", []):
            assert container.get("image"), f"{group_name}/{container['name']}: no image"
            for mount in container.get("volumeMounts", []):
                assert mount["name"] in volumes, f"{group_name}: volume {mount['name']} is not defined"
        if group_name == "head":
            continue
        assert isinstance(group["rayStartParams"], dict)
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], group_name
        resources = _containers(group["template"])[0]["resources"]
        gpus = int(resources.get("limits", {}).get("nvidia.com/gpu", 0))
        if gpus:
            gpu_groups.append(group_name)
            assert int(resources.get("requests", {}).get("nvidia.com/gpu", gpus)) == gpus
    assert gpu_groups, "no worker group with an nvidia.com/gpu limit"


@pytest.mark.parametrize("name, spec", CLUSTER_SPECS, ids=[n for n, _ in CLUSTER_SPECS])
def test_rays_kuberay_autoscaler_reads_the_spec(name, spec):
    """The autoscaler sidecar derives its node types from the RayCluster with this function and validates them
    against Ray's schema; the GPU group must come out with GPUs, the head with none of the CPUs."""
    pytest.importorskip("jsonschema")
    from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr

    cr = {"apiVersion": "ray.io/v1", "kind": "RayCluster",
          "metadata": {"name": "raydist", "namespace": "default"}, "spec": copy.deepcopy(spec)}
    cfg = _derive_autoscaling_config_from_ray_cr(cr)
    types = cfg["available_node_types"]
    assert types[cfg["head_node_type"]]["resources"]["CPU"] == 0
    assert any(t["resources"].get("GPU", 0) >= 1 for t in types.values())


def _entrypoint(doc: dict) -> list[str]:
    return shlex.split(doc["spec"]["entrypoint"])


def _overrides(words: list[str]) -> list[str]:
    return [words[i + 1] for i, w in enumerate(words) if w == "--set"]


@pytest.mark.parametrize("path, doc", RAYJOBS, ids=[_rel(p) for p, _ in RAYJOBS])
def test_rayjob_runs_an_existing_job_file_on_shared_storage(path, doc):
    spec = doc["spec"]
    assert spec["entrypoint"].startswith("raydist "), spec["entrypoint"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert isinstance(spec["ttlSecondsAfterFinished"], int) and spec["ttlSecondsAfterFinished"] >= 0
    words = _entrypoint(doc)
    assert words[1] == "train"
    job = words[2]
    assert re.fullmatch(r"jobs/[\w.-]+\.yaml", job) and (ROOT / job).is_file(), job
    cfg = C.load_job(ROOT / job, _overrides(words))  # the overrides name real keys with valid values
    out = cfg["run"]["output_dir"]
    assert out.startswith("/"), out
    cluster = spec["rayClusterSpec"]
    for group_name, group in _groups(cluster):
        mounts = [m["mountPath"] for m in _containers(group["template"])[0].get("volumeMounts", [])]
        assert any(out == m or out.startswith(m.rstrip("/") + "/") for m in mounts), \
            f"run.output_dir {out} is not on a volume of the {group_name} pods"


def _images(spec: dict) -> set[str]:
    return {c["image"] for _, g in _groups(spec) for c in g["template"]["spec"]["containers"]}


def _ray_versions() -> dict[str, set[str]]:
    """Every Ray version these files pin, by file."""
    found: dict[str, set[str]] = {}
    for path in LAUNCHERS:
        text = yaml.safe_dump(_load(path))
        found[_rel(path)] = set(re.findall(r"rayproject/ray:(\d+\.\d+\.\d+)-py\d+-(?:cpu|gpu|cu\d+)", text))
    for name, spec in CLUSTER_SPECS:
        found[name] = {str(spec["rayVersion"])}
    dockerfile = (CLUSTERS / "kuberay" / "Dockerfile").read_text()
    found["clusters/kuberay/Dockerfile"] = set(re.findall(r"rayproject/ray:(\d+\.\d+\.\d+)-py\d+-gpu", dockerfile))
    return found


def test_one_ray_version_and_one_image_everywhere():
    versions = _ray_versions()
    assert all(versions.values()), versions
    assert len(set().union(*versions.values())) == 1, versions
    images = set().union(*(_images(spec) for _, spec in CLUSTER_SPECS))
    assert len(images) == 1, f"the RayCluster and the RayJob should run the same image: {images}"


def test_dockerfile_installs_the_project_and_the_job_files():
    text = (CLUSTERS / "kuberay" / "Dockerfile").read_text()
    for needle in ("FROM ", "COPY --chown=ray:users raydist ", "COPY --chown=ray:users jobs ", "pip install",
                   "WORKDIR /home/ray/raydist"):
        assert needle in text, needle
    ignore = (CLUSTERS / "kuberay" / "Dockerfile.dockerignore").read_text().split()
    assert {"!raydist/", "!jobs/", "!pyproject.toml"} <= set(ignore)
    # the manifests' containers start where the job files are
    for _, spec in CLUSTER_SPECS:
        for _, group in _groups(spec):
            assert _containers(group["template"])[0].get("workingDir") == "/home/ray/raydist"


# ------------------------------------------------------------------------------------------------------- docs

DOC_FILES = sorted(p for p in CLUSTERS.rglob("*") if p.is_file())


def _text(path: Path) -> str:
    # join shell continuation lines, also inside YAML / Dockerfile comments
    return re.sub(r"\\[ \t]*\n[ \t]*#?[ \t]*", " ", path.read_text())


@pytest.mark.parametrize("path", DOC_FILES, ids=_rel)
def test_paths_named_in_the_cluster_files_exist(path):
    text = _text(path)
    refs = {m.group(1) for m in re.finditer(r"(?<![\w/.-])((?:jobs|clusters)/[\w./-]+)", text)
            if text[m.end():m.end() + 1] not in ("*", "{")}  # jobs/imagenet_*.yaml is a pattern, not a path
    for ref in sorted(refs):
        ref = ref.rstrip(".")
        if ref.endswith("/"):
            assert (ROOT / ref).is_dir(), f"{_rel(path)} names {ref}"
        else:
            assert (ROOT / ref).exists(), f"{_rel(path)} names {ref}, which does not exist"


COMMAND = re.compile(r"raydist (submit|train) (jobs/[\w.-]+\.yaml)((?:[ \t]+--set[ \t]+[^\s`]+)*)")


def _commands() -> list[tuple[str, str, str, list[str]]]:
    found = []
    for path in DOC_FILES:
        for verb, job, sets in COMMAND.findall(_text(path)):
            overrides = [s.replace("$PWD", str(ROOT)) for s in re.findall(r"--set[ \t]+([^\s`]+)", sets)]
            found.append((_rel(path), verb, job, overrides))
    return found


COMMANDS = _commands()


def test_the_docs_show_submit_commands():
    assert sum(verb == "submit" for _, verb, _, _ in COMMANDS) >= 5


@pytest.mark.parametrize("where, verb, job, overrides", COMMANDS,
                         ids=[f"{w}:{j}:{' '.join(o)}" for w, _, j, o in COMMANDS])
def test_commands_in_the_docs_are_valid(where, verb, job, overrides):
    """Every `raydist submit|train jobs/X.yaml --set ...` in clusters/ would pass raydist's own checks: the keys
    exist, the values are valid, and a submitted run writes to an absolute (shared) run.output_dir."""
    path = ROOT / job
    assert path.is_file(), f"{where}: {job}"
    raw = yaml.safe_load(path.read_text())
    if "methods" in raw or "space" in raw or "base" in raw:
        pytest.skip("sweep and compare files are checked by their own tests")
    try:
        cfg = C.load_job(path, overrides)
    except C.ConfigError as err:
        if str(err).startswith("data.root") and any(o.startswith("data.root=/mnt/") for o in overrides):
            return  # data that lives on the cluster's storage only: checked where the storage is mounted
        raise
    if verb == "submit":
        assert cfg["run"]["output_dir"].startswith("/"), f"{where}: submit needs an absolute run.output_dir"
