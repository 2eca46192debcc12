"""The server process's malloc settings against the forward pass: QPS, page faults and system
CPU of `ticketserve serve` under a gRPC load, and of the in-process Engine under the same
load, for each allocator setting, in one sitting, runs interleaved.

    python benchmarks/allocator.py [--seconds 20] [--rounds 2]

The server (or the in-process engine) runs on core 0 with one torch thread; the load — 32
asyncio gRPC channels (server), or 32 submitter threads (in process) — on core 1. One SST-2
sentence per request over 8 Dominant-1-sized row-delta tasks at random, on the bundled MiniLM.
Each setting is the environment the process starts with (glibc reads MALLOC_*_ itself; our
`tune_malloc()` applies only what the environment leaves unset):

  shipped-1MiB  `tune_malloc()` as shipped until #34: a fixed 1 MiB mmap threshold, 2 arenas
  32MiB-1GiB    mmap threshold 32 MiB (glibc's maximum) and trim threshold 1 GiB, 2 arenas

The server also returns free heap pages every 2 s (`malloc_trim`, part of the server since
#34, whatever the setting); the in-process engine never does.

Results: benchmarks/results/allocator.jsonl and benchmarks/allocator.md.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).parent
RESULTS = HERE / "results" / "allocator.jsonl"
REPORT = HERE / "allocator.md"
SST2_DEV = HERE.parent / "ticketserve" / "core" / "samples" / "sst2" / "validation.jsonl"
TASKS = [f"alloc-{i}" for i in range(8)]
CLIENTS = 32
SETTINGS = {
    # glibc's trim threshold stays at its 128 KiB default once the mmap threshold is fixed
    "shipped-1MiB": {"MALLOC_MMAP_THRESHOLD_": str(1 << 20), "MALLOC_ARENA_MAX": "2",
                     "MALLOC_TRIM_THRESHOLD_": str(128 << 10)},
    "32MiB-1GiB": {"MALLOC_MMAP_THRESHOLD_": str(32 << 20), "MALLOC_TRIM_THRESHOLD_": str(1 << 30),
                   "MALLOC_ARENA_MAX": "2"},
}


def process_stats(pid: int) -> tuple[int, float, float]:
    """Minor faults, user and system CPU seconds of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return int(fields[7]), int(fields[11]) / ticks, int(fields[12]) / ticks


def environment(setting: str) -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return env | SETTINGS[setting]


def measured(pid: int, run, seconds: float) -> dict:
    """Run `run(seconds)` (returns requests answered) while reading the process's counters."""
    faults0, user0, system0 = process_stats(pid)
    started = time.monotonic()
    answered = run(seconds)
    wall = time.monotonic() - started
    faults1, user1, system1 = process_stats(pid)
    return {"qps": answered / wall, "faults_per_request": (faults1 - faults0) / max(answered, 1),
            "system_cpu_per_s": (system1 - system0) / wall, "user_cpu_per_s": (user1 - user0) / wall,
            "requests": answered}


# -- the two sides, each its own process --------------------------------------------------

def serve_side(registry: str, setting: str, seconds: float, warmup: float) -> dict:
    port = _free_port()
    server = subprocess.Popen(["taskset", "-c", "0", sys.executable, "-m", "ticketserve.cli", "serve", "--registry",
                               registry, "--port", str(port), *sum((["--preload", t] for t in TASKS), [])],
                              env=environment(setting), stderr=subprocess.DEVNULL)
    try:
        subprocess.run([sys.executable, "-m", "ticketserve.cli", "info", "--server", f"127.0.0.1:{port}", "--wait",
                        "300"], check=True, capture_output=True)
        load = lambda s: _grpc_load(port, s)  # noqa: E731
        load(warmup)
        return measured(server.pid, load, seconds)
    finally:
        server.terminate()
        server.wait(timeout=60)


