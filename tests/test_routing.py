"""The task header balancers route by (`x-ticketserve-task`, docs: scaling out) on every door of
a real server on 127.0.0.1: a request whose header agrees with the task it names is answered as
without the header; one whose header names another task is refused (400 / INVALID_ARGUMENT,
naming the header) before anything loads; our client sends the header on every call about one
task."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from tests.helpers import publish_row_task
from tests.test_embedding_doors import embedding_registry  # noqa: F401 (a fixture)
from tests.test_protocols import http, serve, text_input
from ticketserve.core.backbone import load_backbone
from ticketserve.runtime.client import Client
from ticketserve.v1 import TASK_HEADER, pb, rpc

tritonclient_grpc = pytest.importorskip("tritonclient.grpc")
from tritonclient.utils import InferenceServerException  # noqa: E402

V2_INPUT = {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": ["a fine film"]}]}
DOORS = [  # (method, path, body, the task the request names)
    ("POST", "/v1/predict", {"task": "alpha", "inputs": [{"text": "a fine film"}]}, "alpha"),
    ("POST", "/v1/fanout", {"tasks": ["alpha", "embed"], "inputs": [{"text": "a fine film"}]}, "embed"),
    ("POST", "/v1/embeddings", {"model": "embed", "input": "a fine film"}, "embed"),
    ("POST", "/v1/rerank", {"model": "rerank", "query": "a film", "documents": ["a fine film", "rain"]}, "rerank"),
    ("POST", "/rerank", {"model": "rerank", "query": "a film", "texts": ["a fine film", "rain"]}, "rerank"),
    ("POST", "/v2/models/alpha/infer", V2_INPUT, "alpha"),
    ("POST", "/v2/models/alpha/versions/1/infer", V2_INPUT, "alpha:1"),
    ("GET", "/v2/models/alpha", None, "alpha"),
]


@pytest.fixture
def server(embedding_registry, tiny_bert):  # noqa: F811
    publish_row_task(embedding_registry, load_backbone(tiny_bert), "alpha", seed=1)
    with serve(embedding_registry, tiny_bert) as running:
        yield running


@pytest.mark.parametrize("method,path,body,task", DOORS, ids=[f"{m} {p}" for m, p, _, _ in DOORS])
def test_every_http_door_answers_when_the_header_agrees_and_refuses_when_it_does_not(server, method, path, body, task):
    url = f"http://127.0.0.1:{server.http_port}{path}"
    assert http(method, url, body)[0] == 200
    agreed = http(method, url, body, {TASK_HEADER: task})
    assert agreed[0] == 200, agreed
    status, error = http(method, url, body, {TASK_HEADER: "beta"})
    assert status == 400 and TASK_HEADER in str(error) and "'beta'" in str(error), error


def test_a_header_alone_names_the_task_where_the_api_lets_it(server):
    url = f"http://127.0.0.1:{server.http_port}/rerank"  # TEI's rerank body has no task field of its own
    body = {"query": "a film", "texts": ["a fine film", "rain"]}
    assert http("POST", url, body, {TASK_HEADER: "rerank"}) == http("POST", url, body | {"model": "rerank"})
    assert http("POST", url, body)[0] == 400


def test_the_readiness_of_a_task_checks_the_header_too(server):
    base = f"http://127.0.0.1:{server.http_port}"
    assert http("POST", f"{base}/v1/predict", {"task": "alpha", "inputs": [{"text": "x"}]})[0] == 200  # resident now
    assert http("GET", f"{base}/v2/models/alpha/ready", None, {TASK_HEADER: "alpha"})[0] == 200
    status, error = http("GET", f"{base}/v2/models/alpha/ready", None, {TASK_HEADER: "beta"})
    assert status == 400 and TASK_HEADER in error["error"]


def test_grpc_doors_check_the_metadata_and_our_client_sends_it(server):
    with Client(f"127.0.0.1:{server.port}") as client:
        assert client.predict("alpha", ["a fine film"]).artifact.startswith("alpha:")  # sent with alpha's header
        assert client.get_task("alpha").task.name == "alpha"
        request = pb.PredictRequest(task="alpha", inputs=[pb.TextInput(text="a fine film")])
        with pytest.raises(grpc.RpcError) as refused:
            client.inference.Predict(request, metadata=client.routed("beta"))
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT and TASK_HEADER in refused.value.details()
        with pytest.raises(grpc.RpcError) as refused:
            rpc.TasksStub(client.channel).GetTask(pb.GetTaskRequest(task="alpha"), metadata=client.routed("beta"))
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    v2 = tritonclient_grpc.InferenceServerClient(f"127.0.0.1:{server.port}")
    inputs = [text_input(tritonclient_grpc, ["a fine film"])]
    agreed = v2.infer("alpha", inputs, headers={TASK_HEADER: "alpha"}).as_numpy("score")
    np.testing.assert_allclose(agreed, v2.infer("alpha", inputs).as_numpy("score"))
    with pytest.raises(InferenceServerException) as refused:
        v2.infer("alpha", inputs, headers={TASK_HEADER: "beta"})
    assert "INVALID_ARGUMENT" in str(refused.value.status()) and TASK_HEADER in refused.value.message()


def _picked(metrics_url: str, config: dict) -> dict:
    """What the inference gateway's endpoint picker takes from one scrape, by its rules
    (llm-d-router's core-metrics-extractor): the queue and running gauges' values, and from
    the LoRA-info series with the highest value its comma-separated adapter lists and max_lora."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    (engine,) = next(p for p in config["plugins"] if p["type"] == "core-metrics-extractor")["parameters"]["engineConfigs"]
    with urllib.request.urlopen(metrics_url, timeout=10) as response:
        families = {f.name: f for f in text_string_to_metric_families(response.read().decode())}
    lora = max(families[engine["loraSpec"]].samples, key=lambda s: s.value)
    listed = {key: [name.strip() for name in lora.labels[key].split(",") if name.strip()]
              for key in ("running_lora_adapters", "waiting_lora_adapters")}
    return {"queued": families[engine["queuedRequestsSpec"]].samples[0].value,
            "running": families[engine["runningRequestsSpec"]].samples[0].value,
            "active": listed["running_lora_adapters"], "waiting": listed["waiting_lora_adapters"],
            "max": int(lora.labels["max_lora"]), "updated": lora.value}


def test_the_endpoint_picker_sees_which_tasks_a_replica_holds(embedding_registry, tiny_bert):  # noqa: F811
    import yaml

    from tests.test_deploy import DEPLOY

    config = yaml.safe_load((DEPLOY / "gateway" / "endpoint-picker.yaml").read_text())
    backbone = load_backbone(tiny_bert)
    for seed, name in enumerate(("alpha", "beta")):
        publish_row_task(embedding_registry, backbone, name, seed=seed)
    with serve(embedding_registry, tiny_bert, metrics_port=0) as server:
        url = f"http://127.0.0.1:{server.metrics_port}/metrics"
        before = _picked(url, config)
        assert before["active"] == [] and before["waiting"] == [] and before["queued"] == before["running"] == 0
        with Client(f"127.0.0.1:{server.port}") as client:
            client.predict("alpha", ["a fine film"])
            client.predict("beta", ["a fine film"])
            loaded = _picked(url, config)
            assert loaded["active"] == ["alpha", "beta"] and loaded["waiting"] == []
            assert loaded["max"] >= 2 and loaded["updated"] >= before["updated"]  # room: the cache's default budget
            assert client.unload_task("beta")
            after = _picked(url, config)
        assert after["active"] == ["alpha"] and after["updated"] >= loaded["updated"]
