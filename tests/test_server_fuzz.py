"""Property-based fuzzing of every RPC the server answers (ours, health, reflection) with raw
bytes, mutated valid messages and valid-but-hostile messages: every answer is a clear status
(never UNKNOWN or INTERNAL), nothing is logged as unexpected, and the server stays healthy.

The default run is bounded (about a minute); `--hypothesis-profile fuzz-long` runs 40× more
examples per property."""

from __future__ import annotations

import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2
from hypothesis import given
from hypothesis import strategies as st

from tests.helpers import ROW_TASKS, publish_mask_task, publish_row_task
from tests.test_server import _code
from ticketserve.core.backbone import load_backbone
from ticketserve.registry import open_store
from ticketserve.runtime.client import Client
from ticketserve.runtime.engine import EngineConfig
from ticketserve.runtime.server.main import BackgroundServer, ServeConfig
from ticketserve.v1 import pb

NEVER = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL}
CLEAR = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
         grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.RESOURCE_EXHAUSTED}
TASKS = [*ROW_TASKS, "masked", "pairs"]

# every method, with a valid request of its type and whether requests / responses stream
METHODS = {
    "/ticketserve.v1.Inference/Predict": (pb.PredictRequest(task="alpha", inputs=[pb.TextInput(text="fine")]), False, False),
    "/ticketserve.v1.Inference/PredictStream": (pb.PredictRequest(task="pairs", inputs=[pb.TextInput(text="a", text_pair="b")]),
                                                True, True),
    "/ticketserve.v1.Tasks/ListTasks": (pb.ListTasksRequest(include_registry=True), False, False),
    "/ticketserve.v1.Tasks/GetTask": (pb.GetTaskRequest(task="beta", version="1"), False, False),
    "/ticketserve.v1.Tasks/LoadTask": (pb.LoadTaskRequest(task="gamma"), False, False),
    "/ticketserve.v1.Tasks/UnloadTask": (pb.UnloadTaskRequest(task="gamma"), False, False),
    "/ticketserve.v1.Info/ServerInfo": (pb.ServerInfoRequest(), False, False),
    "/grpc.health.v1.Health/Check": (health_pb2.HealthCheckRequest(service="ticketserve.v1.Inference"), False, False),
    "/grpc.health.v1.Health/Watch": (health_pb2.HealthCheckRequest(service=""), False, True),
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo": (
        reflection_pb2.ServerReflectionRequest(file_containing_symbol="ticketserve.v1.Inference"), True, True),
}


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_checkpoints):
    store = open_store(str(tmp_path_factory.mktemp("fuzz") / "registry"))
    backbone = load_backbone(str(tiny_checkpoints["bert"]))
    for seed, name in enumerate(ROW_TASKS):
        publish_row_task(store, backbone, name, seed)
    publish_mask_task(store, backbone, "masked", 4)
    publish_row_task(store, backbone, "pairs", 5, task="mrpc")
    engine = EngineConfig(max_texts_per_request=8, max_tokens_per_text=64, max_queue_delay_ms=1, max_text_bytes=4096)
    config = ServeConfig(port=0, registry=store.url, backbone=str(tiny_checkpoints["bert"]), engine=engine,
                         max_message_bytes=256 * 1024, metrics_port=0, cache_bytes=40_000)
    with BackgroundServer(config) as running, Client(f"127.0.0.1:{running.port}", timeout=20, retries=1) as client:
        yield running, client
        health = health_pb2_grpc.HealthStub(client.channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        assert client.predict("alpha", ["after the fuzz"]).artifact == "alpha:1"
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{running.metrics_port}/metrics").read().decode()
        assert "ticketserve_unexpected_errors_total{" not in metrics, "an RPC hit an unexpected exception"


def _call(channel: grpc.Channel, method: str, payloads: list[bytes]) -> grpc.StatusCode:
    """Send raw request bytes to a method whatever its shape; the status it ends with."""
    _, streams_in, streams_out = METHODS[method]
    timeout = 2 if method.endswith("/Watch") else 20  # a valid Watch streams until its deadline
    if streams_in:
        return _code(lambda: list(channel.stream_stream(method)(iter(payloads), timeout=timeout)))
    if streams_out:
        return _code(lambda: list(channel.unary_stream(method)(payloads[0], timeout=timeout)))
    return _code(lambda: channel.unary_unary(method)(payloads[0], timeout=timeout))


def _assert_clear(method: str, code: grpc.StatusCode, what) -> None:
    assert code not in NEVER, f"{code} from {method} for {what!r}"
    if method.startswith("/ticketserve.v1."):
        assert code in CLEAR, f"{code} from {method} for {what!r}"
    elif method.endswith("/Watch"):
        assert code in CLEAR | {grpc.StatusCode.DEADLINE_EXCEEDED}, f"{code} from {method} for {what!r}"


@given(method=st.sampled_from(sorted(METHODS)), payloads=st.lists(st.binary(max_size=2048), min_size=1, max_size=3))
def test_raw_bytes_on_every_method_get_a_clear_status(server, method, payloads):
    _assert_clear(method, _call(server[1].channel, method, payloads), payloads)


@st.composite
def mutated(draw, message: bytes) -> bytes:
    """A valid message with a few byte-level edits: flips, cuts, insertions, repeats."""
    data = bytearray(message)
    for _ in range(draw(st.integers(1, 4))):
        edit = draw(st.sampled_from(["flip", "cut", "insert", "repeat"]))
        at = draw(st.integers(0, len(data)))
        if edit == "flip" and data:
            data[min(at, len(data) - 1)] ^= draw(st.integers(1, 255))
        elif edit == "cut":
            del data[at:at + draw(st.integers(1, 8))]
        elif edit == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        else:
            data += data[:at]
    return bytes(data)


@given(data=st.data(), method=st.sampled_from(sorted(METHODS)))
def test_mutated_valid_messages_on_every_method_get_a_clear_status(server, data, method):
    payload = data.draw(mutated(METHODS[method][0].SerializeToString()))
    _assert_clear(method, _call(server[1].channel, method, [payload]), payload)


hostile_text = (st.text(max_size=200) | st.sampled_from(["", "\x00" * 50, "\ud7ff\ue000" * 30, "é" * 3000, "word " * 2000,
                                                         "🙂" * 1100, "\u202e\u200b" * 100]))
hostile_name = (st.sampled_from([*TASKS, "", "alpha\n", "ALPHA", "a" * 129, "a" * 20_000, "../etc/passwd", "alpha:1",
                                 "alpha@sha256:" + "0" * 64, "al pha", "ticket", "nope"])
                | st.text(max_size=60))
hostile_version = st.none() | st.sampled_from(["1", "01", "0", "999999999", "1" * 5000, "latest", "²", "٣", "𝟏",
                                               "-1", "1.0", " 1", "Latest", "a" * 70]) | st.text(max_size=12)
inputs = st.lists(st.builds(lambda t, p: pb.TextInput(text=t, **({"text_pair": p} if p is not None else {})),
                            hostile_text, st.none() | hostile_text), max_size=12)


def _versioned(cls):
    return st.builds(lambda task, version: cls(task=task, **({"version": version} if version is not None else {})),
                     hostile_name, hostile_version)


hostile_messages = st.one_of(
    st.tuples(st.just("/ticketserve.v1.Inference/Predict"), st.builds(
        lambda task, version, items: pb.PredictRequest(task=task, inputs=items, **({"version": version} if version is not None else {})),
        hostile_name, hostile_version, inputs)),
    st.tuples(st.just("/ticketserve.v1.Tasks/GetTask"), _versioned(pb.GetTaskRequest)),
    st.tuples(st.just("/ticketserve.v1.Tasks/LoadTask"), _versioned(pb.LoadTaskRequest)),
    st.tuples(st.just("/ticketserve.v1.Tasks/UnloadTask"), st.builds(pb.UnloadTaskRequest, task=hostile_name)),
    st.tuples(st.just("/grpc.health.v1.Health/Check"), st.builds(health_pb2.HealthCheckRequest, service=hostile_name)),
)


@given(case=hostile_messages)
def test_valid_but_hostile_messages_get_a_clear_status(server, case):
    method, message = case
    _assert_clear(method, _call(server[1].channel, method, [message.SerializeToString()]), message)


@given(requests=st.lists(st.builds(lambda task, items: pb.PredictRequest(task=task, inputs=items), hostile_name, inputs),
                         min_size=1, max_size=4))
def test_hostile_streams_end_with_a_clear_status(server, requests):
    method = "/ticketserve.v1.Inference/PredictStream"
    _assert_clear(method, _call(server[1].channel, method, [r.SerializeToString() for r in requests]), requests)
