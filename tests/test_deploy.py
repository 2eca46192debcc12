"""Deployment manifests: every Kustomize overlay renders and validates against the Kubernetes
schemas (the images themselves are run by tests/test_image.py)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
OVERLAYS = sorted(p.name for p in (DEPLOY / "k8s" / "overlays").iterdir())


def render(overlay: str) -> list[dict]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed")
    rendered = subprocess.run([kubectl, "kustomize", str(DEPLOY / "k8s" / "overlays" / overlay)],
                              check=True, capture_output=True, text=True).stdout
    return [doc for doc in yaml.safe_load_all(rendered) if doc]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_and_validates(overlay):
    import kubernetes_validate
    from kubernetes_validate.utils import latest_version

    documents = render(overlay)
    tls = overlay.endswith("-tls")
    assert {d["kind"] for d in documents} == {"ConfigMap", "Deployment", "Service",  # no Secret: no committed tokens
                                              "PodDisruptionBudget", "HorizontalPodAutoscaler", "NetworkPolicy",
                                              *(["Certificate"] if tls else [])}
    for document in documents:
        if document["kind"] != "Certificate":  # cert-manager's CRD: not in the Kubernetes schemas, checked below
            kubernetes_validate.validate(document, latest_version(), strict=True)
    deployment = next(d for d in documents if d["kind"] == "Deployment")
    pod = deployment["spec"]["template"]
    container = pod["spec"]["containers"][0]
    if tls:  # the server speaks TLS from the Certificate's Secret; probes check health over TLS
        certificate = next(d for d in documents if d["kind"] == "Certificate")
        secret = certificate["spec"]["secretName"]
        assert certificate["apiVersion"] == "cert-manager.io/v1" and "localhost" in certificate["spec"]["dnsNames"]
        assert next(v for v in pod["spec"]["volumes"] if v["name"] == "tls")["secret"]["secretName"] == secret
        mount = next(m for m in container["volumeMounts"] if m["name"] == "tls")["mountPath"]
        assert f"--tls-cert={mount}/tls.crt" in container["args"] and f"--tls-key={mount}/tls.key" in container["args"]
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert container[probe]["exec"]["command"] == ["ticketserve", "health", "--server", "localhost:50051",
                                                          "--tls-ca", f"{mount}/ca.crt"]
    else:
        assert container["readinessProbe"]["grpc"]["port"] == 50051 and container["livenessProbe"]["grpc"]
    assert pod["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
    assert deployment["spec"]["selector"]["matchLabels"] == pod["metadata"]["labels"]
    assert pod["spec"]["securityContext"]["runAsNonRoot"]
    tokens = next(v for v in pod["spec"]["volumes"] if v["name"] == "token")
    assert tokens["secret"]["secretName"] == "ticketserve"  # the operator's own Secret
    if overlay == "gpu":
        assert container["resources"]["limits"]["nvidia.com/gpu"] == 1 and "--device=cuda" in container["args"]
        assert pod["spec"]["tolerations"] and pod["spec"]["nodeSelector"]
    assert container["image"] == f"ticketserve:{'cuda' if overlay == 'gpu' else 'cpu'}"  # cpu-tls: the cpu image
    hpa = next(d for d in documents if d["kind"] == "HorizontalPodAutoscaler")
    assert [m.get("pods", {}).get("metric", {}).get("name") or m["resource"]["name"] for m in hpa["spec"]["metrics"]] == \
        ["ticketserve_queue_depth", "cpu"]  # the queue first, CPU as the fallback
    policy = next(d for d in documents if d["kind"] == "NetworkPolicy")
    assert policy["spec"]["podSelector"]["matchLabels"] == pod["metadata"]["labels"]  # the server's pods, no others
    grpc_rule = next(r for r in policy["spec"]["ingress"] if r["ports"][0]["port"] == 50051)
    assert [p["port"] for p in grpc_rule["ports"]] == [50051, 8080]  # clients reach gRPC and HTTP, nothing else
    service = next(d for d in documents if d["kind"] == "Service")
    assert {p["name"]: p["port"] for p in service["spec"]["ports"]} == {"grpc": 50051, "http": 8080, "metrics": 9100}
    assert "--http-port=8080" in container["args"] and {"name": "http", "containerPort": 8080} in container["ports"]
    assert grpc_rule["from"][0]["podSelector"]["matchLabels"] == {"ticketserve.io/client": "true"}


def test_the_queue_depth_metric_the_hpa_uses_is_served_by_the_adapter_rule():
    """The HPA's custom metric exists: the server exports it, the Prometheus adapter rule
    serves it per pod; the rule's ConfigMap validates."""
    import kubernetes_validate
    from kubernetes_validate.utils import latest_version

    from ticketserve.runtime.server.metrics import Metrics

    document = yaml.safe_load((DEPLOY / "k8s" / "monitoring" / "prometheus-adapter-rules.yaml").read_text())
    kubernetes_validate.validate(document, latest_version(), strict=True)
    (rule,) = yaml.safe_load(document["data"]["config.yaml"])["rules"]
    assert rule["seriesQuery"].startswith("ticketserve_queue_depth{") and rule["name"]["as"] == "ticketserve_queue_depth"
    assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}
    exported = {family.name for family in Metrics(1).registry.collect()}
    assert "ticketserve_queue_depth" in exported


