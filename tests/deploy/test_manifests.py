"""Every deployment file is checked against its schema and against the code it names.

Built-in Kubernetes kinds: kubernetes-validate (strict: unknown fields fail). KubeRay kinds: the
CRD openAPIV3Schema kept in cluster/crds/ (unknown fields fail, as with `kubectl --validate=strict`),
and each pod template in them as a core/v1 PodTemplate. The AWS launcher YAML: the jsonschema Ray
ships. The Dockerfile and the manifests: every `python -m X` and `reel CMD` exists in the package.
"""

import importlib.util
import json
import math
import re
import shlex
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import tomllib
import yaml

ROOT = Path(__file__).resolve().parents[2]
YAMLS = sorted(p for d in ("cluster", "infra") for p in (ROOT / d).rglob("*.yaml"))
K8S_VERSION = kubernetes_validate.utils.latest_version()
CRDS = {}
for path in sorted((ROOT / "cluster" / "crds").glob("*.yaml")):
    crd = yaml.safe_load(path.read_text())
    CRDS[crd["spec"]["names"]["kind"]] = crd
NOT_KUBERNETES = {"aws-launcher.yaml"}  # Ray's own format


def docs(path):
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def kube_objects():
    for path in YAMLS:
        if path.parent.name == "crds" or path.name in NOT_KUBERNETES:
            continue
        for i, doc in enumerate(docs(path)):
            yield pytest.param(path, doc, id=f"{path.relative_to(ROOT)}#{i}:{doc.get('kind')}")


def strict(schema):
    """A CRD structural schema as JSON Schema where unknown fields are errors (kubectl --validate=strict)."""
    if isinstance(schema, dict):
        out = {k: strict(v) for k, v in schema.items() if not k.startswith("x-kubernetes-") and k != "default"}
        if "properties" in schema and not schema.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
        if schema.get("format") == "int32":
            out.update(minimum=-(2**31), maximum=2**31 - 1)
        return out
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    return schema


def pod_templates(obj, path=""):
    """(path, template) of every PodTemplateSpec in a KubeRay object."""
    spec = obj.get("spec", {})
    clusters = [(f"{path}spec", spec)] if obj["kind"] == "RayCluster" else []
    if "rayClusterSpec" in spec:
        clusters.append(("spec.rayClusterSpec", spec["rayClusterSpec"]))
    if "rayClusterConfig" in spec:
        clusters.append(("spec.rayClusterConfig", spec["rayClusterConfig"]))
    for where, c in clusters:
        yield f"{where}.headGroupSpec.template", c["headGroupSpec"]["template"]
        for g in c.get("workerGroupSpecs", []):
            yield f"{where}.workerGroupSpecs[{g['groupName']}].template", g["template"]
    if "submitterPodTemplate" in spec:
        yield "spec.submitterPodTemplate", spec["submitterPodTemplate"]


def test_every_yaml_and_json_parses():
    assert YAMLS, "no deployment files found"
    for path in YAMLS:
        assert docs(path), f"{path} is empty"
    for path in (ROOT / "infra").rglob("*.json"):
        json.loads(path.read_text())


