"""The gRPC server as users run it: a real server on 127.0.0.1, a real registry, tiny models."""

from __future__ import annotations

import concurrent.futures
import os
import random
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.helpers import ROW_TASKS, TEXTS, ByName, free_port, publish_row_task
from ticketserve.core import artifact
from ticketserve.core.backbone import load_backbone
from ticketserve.core.errors import BackboneMismatch, CorruptArtifact, InvalidArgument, NotFound, Unauthenticated
from ticketserve.registry import open_store
from ticketserve.runtime.client import Client
from ticketserve.runtime.engine import EngineConfig
from ticketserve.runtime.executor import Runtime
from ticketserve.runtime.server.main import BackgroundServer, ServeConfig
from ticketserve.v1 import pb


def config(registry, tiny_bert, **overrides) -> ServeConfig:
    return ServeConfig(port=0, registry=registry.url, backbone=tiny_bert, watch_seconds=0.2, metrics_port=0,
                       **overrides)


def in_process(registry, tiny_bert, name: str, texts: list[str], ref: str | None = None):
    backbone = load_backbone(tiny_bert)
    runtime = ByName(Runtime(backbone, device="cpu"))
    runtime.add(artifact.load(registry, ref or name, backbone), name=name)
    return runtime.predict([name] * len(texts), texts)


def assert_same(served, expected):
    assert [p.label for p in served] == [p.label for p in expected]
    for got, want in zip(served, expected):
        for label, prob in want.probabilities.items():
            assert got.probabilities[label] == pytest.approx(prob, abs=1e-5)


def test_mixed_task_requests_from_concurrent_clients_match_in_process(registry, tiny_bert):
    names = ROW_TASKS + ["masked"]
    expected = {name: in_process(registry, tiny_bert, name, TEXTS) for name in names}
    engine = EngineConfig(max_queue_delay_ms=30)
    with BackgroundServer(config(registry, tiny_bert, engine=engine)) as server:
        target = f"127.0.0.1:{server.port}"

        def client_work(seed: int) -> list:
            rng = random.Random(seed)
            results = []
            with Client(target) as client:
                for _ in range(6):
                    name = rng.choice(names)
                    picks = rng.sample(range(len(TEXTS)), 3)
                    result = client.predict(name, [TEXTS[i] for i in picks])
                    results.append((name, picks, result))
            return results

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            outcomes = [r for rs in pool.map(client_work, range(8)) for r in rs]
    assert len(outcomes) == 48
    for name, picks, result in outcomes:
        assert result.artifact == f"{name}:1"
        assert_same(result.predictions, [expected[name][i] for i in picks])
    assert max(result.metadata.batch_tasks for _, _, result in outcomes) > 1  # batches really mixed tasks


def test_bundled_minilm_serves_what_in_process_prediction_returns(tmp_path):
    store = open_store(str(tmp_path / "registry"))
    backbone = load_backbone()
    publish_row_task(store, backbone, "mini", 3)
    expected = in_process(store, None, "mini", TEXTS)
    with BackgroundServer(ServeConfig(port=0, registry=store.url)) as server, Client(f"127.0.0.1:{server.port}") as client:
        assert client.server_info().fingerprint == backbone.fingerprint
        assert_same(client.predict("mini", TEXTS).predictions, expected)


def test_hot_swap_under_load_fails_nothing_and_switches_to_v2(registry, tiny_bert):
    backbone = load_backbone(tiny_bert)
    publish_row_task(registry, backbone, "swap", 1)
    v1 = in_process(registry, tiny_bert, "swap", TEXTS[:2], "swap:1")
    with BackgroundServer(config(registry, tiny_bert)) as server:
        target, stop, failures, seen = f"127.0.0.1:{server.port}", threading.Event(), [], []

        def hammer() -> None:
            with Client(target) as client:
                while not stop.is_set():
                    try:
                        result = client.predict("swap", TEXTS[:2])
                        seen.append((time.monotonic(), result.artifact, result.predictions))
                    except grpc.RpcError as exc:
                        failures.append(exc)

        threads = [threading.Thread(target=hammer) for _ in range(8)]
        for thread in threads:
            thread.start()
        time.sleep(1.0)
        published_at = time.monotonic()
        publish_row_task(registry, backbone, "swap", 2)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not any(a == "swap:2" for _, a, _ in seen[-8:]):
            time.sleep(0.1)
        time.sleep(0.5)
        stop.set()
        for thread in threads:
            thread.join()
    v2 = in_process(registry, tiny_bert, "swap", TEXTS[:2], "swap:2")
    assert not failures
    assert {a for _, a, _ in seen} == {"swap:1", "swap:2"}
    first_v2 = min(t for t, a, _ in seen if a == "swap:2")
    assert first_v2 > published_at
    for _, name, predictions in seen:
        assert_same(predictions, v1 if name == "swap:1" else v2)
    assert seen[-1][1] == "swap:2"


