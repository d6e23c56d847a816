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
                 "kuberay/rayjob.yaml", "kuberay/shared-storage.yaml", "Dockerfile"):
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
    assert cfg["head_node_type"] in cfg["available_node_types"]


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
def test_launcher_runs_the_one_image_and_installs_nothing(path):
    """Every node runs the image built from clusters/Dockerfile (torch, the project): no per-node pip install of
    CUDA wheels, and no node type swaps in another image."""
    cfg = _load(path)
    assert cfg["docker"]["image"] == _dockerfile_image()
    assert "head_image" not in cfg["docker"] and "worker_image" not in cfg["docker"]
    for name, node_type in cfg["available_node_types"].items():
        assert not {"head_image", "worker_image", "image"} & set(node_type.get("docker", {})), name
    commands = [c for key in ("setup_commands", "head_setup_commands", "worker_setup_commands")
                for c in cfg.get(key, [])]
    assert not any("torch" in c or "~/raydist" in c for c in commands), commands
    assert cfg["file_mounts"].get("~/raydist") == ".", "file_mounts must copy the repository root to ~/raydist"
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
    # autoscaler v2 (the one that reads `priority`), the dashboard's Train view, metrics on every node
    assert "RAY_enable_autoscaler_v2=1 " in head and "RAY_enable_autoscaler_v2=0" not in head
    for commands in (head, worker):
        assert "RAY_TRAIN_ENABLE_STATE_TRACKING=1 " in commands and "--metrics-export-port=8080" in commands
    assert "RAY_PROMETHEUS_HOST=http://127.0.0.1:9090" in head and "RAY_GRAFANA_HOST=http://127.0.0.1:3000" in head
    # Prometheus and Grafana from the image, with the configs Ray writes for the session, after `ray start`
    start = head.index("ray start --head")
    for binary, config in (("/opt/prometheus/prometheus", "/tmp/ray/session_latest/metrics/prometheus/prometheus.yml"),
                           ("/opt/grafana/bin/grafana server", "/tmp/ray/session_latest/metrics/grafana/grafana.ini")):
        assert head.index(binary) > start and config in head, binary
        assert "/opt/" + binary.split("/")[2] in (CLUSTERS / "Dockerfile").read_text()
    if "~/.ray/auth_token" in cfg["file_mounts"]:
        # a node joining a token-protected head presents the token only with RAY_AUTH_MODE=token
        assert "RAY_AUTH_MODE=token" in head and "RAY_AUTH_MODE=token" in worker


@pytest.mark.parametrize("path", LAUNCHERS, ids=_rel)
def test_launcher_mounts_shared_storage_into_the_container(path):
    """README: run.output_dir=/mnt/shared/... is the storage every node sees."""
    cfg = _load(path)
    assert "--volume /mnt/shared:/mnt/shared" in cfg["docker"]["run_options"]
    assert any("mkdir -p /mnt/shared" in c for c in cfg["initialization_commands"])


def _v2_launches(cfg: dict, bundle: dict[str, float], count: int = 1,
                 failed: tuple[str, ...] = ()) -> tuple[dict[str, int], int]:
    """What Ray's v2 autoscaler launches for ``count`` pending ``bundle`` requests on an empty cluster of this
    config, with the node types in ``failed`` having just failed to launch: ({node type: count}, infeasible)."""
    from ray.autoscaler.v2.instance_manager.config import AutoscalingConfig
    from ray.autoscaler.v2.scheduler import ResourceDemandScheduler, SchedulingRequest
    from ray.autoscaler.v2.utils import ResourceRequestUtil
    from ray.core.generated.autoscaler_pb2 import ResourceRequestByCount

    config = AutoscalingConfig(copy.deepcopy(cfg), skip_content_hash=True)
    availability = {name: 0.0 for name in failed}
    request = SchedulingRequest(
        disable_launch_config_check=True, node_type_configs=config.get_node_type_configs(),
        max_num_nodes=config.get_max_num_nodes(),
        resource_requests=[ResourceRequestByCount(request=ResourceRequestUtil.make(bundle), count=count)],
        cloud_resource_availabilities=availability, recoverable_resource_availabilities=availability)
    reply = ResourceDemandScheduler().schedule(request)
    return {r.instance_type: r.count for r in reply.to_launch}, len(reply.infeasible_resource_requests)


