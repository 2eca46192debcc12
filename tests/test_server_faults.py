"""Faults an operator met before trusting the server with traffic: cache pressure, artifacts
that verify but cannot attach, huge texts, invented task names, odd version strings, corrupt
registry entries, bugs, drain, auth. Each against a real server on 127.0.0.1 and a real
registry directory."""

from __future__ import annotations

import concurrent.futures
import json
import logging
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
import torch

from tests.helpers import ROW_TASKS, TEXTS, ByName, manifest_for, publish_row_task, random_head, random_row_delta
from tests.test_server import _code, assert_same, config, in_process
from ticketserve.core import artifact
from ticketserve.core.backbone import load_backbone
from ticketserve.core.errors import InvalidArgument
from ticketserve.core.kinds.row_delta import RowDeltas, rows_on
from ticketserve.runtime.client import Client
from ticketserve.runtime.engine import Engine, EngineConfig
from ticketserve.runtime.executor import Runtime
from ticketserve.runtime.server.main import BackgroundServer
from ticketserve.v1 import pb

OK, INVALID = grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT


def _metrics(server) -> str:
    return urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics").read().decode()


def _row_slots(runtime: Runtime) -> int:
    """Task rows held in the shared encoder's row tables, over every matrix."""
    return sum(len(table) for table in rows_on(runtime.shared).tables.values())


def _task_bytes(store, name: str) -> int:
    return sum(t.numel() * t.element_size() for t in artifact.read(store, name).tensors.values())


def publish_bad_head(store, backbone, name: str):
    """Verifies (checksums, backbone) but cannot attach: a head bias of 7 for 2 labels."""
    tensors = random_row_delta(backbone, k=2) | random_head(backbone)
    tensors["head.bias"] = torch.zeros(7)
    return artifact.publish(store, manifest_for(backbone, name), tensors)


def test_more_tasks_than_the_cache_holds_under_32_clients_fails_nothing(registry, tiny_bert):
    backbone = load_backbone(tiny_bert)
    names = [f"t{i}" for i in range(6)]
    for seed, name in enumerate(names):
        publish_row_task(registry, backbone, name, 20 + seed)
    expected = {name: in_process(registry, tiny_bert, name, TEXTS[:2]) for name in names}
    budget = int(_task_bytes(registry, "t0") * 1.5)  # one task fits, six are asked for
    with BackgroundServer(config(registry, tiny_bert, cache_bytes=budget)) as server:
        target, outcomes, stop = f"127.0.0.1:{server.port}", [], threading.Event()

        def client_work(seed: int) -> None:
            rng = random.Random(seed)
            with Client(target, retries=1) as client:
                for _ in range(8):
                    name = rng.choice(names)
                    try:
                        outcomes.append((name, client.predict(name, TEXTS[:2])))
                    except grpc.RpcError as exc:
                        outcomes.append((name, exc))

        def unloader() -> None:  # a concurrent admin unloading what requests are acquiring
            with Client(target, retries=1) as admin:
                while not stop.is_set():
                    admin.unload_task(random.choice(names))
                    time.sleep(0.01)

        churn = threading.Thread(target=unloader)
        churn.start()
        with concurrent.futures.ThreadPoolExecutor(32) as pool:
            list(pool.map(client_work, range(32)))
        stop.set()
        churn.join()
        metrics = _metrics(server)
    failures = [(name, r) for name, r in outcomes if isinstance(r, grpc.RpcError)]
    assert not failures, [(name, r.code(), r.details()) for name, r in failures[:5]]
    assert len(outcomes) == 256
    for name, result in outcomes:
        assert_same(result.predictions, expected[name])
    assert 'ticketserve_task_cache_total{event="eviction"}' in metrics
    assert "ticketserve_cache_over_budget_bytes" in metrics and f"ticketserve_cache_budget_bytes {float(budget)}" in metrics


