"""Every door of a real server on 127.0.0.1, spoken to by clients we did not write: tritonclient
(the Open Inference Protocol's own clients, HTTP and gRPC) and raw HTTP for the JSON API. Each
returns what in-process prediction returns, mixed-task requests included, and every error
keeps its meaning: 404/NOT_FOUND, 400/INVALID_ARGUMENT, 429/RESOURCE_EXHAUSTED,
412/FAILED_PRECONDITION, 401/UNAUTHENTICATED, 403/PERMISSION_DENIED."""

from __future__ import annotations

import concurrent.futures
import json
import socket
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

tritonclient_http = pytest.importorskip("tritonclient.http")
tritonclient_grpc = pytest.importorskip("tritonclient.grpc")
from tritonclient.utils import InferenceServerException  # noqa: E402

from tests.helpers import ROW_TASKS, TEXTS, ByName, publish_row_task  # noqa: E402
from ticketserve.core import artifact  # noqa: E402
from ticketserve.core.backbone import load_backbone  # noqa: E402
from ticketserve.runtime.engine import EngineConfig  # noqa: E402
from ticketserve.runtime.executor import Runtime  # noqa: E402
from ticketserve.runtime.server.main import BackgroundServer, ServeConfig  # noqa: E402

OPENAPI = Path(__file__).resolve().parent.parent / "docs" / "openapi.json"
PAIRS = [("the cat sat", "a cat was sitting"), ("it rained", "the sun shone")]


def expected(registry, tiny_bert, name: str, texts, pairs=None, ref: str | None = None):
    backbone = load_backbone(tiny_bert)
    runtime = ByName(Runtime(backbone, device="cpu"))
    runtime.add(artifact.load(registry, ref or name, backbone), name=name)
    return runtime.predict([name] * len(texts), texts, pairs)


def serve(registry, tiny_bert, **overrides) -> BackgroundServer:
    return BackgroundServer(ServeConfig(port=0, http_port=0, registry=registry.url, backbone=tiny_bert,
                                        watch_seconds=0.2, **overrides))


def text_input(module, texts, name="text"):
    tensor = module.InferInput(name, [len(texts)], "BYTES")
    tensor.set_data_from_numpy(np.array([t.encode() for t in texts], dtype=object))
    return tensor


def assert_matches(result, want):
    labels = list(want[0].probabilities)  # the task's labels, in order: the columns of `probabilities`
    assert [x.decode() for x in result.as_numpy("label")] == [p.label for p in want]
    probabilities = result.as_numpy("probabilities")
    assert probabilities.shape == (len(want), len(labels))
    for row, prediction in zip(probabilities, want):
        assert row == pytest.approx([prediction.probabilities[label] for label in labels], abs=1e-5)
    assert result.as_numpy("score") == pytest.approx([p.score for p in want], abs=1e-5)