def _imagenet_worker() -> dict[str, float]:
    """One Ray Train worker of the ImageNet jobs: the request the GPU node types are sized for."""
    sc = yaml.safe_load((ROOT / "jobs" / "imagenet_sat_resnet50_silu.yaml").read_text())["scaling"]
    return {"CPU": float(sc["cpus_per_worker"]), "GPU": float(sc["gpus_per_worker"])}


@pytest.mark.parametrize("path", LAUNCHERS, ids=_rel)
def test_v2_autoscaler_launches_spot_first_then_on_demand(path):
    """Ray's v2 scheduler (what the head runs with RAY_enable_autoscaler_v2=1) on this file: an ImageNet worker
    gets the default GPU type on spot, its on-demand twin once spot launches fail, never the pinned A100 type
    unless asked for it; plain CPU work gets spot CPU nodes."""
    cfg = _load(path)
    provider = cfg["provider"]["type"]
    types = _worker_types(cfg)
    worker = _imagenet_worker()
    launched, infeasible = _v2_launches(cfg, worker)
    assert infeasible == 0 and len(launched) == 1, launched
    (spot_type,) = launched
    assert _is_spot(provider, types[spot_type]["node_config"]) and types[spot_type]["resources"].get("GPU")
    assert not any(k.startswith("accelerator_type:") for k in types[spot_type]["resources"])
    twins = [n for n, t in types.items() if n != spot_type and t["resources"] == types[spot_type]["resources"]
             and not _is_spot(provider, t["node_config"])]
    assert twins, f"{spot_type} has no on-demand twin with the same resources"
    launched, _ = _v2_launches(cfg, worker, failed=(spot_type,))
    assert set(launched) <= set(twins) and launched, launched
    # a spot type and its on-demand twin declare the same resources, or v2's utilisation score (which comes
    # before priority) would pick one of them whatever their priorities say
    for name, node_type in types.items():
        if node_type["resources"].get("GPU") and not _is_spot(provider, node_type["node_config"]):
            machine = _machine(provider, node_type["node_config"])[0]
            for other, spot in types.items():
                if _is_spot(provider, spot["node_config"]) and _machine(provider, spot["node_config"])[0] == machine:
                    assert spot["resources"] == node_type["resources"], (other, name)
    # pinned types: only a request for their accelerator lands there
    for name, node_type in types.items():
        pins = [k for k in node_type["resources"] if k.startswith("accelerator_type:")]
        for pin in pins:
            launched, _ = _v2_launches(cfg, {**worker, pin: 0.001})
            assert set(launched) == {name} or all(pin in types[n]["resources"] for n in launched), launched
    launched, _ = _v2_launches(cfg, {"CPU": 1.0})
    assert launched and all(_is_spot(provider, types[n]["node_config"]) and not types[n]["resources"].get("GPU")
                            for n in launched), launched


