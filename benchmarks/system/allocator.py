"""The server process's malloc settings against the forward pass: QPS, page faults and system
CPU of `ticketserve serve` under a gRPC load, and of the in-process Engine under the same
load, for each allocator setting, in one sitting, runs interleaved.

    python -m benchmarks.system.allocator [--seconds 20] [--rounds 2]

The server (or the in-process engine) runs on core 0 with one torch thread; the load — 32
asyncio gRPC channels (server), or 32 submitter threads (in process) — on core 1. One SST-2
sentence per request over 8 Dominant-1-sized row-delta tasks at random, on the bundled MiniLM.
Each setting is the environment the process starts with (glibc reads MALLOC_*_ itself; our
`tune_malloc()` applies only what the environment leaves unset; TICKETSERVE_MALLOC_TRIM picks
the server's trim policy, runtime/server/memory.py):

  shipped-1MiB        as shipped until #34: a fixed 1 MiB mmap threshold, 2 arenas, no trimming
  32MiB-adaptive      as shipped for glibc (runtime/server/memory.py): mmap threshold 32 MiB
                      (glibc's maximum), trim threshold 1 GiB, 2 arenas, `malloc_trim` only
                      when it gives memory back (in-use bytes fell, or resident bytes grew
                      beyond them, by the slack; baseline over 30 s of settling)
  32MiB-top-pad-adaptive  the same with a 64 MiB top pad: a thread arena's heaps are no longer
                      unmapped when their top is free (and mapped and faulted again), but a
                      flood's memory then stays in them (chaos run: RSS +21.9 %), so not shipped
  32MiB-top-pad-no-trim   the same as shipped, never trimming
  32MiB-top-pad-adaptive-python-protobuf  as shipped, protobuf's pure-Python messages on both
                      sides (PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION=python): protobuf's upb
                      messages call `malloc_trim(0)` every 10,000 arena frees, whatever the server
                      decides; this setting measures what that costs
  jemalloc-adaptive   jemalloc as the process's malloc (LD_PRELOAD, as the image runs the server),
                      never decaying (freed pages stay), purged when the same rules say so;
                      glibc's malloc_trim, which protobuf still calls, then has nothing to return
  32MiB-trim-2s       mmap threshold 32 MiB, trim threshold 1 GiB, `malloc_trim` every 2 s
                      (not run by default: measured 2026-12-06)
  32MiB-adaptive-huge-pages  adaptive, and glibc.malloc.hugetlb=1 (transparent huge pages for
                      malloc) for the engine too: half the server's faults, but the chaos run's
                      RSS grew 15 % (target 10 %), so the server does not set it (not run by default)

Every other setting runs with glibc.malloc.hugetlb=0 (glibc's default, spelled out).
The in-process engine never trims, so it is measured once per malloc environment and round.

Results: benchmarks/results/allocator.jsonl and benchmarks/system/allocator.md.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from benchmarks import common
from benchmarks.common import cpu_name, jemalloc_environment, publish
from benchmarks.results import span
from benchmarks.system import memory_kernel
from benchmarks.system.serving import load, served

HERE = Path(__file__).parent
RESULTS = common.RESULTS / "allocator.jsonl"
REPORT = HERE / "allocator.md"
TASKS = [f"alloc-{i}" for i in range(8)]
CLIENTS = 32
SHIPPED = {"MALLOC_MMAP_THRESHOLD_": str(1 << 20), "MALLOC_ARENA_MAX": "2",  # glibc's trim threshold stays at
           "MALLOC_TRIM_THRESHOLD_": str(128 << 10), "MALLOC_TOP_PAD_": str(128 << 10)}  # 128 KiB once mmap's is fixed
RAISED = {"MALLOC_MMAP_THRESHOLD_": str(32 << 20), "MALLOC_TRIM_THRESHOLD_": str(1 << 30), "MALLOC_ARENA_MAX": "2",
          "MALLOC_TOP_PAD_": str(64 << 20)}
NO_TOP_PAD = {"MALLOC_TOP_PAD_": str(128 << 10)}  # glibc's default
NO_HUGE, HUGE = {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
PURE_PYTHON_PROTOBUF = {"PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION": "python"}
SETTINGS = {  # name → (process environment, the engine run it is compared with, the server's trim policy)
    "shipped-1MiB": (SHIPPED | NO_HUGE, "1MiB", "off"),
    "32MiB-top-pad-adaptive": (RAISED | NO_HUGE, "32MiB-top-pad", "adaptive"),
    "32MiB-adaptive": (RAISED | NO_TOP_PAD | NO_HUGE, "32MiB", "adaptive"),
    "32MiB-top-pad-no-trim": (RAISED | NO_HUGE, "32MiB-top-pad", "off"),
    "32MiB-top-pad-adaptive-python-protobuf": (RAISED | NO_HUGE | PURE_PYTHON_PROTOBUF, "32MiB-top-pad", "adaptive"),
    "jemalloc-adaptive": ("jemalloc", "jemalloc", "adaptive"),
    "32MiB-trim-2s": (RAISED | NO_TOP_PAD | NO_HUGE, "32MiB", "always"),
    "32MiB-adaptive-huge-pages": (RAISED | NO_TOP_PAD | HUGE, "32MiB-huge", "adaptive"),
}
DEFAULT_SETTINGS = list(SETTINGS)[:6]


def environment(setting: str) -> dict[str, str]:
    malloc, _, policy = SETTINGS[setting]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return env | (jemalloc_environment() if malloc == "jemalloc" else malloc) | {"TICKETSERVE_MALLOC_TRIM": policy}


def serve_side(registry: str, setting: str, seconds: float, warmup: float) -> dict:
    """`ticketserve serve` on core 0 under 32 asyncio gRPC channels on core 1 (benchmarks/system/loadgen.py)."""
    with served(registry, TASKS, [0], environment(setting)) as (server, port, _, metrics_port):
        return load("grpc", [1], TASKS, CLIENTS, seconds, environment(setting), (server.pid, metrics_port),
                    memory_kernel.available(), port=port, warmup=warmup)


def engine_side(registry: str, setting: str, seconds: float, warmup: float) -> dict:
    """The in-process Engine under 32 submitter threads on core 0 (its submitters share that core,
    as the server's event loop does)."""
    return load("engine", [0], TASKS, CLIENTS, seconds, environment(setting), None, memory_kernel.available(),
                registry=registry, warmup=warmup)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--warmup", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--settings", default=",".join(DEFAULT_SETTINGS))
    args = parser.parse_args()
    from ticketserve.core.backbone import load_backbone
    from ticketserve.registry import open_store

    registry = tempfile.mkdtemp(prefix="ts-alloc-")
    store = open_store(registry)
    publish(store, load_backbone(None, store), "row_delta", TASKS)
    settings, run = args.settings.split(","), time.strftime("%Y-%m-%dT%H:%M:%S")
    records = []
    for round_ in range(args.rounds):
        order = settings if round_ % 2 == 0 else settings[::-1]
        engines = {}  # one engine run per malloc environment and round, before its first server run
        for setting in order:
            if SETTINGS[setting][1] not in engines:
                engines[SETTINGS[setting][1]] = engine_side(registry, setting, args.seconds, args.warmup)
            record = {"run": run, "cpu_count": os.cpu_count(), "device": "cpu", "device_name": cpu_name(),
                      "round": round_, "seconds": args.seconds, "setting": setting, "side": "server",
                      **serve_side(registry, setting, args.seconds, args.warmup)}
            records += [record, {**record, **engines[SETTINGS[setting][1]], "side": "engine"}]
            print(json.dumps(records[-2]), json.dumps(records[-1]), sep="\n", flush=True)
    RESULTS.parent.mkdir(exist_ok=True)
    with RESULTS.open("a") as out:
        out.writelines(json.dumps(r) + "\n" for r in records)
    REPORT.write_text(report(records))
    print(REPORT.read_text())