def test_corrupt_or_foreign_new_version_keeps_the_old_one_serving(registry, tiny_bert, tiny_checkpoints):
    backbone = load_backbone(tiny_bert)
    with BackgroundServer(config(registry, tiny_bert)) as server, Client(f"127.0.0.1:{server.port}") as client:
        assert client.predict("alpha", TEXTS[:1]).artifact == "alpha:1"
        corrupt = publish_row_task(registry, backbone, "alpha", 11)
        sha = registry.manifest(corrupt).files["payload.safetensors"].sha256
        blob = Path(registry.url) / "blobs" / "sha256" / sha[:2] / sha
        data = bytearray(blob.read_bytes())
        data[-5] ^= 0xFF
        blob.write_bytes(bytes(data))
        time.sleep(1.0)  # a few watch polls
        assert client.predict("alpha", TEXTS[:1]).artifact == "alpha:1"
        task = client.get_task("alpha")
        assert task.task.state == pb.TASK_STATE_ERRORED and "checksum mismatch" in task.task.error
        with pytest.raises(CorruptArtifact) as info:  # the server's error class, raised again by the client
            client.predict("alpha", TEXTS[:1], version="2")
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION and isinstance(info.value, grpc.RpcError)

        roberta = load_backbone(str(tiny_checkpoints["roberta"]))
        publish_row_task(registry, roberta, "alpha", 12)  # alpha:3, for another backbone
        time.sleep(1.0)
        assert client.predict("alpha", TEXTS[:1]).artifact == "alpha:1"
        with pytest.raises(BackboneMismatch) as info:
            client.predict("alpha", TEXTS[:1], version="3")
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "trained on backbone" in info.value.details()
        with pytest.raises(NotFound, match="no artifact named 'nobody'"):
            client.predict("nobody", TEXTS[:1])
        with pytest.raises(InvalidArgument):
            client.predict("alpha", [])


def _code(call) -> grpc.StatusCode:
    try:
        call()
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


def test_every_bad_input_gets_its_status_code_and_the_server_stays_healthy(registry, tiny_bert):
    engine = EngineConfig(max_texts_per_request=4, max_tokens_per_text=16, truncate=False, max_batch_size=8)
    with BackgroundServer(config(registry, tiny_bert, engine=engine, max_message_bytes=64 * 1024)) as server:
        target = f"127.0.0.1:{server.port}"
        with Client(target, retries=1) as client:
            stub = client.inference
            cases = {
                "no task": (lambda: stub.Predict(pb.PredictRequest(inputs=[pb.TextInput(text="x")])), grpc.StatusCode.INVALID_ARGUMENT),
                "unknown task": (lambda: client.predict("nope", ["x"]), grpc.StatusCode.NOT_FOUND),
                "unknown version": (lambda: client.predict("alpha", ["x"], version="9"), grpc.StatusCode.NOT_FOUND),
                "bad name": (lambda: client.predict("Bad/Name", ["x"]), grpc.StatusCode.INVALID_ARGUMENT),
                "no inputs": (lambda: client.predict("alpha", []), grpc.StatusCode.INVALID_ARGUMENT),
                "too many inputs": (lambda: client.predict("alpha", ["x"] * 5), grpc.StatusCode.INVALID_ARGUMENT),
                "too long": (lambda: client.predict("alpha", ["word " * 40]), grpc.StatusCode.INVALID_ARGUMENT),
                "pair for a single-text task": (lambda: client.predict("alpha", ["x"], pairs=["y"]), grpc.StatusCode.INVALID_ARGUMENT),
                "single text for a pair task": (lambda: client.predict("pairs", ["x"]), grpc.StatusCode.INVALID_ARGUMENT),
                "message too large": (lambda: client.predict("alpha", ["x" * 100_000]), grpc.StatusCode.RESOURCE_EXHAUSTED),
                "deadline": (lambda: stub.Predict(pb.PredictRequest(task="beta", inputs=[pb.TextInput(text="x")]), timeout=0.0001),
                             grpc.StatusCode.DEADLINE_EXCEEDED),
            }
            for what, (call, expected) in cases.items():
                assert _code(call) == expected, what
            assert client.predict("pairs", ["x"], pairs=["y"]).predictions
            health = health_pb2_grpc.HealthStub(client.channel).Check(health_pb2.HealthCheckRequest())
            assert health.status == health_pb2.HealthCheckResponse.SERVING
            assert client.predict("alpha", ["still fine"]).artifact == "alpha:1"


