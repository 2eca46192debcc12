"""Load that costs little, in its own process (pin it with taskset): N asyncio clients against
one front door of a running server, or N submitter threads against an in-process Engine, one
SST-2 sentence per request, its task drawn at random. Warms up, prints `measuring`, runs for
`--seconds`, prints one JSON line: qps, p50_ms, p99_ms, requests, failures (the engine also
mean_batch: examples per forward pass), and under `own`
this process's CPU and system CPU per second and minor faults per request over the window (for
`engine`, the engine's own; for a door, what the load costs).

    python -m benchmarks.system.loadgen grpc --port P --tasks a,b --clients 32 --seconds 20
    python -m benchmarks.system.loadgen engine --registry DIR --tasks a,b --clients 32 --seconds 20

Doors: grpc (ticketserve.v1 Predict), v2-grpc (Open Inference Protocol ModelInfer), v2-http
(POST /v2/models/{task}/infer), json (POST /v1/predict). The HTTP clients speak keep-alive
HTTP/1.1 over asyncio streams: a general HTTP client library costs more CPU per request than
the server's own door, and the load must not compete with what it measures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import resource
import threading
import time

from benchmarks.common import SST2_DEV

DOORS = ("grpc", "v2-grpc", "v2-http", "json")


class Window:
    """Latencies and failures of the requests that ended inside the measured window."""

    def __init__(self):
        self.latencies: list[float] = []
        self.failures = 0
        self.batches = 0.0  # the engine's forward passes, each request counting 1/its batch's size
        self.open = False

    def add(self, seconds: float | None, batch_size: int | None = None) -> None:
        if not self.open:
            return
        if seconds is None:
            self.failures += 1
        else:
            self.latencies.append(seconds)
            if batch_size:
                self.batches += 1 / batch_size

    def result(self, wall: float) -> dict:
        ordered = sorted(self.latencies) or [float("nan")]
        batch = {"mean_batch": len(self.latencies) / self.batches} if self.batches else {}
        return {"qps": len(self.latencies) / wall, "p50_ms": 1000 * ordered[len(ordered) // 2],
                "p99_ms": 1000 * ordered[int(len(ordered) * 0.99)], "requests": len(self.latencies),
                "failures": self.failures, **batch}


def usage() -> tuple[float, float, int]:
    """(user + system CPU seconds, system CPU seconds, minor faults) of this process so far."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    return own.ru_utime + own.ru_stime, own.ru_stime, own.ru_minflt


def measure(run_for, warmup: float, seconds: float, window: Window) -> dict:
    """Warm up, then measure `seconds` of `run_for(seconds)`; report with this process's usage."""
    run_for(warmup)
    print("measuring", flush=True)
    window.open = True
    cpu0, system0, faults0 = usage()
    started = time.monotonic()
    run_for(seconds)
    wall = time.monotonic() - started
    cpu1, system1, faults1 = usage()
    result = window.result(wall)
    return result | {"own": {"cpu_per_s": (cpu1 - cpu0) / wall, "system_cpu_per_s": (system1 - system0) / wall,
                             "faults_per_request": (faults1 - faults0) / max(result["requests"], 1)}}


# -- a door of a running server ---------------------------------------------------------------

def grpc_call(door: str, channel):
    """An async predict(task, text) on one channel."""
    if door == "grpc":
        from ticketserve.v1 import pb, rpc

        stub = rpc.InferenceStub(channel)
        return lambda task, text: stub.Predict(pb.PredictRequest(task=task, inputs=[pb.TextInput(text=text)]))
    from ticketserve.openinference import pb as v2
    from ticketserve.openinference import rpc as v2_rpc

    stub = v2_rpc.GRPCInferenceServiceStub(channel)

    def infer(task: str, text: str):
        request = v2.ModelInferRequest(model_name=task)
        request.inputs.add(name="text", datatype="BYTES", shape=[1]).contents.bytes_contents.append(text.encode())
        return stub.ModelInfer(request)

    return infer