def test_unattachable_version_is_refused_rolled_back_reported_and_never_stops_the_watch(registry, tiny_bert, caplog):
    caplog.set_level(logging.DEBUG, logger="ticketserve")
    backbone = load_backbone(tiny_bert)
    with BackgroundServer(config(registry, tiny_bert)) as server, Client(f"127.0.0.1:{server.port}", retries=1) as client:
        assert client.predict("alpha", TEXTS[:1]).artifact == "alpha:1"
        assert client.predict("beta", TEXTS[:1]).artifact == "beta:1"  # watched after alpha
        slots = _row_slots(server.runtime)
        publish_bad_head(registry, backbone, "alpha")  # alpha:2, newest of a watched name
        time.sleep(1.5)  # several watch polls
        assert _row_slots(server.runtime) == slots  # nothing leaked per poll
        publish_row_task(registry, backbone, "beta", 31)  # the watch must still swap other names
        deadline = time.monotonic() + 20
        while client.predict("beta", TEXTS[:1]).artifact != "beta:2":
            assert time.monotonic() < deadline, "beta never swapped to v2"
            time.sleep(0.1)
        assert client.predict("alpha", TEXTS[:1]).artifact == "alpha:1"  # the old version keeps serving
        with pytest.raises(grpc.RpcError) as info:
            client.predict("alpha", TEXTS[:1], version="2")
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "head.bias" in info.value.details()
        with pytest.raises(grpc.RpcError) as info:
            client.load_task("alpha", version="2")
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert _row_slots(server.runtime) == slots  # beta:2 replaced beta:1; alpha:2 left nothing
        listed = {t.artifact: t for t in client.list_tasks(include_registry=True)}
        assert listed["alpha:2"].state == pb.TASK_STATE_ERRORED and "head.bias" in listed["alpha:2"].error
        assert client.get_task("alpha", version="2").task.state == pb.TASK_STATE_ERRORED
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING and "alpha:2" in r.getMessage()]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]  # logged once, retried with back-off


def test_a_broken_newest_version_keeps_the_old_one_serving_even_after_eviction(registry, tiny_bert):
    backbone = load_backbone(tiny_bert)
    budget = int(_task_bytes(registry, "alpha") * 1.5)  # one task at a time
    with BackgroundServer(config(registry, tiny_bert, cache_bytes=budget)) as server, \
            Client(f"127.0.0.1:{server.port}", retries=1) as client:
        assert client.predict("alpha", TEXTS[:1]).artifact == "alpha:1"
        publish_bad_head(registry, backbone, "alpha")  # alpha:2 cannot be served
        time.sleep(0.6)  # the watch tries it and keeps alpha:1
        for _ in range(3):
            assert client.predict("beta", TEXTS[:1]).artifact == "beta:1"  # evicts alpha:1
            assert client.predict("alpha", TEXTS[:1]).artifact == "alpha:1"  # loaded again, not alpha:2
        publish_row_task(registry, backbone, "alpha", 40)  # a good alpha:3 takes over
        deadline = time.monotonic() + 20
        while client.predict("alpha", TEXTS[:1]).artifact != "alpha:3":
            assert time.monotonic() < deadline
            time.sleep(0.1)


def test_a_slow_first_load_of_an_older_version_never_moves_the_alias_back(registry, tiny_bert):
    """Seen in the chaos run (cache for 4 of 12 tasks, swaps every 2 s): a request's first load
    resolved alpha:1, and while it loaded alpha:2 was published, served to another request and
    evicted; the slow load then put the alias back on alpha:1, and requests that began after
    clients had alpha:2 got alpha:1."""
    from ticketserve.runtime.server.loader import TaskLoader

    backbone = load_backbone(tiny_bert)
    resolved, go_on = threading.Event(), threading.Event()

    class SlowFirstLook(type(registry)):
        def resolve(self, ref):
            found = super().resolve(ref)
            if threading.current_thread().name == "slow":
                resolved.set()
                go_on.wait(10)
            return found

    store = SlowFirstLook(registry.url)
    loader = TaskLoader(store, Runtime(backbone, device="cpu"), cache_bytes=int(_task_bytes(registry, "alpha") * 1.5))
    first: list = []
    slow = threading.Thread(target=lambda: first.append(loader.acquire("alpha")), name="slow")
    slow.start()
    assert resolved.wait(10)  # it found alpha:1 and is about to load it
    publish_row_task(registry, backbone, "alpha", 40)  # alpha:2
    newer = loader.acquire("alpha")
    assert newer.key == "alpha:2"
    loader.release(newer)
    loader.release(loader.acquire("beta"))  # evicts alpha:2 and its alias (room for one task)
    go_on.set()
    slow.join(10)
    assert first[0].key == "alpha:1"  # it began before alpha:2 existed: served as it resolved
    loader.release(first[0])
    again = loader.acquire("alpha")
    assert again.key == "alpha:2"  # not the older version the slow load brought back
    loader.release(again)


