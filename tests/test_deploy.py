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