@pytest.mark.parametrize("path, obj", list(kube_objects()))
def test_kubernetes_object_is_valid(path, obj):
    kind = obj["kind"]
    if kind == "Kustomization":
        for res in obj.get("resources", []):
            assert (path.parent / res).resolve().is_file(), f"{path}: missing resource {res}"
            inside = (path.parent / res).resolve().is_relative_to(path.parent)
            assert inside, f"{res}: kustomize loads only below its root"
        for gen in obj.get("configMapGenerator", []):
            for f in gen["files"]:
                assert (path.parent / f.split("=", 1)[-1]).is_file()
        return
    if kind in CRDS:
        crd = CRDS[kind]
        group, version = obj["apiVersion"].split("/")
        assert group == crd["spec"]["group"] and version in [v["name"] for v in crd["spec"]["versions"]]
        schema = next(v for v in crd["spec"]["versions"] if v["name"] == version)["schema"]["openAPIV3Schema"]
        jsonschema.validate(obj, strict(schema))
        templates = list(pod_templates(obj))
        assert templates
        for where, template in templates:
            try:
                kubernetes_validate.validate({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"},
                                              "template": template}, K8S_VERSION, strict=True)
            except kubernetes_validate.ValidationError as e:
                pytest.fail(f"{path} {where}: {e.message}")
        return
    kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def test_crd_subsets_note_their_version():
    assert set(CRDS) == {"RayCluster", "RayJob", "RayService"}
    for path in (ROOT / "cluster" / "crds").glob("*.yaml"):
        head = path.read_text().split("apiVersion", 1)[0]
        assert "ray-project/kuberay" in head and re.search(r"@ [0-9a-f]{40}", head) and "SUBSET" in head