def test_a_newer_first_load_that_finishes_last_still_moves_the_alias_forward(registry, tiny_bert):
    """Seen in the chaos run: two first loads raced, the older look (alpha:1) finished first and
    took the alias; the newer (alpha:2) finished second, found the alias taken and left it, so
    requests that began after a client had alpha:2 got alpha:1 until the next poll."""
    from ticketserve.runtime.server.loader import TaskLoader

    backbone = load_backbone(tiny_bert)
    resolved = {"older": threading.Event(), "newer": threading.Event()}
    go_on = {"older": threading.Event(), "newer": threading.Event()}

    class PausedLooks(type(registry)):
        def resolve(self, ref):
            found = super().resolve(ref)
            name = threading.current_thread().name
            if name in resolved:
                resolved[name].set()
                go_on[name].wait(10)
            return found

    loader = TaskLoader(PausedLooks(registry.url), Runtime(backbone, device="cpu"), cache_bytes=1 << 30)
    got: dict = {}
    threads = {name: threading.Thread(target=lambda name=name: got.__setitem__(name, loader.acquire("alpha")), name=name)
               for name in ("older", "newer")}
    threads["older"].start()
    assert resolved["older"].wait(10)  # found alpha:1
    publish_row_task(registry, backbone, "alpha", 40)  # alpha:2
    threads["newer"].start()
    assert resolved["newer"].wait(10)  # found alpha:2
    for name in ("older", "newer"):  # the older look finishes first
        go_on[name].set()
        threads[name].join(10)
        loader.release(got[name])
    assert (got["older"].key, got["newer"].key) == ("alpha:1", "alpha:2")
    again = loader.acquire("alpha")
    assert again.key == "alpha:2"  # the alias follows the newer look, whichever finished last
    loader.release(again)


def test_a_failing_attach_is_rolled_back_and_typed(tiny_checkpoints, monkeypatch):
    from tests.helpers import in_memory_artifact
    from ticketserve.core.errors import CorruptArtifact

    backbone = load_backbone(str(tiny_checkpoints["bert"]))
    runtime = ByName(Runtime(backbone, device="cpu"))
    runtime.add(in_memory_artifact(backbone, "ok", random_row_delta(backbone)))
    before = _row_slots(runtime)
    calls = {"n": 0}
    original = RowDeltas.serve

    def fail_midway(self, slot, matrix, index, delta):
        calls["n"] += 1
        if calls["n"] == 5:  # four matrices already hold the task's rows
            raise RuntimeError("device out of memory")
        original(self, slot, matrix, index, delta)

    monkeypatch.setattr(RowDeltas, "serve", fail_midway)
    with pytest.raises(CorruptArtifact, match="cannot be attached .*out of memory"):
        runtime.add(in_memory_artifact(backbone, "bad", random_row_delta(backbone, seed=1)))
    assert _row_slots(runtime) == before and set(runtime.tasks) == {"ok"}


