"""deploy/: every manifest valid against the Kubernetes schemas, and consistent with what the service and
the offline job actually serve and read (probe paths, ports, environment names, the shard arguments)."""

from __future__ import annotations

import re
from pathlib import Path

import httpx
import kubernetes_validate
import pytest
import yaml

from support import REPO, Server

pytestmark = pytest.mark.unit

DEPLOY = REPO / "deploy"
KUBERNETES_VERSIONS = ("1.30.0", "1.37.0")  # preStop's sleep action needs 1.30


def manifests() -> dict[str, dict]:
    found = {}
    for path in sorted(DEPLOY.glob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text()):
            found[f"{document['kind']}/{document['metadata']['name']}"] = document
    return found


def settings_read() -> set[str]:
    """The environment variables the service reads: one per declared setting."""
    from classifier.settings import Settings

    return {name.upper() for name in Settings.model_fields}


def env_of(container: dict) -> dict[str, dict]:
    return {item["name"]: item for item in container.get("env", [])}


@pytest.mark.parametrize("path", sorted(DEPLOY.glob("*.yaml")), ids=lambda path: path.name)
@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_manifest_is_valid_against_the_kubernetes_schemas(path: Path, version: str):
    for document in yaml.safe_load_all(path.read_text()):
        kubernetes_validate.validate(document, version, strict=True)  # raises on an unknown or misplaced field


def test_strict_validation_catches_a_misspelt_field():
    deployment = manifests()["Deployment/classifier"]
    deployment["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {"httpGet": {"path": "/ready", "port": 8000}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSIONS[-1], strict=True)


@pytest.mark.server
def test_the_deployment_matches_the_service_it_runs(server: Server):
    found = manifests()
    pod = found["Deployment/classifier"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert container["command"] == ["python", "-m", "app"]  # HTTP on PORT, gRPC on GRPC_PORT, both on the image's HOST
    assert {port["targetPort"] for port in found["Service/classifier"]["spec"]["ports"]} == set(ports)

    # The probes name paths this service answers 200 on, on its port.
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        get = container[probe]["httpGet"]
        assert get["port"] in ports
        assert httpx.get(f"{server.url}{get['path']}").status_code == 200, probe
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"  # 503 while starting and draining
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"

    # Every variable set is one the service reads; secrets come from the Secret the example defines.
    env = env_of(container)
    from classifier.settings import Settings

    assert int(env["GRPC_PORT"]["value"]) == ports["grpc"] == Settings.model_fields["grpc_port"].default
    assert int(env["PORT"]["value"]) == ports["http"] == Settings.model_fields["port"].default
    assert set(env) - {"PYTHONDONTWRITEBYTECODE"} <= settings_read()
    secret = found["Secret/classifier"]["stringData"]
    for item in env.values():
        if "valueFrom" in item:
            assert item["valueFrom"]["secretKeyRef"]["key"] in secret
    assert "JOBS_DATABASE_URL" in env and secret["jobs-database-url"].startswith("postgresql+psycopg://")

    # The drain fits in the grace period: preStop, then SIGTERM's drain of SHUTDOWN_TIMEOUT_S.
    pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pre_stop + float(env["SHUTDOWN_TIMEOUT_S"]["value"]) < pod["terminationGracePeriodSeconds"]
    # Threads are set to the pod's cores, not left to the node's CPU count.
    assert int(env["THREADS"]["value"]) == int(container["resources"]["limits"]["cpu"])

    security = container["securityContext"]
    assert pod["securityContext"]["runAsNonRoot"] and security["readOnlyRootFilesystem"]
    mounts = {mount["name"] for mount in container["volumeMounts"]}
    assert mounts == {volume["name"] for volume in pod["volumes"]}
    assert env["MODEL_WEIGHTS"]["value"].startswith(next(m["mountPath"] for m in container["volumeMounts"] if m["name"] == "models"))


@pytest.mark.server
def test_the_autoscaler_scales_the_deployment_on_a_metric_the_service_exports(server: Server):
    found = manifests()
    hpa = found["HorizontalPodAutoscaler/classifier"]["spec"]
    assert f"{hpa['scaleTargetRef']['kind']}/{hpa['scaleTargetRef']['name']}" in found
    metrics = httpx.get(f"{server.url}/metrics").text
    assert {metric["type"] for metric in hpa["metrics"]} == {"Resource", "External"}
    (external,) = [metric["external"] for metric in hpa["metrics"] if metric["type"] == "External"]
    assert external["metric"]["name"] == "job_images_pending"
    assert re.search(rf"^{external['metric']['name']} ", metrics, re.M)  # a gauge the service exports


def test_the_indexed_job_runs_one_shard_per_index(weights_file):
    from classifier.cli import classify

    job = manifests()["Job/classify-photos"]["spec"]
    assert job["completionMode"] == "Indexed"
    (container,) = job["template"]["spec"]["containers"]
    assert container["command"][:3] == ["python", "-m", "classify"]
    assert set(env_of(container)) - {"PYTHONDONTWRITEBYTECODE"} <= settings_read()
    for index in range(job["completions"]):  # as Kubernetes expands $(JOB_COMPLETION_INDEX) in each pod
        argv = [part.replace("$(JOB_COMPLETION_INDEX)", str(index)) for part in container["command"][3:]]
        args = classify.arguments(argv)
        assert args.shard == (index, job["completions"])
        assert args.out == f"/results/part-{index}.jsonl"  # each pod its own file


def test_the_manifests_and_make_image_name_the_same_image():
    makefile = (REPO / "Makefile").read_text()
    tag = re.search(r"^IMAGE \?= (\S+)$", makefile, re.M).group(1)
    images = {container["image"] for document in manifests().values() if document["kind"] in ("Deployment", "Job")
              for container in document["spec"]["template"]["spec"]["containers"]}
    from tools import image_build

    assert images == {tag, f"{tag}-slim"} and tag == image_build.TAG
    slim = manifests()["Deployment/classifier-slim"]["spec"]["template"]["spec"]["containers"][0]
    assert slim["image"] == f"{tag}-slim"  # what tools/image_build.py tags the slim target


@pytest.mark.server
def test_the_slim_replica_serves_the_file_the_export_job_writes(slim_server):
    found = manifests()
    (export,) = found["Job/export-model"]["spec"]["template"]["spec"]["containers"]
    pod = found["Deployment/classifier-slim"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert export["command"][:3] == ["python", "-m", "export"]
    env = env_of(container)
    assert env["MODEL_ONNX"]["value"] == export["command"][export["command"].index("--out") + 1]
    assert "MODEL_WEIGHTS" not in env and "MODEL_WEIGHTS" in env_of(export)  # the file records its weights
    assert set(env) - {"PYTHONDONTWRITEBYTECODE"} <= settings_read()
    assert int(env["THREADS"]["value"]) == int(container["resources"]["limits"]["cpu"])
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert httpx.get(f"{slim_server.url}{container[probe]['httpGet']['path']}").status_code == 200, probe
    pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pre_stop + float(env["SHUTDOWN_TIMEOUT_S"]["value"]) < pod["terminationGracePeriodSeconds"]
