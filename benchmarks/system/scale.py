"""One replica holding 10,000 tasks: what an operator checks before giving a replica that many
(the #39 scale-out issue's targets).

    python -m benchmarks.system.scale [--tasks 10000] [--seconds 15] [--allocator glibc]

A registry of `--tasks` synthetic Dominant-1 tasks (one row per matrix, the study's serving
kind) and one `ticketserve serve` on 127.0.0.1 with a cache that holds them all, its malloc
jemalloc as the image runs it (`--allocator glibc`: as `pip install` runs it). Measured:
  registry  the time to publish them; `names()` and the watch's poll (`ref_stamps()`) on the
            store, and `ticketserve registry list` and `ticketserve tasks --all` as commands
  growth    at 1, 100, 1,000 and 10,000 resident tasks (loaded by the admin LoadTask call):
            the server's RSS growth per resident task beyond the first (the first step also
            holds what serving 32 clients over new tasks allocates) ÷ the artifact's bytes, gRPC QPS with
            32 clients over the resident tasks (benchmarks/system/loadgen.py), /metrics size
  flatness  with all of them resident, QPS over all of them ÷ over one, alternated (--rounds)
Results: benchmarks/results/scale.json and benchmarks/system/scale.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import psutil

from benchmarks import common
from benchmarks.common import REPO, cpu_name, jemalloc_environment, publish
from benchmarks.results import span
from benchmarks.system.serving import cores, free_port, load, pinned

HERE = Path(__file__).parent
RESULTS = common.RESULTS / "scale.json"
REPORT = HERE / "scale.md"
STEPS = (1, 100, 1000, 10_000)


def timed(call) -> tuple[float, object]:
    started = time.perf_counter()
    value = call()
    return time.perf_counter() - started, value


def command_seconds(*args: str) -> float:
    """Wall time of one `ticketserve` command (a fresh interpreter, as a user runs it)."""
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "ticketserve.cli", *args], check=True, capture_output=True, cwd=REPO)
    return time.perf_counter() - started


def flatness(names: list[str], cpus: list[int], env: dict, server: tuple[int, int], port: int, seconds: float,
             rounds: int) -> list[dict]:
    """With every task resident: 32 clients over one task and over all of them, alternated, so
    that the machine's drift falls on both alike; QPS of all ÷ one per round."""
    rows = []
    for round_ in range(rounds):
        pools = (("one", names[:1]), ("all", names))
        measured = {label: load("grpc", cpus, pool, 32, seconds, env, server, port=port)
                    for label, pool in (pools if round_ % 2 == 0 else pools[::-1])}
        rows.append({"round": round_, "qps_one": measured["one"]["qps"], "qps_all": measured["all"]["qps"],
                     "all_vs_one": measured["all"]["qps"] / measured["one"]["qps"]})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=STEPS[-1])
    parser.add_argument("--seconds", type=float, default=15.0, help="per QPS measurement")
    parser.add_argument("--allocator", choices=("jemalloc", "glibc"), default="jemalloc")
    parser.add_argument("--rounds", type=int, default=3, help="flatness: rounds of one task against all of them")
    args = parser.parse_args()
    steps = [s for s in STEPS if s < args.tasks] + [args.tasks]

    from ticketserve.core.backbone import load_backbone
    from ticketserve.registry import open_store
    from ticketserve.runtime.client import Client

    root = Path(tempfile.mkdtemp(prefix="ts-bench-scale-"))
    backbone, store = load_backbone(), open_store(str(root / "registry"))
    names = [f"s{i:05d}" for i in range(args.tasks)]  # short: loadgen takes them on its command line
    publish_s, _ = timed(lambda: publish(store, backbone, "row_delta", names))
    artifact_bytes = store.manifest(names[0]).payload_bytes
    record = {"run": time.strftime("%Y-%m-%dT%H:%M:%S"), "cpu": cpu_name(), "cpu_count": os.cpu_count(),
              "tasks": args.tasks, "artifact_bytes": artifact_bytes, "publish_s": publish_s, "allocator": args.allocator}
    record["names_s"], _ = timed(store.names)
    record["watch_poll_s"], _ = timed(store.ref_stamps)
    record["registry_list_s"] = command_seconds("registry", "list", "--registry", str(store.root), "--json")
    print(json.dumps(record), flush=True)

    server_cpus, load_cpus = cores()
    env = {**os.environ, "OMP_NUM_THREADS": str(len(server_cpus)), "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", **(jemalloc_environment() if args.allocator == "jemalloc" else {})}
    port, metrics_port = free_port(), free_port()
    # the watch polls every name at its default interval throughout, as a replica's does
    command = [sys.executable, "-m", "ticketserve.cli", "serve", "--registry", str(store.root), "--port", str(port),
               "--metrics-port", str(metrics_port), "--cache-bytes", str(4 * artifact_bytes * args.tasks)]
    server = subprocess.Popen(pinned(command, server_cpus), env=env, stderr=subprocess.DEVNULL, cwd=REPO)
    growth = []
    try:
        subprocess.run([sys.executable, "-m", "ticketserve.cli", "info", "--server", f"127.0.0.1:{port}", "--wait",
                        "300"], check=True, capture_output=True)
        with Client(f"127.0.0.1:{port}", timeout=60) as client:
            client.predict(names[0], ["warm the forward before the baseline"])
            client.unload_task(names[0])
            load("grpc", load_cpus, names[:1], 32, 5, env, (server.pid, metrics_port), port=port)  # the serving working set
            process = psutil.Process(server.pid)
            base = process.memory_info().rss
            loaded = 0
            for count in steps:
                load_s, _ = timed(lambda: [client.load_task(name) for name in names[loaded:count]])
                added, loaded = count - loaded, count
                served = load("grpc", load_cpus, names[:count], 32, args.seconds, env, (server.pid, metrics_port), port=port)
                rss = process.memory_info().rss
                metrics = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=30).read()
                first = growth[0]["rss_growth_bytes"] if growth else rss - base  # the 1-task point: serving's own
                growth.append({"resident": count, "load_s_per_task": load_s / added, "rss_growth_bytes": rss - base,
                               "rss_per_task_vs_artifact": (rss - base - first) / max(count - 1, 1) / artifact_bytes,
                               "qps": served["qps"], "p99_ms": served["p99_ms"], "failures": served["failures"],
                               "metrics_bytes": len(metrics)})
                print(json.dumps(growth[-1]), flush=True)
            record["flatness"] = flatness(names, load_cpus, env, (server.pid, metrics_port), port, args.seconds,
                                          args.rounds)
        record["tasks_all_s"] = command_seconds("tasks", "--server", f"127.0.0.1:{port}", "--all", "--json")
    finally:
        server.terminate()
        server.wait(timeout=60)
    record["growth"] = growth
    RESULTS.write_text(json.dumps(record, indent=1) + "\n")
    write_report()