def test_registry_listing_shows_foreign_and_corrupt_entries_as_errors_and_skips_non_tasks(registry, tiny_bert,
                                                                                          tiny_checkpoints):
    publish_row_task(registry, load_backbone(str(tiny_checkpoints["roberta"])), "foreign", 1)
    artifact.publish(registry, manifest_for(load_backbone(tiny_bert), "a-ticket", kind="ticket"), {})
    digest = registry.resolve("beta").digest.removeprefix("sha256:")
    blob = Path(registry.url) / "blobs" / "sha256" / digest[:2] / digest
    blob.write_bytes(blob.read_bytes().replace(b'"method"', b'"methox"'))  # one manifest byte flipped
    (Path(registry.url) / "refs" / "gamma" / "tags" / "latest").write_text("")  # a garbage tag file
    with BackgroundServer(config(registry, tiny_bert)) as server, Client(f"127.0.0.1:{server.port}") as client:
        listed = {t.artifact: t for t in client.list_tasks(include_registry=True)}
        assert listed["alpha:1"].state == pb.TASK_STATE_AVAILABLE and not listed["alpha:1"].error
        assert listed["foreign:1"].state == pb.TASK_STATE_ERRORED and "trained on backbone" in listed["foreign:1"].error
        assert listed["beta:1"].state == pb.TASK_STATE_ERRORED and "checksum mismatch" in listed["beta:1"].error
        assert listed["gamma"].state == pb.TASK_STATE_ERRORED and "tags/latest holds ''" in listed["gamma"].error
        assert not any(a.startswith("a-ticket") for a in listed)
        with pytest.raises(grpc.RpcError) as info:
            client.predict("gamma", ["x"])
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "tag file" in info.value.details()


def test_preload_of_an_unattachable_task_fails_the_start_with_one_line(registry, tiny_bert):
    publish_bad_head(registry, load_backbone(tiny_bert), "broken")
    env = os.environ | {"TICKETSERVE_REGISTRY": registry.url}
    result = subprocess.run([str(Path(sys.executable).parent / "ticketserve"), "serve", "--backbone", tiny_bert,
                             "--port", "0", "--preload", "broken"], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "error: --preload broken: broken:1: head.bias" in result.stderr


class _RecordingTokenizer:
    """The backbone's tokenizer, recording the longest text each call receives."""

    def __init__(self, tokenizer):
        self.tokenizer, self.longest = tokenizer, []

    def __call__(self, texts, pairs=None, **kwargs):
        self.longest.append(max(len(t) for t in [*texts, *(pairs or [])]))
        return self.tokenizer(texts, pairs, **kwargs)

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)


def test_huge_texts_are_cut_before_tokenizing_with_the_same_prediction(tiny_checkpoints):
    backbone = load_backbone(str(tiny_checkpoints["bert"]))
    runtime = ByName(Runtime(backbone, device="cpu", max_length=64))
    runtime.add(artifact_for(backbone))
    engine = Engine(runtime, EngineConfig(max_tokens_per_text=64))
    try:
        words = " ".join(random.Random(0).choice(["good", "bad", "plot", "actors", "film,"]) for _ in range(30_000))
        recorder = engine.tokenization.tokenizer = _RecordingTokenizer(backbone.tokenizer)
        huge = engine.submit(runtime.get("ok"), [words, words[:500]]).result(timeout=60).predictions
        assert max(recorder.longest) <= 64 * 24 < len(words)  # the tokenizer never saw the whole text
        cut = words[:64 * 24].rsplit(" ", 1)[0]
        assert_same(huge, runtime.predict(["ok", "ok"], [cut, words[:500]]))
        with pytest.raises(InvalidArgument, match="bytes; the limit is 262,144"):
            engine.submit(runtime.get("ok"), ["é" * 140_000])  # 280,000 bytes in 140,000 characters
    finally:
        engine.close()