def http_body(door: str, task: str, text: str) -> tuple[str, bytes]:
    if door == "json":
        return "/v1/predict", json.dumps({"task": task, "inputs": [text]}).encode()
    return f"/v2/models/{task}/infer", json.dumps(
        {"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": [text]}]}).encode()


async def http_exchange(reader, writer, port: int, path: str, body: bytes, headers: str = "") -> int:
    """One keep-alive POST (plus `headers`, each line ending in CRLF); the response's status (its
    body is read and dropped)."""
    writer.write(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n{headers}"
                 f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    head = await reader.readuntil(b"\r\n\r\n")
    length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                   if line.lower().startswith(b"content-length:")), 0)
    await reader.readexactly(length)
    return int(head.split(b" ", 2)[1])


async def client(door: str, port: int, tasks: list[str], texts: list[str], seed: int, until, window: Window) -> None:
    rng = random.Random(seed)
    if door in ("grpc", "v2-grpc"):
        import grpc

        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = grpc_call(door, channel)
            while time.monotonic() < until[0]:
                started = time.perf_counter()
                try:
                    await call(rng.choice(tasks), rng.choice(texts))
                    window.add(time.perf_counter() - started)
                except grpc.RpcError:
                    window.add(None)
        return
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        while time.monotonic() < until[0]:
            path, body = http_body(door, rng.choice(tasks), rng.choice(texts))
            started = time.perf_counter()
            status = await http_exchange(reader, writer, port, path, body)
            window.add(time.perf_counter() - started if status == 200 else None)
    finally:
        writer.close()


def door_load(args, texts: list[str]) -> dict:
    """The clients run through warm-up and window alike; they stop when the window ends."""
    window, until = Window(), [float("inf")]
    loop = asyncio.new_event_loop()
    clients = [loop.create_task(client(args.door, args.port, args.tasks, texts, i, until, window))
               for i in range(args.clients)]
    result = measure(lambda seconds: loop.run_until_complete(asyncio.sleep(seconds)), args.warmup, args.seconds, window)
    window.open, until[0] = False, 0.0
    loop.run_until_complete(asyncio.gather(*clients, return_exceptions=True))
    loop.close()
    return result


# -- the in-process engine ----------------------------------------------------------------------

def engine_load(args, texts: list[str]) -> dict:
    """The Engine under submitter threads on this process's core(s), as the server's event loop
    shares its core with the forward."""
    from ticketserve.runtime.server.memory import tune_malloc

    tune_malloc()
    from ticketserve.core import artifact
    from ticketserve.core.backbone import load_backbone
    from ticketserve.registry import open_store
    from ticketserve.runtime.engine import Engine
    from ticketserve.runtime.executor import Runtime

    store = open_store(args.registry)
    runtime = Runtime(load_backbone(None, store), device="cpu")
    tasks = [runtime.add(artifact.load(store, name, runtime.backbone)) for name in args.tasks]
    engine, window = Engine(runtime), Window()

    def run_for(seconds: float) -> None:
        until = time.monotonic() + seconds

        def work(seed: int) -> None:
            rng = random.Random(seed)
            while time.monotonic() < until:
                started = time.perf_counter()
                result = engine.submit(rng.choice(tasks), [rng.choice(texts)]).result()
                window.add(time.perf_counter() - started, result.batch_size)

        threads = [threading.Thread(target=work, args=(i,)) for i in range(args.clients)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    return measure(run_for, args.warmup, args.seconds, window)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("door", choices=[*DOORS, "engine"])
    parser.add_argument("--port", type=int, help="the door's port (gRPC or HTTP)")
    parser.add_argument("--registry", help="engine: the registry holding the tasks")
    parser.add_argument("--tasks", required=True, type=lambda value: value.split(","))
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--warmup", type=float, default=3.0)
    args = parser.parse_args()
    texts = [json.loads(line)["sentence"] for line in SST2_DEV.read_text().splitlines()]
    result = engine_load(args, texts) if args.door == "engine" else door_load(args, texts)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
