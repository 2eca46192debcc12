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
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    assert pod["metadata"]["labels"]["llm-d.ai/engine-type"] == "ticketserve"  # the picker's engine (deploy/gateway)
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
    assert policy["spec"]["podSelector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]  # the server's pods
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


# -- Beyond one replica: the inference gateway's InferencePool and endpoint picker, and the
# balancers that hash on the task header, each checked by what reads it: the published CRDs
# (strictly, as `kubectl apply --validate=strict`: no field the schema does not know), HAProxy's
# and nginx's own config checks.

SCHEMAS = Path(__file__).resolve().parent / "schemas"


def _strict(schema):
    """A CRD's structural schema with unknown fields refused where the API server would prune
    or reject them (objects with properties and no explicit openness)."""
    if isinstance(schema, dict):
        schema = {k: _strict(v) for k, v in schema.items()}
        if "properties" in schema and "additionalProperties" not in schema and \
                not schema.get("x-kubernetes-preserve-unknown-fields"):
            schema["additionalProperties"] = False
    elif isinstance(schema, list):
        schema = [_strict(v) for v in schema]
    return schema


def _crd_check(document: dict, crd_file: str) -> None:
    import jsonschema

    crd = yaml.safe_load((SCHEMAS / crd_file).read_text())
    group, version = document["apiVersion"].split("/")
    assert crd["spec"]["group"] == group and crd["spec"]["names"]["kind"] == document["kind"]
    (served,) = [v for v in crd["spec"]["versions"] if v["name"] == version and v["served"]]
    schema = _strict(served["schema"]["openAPIV3Schema"])
    schema["properties"] |= {"metadata": {"type": "object"},  # ObjectMeta: the Kubernetes schemas' business
                             "apiVersion": {"type": "string"}, "kind": {"type": "string"}}  # every object has them
    errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(document), key=str)
    assert not errors, f"{document['kind']}: {errors[0].message} at {list(errors[0].absolute_path)}"


def test_the_inference_pool_is_what_its_crd_accepts_and_selects_our_pods():
    pool = yaml.safe_load((DEPLOY / "gateway" / "inferencepool.yaml").read_text())
    _crd_check(pool, "inferencepools.inference.networking.k8s.io.yaml")
    with pytest.raises(AssertionError):  # the check refuses what the API server would
        _crd_check(pool | {"spec": pool["spec"] | {"targetPort": 8080}}, "inferencepools.inference.networking.k8s.io.yaml")
    base = yaml.safe_load((DEPLOY / "k8s" / "base" / "kustomization.yaml").read_text())
    assert pool["spec"]["selector"]["matchLabels"] == base["labels"][0]["pairs"]
    deployment = yaml.safe_load((DEPLOY / "k8s" / "base" / "deployment.yaml").read_text())
    ports = {p["name"]: p["containerPort"] for p in deployment["spec"]["template"]["spec"]["containers"][0]["ports"]}
    assert [p["number"] for p in pool["spec"]["targetPorts"]] == [ports["http"]]


def test_the_endpoint_picker_reads_the_metrics_we_export_from_the_port_we_serve_them_on():
    """What the picker's config names exists: its engine is our pods' label, its data source
    our metrics port, its metric specs our metric names (tests/test_routing.py checks what
    they hold on a running server)."""
    from ticketserve.runtime.server.metrics import Metrics

    config = yaml.safe_load((DEPLOY / "gateway" / "endpoint-picker.yaml").read_text())
    assert config["kind"] == "EndpointPickerConfig" and config["apiVersion"] == "llm-d.ai/v1alpha1"
    plugins = {p.get("name", p["type"]): p for p in config["plugins"]}
    extractor = plugins["core-metrics-extractor"]["parameters"]
    (engine,) = extractor["engineConfigs"]
    deployment = yaml.safe_load((DEPLOY / "k8s" / "base" / "deployment.yaml").read_text())
    pod = deployment["spec"]["template"]
    assert engine["name"] == extractor["defaultEngine"] == pod["metadata"]["labels"]["llm-d.ai/engine-type"]
    ports = {p["name"]: p["containerPort"] for p in pod["spec"]["containers"][0]["ports"]}
    assert plugins["metrics-data-source"]["parameters"]["port"] == ports["metrics"]
    exported = {family.name for family in Metrics(1).registry.collect()}
    specs = [engine[k] for k in ("queuedRequestsSpec", "runningRequestsSpec", "loraSpec")]
    assert set(specs) <= exported and engine["kvUsageSpec"] == ""  # an encoder has no KV cache
    used = {ref["pluginRef"] for profile in config["schedulingProfiles"] for ref in profile["plugins"]}
    used |= {ref["pluginRef"] for ref in config["requestHandler"]["parsers"]}
    assert used <= set(plugins) and config["requestHandler"]["parsers"][-1]["pluginRef"] == "passthrough"


