"""The KubeRay manifests and the image in cluster/ are what the operator and Ray Serve accept.

No Kubernetes cluster is needed: each manifest is validated against the v1 `openAPIV3Schema` of
KubeRay's CRDs (from ../shared/kuberay/crds beside the checkout; skipped when absent) in strict
mode, as `kubectl apply` does, so a misspelled field is an error and not silently pruned, and
against the checks the KubeRay operator adds on top (names, autoscaler v2, token auth). The
RayService's `serveConfigV2` string, which the CRD treats as opaque text, is checked with Ray
Serve's own config schema and built with the project's application builder. Broken variants of the
real manifests prove each check can fail.
"""

from __future__ import annotations

import copy
import importlib
import re
import shlex
import sys
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

if sys.version_info >= (3, 11):
    import tomllib
else:  # pytest depends on tomli before 3.11
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
CRD_DIR = Path(__file__).resolve().parents[2] / "shared" / "kuberay" / "crds"
MANIFESTS = {"rayjob.yaml": "RayJob", "rayservice.yaml": "RayService", "raycluster.yaml": "RayCluster"}
CRD_FILES = {"RayJob": "ray.io_rayjobs.yaml", "RayService": "ray.io_rayservices.yaml",
             "RayCluster": "ray.io_rayclusters.yaml"}
DNS1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
# KubeRay appends suffixes to these names; its operator rejects longer ones (utils.MaxRay*NameLength).
MAX_NAME_LENGTH = {"RayCluster": 53, "RayJob": 47, "RayService": 47}
GPU = "nvidia.com/gpu"


# ---------------------------------------------------------------------------------------------
# Reading the project's files
# ---------------------------------------------------------------------------------------------


def load_manifest(name: str) -> dict[str, Any]:
    docs = [d for d in yaml.safe_load_all((CLUSTER / name).read_text()) if d is not None]
    assert len(docs) == 1, f"{name}: expected one document, got {len(docs)}"
    return docs[0]


def pinned_ray_version() -> str:
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    pins = [m.group(1) for d in deps if (m := re.fullmatch(r"ray(?:\[[^\]]*\])?==([\w.]+)", d.strip()))]
    assert len(pins) == 1, f"pyproject.toml must pin ray exactly once with ==, found {pins}"
    return pins[0]


def dockerfile_from_and_home() -> tuple[str, str]:
    """The resolved base image of cluster/Dockerfile and the project's folder inside the image."""
    args: dict[str, str] = {}
    base = home = None
    for line in (CLUSTER / "Dockerfile").read_text().splitlines():
        words = line.split()
        if not words or words[0].startswith("#"):
            continue
        if words[0] == "ARG" and "=" in words[1] and base is None:
            key, value = words[1].split("=", 1)
            args[key] = value
        elif words[0] == "FROM":
            base = re.sub(r"\$\{?(\w+)\}?", lambda m: args[m.group(1)], words[1])
        elif words[0] == "ENV" and words[1].startswith("CLLM_HOME="):
            home = words[1].split("=", 1)[1]
    assert base and home, "cluster/Dockerfile needs a FROM line and ENV CLLM_HOME=<project folder>"
    return base, home


def cluster_spec(manifest: dict) -> dict:
    """The RayCluster spec inside any of the three kinds."""
    key = {"RayJob": "rayClusterSpec", "RayService": "rayClusterConfig"}.get(manifest["kind"])
    return manifest["spec"][key] if key else manifest["spec"]


def pod_specs(manifest: dict) -> dict[str, dict]:
    """Pod spec per group: 'head' and each worker group's name."""
    spec = cluster_spec(manifest)
    pods = {"head": spec["headGroupSpec"]["template"]["spec"]}
    pods.update({g["groupName"]: g["template"]["spec"] for g in spec.get("workerGroupSpecs", [])})
    return pods


def quantity(value: int | str) -> float:
    """A Kubernetes CPU/GPU quantity ('8', 8, '500m') as a number."""
    text = str(value)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def serve_config(manifest: dict) -> dict:
    return yaml.safe_load(manifest["spec"]["serveConfigV2"])


