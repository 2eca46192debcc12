"""Chaos run: the server under everything at once, as an operator tries it before trusting it
with traffic. One bounded command (about 4 minutes on 2 cores):

    python -m benchmarks.system.chaos [--seconds 60] [--clients 32] [--allocator jemalloc]

`--allocator jemalloc` runs the server with jemalloc as its malloc, as the image does (results
and report then carry a `-jemalloc` suffix); by default it runs with glibc's, as `pip install` does.

A `ticketserve serve` subprocess on 127.0.0.1 with the bundled MiniLM and a fresh registry of
12 row-delta tasks, its cache holding 4 of them. Phases, each with 32 gRPC clients and 8 HTTP
clients (4 on the JSON API, 4 on the Open Inference Protocol's REST) predicting short SST-2
sentences over all 12 tasks:
  warm-up  everything below, the flood for two thirds of it, so steady-state allocations exist
  calm     plus a hot swap every 2 s of one of 4 served names (in turn a valid, a corrupt, a
           foreign-backbone and an unattachable version), fuzzers (raw bytes, mutated and
           hostile messages on every gRPC method, both APIs; raw, mutated and hostile bodies
           on the HTTP endpoints) and a publisher of other names
  flood    all of the above, plus 2 clients sending 8 maximum-size texts per request
  doors    the calm load, plus 2,000 idle TCP connections held on each of the gRPC and HTTP
           ports (reopened when closed), 20 clients trickling an HTTP body a byte a second,
           and hostile HTTP requests: lone surrogates, fan-outs naming a task 2,000 times,
           million-element raw tensors, invented methods, header bytes ≥ 0x80
  settle   the calm load again, so RSS is read under the load it was read under after warm-up
  drain    SIGTERM under all of it, the flood included
Targets: no unexpected error (UNKNOWN/INTERNAL answers, server-side unexpected exceptions);
small requests' p99 under the flood and under the door attacks ≤ 3× calm; the server's log
under 1 MB; RSS after settling ≤ 1.1× after warm-up; each
swapped name serves only its valid versions, never an older one after a newer one; the drain
answers only OK or UNAVAILABLE and ends within its bound.
Results: benchmarks/results/chaos.json and benchmarks/system/chaos.md.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import random
import resource
import selectors
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import torch

from benchmarks import common
from benchmarks.common import SST2_DEV, jemalloc_environment

HERE = Path(__file__).parent
RESULTS = common.RESULTS / "chaos.json"
REPORT = HERE / "chaos.md"
TASKS, CACHED, SWAPPED = 12, 4, 4
DRAIN_SECONDS = 10.0
MAX_TEXT_BYTES = 256 * 1024
UNEXPECTED = {"UNKNOWN", "INTERNAL"}
HTTP_CLIENTS = 8
IDLE_PER_PORT, TRICKLERS = 2000, 20
# an HTTP answer as the status it stands for (runtime/status.py); any other 5xx is unexpected
HTTP_CODES = {200: "OK", 400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED", 404: "NOT_FOUND",
              405: "INVALID_ARGUMENT", 412: "FAILED_PRECONDITION", 413: "INVALID_ARGUMENT", 422: "INVALID_ARGUMENT",
              429: "RESOURCE_EXHAUSTED", 503: "UNAVAILABLE", 504: "DEADLINE_EXCEEDED"}


# -- the registry ------------------------------------------------------------------------------

def row_task(backbone, seed: int, outputs: int = 2) -> dict[str, torch.Tensor]:
    """A synthetic Dominant-style task: 4 rows + bias per matrix (the tests' synthetic row delta), and a head."""
    from ticketserve.core.synthetic import row_delta

    generator = torch.Generator().manual_seed(seed)
    hidden = backbone.config.hidden_size
    head = {"head.weight": torch.randn(outputs, hidden, generator=generator) * 0.1, "head.bias": torch.zeros(outputs)}
    return row_delta(backbone, k=4, seed=seed, scale=0.02) | head


def foreign_backbone(root: Path):
    """A tiny random BERT with the MiniLM tokenizer: artifacts for it must be refused."""
    from transformers import AutoModel, AutoTokenizer, BertConfig

    from ticketserve.core.backbone import load_backbone, resolve_source

    tokenizer = AutoTokenizer.from_pretrained(resolve_source(None)[1])
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=128)
    AutoModel.from_config(config, add_pooling_layer=False).save_pretrained(root)
    tokenizer.save_pretrained(root)
    return load_backbone(str(root))