@pytest.mark.parametrize("ms_per_token, first", [(1.0, "short"), (0.0, "long")])
def test_cheap_requests_go_before_costly_ones_that_came_a_little_earlier(tiny_checkpoints, ms_per_token, first):
    backbone = load_backbone(str(tiny_checkpoints["bert"]))
    runtime = ByName(Runtime(backbone, device="cpu"))
    runtime.add(artifact_for(backbone))
    engine = Engine(runtime, EngineConfig(max_queue_delay_ms=0, queue_ms_per_token=ms_per_token))
    started, release, batches = threading.Event(), threading.Event(), []
    forward = runtime.logits

    def recording(names, inputs):
        batches.append(tuple(inputs["input_ids"].shape))
        started.set()
        release.wait(10)  # the first batch holds the inference thread while the others queue
        return forward(names, inputs)

    runtime.logits = recording
    try:
        busy = engine.submit(runtime.get("ok"), ["warm"])
        assert started.wait(10)
        long = engine.submit(runtime.get("ok"), ["word " * 300] * 4)  # 4 × 126 tokens, queued first
        short = engine.submit(runtime.get("ok"), ["short"])  # 3 tokens, a moment later
        release.set()
        for future in (busy, long, short):
            future.result(timeout=30)
    finally:
        engine.close()
    assert batches[1] == ((1, 3) if first == "short" else (4, 126))  # like lengths only: never one batch


def artifact_for(backbone):
    from tests.helpers import in_memory_artifact

    return in_memory_artifact(backbone, "ok", random_row_delta(backbone))


def test_huge_and_over_limit_texts_through_the_server(registry, tiny_bert):
    words = " ".join(["a fine, moving film"] * 12_000)  # 240 KB: under the default byte limit
    with BackgroundServer(config(registry, tiny_bert, max_message_bytes=8 << 20)) as server, \
            Client(f"127.0.0.1:{server.port}", retries=1, timeout=60) as client:
        expected = client.predict("alpha", [" ".join(["a fine, moving film"] * 200)]).predictions
        started = time.monotonic()
        assert_same(client.predict("alpha", [words] * 8).predictions, expected * 8)
        assert time.monotonic() - started < 10
        with pytest.raises(grpc.RpcError) as info:
            client.predict("alpha", ["x" * (1 << 20)])
        assert info.value.code() == INVALID and "the limit is 262,144" in info.value.details()


def test_admission_is_bounded_and_pushes_back(registry, tiny_bert, monkeypatch):
    original = Engine.submit

    def slow_submit(self, *args, **kwargs):  # tokenizing that takes a while
        time.sleep(0.3)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Engine, "submit", slow_submit)
    engine = EngineConfig(max_queue_size=2, max_batch_size=4, max_texts_per_request=1)
    with BackgroundServer(config(registry, tiny_bert, engine=engine)) as server, \
            Client(f"127.0.0.1:{server.port}", retries=1) as client, concurrent.futures.ThreadPoolExecutor(12) as pool:
        client.predict("alpha", ["warm"])
        codes = list(pool.map(lambda i: _code(lambda: client.predict("alpha", [f"text {i}"])), range(12)))
    assert grpc.StatusCode.RESOURCE_EXHAUSTED in codes and OK in codes
    assert set(codes) <= {OK, grpc.StatusCode.RESOURCE_EXHAUSTED}


def test_metrics_label_only_known_tasks_and_count_every_answer(registry, tiny_bert):
    with BackgroundServer(config(registry, tiny_bert)) as server, Client(f"127.0.0.1:{server.port}", retries=1) as client:
        client.predict("alpha", ["x"])
        for i in range(300):
            assert _code(lambda: client.predict(f"invented-{i}", ["x"])) == grpc.StatusCode.NOT_FOUND
        assert _code(lambda: client.predict("alpha", ["x"], version="7")) == grpc.StatusCode.NOT_FOUND
        metrics = _metrics(server)
    assert "invented" not in metrics and len(metrics) < 60_000
    assert 'ticketserve_requests_total{code="NOT_FOUND",task="_other"} 300.0' in metrics
    assert 'ticketserve_requests_total{code="NOT_FOUND",task="alpha"} 1.0' in metrics
    assert 'ticketserve_task_resident_bytes{task="alpha",version="1"}' in metrics
    assert 'ticketserve_responses_total{code="NOT_FOUND",method="/ticketserve.v1.Inference/Predict"} 301.0' in metrics


