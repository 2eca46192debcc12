"""Serving benchmark: end-to-end gRPC QPS and latency against the in-process engine, in one run.

On the bundled MiniLM, with one task and with 100 Dominant-1-shaped tasks (one random row
per matrix + head; the values do not matter for speed, so they are synthetic), it measures
  * in-process: Runtime forward throughput (examples/s) on batches of `--batch` examples,
    single-task and with every example's task drawn from the 100;
  * end to end: a `ticketserve serve` subprocess on 127.0.0.1 driven by 1, 8 and 32 client
    threads for `--seconds` each (one text per request, SST-2 dev sentences): QPS, p50/p99.
Results: benchmarks/results/serving.jsonl (one record per measurement) and benchmarks/serving.md.

    python benchmarks/serving.py [--seconds 15] [--tasks 100]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

HERE = Path(__file__).parent
RESULTS = HERE / "results" / "serving.jsonl"
REPORT = HERE / "serving.md"
SST2_DEV = HERE.parent / "ticketserve" / "data" / "sst2" / "validation.jsonl"


def dominant1_like(backbone, seed: int) -> dict[str, torch.Tensor]:
    from ticketserve.backbone import dense_matrices

    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, linear in dense_matrices(backbone.model).items():
        row = torch.randint(0, linear.in_features + 1, (1,), generator=generator)
        tensors[f"{name}.index"] = row.int()
        tensors[f"{name}.delta"] = torch.randn(1, linear.out_features, generator=generator) * 0.01
    hidden = backbone.config.hidden_size
    return tensors | {"head.weight": torch.randn(2, hidden, generator=generator) * 0.1, "head.bias": torch.zeros(2)}


def publish_tasks(store, backbone, count: int) -> list[str]:
    from registry import HeadConfig, Manifest
    from ticketserve import artifact
    from ticketserve.tasks import get_task

    names = [f"bench-d1-{i:03d}" for i in range(count)]
    for seed, name in enumerate(names):
        manifest = Manifest(name=name, kind="row_delta", method="dominant", task=get_task("sst2"), head=HeadConfig(),
                            backbone=backbone.ref(), details={"synthetic": True, "k": 1})
        artifact.publish(store, manifest, dominant1_like(backbone, seed))
    return names


def in_process(backbone, store, names: list[str], texts: list[str], batch: int, seconds: float) -> dict:
    from ticketserve import artifact
    from ticketserve.runtime import Runtime

    runtime = Runtime(backbone, device="cpu")
    for name in names:
        runtime.add(artifact.load(store, name, backbone))
    rng = random.Random(0)
    results = {}
    for label, pool in (("1 task", names[:1]), (f"{len(names)} tasks mixed", names)):
        done, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds:
            sample = rng.sample(texts, batch)
            runtime.logits([rng.choice(pool) for _ in sample], runtime.tokenize(sample))
            done += batch
        results[label] = done / (time.perf_counter() - started)
    with torch.inference_mode():  # the plain backbone, no task machinery, same batches
        done, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds:
            sample = rng.sample(texts, batch)
            backbone.model(**runtime.tokenize(sample))
            done += batch
        results["plain backbone"] = done / (time.perf_counter() - started)
    return results


def drive(target: str, names: list[str], texts: list[str], clients: int, seconds: float) -> dict:
    from ticketserve.client import Client

    latencies: list[float] = []
    failures = [0]
    lock = threading.Lock()
    stop = time.monotonic() + seconds

    def work(seed: int) -> None:
        rng = random.Random(seed)
        with Client(target, timeout=60) as client:
            while time.monotonic() < stop:
                started = time.perf_counter()
                try:
                    client.predict(rng.choice(names), [rng.choice(texts)])
                except Exception:
                    with lock:
                        failures[0] += 1
                    continue
                with lock:
                    latencies.append(time.perf_counter() - started)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    latencies.sort()
    return {"qps": len(latencies) / elapsed, "p50_ms": 1000 * latencies[len(latencies) // 2],
            "p99_ms": 1000 * latencies[int(len(latencies) * 0.99)], "requests": len(latencies), "failures": failures[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--tasks", type=int, default=100)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--clients", default="1,8,32")
    parser.add_argument("--port", type=int, default=50171)
    args = parser.parse_args()

    from registry import open_store
    from ticketserve.backbone import load_backbone

    texts = [json.loads(line)["sentence"] for line in SST2_DEV.read_text().splitlines()]
    registry = tempfile.mkdtemp(prefix="ticketserve-bench-")
    store = open_store(registry)
    backbone = load_backbone()
    names = publish_tasks(store, backbone, args.tasks)
    run = {"backbone": backbone.name, "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
           "device": "cpu", "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
    records = []
    engine = in_process(backbone, store, names, texts, args.batch, args.seconds)
    for label, rate in engine.items():
        records.append(run | {"measure": "in-process", "workload": label, "batch": args.batch, "examples_per_s": rate})

    server = subprocess.Popen([sys.executable, "-m", "ticketserve.cli", "serve", "--registry", registry,
                               "--port", str(args.port), "--cache-bytes", str(1 << 30), *sum((["--preload", n] for n in names), [])],
                              stderr=subprocess.DEVNULL)
    try:
        subprocess.run([sys.executable, "-m", "ticketserve.cli", "info", "--server", f"127.0.0.1:{args.port}",
                        "--wait", "300", "--json"], check=True, capture_output=True)
        target = f"127.0.0.1:{args.port}"
        for workload, pool in (("1 task", names[:1]), (f"{len(names)} tasks random", names)):
            for clients in map(int, args.clients.split(",")):
                result = drive(target, pool, texts, clients, args.seconds)
                records.append(run | {"measure": "grpc", "workload": workload, "clients": clients, **result})
                print(json.dumps(records[-1]), flush=True)
    finally:
        server.terminate()
        server.wait(timeout=60)

    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    with RESULTS.open("a") as handle:
        for record in records:
            handle.write(json.dumps(record) + "\n")
    write_report(records, engine)


def write_report(records: list[dict], engine: dict[str, float]) -> None:
    lines = ["# Serving on one CPU machine (generated by `benchmarks/serving.py`)", "",
             f"Bundled MiniLM-L6, {records[0]['cpu_count']} CPU cores, torch threads {records[0]['threads']}, "
             f"run {records[0]['time']}. Tasks are Dominant-1-shaped row deltas (synthetic values).", "",
             "## In-process engine (examples/s, batches of 32)", "", "| workload | examples/s | vs plain backbone |",
             "|---|---|---|"]
    plain = engine["plain backbone"]
    lines += [f"| {label} | {rate:.1f} | {rate / plain:.3f} |" for label, rate in engine.items()]
    lines += ["", "## End to end over gRPC (one text per request)", "",
              "| workload | clients | QPS | p50 ms | p99 ms | failures | QPS / in-process examples/s |", "|---|---|---|---|---|---|---|"]
    for r in records:
        if r["measure"] == "grpc":
            reference = engine["1 task"] if r["workload"] == "1 task" else next(v for k, v in engine.items() if "mixed" in k)
            lines.append(f"| {r['workload']} | {r['clients']} | {r['qps']:.1f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} "
                         f"| {r['failures']} | {r['qps'] / reference:.3f} |")
    REPORT.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