class Registry:
    """The run's registry, and every version it publishes, in order, with whether it is valid."""

    def __init__(self, root: Path):
        from ticketserve.core.backbone import load_backbone
        from ticketserve.registry import open_store

        self.store = open_store(str(root / "registry"))
        self.backbone = load_backbone()
        self.foreign = foreign_backbone(root / "foreign")
        self.published: list[dict] = []
        self.lock = threading.Lock()

    def task_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in row_task(self.backbone, 0).values())


def _manifest(backbone, name: str):
    from ticketserve.core.tasks import get_task
    from ticketserve.registry import HeadConfig, Manifest

    return Manifest(name=name, kind="row_delta", method="chaos", task=get_task("sst2"), head=HeadConfig(),
                    backbone=backbone.ref())


def publish(reg: Registry, name: str, seed: int, how: str = "valid") -> dict:
    """Publish one version: valid, corrupt (a payload byte flipped after publishing), foreign
    (trained on another backbone) or unattachable (a head bias of the wrong size)."""
    from ticketserve.core import artifact

    backbone = reg.foreign if how == "foreign" else reg.backbone
    tensors = row_task(backbone, seed)
    if how == "unattachable":
        tensors["head.bias"] = torch.zeros(7)
    version = artifact.publish(reg.store, _manifest(backbone, name), tensors)
    if how == "corrupt":
        sha = reg.store.manifest(version).files[artifact.PAYLOAD].sha256
        blob = Path(reg.store.url) / "blobs" / "sha256" / sha[:2] / sha
        data = bytearray(blob.read_bytes())
        data[-3] ^= 0xFF
        blob.write_bytes(bytes(data))
    record = {"artifact": str(version), "how": how, "at": time.monotonic()}
    with reg.lock:
        reg.published.append(record)
    return record


# -- load generators ---------------------------------------------------------------------------

class Recorder:
    """Every answer: (time, phase, who, code, seconds, artifact)."""

    def __init__(self):
        self.rows: list[tuple] = []
        self.phase = "warm-up"
        self.lock = threading.Lock()

    def add(self, who: str, code: str, seconds: float, artifact: str = "") -> None:
        with self.lock:
            self.rows.append((time.monotonic(), self.phase, who, code, seconds, artifact))


def _timed(call) -> tuple[str, float, object]:
    started = time.monotonic()
    try:
        result = call()
        return "OK", time.monotonic() - started, result
    except grpc.RpcError as exc:
        return exc.code().name, time.monotonic() - started, None


def small_client(target: str, names: list[str], texts: list[str], record: Recorder, stop: threading.Event, seed: int):
    from ticketserve.runtime.client import Client

    rng = random.Random(seed)
    with Client(target, retries=1, timeout=60) as client:
        while not stop.is_set():
            name = rng.choice(names)
            code, seconds, result = _timed(lambda: client.predict(name, rng.sample(texts, rng.randint(1, 2))))
            record.add("small", code, seconds, result.artifact if result else "")


def flood_client(target: str, names: list[str], huge: str, record: Recorder, stop: threading.Event, on: threading.Event):
    from ticketserve.runtime.client import Client

    with Client(target, retries=1, timeout=120) as client:
        while not stop.is_set():
            if not on.wait(0.2):
                continue
            code, seconds, _ = _timed(lambda: client.predict(random.choice(names), [huge] * 8))
            record.add("flood", code, seconds)


