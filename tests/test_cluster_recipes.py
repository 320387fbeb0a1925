"""The cluster recipes a lab applies: the launcher YAML against Ray's own schema, the KubeRay manifests
against the Kubernetes API's models, and both against each other and the repo (configs and scripts
they name exist; the runs volume is where paths.runs_dir points; nothing is exposed beyond a tunnel)."""
import json
import re
import shlex
from pathlib import Path

import jsonschema
import kubernetes.client
import pytest
import ray
import yaml

from nds.config import REPO_ROOT, load_config

LAUNCHER = REPO_ROOT / "cluster" / "gpu-cluster.yaml"
KUBERAY = REPO_ROOT / "cluster" / "kuberay"


def manifests() -> dict[str, dict]:
    return {doc["kind"]: doc for path in sorted(KUBERAY.glob("*.yaml")) for doc in yaml.safe_load_all(path.read_text())}


def commands_in(text: str) -> list[list[str]]:
    """Every `python experiments/...` command in a recipe (comments and entrypoints), as argv."""
    joined = re.sub(r"\\\n\s*(#\s*)?", " ", text)
    return [shlex.split(m) for m in re.findall(r"python (experiments/[a-z_]+\.py[^\n#`]*)", joined)]


def test_launcher_yaml_is_valid_for_ray_and_exposes_nothing():
    config = yaml.safe_load(LAUNCHER.read_text())
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)
    head_start = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host 127.0.0.1" in head_start and "0.0.0.0" not in LAUNCHER.read_text()
    for start in config["head_start_ray_commands"][1:] + config["worker_start_ray_commands"][1:]:
        assert "RAY_AUTH_MODE=token" in start
    # the repo is shipped and installed from its own pyproject.toml, not from a hand-kept list
    assert config["file_mounts"]["~/nds"] == "."
    installs = [c for c in config["setup_commands"] if "pip install" in c and "--upgrade pip" not in c]
    assert installs and all(c.split("pip install")[1].split() == ["-q", "-e", "~/nds"] for c in installs)


def test_kuberay_manifests_are_valid_kubernetes_and_match_the_launcher():
    docs = manifests()
    assert {"RayCluster", "RayJob", "PersistentVolumeClaim"} <= set(docs)
    cluster, job, pvc = docs["RayCluster"], docs["RayJob"], docs["PersistentVolumeClaim"]
    api = kubernetes.client.ApiClient()
    templates = [cluster["spec"]["headGroupSpec"]["template"]] + [g["template"] for g in cluster["spec"]["workerGroupSpecs"]]
    for template in templates:
        check_against_model(template, "V1PodTemplateSpec", "template")
        api._ApiClient__deserialize(template, "V1PodTemplateSpec")  # the client's own parse succeeds too
    check_against_model(pvc, "V1PersistentVolumeClaim", "pvc")
    assert cluster["apiVersion"] == job["apiVersion"] == "ray.io/v1"
    assert cluster["spec"]["authOptions"]["mode"] == "token"
    assert cluster["spec"]["headGroupSpec"]["serviceType"] == "ClusterIP"  # reached by port-forward only
    assert job["spec"]["clusterSelector"]["ray.io/cluster"] == cluster["metadata"]["name"]
    # the GPU worker group is the launcher's GPU node type
    launcher = yaml.safe_load(LAUNCHER.read_text())["available_node_types"]["gpu_8x"]
    group = cluster["spec"]["workerGroupSpecs"][0]
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert int(limits["nvidia.com/gpu"]) == launcher["resources"]["GPU"]
    assert int(limits["cpu"]) == launcher["resources"]["CPU"]
    assert group["maxReplicas"] == launcher["max_workers"]
    # every pod mounts the runs volume at the path the RayJob gives as paths.runs_dir
    runs_dir = next(a.split("=", 1)[1] for a in shlex.split(job["spec"]["entrypoint"]) if a.startswith("paths.runs_dir="))
    for template in templates:
        volumes = {v["name"]: v for v in template["spec"]["volumes"]}
        mounts = [m for c in template["spec"]["containers"] for m in c["volumeMounts"] if m["mountPath"] == runs_dir]
        assert mounts and volumes[mounts[0]["name"]]["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
    assert "ReadWriteMany" in pvc["spec"]["accessModes"]
    assert f"/mnt/{Path(runs_dir).name}" in " ".join(yaml.safe_load(LAUNCHER.read_text())["setup_commands"])


def test_every_command_in_the_recipes_names_a_script_and_config_that_exist():
    texts = [LAUNCHER.read_text(), *(p.read_text() for p in KUBERAY.glob("*.yaml")), (REPO_ROOT / "README.md").read_text()]
    commands = [c for text in texts for c in commands_in(text)]
    assert len(commands) >= 3
    for argv in commands:
        assert (REPO_ROOT / argv[0]).is_file(), argv
        config = argv[argv.index("--config") + 1] if "--config" in argv else ""
        if config.startswith("configs/"):  # (not a user's own file in an example)
            load_config(REPO_ROOT / config)


def check_against_model(data, model: str, where: str) -> None:
    """Every key of ``data`` is a field of the Kubernetes API model ``model`` (recursively), as the API
    server's schema would require; a misspelt or misplaced key fails, naming its path."""
    if model.startswith("list["):
        assert isinstance(data, list), f"{where}: expected a list"
        for i, item in enumerate(data):
            check_against_model(item, model[5:-1], f"{where}[{i}]")
        return
    if model.startswith("dict[") or model in ("str", "int", "bool", "float", "object", "datetime"):
        return
    cls = getattr(kubernetes.client, model)
    fields = {json_name: attr for attr, json_name in cls.attribute_map.items()}
    assert isinstance(data, dict), f"{where}: expected a mapping for {model}"
    for key, value in data.items():
        if key in ("apiVersion", "kind") and where == "pvc":
            continue
        assert key in fields, f"{where}.{key}: not a field of {model}"
        check_against_model(value, cls.openapi_types[fields[key]], f"{where}.{key}")


def test_the_model_check_catches_a_misplaced_key():
    with pytest.raises(AssertionError, match=r"template.spec.containers\[0\].volumeMount: not a field of V1Container"):
        check_against_model({"spec": {"containers": [{"name": "x", "volumeMount": []}]}}, "V1PodTemplateSpec", "template")