def test_strict_crd_validation_rejects_unknown_fields():
    obj = docs(ROOT / "infra" / "rayjob-nightly-sweep.yaml")[0]
    schema = strict(CRDS["RayJob"]["spec"]["versions"][0]["schema"]["openAPIV3Schema"])
    bad = json.loads(json.dumps(obj))
    bad["spec"]["shutdownAfterJobFinish"] = True
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)
    bad = json.loads(json.dumps(obj))
    bad["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["maxReplicas"] = "8"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)


def test_nightly_rayjob_and_cronjob():
    job = docs(ROOT / "infra" / "rayjob-nightly-sweep.yaml")[0]
    spec = job["spec"]
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0
    assert spec["activeDeadlineSeconds"] > 0 and spec["backoffLimit"] >= 0
    assert "python -m jobs.nightly_sweep" in spec["entrypoint"] and "generateName" in job["metadata"]
    cron = next(d for d in docs(ROOT / "infra" / "nightly-cronjob.yaml") if d["kind"] == "CronJob")
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    assert cron["spec"]["jobTemplate"]["spec"]["activeDeadlineSeconds"] > spec["activeDeadlineSeconds"]
    kust = docs(ROOT / "infra" / "kustomization.yaml")[0]
    volume = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["volumes"][0]["configMap"]["name"]
    assert volume == kust["configMapGenerator"][0]["name"]


@pytest.mark.parametrize("path", [ROOT / "cluster" / "raycluster.yaml", ROOT / "cluster" / "rayservice.yaml",
                                  ROOT / "infra" / "rayjob-nightly-sweep.yaml"], ids=lambda p: p.name)
def test_gpu_group_follows_the_model_parallel_size(path):
    obj = docs(path)[0]
    annotations = docs(ROOT / "cluster" / "raycluster.yaml")[0]["metadata"]["annotations"]
    size = int(annotations["reelforge.io/model-parallel-size"])
    size = int(obj["metadata"].get("annotations", {}).get("reelforge.io/model-parallel-size", size))
    spec = obj["spec"].get("rayClusterSpec") or obj["spec"].get("rayClusterConfig") or obj["spec"]
    gpu_groups = [g for g in spec["workerGroupSpecs"]
                  if "nvidia.com/gpu" in g["template"]["spec"]["containers"][0]["resources"]["limits"]]
    assert gpu_groups
    for g in gpu_groups:
        per_node = int(g["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
        assert per_node == 8
        hosts = g.get("numOfHosts", 1)
        if size <= 8:
            assert 8 % size == 0 and hosts == 1
        else:
            assert size % 8 == 0 and hosts == size // 8
        assert g["minReplicas"] <= g.get("replicas", 0) <= g["maxReplicas"]
    head = spec["headGroupSpec"]["rayStartParams"]
    assert head.get("num-cpus") == "0"
    assert math.gcd(size, 8) == min(size, 8)


def test_launcher_yaml_against_rays_schema():
    import ray

    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    config = docs(ROOT / "cluster" / "aws-launcher.yaml")[0]
    jsonschema.validate(config, schema)
    assert config["head_node_type"] in config["available_node_types"]
    assert sum(t.get("max_workers", 0) for t in config["available_node_types"].values()) <= config["max_workers"]


def _commands():
    """Every shell-ish command line in the deployment files (YAML strings and Dockerfile lines)."""
    texts = [(ROOT / "infra" / "Dockerfile").read_text()]
    for path in YAMLS:
        texts.append(path.read_text())
    return "\n".join(texts)


def test_entry_points_named_by_image_and_manifests_exist():
    from pipeline.cli import main

    text = _commands()
    modules = set(re.findall(r"python3?(?:\.\d+)? -m ([A-Za-z_][\w.]*\w)", text))
    assert {"jobs.nightly_sweep"} <= modules
    for mod in modules - {"venv", "pip"}:
        assert importlib.util.find_spec(mod) is not None, f"python -m {mod}: no such module"
        if mod.startswith("jobs."):
            assert "__main__" in (ROOT / (mod.replace(".", "/") + ".py")).read_text()
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    for import_path, attr in re.findall(r"import_path: ([\w.]+):(\w+)", text):
        assert importlib.util.find_spec(import_path), import_path
        assert hasattr(importlib.import_module(import_path), attr), f"{import_path}:{attr} is not defined"
    for cmd in set(re.findall(r"\breel ([a-z][\w-]*)", text)) - {"--help"}:
        with pytest.raises(SystemExit) as e:
            main([cmd, "--help"])
        assert e.value.code == 0, f"reel {cmd}: no such command"
    assert "reel" in scripts
    for job in ("render_manifest", "render_campaign", "nightly_sweep", "train_default"):
        assert importlib.util.find_spec(f"jobs.{job}") is not None


def test_rayservice_applications_build_as_serve_builds_them(monkeypatch):
    """Each application of the RayService built as Serve's controller builds it
    (ray/serve/_private/application_state.py): the import path's attribute, an application or an
    application builder, called with the application's `args` under its runtime_env's variables.
    Binding reads the model's config; nothing starts."""
    from ray._common.utils import import_attr
    from ray.serve import Application
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary

    service = docs(ROOT / "cluster" / "rayservice.yaml")[0]
    for app in yaml.safe_load(service["spec"]["serveConfigV2"])["applications"]:
        with monkeypatch.context() as env:
            for name, value in app.get("runtime_env", {}).get("env_vars", {}).items():
                env.setenv(name, str(value))
            built = call_user_app_builder_with_args_if_necessary(import_attr(app["import_path"]), app.get("args", {}))
        assert isinstance(built, Application), app["import_path"]


def test_dockerfile_matches_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    docker = (ROOT / "infra" / "Dockerfile").read_text()
    assert re.search(r"^FROM nvidia/cuda:[\w.-]+", docker, re.M), "CUDA base image"
    assert "ffmpeg" in docker
    torch_pin = next(d for d in project["dependencies"] if d.startswith("torch"))
    assert f"pip install {torch_pin}" in docker, f"the image must pin {torch_pin} like pyproject.toml"
    py = re.search(r"python(3\.\d+) -m venv", docker)[1]
    minimum = project["requires-python"].removeprefix(">=")
    assert tuple(map(int, py.split(".")[1:])) >= tuple(map(int, minimum.split(".")[1:])), py
    for extras in re.findall(r'pip install "\.\[([\w,]+)\]"', docker):
        for extra in extras.split(","):
            assert extra in project["optional-dependencies"], f"extra {extra!r} not in pyproject"
    packages = re.findall(r"^COPY (\w+) \./\1$", docker, re.M)
    include = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    assert sorted(packages) == sorted(p.rstrip("*") for p in include)
    cmd = json.loads(re.search(r"^CMD (\[.*\])$", docker, re.M)[1])
    assert cmd[0] in project["scripts"]
    assert shlex.split("reel --help")[0] in project["scripts"]