def fuzzer(target: str, record: Recorder, stop: threading.Event, seed: int):
    """Raw bytes, mutated valid messages and hostile fields on every method of ours."""
    from ticketserve.openinference import pb as v2
    from ticketserve.v1 import pb

    rng = random.Random(seed)
    infer = v2.ModelInferRequest(model_name="chaos-00")
    infer.inputs.add(name="text", datatype="BYTES", shape=[1]).contents.bytes_contents.append(b"x")
    valid = {"/ticketserve.v1.Inference/Predict": pb.PredictRequest(task="chaos-00", inputs=[pb.TextInput(text="x")]),
             "/inference.GRPCInferenceService/ModelInfer": infer,
             "/inference.GRPCInferenceService/ModelMetadata": v2.ModelMetadataRequest(name="chaos-01"),
             "/inference.GRPCInferenceService/RepositoryIndex": v2.RepositoryIndexRequest(),
             "/ticketserve.v1.Tasks/GetTask": pb.GetTaskRequest(task="chaos-01", version="1"),
             "/ticketserve.v1.Tasks/ListTasks": pb.ListTasksRequest(include_registry=True),
             "/ticketserve.v1.Tasks/LoadTask": pb.LoadTaskRequest(task="chaos-02"),
             "/ticketserve.v1.Info/ServerInfo": pb.ServerInfoRequest()}
    hostile = ["", "chaos-00\n", "Chaos", "x" * 20_000, "chaos-00:²", "chaos-00:٣", "chaos-00:" + "9" * 5000, "../x"]
    with grpc.insecure_channel(target) as channel:
        while not stop.is_set():
            method = rng.choice(sorted(valid))
            pick = rng.random()
            if pick < 0.3:
                payload = rng.randbytes(rng.randint(0, 512))
            elif pick < 0.6:
                data = bytearray(valid[method].SerializeToString())
                for _ in range(rng.randint(1, 3)):
                    if data:
                        data[rng.randrange(len(data))] ^= rng.randint(1, 255)
                payload = bytes(data)
            else:
                method = "/ticketserve.v1.Inference/Predict"
                payload = pb.PredictRequest(task=rng.choice(hostile), inputs=[pb.TextInput(text="x")]).SerializeToString()
            code, seconds, _ = _timed(lambda: channel.unary_unary(method)(payload, timeout=30))
            record.add("fuzz", code, seconds)
            time.sleep(0.01)


def _http(pool, path: str, body: bytes) -> tuple[str, float, dict | None]:
    import urllib3

    started = time.monotonic()
    try:
        response = pool.request("POST", path, body=body, headers={"content-type": "application/json"})
    except urllib3.exceptions.HTTPError:  # refused or reset: the port is closed (drain)
        return "UNAVAILABLE", time.monotonic() - started, None
    code = HTTP_CODES.get(response.status, "INTERNAL" if response.status >= 500 else f"HTTP_{response.status}")
    try:
        answer = json.loads(response.data) if response.status == 200 else None
    except ValueError:
        code, answer = "INTERNAL", None  # a 200 that is not JSON is a bug
    return code, time.monotonic() - started, answer


def http_client(port: int, names: list[str], texts: list[str], record: Recorder, stop: threading.Event, seed: int,
                door: str):
    """Small requests on the JSON API (`door` json) or v2 REST (`door` v2); the artifact that
    answered is recorded as for gRPC clients, so the version-order check covers HTTP too."""
    import urllib3

    rng = random.Random(seed)
    pool = urllib3.HTTPConnectionPool("127.0.0.1", port, maxsize=1, timeout=60, retries=False)
    while not stop.is_set():
        name, chosen = rng.choice(names), rng.sample(texts, rng.randint(1, 2))
        if door == "json":
            code, seconds, answer = _http(pool, "/v1/predict", json.dumps({"task": name, "inputs": chosen}).encode())
            artifact = answer["artifact"] if answer else ""
        else:
            body = {"inputs": [{"name": "text", "shape": [len(chosen)], "datatype": "BYTES", "data": chosen}]}
            code, seconds, answer = _http(pool, f"/v2/models/{name}/infer", json.dumps(body).encode())
            artifact = answer["parameters"]["artifact"] if answer else ""
        record.add("small", code, seconds, artifact)
    pool.close()