def write_report(results: Path = RESULTS, report: Path = REPORT) -> None:
    r = json.loads(results.read_text())
    lines = ["# One replica, 10,000 tasks (generated by `benchmarks/system/scale.py`)", "",
             f"Run {r['run']} on {r['cpu']} ({r['cpu_count']} cores; the server on all but the last, the load on the "
             f"last; its malloc {r['allocator']}). {r['tasks']:,} synthetic Dominant-1 tasks of {r['artifact_bytes']:,} "
             "payload bytes each, MiniLM.", "",
             "| registry operation at this size | seconds |", "|---|---|",
             f"| publish all (one process, in turn) | {r['publish_s']:.0f} |",
             f"| `names()` on the store | {r['names_s']:.3f} |",
             f"| the watch's poll (`ref_stamps()`) | {r['watch_poll_s']:.3f} |",
             f"| `ticketserve registry list --json` | {r['registry_list_s']:.2f} |",
             f"| `ticketserve tasks --all --json` against the server holding them | {r['tasks_all_s']:.2f} |", "",
             "| resident tasks | LoadTask, ms per task | RSS growth | RSS growth per task beyond the first ÷ artifact bytes | gRPC QPS "
             "(32 clients, tasks at random) | p99 ms | failures | /metrics bytes |", "|---|---|---|---|---|---|---|---|"]
    for g in r["growth"]:
        per_task = f"{g['rss_per_task_vs_artifact']:.2f}" if g is not r["growth"][0] else "–"
        lines.append(f"| {g['resident']:,} | {1000 * g['load_s_per_task']:.1f} | {g['rss_growth_bytes'] / 2**20:.1f} MiB | "
                     f"{per_task} | {g['qps']:.1f} | {g['p99_ms']:.0f} | {g['failures']} | {g['metrics_bytes']:,} |")
    if r.get("flatness"):
        rows = r["flatness"]
        ratios = [row["all_vs_one"] for row in rows]
        lines += ["", f"Flatness, with all {r['tasks']:,} resident: gRPC QPS with 32 clients over all of them ÷ over one "
                      f"of them, alternated over {len(ratios)} rounds: median {statistics.median(ratios):.2f} "
                      f"({span(ratios)}); over one {span([row['qps_one'] for row in rows], '.1f')}, "
                      f"over all {span([row['qps_all'] for row in rows], '.1f')}."]
    discussion = HERE / "scale_discussion.md"
    report.write_text("\n".join(lines) + "\n" + ("\n" + discussion.read_text() if discussion.exists() else ""))


if __name__ == "__main__":
    main()