# -- KServe: the ServingRuntime and InferenceService, checked field by field against the kserve
# SDK's own models (every key known, every required one present) and their Kubernetes parts
# (containers, env, resources, probes) against the strict Kubernetes schemas.

def _kserve_models():
    """The kserve SDK's generated models, without importing the SDK's model-server half (the
    package's __init__ needs the whole serving stack; its models need only six and urllib3)."""
    import importlib
    import importlib.util
    import sys
    import types

    spec = importlib.util.find_spec("kserve")
    if spec is None:
        pytest.skip("the kserve SDK is not installed (make install adds it)")
    if "kserve" not in sys.modules:
        package = types.ModuleType("kserve")
        package.__path__, package.__spec__ = list(spec.submodule_search_locations), spec
        sys.modules["kserve"] = package
    return importlib.import_module("kserve.models")


def _kubernetes_check(value, type_name: str, where: str) -> None:
    import jsonschema
    from kubernetes_validate.utils import latest_version, schema_contents
    from referencing import Registry, Resource

    folder = f"kubernetes-json-schema/v{latest_version()}-local-strict"
    schema = schema_contents(f"{folder}/{type_name.removeprefix('V1').lower()}-v1.json", latest_version())
    definitions = schema_contents(f"{folder}/_definitions.json", latest_version())
    registry = Resource.from_contents(definitions) @ (Resource.from_contents(schema) @ Registry())
    errors = list(jsonschema.Draft202012Validator(schema, registry=registry).iter_errors(value))
    assert not errors, f"{where}: {errors[0].message}"


def _kserve_check(value, type_name: str, models, where: str):
    """Build the SDK object for `value` (a manifest's dict) as type `type_name`, strictly."""
    if type_name.startswith("list["):
        assert isinstance(value, list), where
        return [_kserve_check(v, type_name[5:-1], models, f"{where}[{i}]") for i, v in enumerate(value)]
    if type_name.startswith("dict("):
        assert isinstance(value, dict), where
        return value
    if type_name in ("str", "int", "bool", "object", "float"):
        assert isinstance(value, {"str": str, "int": int, "bool": bool, "float": (int, float)}.get(type_name, object)), \
            where
        return value
    cls = getattr(models, type_name, None)
    if cls is None:  # a Kubernetes type: the strict Kubernetes schema decides
        _kubernetes_check(value, type_name, where)
        return value
    by_key = {key: attribute for attribute, key in cls.attribute_map.items()}
    unknown = set(value) - set(by_key)
    assert not unknown, f"{where}: {sorted(unknown)} are not fields of {type_name}"
    return cls(**{by_key[k]: _kserve_check(v, cls.openapi_types[by_key[k]], models, f"{where}.{k}")
                  for k, v in value.items()})  # the model's own setters refuse missing required fields


@pytest.mark.parametrize("manifest, kind, api_version", [
    ("servingruntime.yaml", "V1alpha1ServingRuntime", "serving.kserve.io/v1alpha1"),
    ("inferenceservice.yaml", "V1beta1InferenceService", "serving.kserve.io/v1beta1")])
def test_kserve_manifests_are_what_kserve_accepts(manifest, kind, api_version):
    models = _kserve_models()
    document = yaml.safe_load((DEPLOY / "kserve" / manifest).read_text())
    assert document["apiVersion"] == api_version and kind.endswith(document["kind"])
    _kserve_check({k: v for k, v in document.items() if k != "metadata"}, kind, models, manifest)


def test_the_kserve_runtime_runs_our_server_with_flags_it_has():
    from typer.testing import CliRunner

    from ticketserve.cli import app

    runtime = yaml.safe_load((DEPLOY / "kserve" / "servingruntime.yaml").read_text())
    service = yaml.safe_load((DEPLOY / "kserve" / "inferenceservice.yaml").read_text())
    (container,) = runtime["spec"]["containers"]
    args = container["args"] + service["spec"]["predictor"]["model"]["args"]
    usage = CliRunner().invoke(app, [args[0], "--help"], env={"COLUMNS": "200"}).output
    assert all(f" {a.split('=')[0]} " in usage for a in args[1:]), usage
    assert "--http-port=8080" in args and container["ports"] == [{"name": "http1", "containerPort": 8080, "protocol": "TCP"}]
    assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert runtime["spec"]["supportedModelFormats"][0]["name"] == service["spec"]["predictor"]["model"]["modelFormat"]["name"]