def test_full_queue_pushes_back_with_resource_exhausted(registry, tiny_bert):
    engine = EngineConfig(max_queue_size=2, max_queue_delay_ms=200, max_batch_size=1, max_texts_per_request=1)
    with BackgroundServer(config(registry, tiny_bert, engine=engine)) as server:
        target = f"127.0.0.1:{server.port}"
        with Client(target, retries=1) as client, concurrent.futures.ThreadPoolExecutor(24) as pool:
            client.predict("alpha", ["warm"])  # loaded: the burst hits the queue, not the loader
            codes = list(pool.map(lambda i: _code(lambda: client.predict(ROW_TASKS[i % 3], [f"text {i}"])), range(24)))
        assert grpc.StatusCode.RESOURCE_EXHAUSTED in codes and grpc.StatusCode.OK in codes
        assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}


def test_streaming_predictions_come_back_in_order(registry, tiny_bert):
    import asyncio

    from ticketserve.runtime.client import AsyncClient

    async def run(port: int):
        async with AsyncClient(f"127.0.0.1:{port}") as client:
            requests = [(ROW_TASKS[i % 3], [TEXTS[i]]) for i in range(6)]
            return [r async for r in client.predict_stream(requests)]

    with BackgroundServer(config(registry, tiny_bert)) as server:
        results = asyncio.run(run(server.port))
    assert [r.artifact for r in results] == [f"{ROW_TASKS[i % 3]}:1" for i in range(6)]
    for i, result in enumerate(results):
        assert_same(result.predictions, [in_process(registry, tiny_bert, ROW_TASKS[i % 3], [TEXTS[i]])[0]])


def test_token_auth_and_admin_token(registry, tiny_bert, monkeypatch):
    monkeypatch.setenv("TS_TOKEN", "user-secret")
    monkeypatch.setenv("TS_ADMIN", "admin-secret")
    with BackgroundServer(config(registry, tiny_bert, token_env="TS_TOKEN", admin_token_env="TS_ADMIN")) as server:
        target = f"127.0.0.1:{server.port}"
        with Client(target, retries=1) as anonymous, Client(target, token="wrong", retries=1) as wrong, \
                Client(target, token="user-secret") as user, Client(target, token="admin-secret") as admin:
            assert _code(lambda: anonymous.predict("alpha", ["x"])) == grpc.StatusCode.UNAUTHENTICATED
            with pytest.raises(Unauthenticated):  # an interceptor's answer: typed by its status
                anonymous.predict("alpha", ["x"])
            assert _code(lambda: wrong.predict("alpha", ["x"])) == grpc.StatusCode.UNAUTHENTICATED
            assert _code(lambda: anonymous.server_info()) == grpc.StatusCode.UNAUTHENTICATED
            assert user.predict("alpha", ["x"]).artifact == "alpha:1"
            assert _code(lambda: user.load_task("beta")) == grpc.StatusCode.PERMISSION_DENIED
            assert admin.load_task("beta").state == pb.TASK_STATE_READY
            assert admin.unload_task("beta") and not admin.unload_task("beta")  # idempotent
            health = health_pb2_grpc.HealthStub(anonymous.channel).Check(health_pb2.HealthCheckRequest())
            assert health.status == health_pb2.HealthCheckResponse.SERVING  # probes need no secret


def test_tls(registry, tiny_bert, tmp_path):
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost"],
                   check=True, capture_output=True)
    with BackgroundServer(config(registry, tiny_bert, tls_cert=str(cert), tls_key=str(key), host="localhost",
                                 http_port=0)) as server:
        with Client(f"localhost:{server.port}", tls_ca=cert) as client:
            assert client.predict("alpha", ["x"]).artifact == "alpha:1"
        import ssl  # HTTP speaks TLS with the same certificate: no bearer token crosses in plaintext

        request = urllib.request.Request(f"https://localhost:{server.http_port}/v1/predict", method="POST",
                                         data=b'{"task": "alpha", "inputs": ["x"]}',
                                         headers={"content-type": "application/json"})
        with urllib.request.urlopen(request, context=ssl.create_default_context(cafile=str(cert))) as response:
            assert response.status == 200
        with Client(f"localhost:{server.port}", retries=1, timeout=3) as plaintext:
            assert _code(lambda: plaintext.predict("alpha", ["x"])) == grpc.StatusCode.UNAVAILABLE
        from typer.testing import CliRunner

        from ticketserve.cli import app

        # the probe deploy/k8s/components/tls runs in the pod
        probe = CliRunner().invoke(app, ["health", "--server", f"localhost:{server.port}", "--tls-ca", str(cert)])
        assert probe.exit_code == 0 and "SERVING" in probe.output, probe.output