def report(records: list[dict]) -> str:
    lines = ["# Allocator settings: the server against the in-process engine", "",
             f"`python -m benchmarks.system.allocator` ({records[0]['run']}, {len({r['round'] for r in records})} rounds, "
             "interleaved). Server or engine on core 0 with one torch thread, the load on core 1; one SST-2 sentence "
             f"per request, 8 row-delta tasks at random, bundled MiniLM, {records[0]['seconds']:.0f} s per measurement. "
             "The engine never trims; its row is the same run for settings sharing its malloc environment. Ranges over "
             "rounds.", "",
             "The kernel's memory management (page faults, mmap, munmap, madvise, brk: "
             "`benchmarks/system/memory_kernel.py`) is sampled with perf where it is installed; it is the part of the "
             "system CPU an allocator can change (the rest is socket I/O and thread hand-offs).", "",
             "| setting | side | QPS | server ÷ engine (same round) | minor faults / request | server ÷ engine | "
             "system CPU s/s | server ÷ engine | kernel memory management µs / request | server ÷ engine |",
             "|---|---|---|---|---|---|---|---|---|---|"]

    for setting in dict.fromkeys(r["setting"] for r in records):
        for side in ("server", "engine"):
            rows = [r for r in records if r["setting"] == setting and r["side"] == side]
            pairs = [(s, e) for s in rows for e in records if e["setting"] == setting and e["side"] == "engine"
                     and e["round"] == s["round"]] if side == "server" else []

            def ratio(key: str) -> str:
                known = [(s, e) for s, e in pairs if key in s and key in e]
                return span([s[key] / max(e[key], 1e-9) for s, e in known], ".2f") if known else ""

            sampled = [r["memory_kernel_us_per_request"] for r in rows if "memory_kernel_us_per_request" in r]

            lines.append(f"| {setting} | {side} | {span([r['qps'] for r in rows], '.1f')} | {ratio('qps')} | "
                         f"{span([r['faults_per_request'] for r in rows], '.0f')} | {ratio('faults_per_request')} | "
                         f"{span([r['system_cpu_per_s'] for r in rows], '.3f')} | {ratio('system_cpu_per_s')} | "
                         f"{span(sampled, '.0f') if sampled else '—'} | {ratio('memory_kernel_us_per_request')} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