def test_per_task_series_stop_at_the_bound_and_the_rest_count_as_other(registry, tiny_bert):
    """At 10,000 tasks /metrics would be hundreds of thousands of lines: only the first
    --metrics-task-series names get their own series; totals stay exact under `_other`."""
    with BackgroundServer(config(registry, tiny_bert, metrics_task_series=2)) as server, \
            Client(f"127.0.0.1:{server.port}", retries=1) as client:
        for name in ROW_TASKS:  # alpha, beta, gamma: gamma is the third
            client.predict(name, ["x", "y"])
        assert _code(lambda: client.predict("gamma", ["x"], version="7")) == grpc.StatusCode.NOT_FOUND
        metrics = _metrics(server)
    assert 'ticketserve_requests_total{code="OK",task="alpha"} 1.0' in metrics
    assert 'ticketserve_requests_total{code="OK",task="beta"} 1.0' in metrics
    assert 'task="gamma"' not in metrics
    assert 'ticketserve_requests_total{code="OK",task="_other"} 1.0' in metrics
    assert 'ticketserve_requests_total{code="NOT_FOUND",task="_other"} 1.0' in metrics
    assert 'ticketserve_examples_total{task="_other"} 2.0' in metrics
    assert 'ticketserve_resident_tasks 3.0' in metrics
    assert 'ticketserve_task_cache_total{event="load"} 3.0' in metrics
    assert metrics.count("ticketserve_task_resident_bytes{") == 2


@pytest.mark.parametrize("task, version", [("alpha", "²"), ("alpha", "①"), ("alpha", "٣"), ("alpha", "𝟏"),
                                           ("alpha", "1" * 5000), ("alpha\n", None), ("alpha:1\n", None),
                                           ("x" * 20_000, None), ("alpha", "x" * 20_000)])
def test_odd_names_and_versions_are_invalid_with_a_short_echo(registry, tiny_bert, task, version):
    with BackgroundServer(config(registry, tiny_bert)) as server, Client(f"127.0.0.1:{server.port}", retries=1) as client:
        with pytest.raises(grpc.RpcError) as info:
            client.predict(task, ["x"], version=version)
        assert info.value.code() == INVALID and len(info.value.details()) < 300
        assert client.predict("alpha", ["x"]).artifact == "alpha:1"


def test_an_unexpected_error_is_internal_with_a_request_id_logged_and_counted(registry, tiny_bert, monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="ticketserve")

    def broken(*args):
        raise ZeroDivisionError("a bug")

    with BackgroundServer(config(registry, tiny_bert)) as server, Client(f"127.0.0.1:{server.port}", retries=1) as client:
        client.predict("alpha", ["x"])
        monkeypatch.setattr(Runtime, "predictions", broken)
        with pytest.raises(grpc.RpcError) as info:
            client.inference.Predict(pb.PredictRequest(task="alpha", inputs=[pb.TextInput(text="x")]),
                                     metadata=(("x-request-id", "req-42"),))
        monkeypatch.undo()
        assert info.value.code() == grpc.StatusCode.INTERNAL and "request id req-42" in info.value.details()
        assert ("x-request-id", "req-42") in info.value.trailing_metadata()
        assert client.predict("alpha", ["x"]).artifact == "alpha:1"
        metrics = _metrics(server)
    logged = [r for r in caplog.records if "req-42" in r.getMessage()]
    assert len(logged) == 1 and logged[0].exc_info and logged[0].exc_info[0] is ZeroDivisionError
    assert 'ticketserve_unexpected_errors_total{method="/ticketserve.v1.Inference/Predict"} 1.0' in metrics