def http_fuzzer(port: int, record: Recorder, stop: threading.Event, seed: int):
    """Raw bytes, mutated valid bodies and hostile fields on the HTTP endpoints."""
    import urllib3

    rng = random.Random(seed)
    v2 = {"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["x"]}]}
    valid = {"/v1/predict": {"task": "chaos-00", "inputs": ["x"]}, "/v1/fanout": {"tasks": ["chaos-00", "chaos-01"],
                                                                                  "inputs": ["x"]},
             "/v2/models/chaos-00/infer": v2, "/v2/models/chaos-01/versions/1/infer": v2, "/v2/repository/index": {},
             "/v2/repository/models/chaos-02/load": {}}
    hostile = [{"task": "x" * 20_000, "inputs": ["x"]}, {"task": "chaos-00:²", "inputs": ["x"]},
               {"task": "chaos-00", "inputs": [{"text": 5}]}, {"task": ["a"], "inputs": "x"},
               {"inputs": [{"name": "text", "shape": [-1], "datatype": "BYTES", "data": ["x"]}]},
               {"inputs": [{"name": "text", "shape": [2], "datatype": "FP64", "data": [1.0, 2.0]}]},
               {"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "parameters": {"binary_data_size": 99}}]},
               {"task": "chaos-00", "inputs": [[[[[[["deep"]]]]]]]}]
    pool = urllib3.HTTPConnectionPool("127.0.0.1", port, maxsize=1, timeout=30, retries=False)
    while not stop.is_set():
        path = rng.choice(sorted(valid))
        pick = rng.random()
        if pick < 0.3:
            body = rng.randbytes(rng.randint(0, 512))
        elif pick < 0.6:
            data = bytearray(json.dumps(valid[path]).encode())
            for _ in range(rng.randint(1, 3)):
                data[rng.randrange(len(data))] = rng.randint(0, 255)
            body = bytes(data)
        else:
            body = json.dumps(rng.choice(hostile)).encode()
            path = "/v1/predict" if "task" in body.decode() else "/v2/models/chaos-00/infer"
        code, seconds, _ = _http(pool, path, body)
        record.add("fuzz", code, seconds)
        time.sleep(0.01)
    pool.close()


def idle_holder(port: int, count: int, stop: threading.Event, on: threading.Event):
    """`count` TCP connections to `port` that never send a byte, reopened as the server closes them."""
    selector = selectors.DefaultSelector()
    while not stop.is_set():
        if not on.wait(0.2):
            for key in list(selector.get_map().values()):
                selector.unregister(key.fileobj)
                key.fileobj.close()
            continue
        while len(selector.get_map()) < count:
            try:
                sock = socket.create_connection(("127.0.0.1", port), timeout=5)
            except OSError:
                break
            selector.register(sock, selectors.EVENT_READ)
        for key, _ in selector.select(timeout=1.0):  # what the server sent (gRPC's SETTINGS, a 408), or a close
            try:
                closed = not key.fileobj.recv(4096)
            except OSError:
                closed = True
            if closed:  # reopened on the next round
                selector.unregister(key.fileobj)
                key.fileobj.close()
    for key in list(selector.get_map().values()):
        key.fileobj.close()


def trickler(port: int, record: Recorder, stop: threading.Event, on: threading.Event):
    """A JSON API request whose body arrives a byte a second; what ends it is recorded."""
    body = json.dumps({"task": "chaos-00", "inputs": ["a trickle"]}).encode()
    head = f"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    while not stop.is_set():
        if not on.wait(0.2):
            continue
        started, answer = time.monotonic(), b""
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
                sock.sendall(head.encode())
                for byte in body:
                    sock.sendall(bytes([byte]))
                    if stop.wait(1.0):
                        break
                answer = sock.recv(64)
        except OSError:
            pass
        code = f"HTTP_{answer.split(b' ')[1].decode()}" if answer.startswith(b"HTTP/1.1 ") else "CLOSED"
        record.add("trickle", "INTERNAL" if code.startswith("HTTP_5") else code, time.monotonic() - started)


def door_abuser(port: int, record: Recorder, stop: threading.Event, on: threading.Event, seed: int):
    """Hostile requests at the HTTP door, each answered by a client error at little cost."""
    rng = random.Random(seed)
    million = b"".join(struct.pack("<I", 0) for _ in range(1_000_000))
    header = json.dumps({"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES",
                                     "parameters": {"binary_data_size": len(million)}}]}).encode()
    hostile = [
        ("POST", "/v1/predict", json.dumps({"task": "chaos-00", "inputs": ["\ud800"]}).encode(), {}),
        ("POST", "/v2/models/chaos-00/infer", json.dumps({"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES",
                                                                       "data": ["x\udfff"]}]}).encode(), {}),
        ("POST", "/v1/fanout", json.dumps({"tasks": ["chaos-00"] * 2000, "inputs": ["a film"] * 32}).encode(), {}),
        ("POST", "/v2/models/chaos-00/infer", header + million, {"Inference-Header-Content-Length": str(len(header)),
                                                                 "Content-Type": "application/octet-stream"}),
        ("INVENTED", "/nope", b"", {}),
        ("GET", "/v2/health/live", b"", {"X-Junk": "caf\xe9\xff"}),
    ]
    while not stop.is_set():
        if not on.wait(0.2):
            continue
        method, path, body, headers = rng.choice(hostile)
        lines = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        request = (f"{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n{lines}"
                   "Connection: close\r\n\r\n").encode("latin-1") + body
        started, answer = time.monotonic(), b""
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
                sock.sendall(request)
                answer = sock.recv(64)
        except OSError:
            pass
        status = int(answer.split(b" ")[1]) if answer.startswith(b"HTTP/1.1 ") else 0
        code = HTTP_CODES.get(status, "INTERNAL" if status >= 500 or not status else f"HTTP_{status}")
        record.add("doors", code, time.monotonic() - started)
        time.sleep(0.02)