def _grpc_load(port: int, seconds: float) -> int:
    """32 asyncio channels in a child process on core 1; returns requests answered."""
    code = f"""
import asyncio, json, random, time, grpc
from ticketserve.v1 import pb, rpc
texts = [json.loads(l)["sentence"] for l in open({str(SST2_DEV)!r})]
async def client(seed, until):
    rng, done = random.Random(seed), 0
    async with grpc.aio.insecure_channel("127.0.0.1:{port}") as channel:
        stub = rpc.InferenceStub(channel)
        while time.monotonic() < until:
            await stub.Predict(pb.PredictRequest(task=rng.choice({TASKS!r}), inputs=[pb.TextInput(text=rng.choice(texts))]))
            done += 1
    return done
async def main():
    until = time.monotonic() + {seconds}
    print(sum(await asyncio.gather(*(client(i, until) for i in range({CLIENTS})))))
asyncio.run(main())
"""
    result = subprocess.run(["taskset", "-c", "1", sys.executable, "-c", code], check=True, capture_output=True,
                            text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return int(result.stdout.split()[-1])


def engine_side(registry: str, setting: str, seconds: float, warmup: float) -> dict:
    """The in-process Engine under 32 submitter threads, in a child pinned to core 0 (its
    submitters share that core, as the server's event loop does)."""
    code = f"""
import json, random, sys, threading, time
sys.path.insert(0, {str(HERE)!r})
from ticketserve.runtime.server.memory import tune_malloc
tune_malloc()
from ticketserve.core import artifact
from ticketserve.core.backbone import load_backbone
from ticketserve.registry import open_store
from ticketserve.runtime.engine import Engine
from ticketserve.runtime.executor import Runtime
store = open_store({registry!r})
runtime = Runtime(load_backbone(None, store), device="cpu")
tasks = [runtime.add(artifact.load(store, name, runtime.backbone)) for name in {TASKS!r}]
engine = Engine(runtime)
texts = [json.loads(l)["sentence"] for l in open({str(SST2_DEV)!r})]
def load(seconds):
    until, counts = time.monotonic() + seconds, [0] * {CLIENTS}
    def work(i):
        rng = random.Random(i)
        while time.monotonic() < until:
            engine.submit(rng.choice(tasks), [rng.choice(texts)]).result()
            counts[i] += 1
    threads = [threading.Thread(target=work, args=(i,)) for i in range({CLIENTS})]
    for t in threads: t.start()
    for t in threads: t.join()
    return sum(counts)
load({warmup})
print("ready", flush=True)
sys.stdin.readline()
print(load({seconds}), flush=True)
"""
    child = subprocess.Popen(["taskset", "-c", "0", sys.executable, "-c", code], env=environment(setting),
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "ready"

        def run(_seconds):
            child.stdin.write("go\n")
            child.stdin.flush()
            return int(child.stdout.readline())

        return measured(child.pid, run, seconds)
    finally:
        child.kill()
        child.wait()


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--warmup", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--settings", default=",".join(SETTINGS))
    args = parser.parse_args()
    sys.path.insert(0, str(HERE))
    from serving import publish

    from ticketserve.core.backbone import load_backbone
    from ticketserve.registry import open_store

    registry = tempfile.mkdtemp(prefix="ts-alloc-")
    store = open_store(registry)
    publish(store, load_backbone(None, store), "row_delta", TASKS)
    settings, run = args.settings.split(","), time.strftime("%Y-%m-%dT%H:%M:%S")
    records = []
    for round_ in range(args.rounds):
        order = settings if round_ % 2 == 0 else settings[::-1]
        for setting in order:
            for side, measure in (("server", serve_side), ("engine", engine_side)):
                record = {"run": run, "round": round_, "setting": setting, "side": side,
                          **measure(registry, setting, args.seconds, args.warmup)}
                print(json.dumps(record), flush=True)
                records.append(record)
    RESULTS.parent.mkdir(exist_ok=True)
    with RESULTS.open("a") as out:
        out.writelines(json.dumps(r) + "\n" for r in records)
    REPORT.write_text(report(records))
    print(REPORT.read_text())


def report(records: list[dict]) -> str:
    lines = ["# Allocator settings: the server against the in-process engine", "",
             f"`python benchmarks/allocator.py` ({records[0]['run']}, {len({r['round'] for r in records})} rounds, "
             "interleaved). Server or engine on core 0 with one torch thread, the load on core 1; one SST-2 sentence "
             "per request, 8 row-delta tasks at random, bundled MiniLM. The server runs `malloc_trim` every 2 s (the "
             "engine does not). Ranges over rounds.", "",
             "| setting | side | QPS | server ÷ engine (same round) | minor faults / request | system CPU s/s |",
             "|---|---|---|---|---|---|"]

    def span(values: list[float], fmt: str) -> str:
        low, high = min(values), max(values)
        return format(low, fmt) if format(low, fmt) == format(high, fmt) else f"{format(low, fmt)}–{format(high, fmt)}"

    for setting in dict.fromkeys(r["setting"] for r in records):
        for side in ("server", "engine"):
            rows = [r for r in records if r["setting"] == setting and r["side"] == side]
            ratios = [s["qps"] / e["qps"] for s in rows for e in records if e["setting"] == setting
                      and e["side"] == "engine" and e["round"] == s["round"]] if side == "server" else []
            lines.append(f"| {setting} | {side} | {span([r['qps'] for r in rows], '.1f')} | "
                         f"{span(ratios, '.2f') if ratios else ''} | {span([r['faults_per_request'] for r in rows], '.0f')} | "
                         f"{span([r['system_cpu_per_s'] for r in rows], '.3f')} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