def test_drain_under_load_answers_unavailable_never_cancelled_and_ends_in_bounds(registry, tiny_bert):
    env = os.environ | {"TICKETSERVE_REGISTRY": registry.url}
    port = 50193
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "ticketserve"), "serve", "--backbone", tiny_bert, "--port", str(port),
         "--preload", "alpha", "--drain-seconds", "5"], env=env, stderr=subprocess.PIPE, text=True)
    try:
        target, codes, stop = f"127.0.0.1:{port}", [], threading.Event()
        with Client(target, timeout=60) as probe:
            deadline = time.monotonic() + 120
            while _code(probe.server_info) != OK:
                assert time.monotonic() < deadline and server.poll() is None, "server did not start"
                time.sleep(0.3)

        def hammer() -> None:
            with Client(target, retries=1, timeout=30) as client:
                while not stop.is_set():
                    codes.append(_code(lambda: client.predict(random.choice(ROW_TASKS), TEXTS[:2])))

        threads = [threading.Thread(target=hammer) for _ in range(16)]
        for thread in threads:
            thread.start()
        time.sleep(2.0)
        served_before = codes.count(OK)
        signalled = time.monotonic()
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=30) == 0
        shutdown = time.monotonic() - signalled
        time.sleep(0.5)  # clients see the closed port too
        stop.set()
        for thread in threads:
            thread.join()
    finally:
        if server.poll() is None:
            server.kill()
    log = server.stderr.read()
    assert served_before > 0 and set(codes) <= {OK, grpc.StatusCode.UNAVAILABLE}, set(codes)
    assert shutdown < 5 + 3, shutdown
    assert "drained: all requests served" in log


def test_admin_calls_need_the_admin_token_and_one_authorization_header(registry, tiny_bert, monkeypatch):
    monkeypatch.setenv("TS_TOKEN", "user-secret")
    with BackgroundServer(config(registry, tiny_bert, token_env="TS_TOKEN")) as server:
        target = f"127.0.0.1:{server.port}"
        with Client(target, token="user-secret", retries=1) as user:
            assert user.predict("alpha", ["x"]).artifact == "alpha:1"
            assert _code(lambda: user.load_task("beta")) == grpc.StatusCode.PERMISSION_DENIED
            assert _code(lambda: user.unload_task("alpha")) == grpc.StatusCode.PERMISSION_DENIED
            twice = (("authorization", "Bearer user-secret"), ("authorization", "Bearer user-secret"))
            request = pb.PredictRequest(task="alpha", inputs=[pb.TextInput(text="x")])
            assert _code(lambda: user.inference.Predict(request, metadata=twice)) == grpc.StatusCode.UNAUTHENTICATED
            assert user.predict("alpha", ["x"]).artifact == "alpha:1"  # nothing was unloaded


def test_malloc_settings_for_the_server_process_leave_the_environments_alone(monkeypatch):
    from ticketserve.runtime.server.memory import tune_malloc

    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    applied = tune_malloc()
    assert "MALLOC_ARENA_MAX" not in applied
    if sys.platform == "linux" and os.confstr("CS_GNU_LIBC_VERSION"):
        assert applied == {"MALLOC_MMAP_THRESHOLD_": 32 << 20, "MALLOC_TRIM_THRESHOLD_": 1 << 30}


JEMALLOC_PROBE = """
import json, torch
from ticketserve.runtime.server import memory
applied = memory.tune_malloc()
idle = memory.in_use_bytes()
held = [torch.ones(1 << 20) for _ in range(64)]  # 256 MiB
in_use = memory.in_use_bytes()
del held
freed, resident = memory.in_use_bytes(), memory.resident_bytes()
trimmed = memory.trim()
print(json.dumps({"allocator": memory.allocator(), "applied": applied, "idle": idle, "in_use": in_use,
                  "freed": freed, "resident": resident, "trimmed": trimmed, "after": memory.resident_bytes()}))
"""