# ---------------------------------------------------------------------------------------------
# Schema checks
# ---------------------------------------------------------------------------------------------


def forbid_unknown_fields(schema: dict) -> dict:
    """The CRD schema with unknown fields rejected, as kubectl's strict field validation does."""
    out = dict(schema)
    if "properties" in out:
        out["properties"] = {k: forbid_unknown_fields(v) for k, v in out["properties"].items()}
        if "additionalProperties" not in out and not out.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
    if isinstance(out.get("additionalProperties"), dict):
        out["additionalProperties"] = forbid_unknown_fields(out["additionalProperties"])
    if "items" in out:
        out["items"] = forbid_unknown_fields(out["items"])
    for key in ("anyOf", "allOf", "oneOf"):
        if key in out:
            out[key] = [forbid_unknown_fields(s) for s in out[key]]
    return out


@cache
def crd_validator(kind: str) -> jsonschema.Draft4Validator:
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRDs are megabytes of YAML
    crd = yaml.load((CRD_DIR / CRD_FILES[kind]).read_text(), Loader=loader)
    assert crd["spec"]["names"]["kind"] == kind
    (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    # OpenAPI v3.0 schemas are closest to JSON Schema draft 4 (int-or-string is an anyOf there).
    return jsonschema.Draft4Validator(forbid_unknown_fields(v1["schema"]["openAPIV3Schema"]))


def crd_errors(manifest: dict) -> list[str]:
    """Everything the API server would reject in `manifest`, as 'path: message' lines."""
    kind = manifest.get("kind")
    if manifest.get("apiVersion") != "ray.io/v1" or kind not in CRD_FILES:
        return [f"apiVersion/kind must be ray.io/v1 RayJob|RayService|RayCluster, got "
                f"{manifest.get('apiVersion')}/{kind}"]
    return [f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
            for e in crd_validator(kind).iter_errors(manifest)]


def operator_errors(manifest: dict) -> list[str]:
    """What the KubeRay operator itself rejects beyond the schema (a subset of utils/validation.go)."""
    kind, name = manifest["kind"], manifest["metadata"]["name"]
    errors, limit = [], MAX_NAME_LENGTH[kind]
    if not DNS1035_LABEL.match(name) or len(name) > limit:
        errors.append(f"metadata/name: {name!r} must be a DNS-1035 label of at most {limit} characters")
    spec = cluster_spec(manifest)
    for group in spec.get("workerGroupSpecs", []):
        if group.get("minReplicas", 0) > group.get("maxReplicas", 2**31 - 1):
            errors.append(f"worker group {group['groupName']}: minReplicas > maxReplicas")
    if spec.get("enableInTreeAutoscaling") and spec.get("autoscalerOptions", {}).get("version") == "v2":
        for group, pod in pod_specs(manifest).items():
            if pod.get("restartPolicy", "Never") != "Never":
                errors.append(f"{group}: restartPolicy must be Never or unset with autoscaler v2")
    if spec.get("authOptions", {}).get("mode") == "token":
        ray_version = spec.get("rayVersion", "")
        if tuple(int(p) for p in re.findall(r"\d+", ray_version)[:3]) < (2, 52, 0):
            errors.append(f"authOptions.mode token needs rayVersion >= 2.52.0, got {ray_version!r}")
    if kind == "RayJob":
        job = manifest["spec"]
        if job.get("ttlSecondsAfterFinished", 0) > 0 and not job.get("shutdownAfterJobFinishes"):
            errors.append("ttlSecondsAfterFinished needs shutdownAfterJobFinishes: true")
        if job.get("activeDeadlineSeconds", 1) <= 0:
            errors.append("activeDeadlineSeconds must be positive")
        try:
            yaml.safe_load(job.get("runtimeEnvYAML", ""))
        except yaml.YAMLError as err:
            errors.append(f"runtimeEnvYAML is not YAML: {err}")
    return errors


def serve_config_errors(text: str) -> list[str]:
    """Problems Ray Serve would have with a serveConfigV2 string, plus keys it would silently ignore."""
    from pydantic import BaseModel, ValidationError
    from ray.serve.config import AutoscalingConfig
    from ray.serve.schema import (
        DeploymentSchema,
        RayActorOptionsSchema,
        ServeApplicationSchema,
        ServeDeploySchema,
    )

    def unknown_keys(data: Any, model: type[BaseModel], where: str) -> list[str]:
        if not isinstance(data, dict):
            return []
        return [f"{where}: unknown key {k!r} (Ray Serve ignores it)"
                for k in data if k not in model.model_fields]

    if not isinstance(text, str):
        return [f"serveConfigV2 must be a YAML string, got {type(text).__name__}"]
    config = yaml.safe_load(text)
    try:
        ServeDeploySchema.model_validate(config)
    except ValidationError as err:
        return [str(err)]
    errors = unknown_keys(config, ServeDeploySchema, "<root>")
    for app in config["applications"]:
        where = f"applications[{app.get('name')}]"
        errors += unknown_keys(app, ServeApplicationSchema, where)
        for dep in app.get("deployments", []):
            dwhere = f"{where}.deployments[{dep.get('name')}]"
            errors += unknown_keys(dep, DeploymentSchema, dwhere)
            errors += unknown_keys(dep.get("ray_actor_options"), RayActorOptionsSchema,
                                   f"{dwhere}.ray_actor_options")
            autoscaling = dep.get("autoscaling_config")
            if autoscaling is not None:  # the deploy schema accepts any dict here; Serve checks it at deploy
                errors += unknown_keys(autoscaling, AutoscalingConfig, f"{dwhere}.autoscaling_config")
                try:
                    AutoscalingConfig.model_validate(autoscaling)
                except ValidationError as err:
                    errors.append(f"{dwhere}.autoscaling_config: {err}")
    return errors


@pytest.fixture(scope="module")
def crds() -> Path:
    if not CRD_DIR.is_dir():
        pytest.skip(f"KubeRay CRD schemas not found at {CRD_DIR} (a ../shared folder beside the checkout); "
                    "schema validation of the manifests is skipped")
    return CRD_DIR


# ---------------------------------------------------------------------------------------------
# The manifests against the KubeRay CRDs
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(MANIFESTS))
def test_manifest_validates_against_kuberay_crd(crds, name):
    manifest = load_manifest(name)
    assert manifest["kind"] == MANIFESTS[name]
    assert crd_errors(manifest) == []


