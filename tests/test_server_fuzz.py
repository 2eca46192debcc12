"""Property-based fuzzing of the Predict API: any request gets an answer or a clear status,
the server never crashes or hangs, and stays healthy."""

from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from registry import open_store
from tests.test_server import ROW_TASKS, _code, publish_row_task
from ticketserve.backbone import load_backbone
from ticketserve.client import Client
from ticketserve.engine import EngineConfig
from ticketserve.server.main import BackgroundServer, ServeConfig
from ticketserve.v1 import pb

CLEAR = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
         grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.RESOURCE_EXHAUSTED}


@pytest.fixture(scope="module")
def client(tmp_path_factory, tiny_checkpoints):
    store = open_store(str(tmp_path_factory.mktemp("fuzz") / "registry"))
    backbone = load_backbone(str(tiny_checkpoints["bert"]))
    for seed, name in enumerate(ROW_TASKS):
        publish_row_task(store, backbone, name, seed)
    publish_row_task(store, backbone, "pairs", 5, task="mrpc")
    engine = EngineConfig(max_texts_per_request=8, max_tokens_per_text=64, max_queue_delay_ms=1)
    config = ServeConfig(port=0, registry=store.url, backbone=str(tiny_checkpoints["bert"]), engine=engine,
                         max_message_bytes=256 * 1024)
    with BackgroundServer(config) as server, Client(f"127.0.0.1:{server.port}", timeout=20, retries=1) as connected:
        yield connected
        health = health_pb2_grpc.HealthStub(connected.channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        assert connected.predict("alpha", ["after the fuzz"]).artifact == "alpha:1"


text = st.text(max_size=300)
inputs = st.lists(st.builds(lambda t, p: pb.TextInput(text=t, **({"text_pair": p} if p is not None else {})),
                            text, st.none() | text), max_size=12)
requests = st.builds(
    lambda task, version, items: pb.PredictRequest(task=task, inputs=items, **({"version": version} if version is not None else {})),
    st.sampled_from([*ROW_TASKS, "pairs"]) | st.text(max_size=40),
    st.none() | st.sampled_from(["1", "latest", "2", "0"]) | st.text(max_size=12),
    inputs)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(request=requests)
def test_structured_requests_get_a_prediction_or_a_clear_status(client, request):
    code = _code(lambda: client.inference.Predict(request, timeout=20))
    assert code in CLEAR, f"{code} for {request!r}"


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(payload=st.binary(max_size=2048))
def test_raw_bytes_never_crash_or_hang_the_server(client, payload):
    call = client.channel.unary_unary("/ticketserve.v1.Inference/Predict")  # bytes in, bytes out
    code = _code(lambda: call(payload, timeout=20))
    assert code in CLEAR, code  # undecodable bytes are INVALID_ARGUMENT, never UNKNOWN or a hang