def test_under_jemalloc_the_server_keeps_freed_pages_until_its_trimmer_purges_them():
    """The image's malloc: no decay (freed pages stay for the next forward), bytes in use and
    the purge read and done through jemalloc's own controls."""
    from benchmarks.common import JEMALLOC_PATHS

    library = next((p for p in JEMALLOC_PATHS if os.path.exists(p)), None)
    if library is None:
        pytest.skip("jemalloc is not installed (apt-get install libjemalloc2; .ci/run installs it)")
    env = {**os.environ, "LD_PRELOAD": library}
    env.pop("MALLOC_CONF", None)
    probe = subprocess.run([sys.executable, "-c", JEMALLOC_PROBE], env=env, capture_output=True, text=True, check=True)
    found = json.loads(probe.stdout)
    assert found["allocator"] == "jemalloc"
    assert found["applied"]["arenas.dirty_decay_ms"] == found["applied"]["arenas.muzzy_decay_ms"] == -1
    assert found["in_use"] - found["idle"] >= 240 << 20 and found["freed"] - found["idle"] < 16 << 20
    assert found["trimmed"] and found["resident"] - found["after"] >= 200 << 20  # kept until purged


def test_the_server_trims_malloc_only_when_that_gives_memory_back():
    from ticketserve.runtime.server.memory import Trimmer, in_use_bytes, resident_bytes

    used, resident, trims = [100], [400], []
    trimmer = Trimmer(policy="adaptive", settle=3, in_use=lambda: used[0] << 20, resident=lambda: resident[0] << 20,
                      trim=lambda: trims.append((used[0], resident[0])))

    def tick(in_use_mib: int, resident_mib: int) -> bool:
        used[0], resident[0] = in_use_mib, resident_mib
        return trimmer()

    assert not tick(100, 400)  # settling: an idle server, 300 MiB resident beyond what is in use
    assert not tick(110, 480)  # load arrives; the baseline is the most over the settling looks: 370 MiB
    assert not tick(100, 420)
    assert not any(tick(100 + t % 7 * 8, 440 + t % 5 * 12) for t in range(100))  # a forward's swings: under 64 MiB
    assert not tick(400, 770)  # a flood: the memory is in use, trimming gives nothing
    assert not tick(380, 770)
    assert tick(120, 770)  # the flood ended: 280 MiB freed since the highest (slack: a quarter of 400)
    assert not tick(120, 450)  # settling again while the working set comes back, batch shape by batch shape
    assert not tick(125, 520)  # 395 MiB beyond what is in use: the new baseline
    assert not tick(120, 480)
    assert not tick(125, 580)  # resident 60 MiB beyond the baseline: within the slack
    assert tick(125, 600)  # a burst between two looks: resident grew 80 MiB beyond it
    assert not any(tick(900, 1300) for _ in range(3))  # a large encoder settling
    assert not tick(700, 1300)  # 200 MiB under its highest is within a quarter of 900
    assert trims == [(120, 770), (125, 600)]
    always = Trimmer(policy="always", trim=lambda: True)
    assert always() and always()
    assert not Trimmer(policy="off", trim=lambda: pytest.fail("trimmed"))()
    if sys.platform == "linux" and os.confstr("CS_GNU_LIBC_VERSION"):
        assert 0 < in_use_bytes() < resident_bytes()


def test_preloaded_tasks_are_warmed_up_and_never_evicted(registry, tiny_bert):
    """--preload is the operator's working set: it is served once before the port opens (one
    warm-up forward each) and stays resident whatever else passes through a small cache."""
    backbone = load_backbone(tiny_bert)
    names = [f"p{i}" for i in range(4)]
    for seed, name in enumerate(names):
        publish_row_task(registry, backbone, name, 40 + seed)
    budget = int(_task_bytes(registry, "p0") * 1.5)  # room for one task
    with BackgroundServer(config(registry, tiny_bert, cache_bytes=budget, preload=["p0"])) as server, \
            Client(f"127.0.0.1:{server.port}") as client:
        assert "ticketserve_batch_size_count 1.0" in _metrics(server)  # the warm-up, before any request
        for name in names[1:] * 2:
            client.predict(name, TEXTS[:1])
        resident = {t.artifact for t in client.list_tasks()}
        metrics = _metrics(server)
    assert "p0:1" in resident
    evictions = next(line for line in metrics.splitlines() if line.startswith('ticketserve_task_cache_total{event="eviction"}'))
    assert float(evictions.split()[-1]) >= 4  # the others came and went