def test_istio_hashes_on_the_task_header_and_its_crd_accepts_the_rule():
    from ticketserve.v1 import TASK_HEADER

    rule = yaml.safe_load((DEPLOY / "balancers" / "istio-destinationrule.yaml").read_text())
    _crd_check(rule, "destinationrules.networking.istio.io.yaml")
    assert rule["spec"]["trafficPolicy"]["loadBalancer"]["consistentHash"]["httpHeaderName"] == TASK_HEADER
    service = yaml.safe_load((DEPLOY / "k8s" / "base" / "service.yaml").read_text())
    assert rule["spec"]["host"] == service["metadata"]["name"]


def _binary(name: str) -> str:
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")
    if found is None:
        pytest.skip(f"{name} is not installed (apt-get install {name}; .ci/run installs it)")
    return found


def test_haproxy_accepts_its_config_and_hashes_both_doors_on_the_task_header():
    import kubernetes_validate
    from kubernetes_validate.utils import latest_version

    from ticketserve.v1 import TASK_HEADER

    config = DEPLOY / "balancers" / "haproxy.cfg"
    checked = subprocess.run([_binary("haproxy"), "-c", "-f", str(config)], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    text = config.read_text()
    assert text.count(f"balance hdr({TASK_HEADER})") == 2 and text.count("hash-type consistent") == 2
    headless = yaml.safe_load((DEPLOY / "balancers" / "headless-service.yaml").read_text())
    kubernetes_validate.validate(headless, latest_version(), strict=True)
    assert text.count(f"{headless['metadata']['name']}:") == 2


def test_nginx_accepts_its_config_and_hashes_both_doors_on_the_task_header(tmp_path):
    from ticketserve.v1 import TASK_HEADER

    config = DEPLOY / "balancers" / "nginx.conf"
    checked = subprocess.run([_binary("nginx"), "-t", "-c", str(config), "-g", f"pid {tmp_path}/nginx.pid;"],
                             capture_output=True, text=True)
    assert checked.returncode == 0, checked.stderr
    variable = "$http_" + TASK_HEADER.replace("-", "_")
    assert config.read_text().count(f"hash {variable} consistent;") == 2


ENVOY_TYPES = ("envoy.config.bootstrap.v3.bootstrap_pb2",  # every type envoy.yaml names in "@type"
               "envoy.extensions.filters.network.http_connection_manager.v3.http_connection_manager_pb2",
               "envoy.extensions.filters.http.router.v3.router_pb2",
               "envoy.extensions.retry.host.previous_hosts.v3.previous_hosts_pb2",
               "envoy.extensions.load_balancing_policies.ring_hash.v3.ring_hash_pb2",
               "envoy.extensions.upstreams.http.v3.http_protocol_options_pb2")


def test_envoy_bootstrap_parses_as_envoys_own_api_and_hashes_both_doors_on_the_task_header():
    """Checked against Envoy's v3 API (the xds-protos messages Envoy itself is built from): every
    field known and typed, every typed_config's type resolved — the check `envoy --mode validate`
    starts with (its value rules and DNS are not checked here: no Envoy binary on the machine)."""
    import importlib

    from google.protobuf import json_format

    from ticketserve.v1 import TASK_HEADER

    modules = [importlib.import_module(name) for name in ENVOY_TYPES]
    document = yaml.safe_load((DEPLOY / "balancers" / "envoy.yaml").read_text())
    bootstrap = json_format.ParseDict(document, modules[0].Bootstrap())  # raises on any unknown field or type
    routes = {}
    for listener in bootstrap.static_resources.listeners:
        manager = modules[1].HttpConnectionManager()
        assert listener.filter_chains[0].filters[0].typed_config.Unpack(manager)
        for route in manager.route_config.virtual_hosts[0].routes:
            routes[listener.address.socket_address.port_value] = route.route
    assert {port: route.hash_policy[0].header.header_name for port, route in routes.items()} == \
        {8080: TASK_HEADER, 50051: TASK_HEADER}
    headless = yaml.safe_load((DEPLOY / "balancers" / "headless-service.yaml").read_text())
    for cluster in bootstrap.static_resources.clusters:
        ring = modules[4].RingHash()
        assert cluster.load_balancing_policy.policies[0].typed_extension_config.typed_config.Unpack(ring)
        assert not ring.HasField("consistent_hashing_lb_config")  # no bounded load: it costs cache hits
        address = cluster.load_assignment.endpoints[0].lb_endpoints[0].endpoint.address.socket_address
        assert address.address == headless["metadata"]["name"]
        assert cluster.health_checks[0].http_health_check.path == "/v2/health/ready"
    assert {r.cluster for r in routes.values()} == {c.name for c in bootstrap.static_resources.clusters}


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