def _parent(doc: Any, path: str) -> tuple[Any, str | int]:
    """The container holding the last key of a dotted path ('spec.workerGroupSpecs.0.maxReplicas')."""
    *parents, last = (int(k) if k.isdigit() else k for k in path.split("."))
    for key in parents:
        doc = doc[key]
    return doc, last


def _set(path: str, value: Any):
    def edit(doc):
        node, key = _parent(doc, path)
        node[key] = value
    return edit


def _delete(path: str):
    def edit(doc):
        node, key = _parent(doc, path)
        del node[key]
    return edit


def _rename(path: str, new: str):
    def edit(doc):
        node, key = _parent(doc, path)
        node[new] = node.pop(key)
    return edit


BROKEN = {
    "maxReplicas as text": ("raycluster.yaml", _set("spec.workerGroupSpecs.0.maxReplicas", "four"),
                            "workerGroupSpecs/0/maxReplicas"),
    "head without pod template": ("raycluster.yaml", _delete("spec.headGroupSpec.template"), "headGroupSpec"),
    "misspelled minReplicas": (
        "rayservice.yaml", _rename("spec.rayClusterConfig.workerGroupSpecs.0.minReplicas", "minReplica"),
        "workerGroupSpecs/0"),
    "memory quantity with a space": (
        "rayjob.yaml",
        _set("spec.rayClusterSpec.headGroupSpec.template.spec.containers.0.resources.limits.memory", "8 GB"),
        "limits/memory"),
    "rayStartParams value not a string": (
        "raycluster.yaml", _set("spec.headGroupSpec.rayStartParams.num-cpus", 0), "rayStartParams/num-cpus"),
    "shutdownAfterJobFinishes as text": ("rayjob.yaml", _set("spec.shutdownAfterJobFinishes", "yes"),
                                         "shutdownAfterJobFinishes"),
    "serveConfigV2 as a mapping": ("rayservice.yaml", _set("spec.serveConfigV2", {"applications": []}),
                                   "serveConfigV2"),
    "unknown auth mode": ("rayservice.yaml", _set("spec.rayClusterConfig.authOptions.mode", "password"),
                          "authOptions/mode"),
    "wrong apiVersion": ("rayjob.yaml", _set("apiVersion", "ray.io/v1alpha2"), "apiVersion"),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_broken_manifest_is_rejected(crds, case):
    name, edit, where = BROKEN[case]
    manifest = copy.deepcopy(load_manifest(name))
    edit(manifest)
    errors = crd_errors(manifest)
    assert errors, f"{case}: the broken manifest passed validation"
    assert any(where in e for e in errors), f"{case}: no error at {where}: {errors}"


@pytest.mark.parametrize("name", sorted(MANIFESTS))
def test_manifest_passes_kuberay_operator_checks(name):
    assert operator_errors(load_manifest(name)) == []


BROKEN_FOR_OPERATOR = {
    "name too long": ("rayservice.yaml", _set("metadata.name", "cllm-" + "x" * 45)),
    "name starts with a digit": ("raycluster.yaml", _set("metadata.name", "7cllm")),
    "minReplicas above maxReplicas": ("raycluster.yaml", _set("spec.workerGroupSpecs.0.minReplicas", 5)),
    "restartPolicy Always under autoscaler v2": (
        "rayjob.yaml", _set("spec.rayClusterSpec.workerGroupSpecs.0.template.spec.restartPolicy", "Always")),
    "token auth on an old Ray": ("raycluster.yaml", _set("spec.rayVersion", "2.47.1")),
    "TTL without shutdown": ("rayjob.yaml", _set("spec.shutdownAfterJobFinishes", False)),
}


@pytest.mark.parametrize("case", sorted(BROKEN_FOR_OPERATOR))
def test_broken_manifest_is_rejected_by_operator_checks(case):
    name, edit = BROKEN_FOR_OPERATOR[case]
    manifest = copy.deepcopy(load_manifest(name))
    edit(manifest)
    assert operator_errors(manifest), f"{case}: the broken manifest passed"


# ---------------------------------------------------------------------------------------------
# The Serve config inside the RayService
# ---------------------------------------------------------------------------------------------


def test_serve_config_validates_with_ray_serve_schema():
    assert serve_config_errors(load_manifest("rayservice.yaml")["spec"]["serveConfigV2"]) == []


DEPLOYMENT = "applications.0.deployments.0"
BROKEN_SERVE = {
    "num_gpus as text": _set(f"{DEPLOYMENT}.ray_actor_options.num_gpus", "one"),
    "min_replicas above max_replicas": _set(f"{DEPLOYMENT}.autoscaling_config.min_replicas", 9),
    "misspelled num_replicas": _set(f"{DEPLOYMENT}.num_replica", 2),
    "misspelled autoscaling key": _rename(f"{DEPLOYMENT}.autoscaling_config.target_ongoing_requests",
                                          "target_ongoing_request"),
    "no import_path": _delete("applications.0.import_path"),
}


@pytest.mark.parametrize("case", sorted(BROKEN_SERVE))
def test_broken_serve_config_is_rejected(case):
    config = serve_config(load_manifest("rayservice.yaml"))
    BROKEN_SERVE[case](config)
    assert serve_config_errors(yaml.safe_dump(config)), f"{case}: the broken Serve config passed"


def test_serve_import_path_imports_and_builds_the_application():
    """The builder exists, accepts the configured args, and defines every configured deployment.

    Building only binds the deployment (no model is loaded and no Ray is started), as Serve does on
    the head before it places replicas.
    """
    from ray import serve

    for app in serve_config(load_manifest("rayservice.yaml"))["applications"]:
        module_name, attr = app["import_path"].split(":")
        module = importlib.import_module(module_name)
        builder = getattr(module, attr)
        assert callable(builder), f"{app['import_path']} is not callable"
        assert isinstance(builder(app.get("args", {})), serve.Application)
        deployments = {d.name for d in vars(module).values() if isinstance(d, serve.Deployment)}
        for dep in app.get("deployments", []):
            assert dep["name"] in deployments, f"{module_name} defines no deployment {dep['name']!r}"


def test_serve_config_matches_local_serve_config():
    """The cluster serves the same application as configs/serve.yaml does locally.

    The local file may be a Serve deploy config (`applications:`) or the flat `cllm.serving.config.ServeConfig`
    of pipelines/serve.py; either way the application's name and route must agree.
    """
    local = yaml.safe_load((REPO / "configs" / "serve.yaml").read_text())
    (app,) = serve_config(load_manifest("rayservice.yaml"))["applications"]
    if "applications" in local:
        assert _applications({"applications": [app]}) == _applications(local)
    else:
        from cllm.serving.config import ServeConfig

        flat = ServeConfig(**local)
        assert (app["name"], app["route_prefix"]) == (flat.app_name, flat.route_prefix)
        assert app["import_path"] == "cllm.serving.api:build_app"


def _applications(config: dict) -> list[tuple]:
    """What identifies an application: its name, import path and route (not per-cluster overrides)."""
    return [(app["name"], app["import_path"], app.get("route_prefix", "/")) for app in config["applications"]]


def test_serve_replicas_fit_the_gpu_worker_group():
    """Every replica fits one GPU pod, and Serve's max_replicas can all be placed at maxReplicas pods."""
    manifest = load_manifest("rayservice.yaml")
    spec = cluster_spec(manifest)
    assert spec["enableInTreeAutoscaling"] is True
    head_cpus = spec["headGroupSpec"]["rayStartParams"].get("num-cpus")
    assert head_cpus == "0", "replicas must not land on the head"
    (group,) = [g for g in spec["workerGroupSpecs"] if GPU in _limits(g["template"]["spec"])]
    limits = _limits(group["template"]["spec"])
    pod_gpus, pod_cpus = quantity(limits[GPU]), quantity(limits["cpu"])
    for app in serve_config(manifest)["applications"]:
        for dep in app["deployments"]:
            opts, scale = dep["ray_actor_options"], dep["autoscaling_config"]
            assert 0 < opts["num_gpus"] <= pod_gpus, f"{dep['name']}: a replica needs a GPU that fits one pod"
            assert opts.get("num_cpus", 1) <= pod_cpus
            per_pod = min(pod_gpus // opts["num_gpus"], pod_cpus // opts.get("num_cpus", 1))
            assert scale["max_replicas"] <= per_pod * group["maxReplicas"], (
                f"{dep['name']}: max_replicas={scale['max_replicas']} cannot be placed on "
                f"{group['maxReplicas']} pods x {per_pod} replicas")


def _ray_container(pod: dict) -> dict:
    (container,) = [c for c in pod["containers"] if c["name"].startswith("ray-")]
    return container


def _limits(pod: dict) -> dict:
    return _ray_container(pod)["resources"]["limits"]


def _requests(pod: dict) -> dict:
    return _ray_container(pod)["resources"]["requests"]


# ---------------------------------------------------------------------------------------------
# Cluster shape shared by the three manifests
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(MANIFESTS))
def test_autoscaling_gpu_worker_group_with_explicit_bounds(name):
    spec = cluster_spec(load_manifest(name))
    assert spec["enableInTreeAutoscaling"] is True
    gpus = [quantity(_limits(g["template"]["spec"]).get(GPU, 0)) for g in spec["workerGroupSpecs"]]
    assert max(gpus, default=0) >= 1, f"{name}: no worker group with a {GPU} limit"
    for group in spec["workerGroupSpecs"]:
        assert "minReplicas" in group and "maxReplicas" in group, "set both: the CRD's default max is 2^31-1"
        low, high = group["minReplicas"], group["maxReplicas"]
        assert 0 <= low <= group.get("replicas", low) <= high
    for group, pod in pod_specs(load_manifest(name)).items():
        requests, limits = _requests(pod), _limits(pod)
        assert {"cpu", "memory"} <= set(requests) <= set(limits), f"{group}: set cpu/memory requests, limits"
        assert str(requests.get(GPU)) == str(limits.get(GPU)), f"{group}: GPU request and limit differ"


@pytest.mark.parametrize("name", sorted(MANIFESTS))
def test_one_project_image_on_the_pinned_ray_version(name):
    manifest = load_manifest(name)
    assert cluster_spec(manifest)["rayVersion"] == pinned_ray_version()
    images = {c["image"] for pod in pod_specs(manifest).values() for c in pod["containers"]}
    assert len(images) == 1, f"{name}: head and workers must run the same image, got {images}"
    assert not images.pop().startswith("rayproject/"), "the pods need the project image (cluster/Dockerfile)"


def test_image_is_the_official_ray_gpu_image_of_the_pinned_version():
    base, _ = dockerfile_from_and_home()
    match = re.fullmatch(r"rayproject/ray:([\w.]+)-py3\d+-(gpu|cu\d+)", base)
    assert match, f"cluster/Dockerfile must build on an official Ray GPU image, got {base}"
    assert match.group(1) == pinned_ray_version()


@pytest.mark.parametrize("name", sorted(MANIFESTS))
def test_storage_claim_is_defined_and_mounted_everywhere(name):
    (claim,) = [d for d in yaml.safe_load_all((CLUSTER / "storage.yaml").read_text()) if d]
    assert claim["kind"] == "PersistentVolumeClaim" and "ReadWriteMany" in claim["spec"]["accessModes"]
    for group, pod in pod_specs(load_manifest(name)).items():
        claims = {v["name"]: v["persistentVolumeClaim"]["claimName"]
                  for v in pod.get("volumes", []) if "persistentVolumeClaim" in v}
        assert set(claims.values()) == {claim["metadata"]["name"]}, f"{name}/{group}: mount the shared claim"
        mounts = {m["name"] for c in pod["containers"] for m in c.get("volumeMounts", [])}
        assert set(claims) <= mounts, f"{name}/{group}: claim volume declared but not mounted"


# ---------------------------------------------------------------------------------------------
# The RayJob
# ---------------------------------------------------------------------------------------------


def _entrypoint() -> list[str]:
    return shlex.split(load_manifest("rayjob.yaml")["spec"]["entrypoint"])


def test_rayjob_entrypoint_runs_the_full_pipeline_from_the_image():
    _, home = dockerfile_from_and_home()
    args = _entrypoint()
    assert args[0] == "python"
    script = Path(args[1])
    assert script.is_relative_to(home), f"{script} is not inside the image's project folder {home}"
    local = REPO / script.relative_to(home)
    assert local == REPO / "pipelines" / "full.py"
    assert local.is_file(), f"the RayJob runs {script}, but {local} does not exist"


def test_rayjob_outputs_go_to_shared_storage_and_cluster_is_cleaned_up():
    manifest = load_manifest("rayjob.yaml")
    spec = manifest["spec"]
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0
    args = _entrypoint()
    output_dir = Path(args[args.index("--output-dir") + 1])
    for group, pod in pod_specs(manifest).items():
        claims = {v["name"] for v in pod["volumes"] if "persistentVolumeClaim" in v}
        mounts = [Path(m["mountPath"]) for c in pod["containers"] for m in c.get("volumeMounts", [])
                  if m["name"] in claims]
        assert any(output_dir.is_relative_to(m) for m in mounts), (
            f"{group}: --output-dir {output_dir} is not on the shared claim (Ray Train needs every node to "
            "see the same storage)")