@pytest.mark.parametrize("path", LAUNCHERS, ids=_rel)
def test_drivers_stay_off_spot_nodes(path):
    """raydist/tune/runner.py asks for raydist_driver when the cluster declares it: the head and an on-demand
    CPU type declare it, no spot type does, and a sweep trial's driver (0.01 CPU + raydist_driver) launches an
    on-demand node while a compare run's driver (no CPU) fits the head."""
    from raydist.tune.runner import DRIVER_RESOURCE, driver_resources, trial_resources

    cfg = _load(path)
    provider = cfg["provider"]["type"]
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]["resources"]
    assert head.get(DRIVER_RESOURCE, 0) >= 100, "the head must declare raydist_driver"
    declaring = {n for n, t in types.items() if t["resources"].get(DRIVER_RESOURCE)}
    for name in declaring:
        assert not _is_spot(provider, types[name]["node_config"]), f"spot type {name} declares {DRIVER_RESOURCE}"
    assert not any(types[n]["resources"].get("GPU") for n in declaring), "drivers would hold a GPU node"
    totals = {k: float(v) for t in types.values() for k, v in t["resources"].items()}
    scaling = {"num_workers": 4, "cpus_per_worker": 8, "use_gpu": True, "gpus_per_worker": 1}
    trial = trial_resources(scaling, cluster=totals)
    assert DRIVER_RESOURCE in trial and trial["CPU"] > 0
    launched, infeasible = _v2_launches(cfg, trial, count=8)
    assert infeasible == 0 and launched and set(launched) <= declaring - {cfg["head_node_type"]}, launched
    compare = driver_resources(totals)
    assert all(head.get(k, 0) >= v for k, v in compare.items())


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
def test_kuberay_autoscaler_v2_train_view_and_metrics(name, spec):
    assert spec["autoscalerOptions"].get("version") == "v2"
    for group_name, group in _groups(spec):
        assert group["rayStartParams"].get("metrics-export-port") == "8080", group_name
        container = _containers(group["template"])[0]
        env = {e["name"]: e.get("value") for e in container.get("env", [])}
        # KubeRay refuses autoscalerOptions.version together with this variable on the head
        assert "RAY_enable_autoscaler_v2" not in env, group_name
        assert env.get("RAY_TRAIN_ENABLE_STATE_TRACKING") == "1", group_name
        assert 8080 in {p["containerPort"] for p in container.get("ports", [])}, group_name
        if group_name == "head":
            assert env.get("RAY_PROMETHEUS_HOST", "").startswith("http") and env.get("RAY_GRAFANA_HOST")
        else:
            assert group["template"]["spec"].get("restartPolicy") == "Never", group_name


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
    # sweep trial drivers: the head and an on-demand CPU group declare raydist_driver, GPU groups do not
    from raydist.tune.runner import DRIVER_RESOURCE

    declaring = {n for n, t in types.items() if t["resources"].get(DRIVER_RESOURCE)}
    assert cfg["head_node_type"] in declaring
    assert any(types[n]["resources"].get("CPU", 0) > 0 for n in declaring), "no CPUs for trial drivers"
    assert not any(types[n]["resources"].get("GPU") for n in declaring)
    for group in spec["workerGroupSpecs"]:
        if group["groupName"] in declaring:
            assert not group["template"]["spec"].get("nodeSelector"), "a driver group on spot nodes"


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
    for path in LAUNCHERS:  # they run the Dockerfile's image; their comments name its base
        text = path.read_text()
        found[_rel(path)] = set(re.findall(r"rayproject/ray:(\d+\.\d+\.\d+)-py\d+-(?:cpu|gpu|cu\d+)", text))
    for name, spec in CLUSTER_SPECS:
        found[name] = {str(spec["rayVersion"])}
    dockerfile = (CLUSTERS / "Dockerfile").read_text()
    found["clusters/Dockerfile"] = set(re.findall(r"rayproject/ray:(\d+\.\d+\.\d+)-py\d+-gpu", dockerfile))
    return found


def test_one_ray_version_and_one_image_everywhere():
    versions = _ray_versions()
    assert all(versions.values()), versions
    assert len(set().union(*versions.values())) == 1, versions
    images = set().union(*(_images(spec) for _, spec in CLUSTER_SPECS))
    assert len(images) == 1, f"the RayCluster and the RayJob should run the same image: {images}"


def _dockerfile_image() -> str:
    """The image name clusters/Dockerfile's build command tags: what every cluster file must run."""
    (tag,) = re.findall(r"docker build -f clusters/Dockerfile -t (\S+) \.", (CLUSTERS / "Dockerfile").read_text())
    return tag


def test_every_cluster_file_runs_the_dockerfiles_image():
    image = _dockerfile_image()
    for path in LAUNCHERS:
        assert _load(path)["docker"]["image"] == image, _rel(path)
    for name, spec in CLUSTER_SPECS:
        for _, group in _groups(spec):
            pod = group["template"]["spec"]
            assert {c["image"] for c in pod["containers"] + pod.get("initContainers", [])} == {image}, name


def test_the_nvidia_driver_the_wheels_need_is_stated():
    """The image's CUDA wheels fix the lowest NVIDIA driver; the README and the Dockerfile name it."""
    dockerfile = (CLUSTERS / "Dockerfile").read_text()
    (cuda,) = re.findall(r"ARG TORCH_INDEX=https://download.pytorch.org/whl/cu(\d+)", dockerfile)
    driver = {"130": "580", "129": "575", "128": "570", "126": "560"}[cuda]
    readme = (CLUSTERS / "README.md").read_text()
    assert f"driver >= {driver}" in dockerfile and re.search(rf"driver[^.]*>= ?{driver}", readme), driver


def test_dockerfile_installs_the_project_and_the_job_files():
    text = (CLUSTERS / "Dockerfile").read_text()
    for needle in ("FROM ", "COPY --chown=ray:users raydist ", "COPY --chown=ray:users jobs ", "pip install",
                   "WORKDIR /home/ray/raydist"):
        assert needle in text, needle
    assert "--index-url ${TORCH_INDEX}" in text and "download.pytorch.org/whl/cu" in text  # the CUDA wheels
    ignore = (CLUSTERS / "Dockerfile.dockerignore").read_text().split()
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