def http(method: str, url: str, body=None, headers=None) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method,
                                     headers={"content-type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            text = response.read()
            return response.status, json.loads(text) if text else {}
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


@pytest.fixture
def clients(registry, tiny_bert):
    with serve(registry, tiny_bert) as server:
        rest = tritonclient_http.InferenceServerClient(f"127.0.0.1:{server.http_port}", concurrency=8)
        grpc_client = tritonclient_grpc.InferenceServerClient(f"127.0.0.1:{server.port}")
        try:
            yield server, {"http": (tritonclient_http, rest), "grpc": (tritonclient_grpc, grpc_client)}
        finally:
            rest.close()
            grpc_client.close()


@pytest.mark.parametrize("transport", ["http", "grpc"])
def test_tritonclient_metadata_infer_pairs_and_versions(clients, registry, tiny_bert, transport):
    server, by_transport = clients
    module, client = by_transport[transport]
    assert client.is_server_live() and client.is_server_ready()
    metadata = client.get_server_metadata()
    name = metadata["name"] if transport == "http" else metadata.name
    assert name == "ticketserve"

    model = client.get_model_metadata("alpha")
    inputs = model["inputs"] if transport == "http" else [{"name": t.name, "datatype": t.datatype} for t in model.inputs]
    assert [(t["name"], t["datatype"]) for t in inputs] == [("text", "BYTES")]
    if transport == "http":
        assert model["labels"] == ["negative", "positive"] and model["versions"] == ["1"]

    result = client.infer("alpha", [text_input(module, TEXTS)])
    assert_matches(result, expected(registry, tiny_bert, "alpha", TEXTS))
    assert client.is_model_ready("alpha")

    a, b = zip(*PAIRS)
    paired = client.infer("pairs", [text_input(module, list(a)), text_input(module, list(b), "text_pair")])
    assert_matches(paired, expected(registry, tiny_bert, "pairs", list(a), list(b)))

    publish_row_task(registry, load_backbone(tiny_bert), "alpha", 21)  # version 2; version 1 stays addressable
    pinned = client.infer("alpha", [text_input(module, TEXTS[:2])], model_version="1")
    assert_matches(pinned, expected(registry, tiny_bert, "alpha", TEXTS[:2], ref="alpha:1"))
    newest = client.infer("alpha", [text_input(module, TEXTS[:2])], model_version="2")
    assert_matches(newest, expected(registry, tiny_bert, "alpha", TEXTS[:2], ref="alpha:2"))
    response = newest.get_response()
    version = response["model_version"] if transport == "http" else response.model_version
    assert version == "2"


@pytest.mark.parametrize("transport", ["http", "grpc"])
def test_tritonclient_mixed_tasks_concurrently_match_in_process(registry, tiny_bert, transport):
    names = ROW_TASKS + ["masked"]
    want = {name: expected(registry, tiny_bert, name, TEXTS) for name in names}
    with serve(registry, tiny_bert, engine=EngineConfig(max_queue_delay_ms=30)) as server:
        module = tritonclient_http if transport == "http" else tritonclient_grpc
        port = server.http_port if transport == "http" else server.port

        def work(i: int):
            client = module.InferenceServerClient(f"127.0.0.1:{port}")
            try:
                name = names[i % len(names)]
                return name, client.infer(name, [text_input(module, TEXTS)])
            finally:
                client.close()

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            outcomes = list(pool.map(work, range(16)))
    batch_tasks = []
    for name, result in outcomes:
        assert_matches(result, want[name])
        response = result.get_response()
        parameters = response["parameters"] if transport == "http" else {
            k: v.int64_param for k, v in response.parameters.items() if v.WhichOneof("parameter_choice") == "int64_param"}
        batch_tasks.append(parameters["batch_tasks"])
    assert max(batch_tasks) > 1  # requests of different tasks really shared batches


def _code(exc: InferenceServerException) -> str:
    return str(exc.status())


@pytest.mark.parametrize("transport", ["http", "grpc"])
def test_every_error_class_keeps_its_meaning(registry, tiny_bert, tiny_checkpoints, transport, tmp_path):
    foreign = load_backbone(str(tiny_checkpoints["roberta"]))
    publish_row_task(registry, foreign, "foreign", 3)
    token_file, admin_file = tmp_path / "token", tmp_path / "admin"
    token_file.write_text("user-token\n")
    admin_file.write_text("admin-token\n")
    config = dict(token_file=str(token_file), admin_token_file=str(admin_file),
                  engine=EngineConfig(max_queue_size=1, max_queue_delay_ms=300, max_batch_size=4,
                                      max_texts_per_request=4))
    expect = {"not_found": ("404", "StatusCode.NOT_FOUND"), "invalid": ("400", "StatusCode.INVALID_ARGUMENT"),
              "mismatch": ("412", "StatusCode.FAILED_PRECONDITION"), "busy": ("429", "StatusCode.RESOURCE_EXHAUSTED"),
              "no_token": ("401", "StatusCode.UNAUTHENTICATED"), "not_admin": ("403", "StatusCode.PERMISSION_DENIED")}
    index = 0 if transport == "http" else 1
    with serve(registry, tiny_bert, **config) as server:
        module = tritonclient_http if transport == "http" else tritonclient_grpc
        port = server.http_port if transport == "http" else server.port
        user = {"authorization": "Bearer user-token"}  # copied per call: tritonclient adds its headers to the dict
        client = module.InferenceServerClient(f"127.0.0.1:{port}")
        try:
            def fails(kind, call):
                with pytest.raises(InferenceServerException) as caught:
                    call()
                assert expect[kind][index] in _code(caught.value), (kind, caught.value.message())

            fails("not_found", lambda: client.infer("nope", [text_input(module, TEXTS[:1])], headers=dict(user)))
            fails("invalid", lambda: client.infer("alpha", [text_input(module, TEXTS[:1], "words")], headers=dict(user)))
            fails("invalid", lambda: client.infer("alpha", [text_input(module, TEXTS[:1])], headers=dict(user),
                                                  outputs=[module.InferRequestedOutput("nothing")]))
            fails("invalid", lambda: client.infer("pairs", [text_input(module, TEXTS[:1])], headers=dict(user)))
            fails("mismatch", lambda: client.infer("foreign", [text_input(module, TEXTS[:1])], headers=dict(user)))
            fails("no_token", lambda: client.infer("alpha", [text_input(module, TEXTS[:1])]))
            fails("not_admin", lambda: client.load_model("alpha", headers=dict(user)))
            client.load_model("beta", headers={"authorization": "Bearer admin-token"})
            assert client.is_model_ready("beta", headers=dict(user))
            client.unload_model("beta", headers={"authorization": "Bearer admin-token"})
            assert not client.is_model_ready("beta", headers=dict(user))
            index_rows = client.get_model_repository_index(headers=dict(user))
            names = {(r["name"] if transport == "http" else r.name) for r in
                     (index_rows if transport == "http" else index_rows.models)}
            assert {"alpha", "beta", "pairs", "foreign"} <= names

            def one(_):  # a queue of one: concurrent requests past it are refused at once
                other = module.InferenceServerClient(f"127.0.0.1:{port}")
                try:
                    other.infer("alpha", [text_input(module, TEXTS[:4])], headers=dict(user))
                    return None
                except InferenceServerException as exc:
                    return _code(exc)
                finally:
                    other.close()

            with concurrent.futures.ThreadPoolExecutor(8) as pool:
                codes = list(pool.map(one, range(8)))
            assert expect["busy"][index] in " ".join(c for c in codes if c), codes
            assert set(codes) <= {None, expect["busy"][index]}, codes
        finally:
            client.close()


def test_json_api_predicts_fans_out_and_describes(registry, tiny_bert):
    with serve(registry, tiny_bert, engine=EngineConfig(max_queue_delay_ms=30)) as server:
        base = f"http://127.0.0.1:{server.http_port}"
        status, body = http("POST", f"{base}/v1/predict", {"task": "alpha", "inputs": TEXTS})
        assert status == 200 and body["artifact"] == "alpha:1"
        want = expected(registry, tiny_bert, "alpha", TEXTS)
        assert [p["label"] for p in body["predictions"]] == [p.label for p in want]
        for got, prediction in zip(body["predictions"], want):
            assert got["probabilities"] == pytest.approx(prediction.probabilities, abs=1e-5)

        a, b = zip(*PAIRS)
        status, body = http("POST", f"{base}/v1/predict",
                            {"task": "pairs", "inputs": [{"text": x, "text_pair": y} for x, y in PAIRS]})
        assert status == 200
        assert [p["label"] for p in body["predictions"]] == [p.label for p in expected(registry, tiny_bert, "pairs",
                                                                                        list(a), list(b))]

        status, body = http("POST", f"{base}/v1/fanout", {"tasks": ROW_TASKS, "inputs": TEXTS[:2]})
        assert status == 200 and [r["artifact"] for r in body["results"]] == [f"{n}:1" for n in ROW_TASKS]
        for name, answer in zip(ROW_TASKS, body["results"]):
            assert [p["label"] for p in answer["predictions"]] == [p.label for p in
                                                                  expected(registry, tiny_bert, name, TEXTS[:2])]
            assert answer["metadata"]["batch_tasks"] == len(ROW_TASKS)  # one mixed batch

        status, body = http("GET", f"{base}/v1/tasks?all=true")
        states = {t["name"]: t["state"] for t in body["tasks"]}
        assert status == 200 and states["alpha"] == "READY" and states["gamma"] == "READY" and states["masked"] == "AVAILABLE"
        status, body = http("GET", f"{base}/v1/info")
        assert status == 200 and body["fingerprint"] == load_backbone(tiny_bert).fingerprint

        for bad, code in [({"task": "nope", "inputs": ["x"]}, 404), ({"task": "alpha", "inputs": []}, 400),
                          ({"task": "alpha"}, 400), ({"task": "alpha", "inputs": [{"text": "x", "text_pair": "y"}]}, 400),
                          (b"{not json", 400)]:
            status, body = http("POST", f"{base}/v1/predict", bad)
            assert status == code and body["error"], (bad if isinstance(bad, bytes) else str(bad)[:80], status, body)
        status, body = http("POST", f"{base}/v1/fanout", {"tasks": ["alpha", "nope"], "inputs": ["x"]})
        assert status == 404
        with socket.create_connection(("127.0.0.1", server.http_port), timeout=30) as sock:  # refused unread
            sock.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 5000000\r\n\r\n")
            assert sock.recv(4096).startswith(b"HTTP/1.1 413 ")


def test_served_openapi_document_is_the_committed_one(registry, tiny_bert):
    with serve(registry, tiny_bert) as server:
        status, served = http("GET", f"http://127.0.0.1:{server.http_port}/openapi.json")
    assert status == 200
    assert served == json.loads(OPENAPI.read_text()), "regenerate it: ticketserve openapi > docs/openapi.json"


schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, settings  # noqa: E402

FUZZED = schemathesis.openapi.from_path(str(OPENAPI))


@pytest.fixture(scope="module")
def fuzzed_server(tmp_path_factory, tiny_checkpoints):
    from ticketserve.registry import open_store

    store = open_store(str(tmp_path_factory.mktemp("fuzz") / "registry"))
    backbone = load_backbone(str(tiny_checkpoints["bert"]))
    for seed, name in enumerate(ROW_TASKS):
        publish_row_task(store, backbone, name, seed)
    with BackgroundServer(ServeConfig(port=0, http_port=0, registry=store.url, backbone=str(tiny_checkpoints["bert"]))) \
            as server:
        yield f"http://127.0.0.1:{server.http_port}"


@FUZZED.parametrize()
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
def test_no_request_the_openapi_document_allows_gets_a_server_error(case, fuzzed_server):
    """schemathesis, bounded: requests generated from the committed document, valid and not."""
    response = case.call(base_url=fuzzed_server, timeout=60)
    assert response.status_code < 500, (case.method, case.path, response.status_code, response.text[:300])
    if response.status_code >= 400 and not case.path.endswith("/ready"):  # readiness answers by status alone
        assert response.json()["error"]