def test_lru_eviction_reload_and_metrics(registry, tiny_bert):
    one_task = sum(t.numel() * t.element_size() for t in artifact.read(registry, "alpha").tensors.values())
    with BackgroundServer(config(registry, tiny_bert, cache_bytes=int(one_task * 2.5))) as server:
        with Client(f"127.0.0.1:{server.port}") as client:
            for name in ROW_TASKS + ROW_TASKS[:1]:
                client.predict(name, ["x"])
            listed = {t.artifact for t in client.list_tasks()}
            assert len(listed) <= 2 and "alpha:1" in listed
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics").read().decode()
    assert 'ticketserve_task_cache_total{event="eviction"}' in metrics
    assert 'ticketserve_requests_total{code="OK",task="alpha"} 2.0' in metrics
    assert "ticketserve_batch_size_bucket" in metrics and "ticketserve_resident_bytes" in metrics


def _in_flight(metrics_port: int) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
    return next(float(line.split()[-1]) for line in text.splitlines() if line.startswith("ticketserve_requests_in_flight "))


def test_sigterm_drains_in_flight_requests(registry, tiny_bert, tmp_path):
    env = os.environ | {"TICKETSERVE_REGISTRY": registry.url}
    port, metrics_port = free_port(), free_port()  # fixed ports could be another socket's ephemeral ones
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "ticketserve"), "serve", "--backbone", tiny_bert, "--port", str(port),
         "--metrics-port", str(metrics_port), "--max-queue-delay-ms", "3000", "--preload", "alpha"],
        env=env, stderr=subprocess.PIPE, text=True)
    try:
        target = f"127.0.0.1:{port}"
        with Client(target, timeout=60) as client:
            deadline = time.monotonic() + 120
            while _code(client.server_info) != grpc.StatusCode.OK:
                assert server.poll() is None, f"server exited: {server.stderr.read()[-2000:]}"
                assert time.monotonic() < deadline, "server did not start"
                time.sleep(0.3)
            with concurrent.futures.ThreadPoolExecutor(4) as pool:
                in_flight = [pool.submit(client.predict, "alpha", [TEXTS[i]]) for i in range(4)]
                deadline = time.monotonic() + 30  # a fixed sleep raced the requests' arrival (1 run in ~10)
                while _in_flight(metrics_port) < 4:  # all four at the server, waiting out the batching delay
                    assert time.monotonic() < deadline, "the requests never reached the server"
                    time.sleep(0.05)
                server.send_signal(signal.SIGTERM)
                results = [f.result(timeout=60) for f in in_flight]
        assert all(r.artifact == "alpha:1" for r in results)
        assert server.wait(timeout=60) == 0
        assert "drained: all requests served" in server.stderr.read()
    finally:
        if server.poll() is None:
            server.kill()


def test_health_command_for_container_checks(registry, tiny_bert):
    from typer.testing import CliRunner

    from ticketserve.cli import app

    with BackgroundServer(config(registry, tiny_bert)) as server:
        result = CliRunner().invoke(app, ["health", "--server", f"127.0.0.1:{server.port}"])
        assert result.exit_code == 0 and "SERVING" in result.output
    down = CliRunner().invoke(app, ["health", "--server", "127.0.0.1:1", "--timeout", "1"])
    assert down.exit_code != 0


def test_client_retries_unavailable_with_backoff():
    from concurrent import futures

    from ticketserve.v1 import rpc

    class Flaky(rpc.InfoServicer):
        calls = 0

        def ServerInfo(self, request, context):
            Flaky.calls += 1
            if Flaky.calls <= 2:
                context.abort(grpc.StatusCode.UNAVAILABLE, "warming up")
            return pb.ServerInfoResponse(version="flaky")

    server = grpc.server(futures.ThreadPoolExecutor(2))
    rpc.add_InfoServicer_to_server(Flaky(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with Client(f"127.0.0.1:{port}", retries=4) as client:
            assert client.server_info().version == "flaky"
        assert Flaky.calls == 3
        Flaky.calls = -10  # now it keeps failing past the retry budget
        with Client(f"127.0.0.1:{port}", retries=2) as client:
            assert _code(client.server_info) == grpc.StatusCode.UNAVAILABLE
    finally:
        server.stop(None)


def test_reflection_lists_every_service(registry, tiny_bert):
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    with BackgroundServer(config(registry, tiny_bert)) as server, Client(f"127.0.0.1:{server.port}") as client:
        services = set(ProtoReflectionDescriptorDatabase(client.channel).get_services())
    assert {"ticketserve.v1.Inference", "ticketserve.v1.Tasks", "ticketserve.v1.Info", "grpc.health.v1.Health"} <= services