def swapper(reg: Registry, stop: threading.Event, every: float):
    """A new version of one of the swapped names every `every` seconds, in turn; each name
    gets, in turn, a valid, corrupt, valid, foreign-backbone, valid and unattachable version."""
    hows = ["valid", "corrupt", "valid", "foreign", "valid", "unattachable"]
    i = 0
    while not stop.wait(every):
        publish(reg, f"chaos-{i % SWAPPED:02d}", 1000 + i, hows[(i // SWAPPED) % len(hows)])
        i += 1


def publisher(reg: Registry, stop: threading.Event):
    i = 0
    while not stop.wait(0.5):
        publish(reg, f"other-{i % 3}", 5000 + i)
        i += 1


# -- the server --------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def scrape(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            values[key] = float(value)
    return values


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def served_in_order(rows: list[tuple], published: list[dict]) -> dict:
    """Per swapped name: only valid versions are served, and never one older than a version
    some client had already received when the request started (requests in flight during a
    swap may still finish on the version they began with)."""
    valid = {p["artifact"] for p in published if p["how"] == "valid"}
    invalid_served, backwards, sequences = [], [], {}
    for i in range(SWAPPED):
        name = f"chaos-{i:02d}"
        answers = sorted((r[0], r[0] - r[4], int(r[5].split(":")[1])) for r in rows
                         if r[2] == "small" and r[3] == "OK" and r[5].split(":")[0] == name)
        invalid_served += sorted({f"{name}:{v}" for _, _, v in answers if f"{name}:{v}" not in valid})
        received, newest = 0, 0
        for answered, started, version in sorted(answers, key=lambda a: a[1]):
            while received < len(answers) and answers[received][0] < started:
                newest = max(newest, answers[received][2])
                received += 1
            if version < newest:
                backwards.append(f"{name}:{version} started after {name}:{newest} was received")
        sequences[name] = sorted({v for _, _, v in answers})
    return {"served_versions": sequences, "invalid_served": invalid_served, "went_backwards": backwards[:10],
            "in_order": not invalid_served and not backwards}


def run(args) -> dict:
    root = Path(tempfile.mkdtemp(prefix="ts-chaos-"))
    reg = Registry(root)
    names = [f"chaos-{i:02d}" for i in range(TASKS)]
    for i, name in enumerate(names):
        publish(reg, name, i)
    cache = CACHED * reg.task_bytes()
    port, metrics_port, http_port = free_port(), free_port(), free_port()
    target = f"127.0.0.1:{port}"
    log = open(root / "server.log", "w")
    environment = {**os.environ, **(jemalloc_environment() if args.allocator == "jemalloc" else {})}
    server = subprocess.Popen(
        [sys.executable, "-m", "ticketserve.cli", "serve", "--registry", reg.store.url, "--port", str(port),
         "--metrics-port", str(metrics_port), "--http-port", str(http_port), "--cache-bytes", str(cache), "--watch-seconds", "1",
         "--max-text-bytes", str(MAX_TEXT_BYTES), "--drain-seconds", str(DRAIN_SECONDS), *args.serve_arg], stderr=log,
        env=environment)
    subprocess.run([sys.executable, "-m", "ticketserve.cli", "info", "--server", target, "--wait", "300"],
                   check=True, capture_output=True)
    texts = [json.loads(line)["sentence"] for line in SST2_DEV.read_text().splitlines()]
    huge = ""
    while len(huge) < MAX_TEXT_BYTES - 200:
        huge += random.choice(texts) + " "
    huge = huge[:MAX_TEXT_BYTES - 200]

    record, stop, flood_on = Recorder(), threading.Event(), threading.Event()
    threads = [threading.Thread(target=small_client, args=(target, names, texts, record, stop, i), daemon=True)
               for i in range(args.clients)]
    threads += [threading.Thread(target=http_client, args=(http_port, names, texts, record, stop, 100 + i,
                                                           "json" if i % 2 else "v2"), daemon=True)
                for i in range(HTTP_CLIENTS)]
    threads += [threading.Thread(target=flood_client, args=(target, names, huge, record, stop, flood_on), daemon=True)
                for _ in range(2)]
    doors_on = threading.Event()
    threads += [threading.Thread(target=idle_holder, args=(p, IDLE_PER_PORT, stop, doors_on), daemon=True)
                for p in (port, http_port)]
    threads += [threading.Thread(target=trickler, args=(http_port, record, stop, doors_on), daemon=True)
                for _ in range(TRICKLERS)]
    threads += [threading.Thread(target=door_abuser, args=(http_port, record, stop, doors_on, 300 + i), daemon=True)
                for i in range(2)]
    for thread in threads:
        thread.start()
    rss: list[tuple[float, str, int]] = []
    started = time.monotonic()

    def sample() -> None:
        while not stop.wait(1.0) and server.poll() is None:
            rss.append((round(time.monotonic() - started, 1), record.phase, rss_bytes(server.pid)))

    sampling = threading.Thread(target=sample, daemon=True)
    sampling.start()

    def phase(name: str, seconds: float) -> None:
        record.phase = name
        print(f"{time.strftime('%H:%M:%S')} phase {name} ({seconds:.0f} s)", flush=True)
        time.sleep(seconds)

    # warm-up: everything once, briefly
    side_stop = threading.Event()
    side = [threading.Thread(target=swapper, args=(reg, side_stop, 2.0), daemon=True),
            threading.Thread(target=fuzzer, args=(target, record, side_stop, 1), daemon=True),
            threading.Thread(target=http_fuzzer, args=(http_port, record, side_stop, 2), daemon=True),
            threading.Thread(target=publisher, args=(reg, side_stop), daemon=True)]
    for thread in side:
        thread.start()
    def settled_rss(name: str) -> int:
        """The median of the last 5 samples of a phase (RSS swings ±10 % with what is in flight)."""
        values = [v for _, p, v in rss if p == name][-5:]
        return int(statistics.median(values)) if values else rss_bytes(server.pid)

    flood_on.set()
    phase("warm-up", args.warmup * 2 / 3)
    flood_on.clear()
    phase("warm-up", args.warmup / 3)
    rss_after_warmup = settled_rss("warm-up")
    phase("calm", args.seconds)
    flood_on.set()
    phase("flood", args.seconds)
    flood_on.clear()
    doors_on.set()
    phase("doors", args.seconds)
    doors_on.clear()
    phase("settle", args.settle)  # the same load as at the end of the warm-up: compare like with like
    rss_end = settled_rss("settle")
    metrics = scrape(metrics_port)

    # drain under load, the flood included
    flood_on.set()
    record.phase = "drain"
    signalled = time.monotonic()
    server.send_signal(signal.SIGTERM)
    exit_code = server.wait(timeout=DRAIN_SECONDS + 30)
    shutdown = time.monotonic() - signalled
    time.sleep(1.0)  # clients see the closed port too
    stop.set()
    side_stop.set()
    for thread in threads + side:
        thread.join(timeout=130)
    log.close()
    server_log = (root / "server.log").read_text()

    rows = record.rows
    by_phase = collections.defaultdict(collections.Counter)
    for _, ph, who, code, _, _ in rows:
        by_phase[f"{ph}/{who}"][code] += 1
    small = {ph: [r[4] for r in rows if r[1] == ph and r[2] == "small" and r[3] == "OK"] for ph in ("calm", "flood", "doors")}
    latency = {ph: {"p50": percentile(v, 0.5), "p99": percentile(v, 0.99), "n": len(v)} for ph, v in small.items()}
    unexpected_answers = sum(1 for r in rows if r[3] in UNEXPECTED)
    unexpected_server = sum(v for k, v in metrics.items() if k.startswith("ticketserve_unexpected_errors_total"))
    error_lines = [line for line in server_log.splitlines() if '"level": "ERROR"' in line]
    drain_codes = collections.Counter(r[3] for r in rows if r[1] == "drain" and r[2] != "fuzz")
    drained_line = next((json.loads(line)["message"] for line in server_log.splitlines() if '"drained:' in line), "")
    result = {
        "run": time.strftime("%Y-%m-%dT%H:%M:%S"), "cpu_count": os.cpu_count(), "clients": args.clients,
        "serve_args": args.serve_arg,
        "seconds_per_phase": args.seconds, "tasks": TASKS, "cache_bytes": cache, "cache_tasks": CACHED,
        "answers": {k: dict(v) for k, v in sorted(by_phase.items())},
        "unexpected": {"answers": unexpected_answers, "server_exceptions": unexpected_server,
                       "error_log_lines": len(error_lines), "first_error_lines": error_lines[:3]},
        "small_latency_s": latency,
        "p99_flood_over_calm": latency["flood"]["p99"] / latency["calm"]["p99"],
        "p99_doors_over_calm": latency["doors"]["p99"] / latency["calm"]["p99"],
        "server_log_bytes": len(server_log.encode()),
        "flood_requests_ok": by_phase["flood/flood"]["OK"],
        "rss_bytes": {"after_warmup": rss_after_warmup, "end": rss_end, "max": max(v for _, _, v in rss),
                      "by_phase": {ph: [min(v for _, p, v in rss if p == ph), max(v for _, p, v in rss if p == ph)]
                                   for ph in ("warm-up", "calm", "flood", "doors", "settle")
                                   if any(p == ph for _, p, _ in rss)},
                      "samples": rss},
        "rss_growth": rss_end / rss_after_warmup - 1,
        "publishes": collections.Counter(p["how"] for p in reg.published),
        "versions": served_in_order(rows, reg.published),
        "cache": {k.split('"')[1]: v for k, v in metrics.items() if k.startswith("ticketserve_task_cache_total")},
        "drain": {"exit_code": exit_code, "seconds": shutdown, "bound_seconds": DRAIN_SECONDS, "log": drained_line,
                  "answers_after_sigterm": dict(drain_codes)},
    }
    result["targets"] = {
        "no unexpected errors": unexpected_answers == 0 and unexpected_server == 0 and not error_lines,
        "p99 under flood <= 3x calm": result["p99_flood_over_calm"] <= 3.0,
        "p99 under the door attacks <= 3x calm": result["p99_doors_over_calm"] <= 3.0,
        "server log under 1 MB": result["server_log_bytes"] < 1 << 20,
        "RSS growth <= 10%": result["rss_growth"] <= 0.10,
        "versions served in publish order": result["versions"]["in_order"],
        "drain: only OK/UNAVAILABLE, exit 0 within bound": exit_code == 0 and shutdown <= DRAIN_SECONDS + 2
        and set(drain_codes) <= {"OK", "UNAVAILABLE"},
    }
    return result


def report(result: dict) -> str:
    t = result["targets"]
    lat = result["small_latency_s"]
    lines = [
        "# Chaos run",
        "",
        "`python -m benchmarks.system.chaos` — a `ticketserve serve` subprocess (bundled MiniLM) under "
        f"{result['clients']} gRPC and {HTTP_CLIENTS} HTTP clients (JSON API and v2 REST) over {result['tasks']} "
        f"row-delta tasks with a cache for {result['cache_tasks']}, hot swaps every 2 s (valid, corrupt, "
        "foreign-backbone and unattachable versions in turn), fuzzers on both gRPC APIs and on HTTP, a "
        "concurrent publisher, then a flood of maximum-size texts (2 clients × 8 texts of 256 KiB per request), "
        "then attacks on the doors (idle and trickling connections, hostile HTTP requests), "
        f"then SIGTERM under load; {result['seconds_per_phase']:.0f} s per phase, on {result['cpu_count']} cores, "
        f"the server's malloc {result.get('allocator', 'glibc')}'s. "
        f"Run {result['run']}; raw numbers in `results/{RESULTS.stem}{suffix(result)}.json`.",
        "",
        "| target | result | met |",
        "|---|---|---|",
        f"| no unexpected errors | {result['unexpected']['answers']} UNKNOWN/INTERNAL answers, "
        f"{result['unexpected']['server_exceptions']:.0f} server-side unexpected exceptions, "
        f"{result['unexpected']['error_log_lines']} ERROR log lines | {'yes' if t['no unexpected errors'] else '**no**'} |",
        f"| small requests' p99 under the flood ≤ 3× calm | calm p50 {lat['calm']['p50'] * 1000:.0f} ms / "
        f"p99 {lat['calm']['p99'] * 1000:.0f} ms; flood p50 {lat['flood']['p50'] * 1000:.0f} ms / "
        f"p99 {lat['flood']['p99'] * 1000:.0f} ms: {result['p99_flood_over_calm']:.2f}× | "
        f"{'yes' if t['p99 under flood <= 3x calm'] else '**no**'} |",
        f"| small requests' p99 under the door attacks ≤ 3× calm | doors p50 {lat['doors']['p50'] * 1000:.0f} ms / "
        f"p99 {lat['doors']['p99'] * 1000:.0f} ms: {result['p99_doors_over_calm']:.2f}× ({IDLE_PER_PORT:,} idle "
        f"connections on each port, {TRICKLERS} trickling bodies, hostile HTTP requests) | "
        f"{'yes' if t['p99 under the door attacks <= 3x calm'] else '**no**'} |",
        f"| server log under 1 MB | {result['server_log_bytes']:,} bytes | "
        f"{'yes' if t['server log under 1 MB'] else '**no**'} |",
        f"| RSS growth ≤ 10 % | {result['rss_bytes']['after_warmup'] / 2**20:.0f} MiB after warm-up → "
        f"{result['rss_bytes']['end'] / 2**20:.0f} MiB after the flood and a calm spell, both the median of 5 s "
        f"under the calm load ({result['rss_growth']:+.1%}); highest {result['rss_bytes']['max'] / 2**20:.0f} MiB, "
        f"during the flood | {'yes' if t['RSS growth <= 10%'] else '**no**'} |",
        f"| versions served in publish order | {', '.join(f'{k}: {v}' for k, v in result['versions']['served_versions'].items())}; "
        f"invalid versions served: {len(result['versions']['invalid_served'])} | "
        f"{'yes' if t['versions served in publish order'] else '**no**'} |",
        f"| drain | exit {result['drain']['exit_code']} after {result['drain']['seconds']:.2f} s "
        f"(bound {result['drain']['bound_seconds']:.0f} s); answers after SIGTERM: "
        f"{', '.join(f'{k} {v}' for k, v in sorted(result['drain']['answers_after_sigterm'].items()))}; "
        f"server: \"{result['drain']['log']}\" | "
        f"{'yes' if t['drain: only OK/UNAVAILABLE, exit 0 within bound'] else '**no**'} |",
        "",
        "## Answers by phase and source",
        "",
        "| phase / source | answers by status |",
        "|---|---|",
    ]
    for key, codes in result["answers"].items():
        lines.append(f"| {key} | {', '.join(f'{c} {n:,}' for c, n in sorted(codes.items(), key=lambda x: -x[1]))} |")
    lines += ["", f"Publishes: {', '.join(f'{k} {v}' for k, v in result['publishes'].items())}. "
                  f"Task cache: {', '.join(f'{k} {v:,.0f}' for k, v in result['cache'].items())}. "
                  f"Flood requests served: {result['flood_requests_ok']}.", ""]
    return "\n".join(lines)


def suffix(result: dict) -> str:
    """Of the run's results and report: none for glibc's malloc, `-jemalloc` for jemalloc."""
    allocator = result.get("allocator", "glibc")
    return "" if allocator == "glibc" else f"-{allocator}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=60.0, help="length of the calm and the flood phases")
    parser.add_argument("--warmup", type=float, default=30.0, help="two thirds with the flood, one third without")
    parser.add_argument("--settle", type=float, default=15.0, help="after the flood, before RSS is read again")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--serve-arg", action="append", default=[], help="extra `ticketserve serve` option, repeatable")
    parser.add_argument("--allocator", choices=("glibc", "jemalloc"), default="glibc")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)  # the idle connections are this process's sockets too
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 3 * IDLE_PER_PORT + 1024)), hard))
    result = run(args) | {"allocator": args.allocator}
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.with_stem(RESULTS.stem + suffix(result)).write_text(json.dumps(result, indent=2, default=str) + "\n")
    REPORT.with_stem(REPORT.stem + suffix(result)).write_text(report(result))
    print(json.dumps(result["targets"], indent=2))


if __name__ == "__main__":
    main()
