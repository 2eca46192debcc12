"""Replicas behind a real load balancer: task affinity by consistent hashing on the task header
against round-robin, as an operator would compare them before choosing (docs/guides/scaling-out.md).

    python -m benchmarks.system.replicas [--tasks 1000] [--zipf 1.1] [--seconds 60] [--rounds 2]

Three `ticketserve serve` replicas on 127.0.0.1 share one registry of 1,000 synthetic tasks of
three kinds (Dominant-1 row deltas, structure masks, LoRA r=8; kinds spread over the ranks).
Requests (one SST-2 sentence each, POST /v1/predict with the `x-ticketserve-task` header) name a
task drawn from a Zipf distribution over the 1,000; the hot set is the most requested tasks that
together draw `--hot-share` of the requests, and each replica's cache (--cache-bytes) holds a
third of its bytes. HAProxy (the distribution's package), started by the benchmark, balances
three frontends over the same replicas: `affinity` with the backend directives of
deploy/balancers/haproxy.cfg (consistent hash of the header), `affinity-bounded` the same with
`hash-balance-factor 150` (bounded load: what its spill costs in hits), `round-robin` with
the same health checks and retries but `balance roundrobin`. Phases alternate them, a
warm-up then a measured window each, for `--rounds` rounds; a last `failover` phase runs the
affinity frontend while one replica is killed (SIGKILL) and, later, started again.

Measured per phase, from the replicas' own /metrics (ticketserve_task_cache_total) and the
load's own clock: cache hit rate (requests served by a resident task; one that waits for
another request's load of its task is a miss), misses and cold loads per second, p50/p99,
requests per second and
failed requests (non-200 answers or broken connections: none may be lost). For comparison, the
hit rate one LRU cache of a replica's budget reaches over the same request stream (simulated):
round-robin should stay near it, affinity should reach 0.9 or more.
Results: benchmarks/results/replicas.json and benchmarks/system/replicas.md.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import collections
import contextlib
import itertools
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from benchmarks import common
from benchmarks.common import REPO, SST2_DEV, cpu_name
from benchmarks.system.loadgen import http_exchange
from benchmarks.system.serving import free_port

HERE = Path(__file__).parent
RESULTS = common.RESULTS / "replicas.json"
REPORT = HERE / "replicas.md"
SHIPPED_HAPROXY = REPO / "deploy" / "balancers" / "haproxy.cfg"
REPLICAS = 3
KINDS = ("row_delta", "structure_mask", "lora")
MODES = ("affinity", "affinity-bounded", "round-robin")  # the frontends, in a round's order
BALANCE_FACTOR = 150  # affinity-bounded: no replica above 1.5x the mean of outstanding requests
TASK_HEADER = "x-ticketserve-task"
WINDOW_SECONDS = 5.0  # the failover phase's time series step


# -- the workload --------------------------------------------------------------------------------

class Zipf:
    """Task names drawn with probability ∝ rank^-s; ranks are assigned to names at random."""

    def __init__(self, names: list[str], s: float, seed: int = 0):
        self.names = names[:]
        random.Random(seed).shuffle(self.names)  # rank 1 is any kind
        weights = [rank ** -s for rank in range(1, len(names) + 1)]
        total = sum(weights)
        self.shares = [w / total for w in weights]
        self.cumulative = list(itertools.accumulate(self.shares))

    def draw(self, rng: random.Random) -> str:
        return self.names[min(bisect.bisect(self.cumulative, rng.random()), len(self.names) - 1)]

    def hot(self, share: float) -> list[str]:
        """The most requested names that together draw `share` of the requests."""
        return self.names[:bisect.bisect_left(self.cumulative, share) + 1]


def lru_hit_rate(stream: list[str], sizes: dict[str, int], budget: int) -> float:
    """The hit rate of one LRU cache of `budget` bytes over `stream` (the first half warms it)."""
    cache: collections.OrderedDict[str, int] = collections.OrderedDict()
    held, hits, counted = 0, 0, 0
    for i, name in enumerate(stream):
        measured = i >= len(stream) // 2
        counted += measured
        if name in cache:
            cache.move_to_end(name)
            hits += measured
            continue
        cache[name] = sizes[name]
        held += sizes[name]
        while held > budget and len(cache) > 1:
            held -= cache.popitem(last=False)[1]
    return hits / max(counted, 1)


def registry(root: Path, count: int) -> tuple[str, dict[str, int]]:
    """`count` synthetic tasks of KINDS in turn in a fresh registry; their resident bytes."""
    from benchmarks.common import publish
    from ticketserve.core import artifact
    from ticketserve.core.backbone import load_backbone
    from ticketserve.registry import open_store

    backbone, store = load_backbone(), open_store(str(root / "registry"))
    names = {kind: [f"{kind.replace('_', '-')}-{i:04d}" for i in range(count) if KINDS[i % len(KINDS)] == kind]
             for kind in KINDS}
    for kind, of_kind in names.items():
        publish(store, backbone, kind, of_kind)
    sizes = {}
    for name in itertools.chain(*names.values()):  # what the server's cache counts (loader.py)
        sizes[name] = sum(t.numel() * t.element_size() for t in artifact.read(store, name).tensors.values())
    return str(store.root), sizes


# -- the replicas and the balancer -------------------------------------------------------------

class Replica:
    """One `ticketserve serve` on 127.0.0.1; `kill()` and `start()` again on the same ports."""

    def __init__(self, registry_root: str, cache_bytes: int, env: dict, log: Path):
        self.registry, self.cache_bytes, self.env, self.log = registry_root, cache_bytes, env, log
        self.grpc_port, self.http_port, self.metrics_port = free_port(), free_port(), free_port()
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        command = [sys.executable, "-m", "ticketserve.cli", "serve", "--registry", self.registry,
                   "--port", str(self.grpc_port), "--http-port", str(self.http_port),
                   "--metrics-port", str(self.metrics_port), "--cache-bytes", str(self.cache_bytes),
                   "--watch-seconds", "3600"]
        with self.log.open("a") as log:
            self.process = subprocess.Popen(command, env=self.env, stdout=log, stderr=log, cwd=REPO)

    def wait_ready(self, seconds: float = 300) -> None:
        until = time.monotonic() + seconds
        while time.monotonic() < until:
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/v2/health/ready", timeout=2) as answer:
                    if answer.status == 200:
                        return
            if self.process.poll() is not None:
                raise RuntimeError(f"replica exited ({self.process.returncode}); see {self.log}")
            time.sleep(0.5)
        raise RuntimeError(f"replica not ready in {seconds} s; see {self.log}")

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=60)

    def cache_events(self) -> collections.Counter:
        """The task cache's events so far by kind (empty while the replica is down)."""
        from prometheus_client.parser import text_string_to_metric_families

        events: collections.Counter = collections.Counter()
        with contextlib.suppress(OSError):
            with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as answer:
                for family in text_string_to_metric_families(answer.read().decode()):
                    if family.name == "ticketserve_task_cache":
                        events.update({s.labels["event"]: s.value for s in family.samples if s.name.endswith("_total")})
        return events


def shipped_backend() -> list[str]:
    """The directives of the shipped HTTP backend but its servers (what the benchmark tests)."""
    lines, inside = [], False
    for line in SHIPPED_HAPROXY.read_text().splitlines():
        if line.startswith("backend "):
            inside = line.split()[1] == "ticketserve_http"
        elif inside and line.strip() and not line.strip().startswith(("server", "#")):
            lines.append(line.strip())
    return lines


def haproxy_config(replicas: list[Replica], ports: dict[str, int]) -> str:
    """Three frontends over the same replicas: affinity (the shipped backend), the same with
    bounded load (what its spill to another replica costs in hits), and round-robin."""
    affinity = shipped_backend()
    frontends = {"affinity": affinity,
                 "affinity-bounded": [*affinity, f"hash-balance-factor {BALANCE_FACTOR}"],
                 "round-robin": ["balance roundrobin", *(d for d in affinity if not d.startswith(("balance", "hash-")))]}
    servers = [f"server replica{i} 127.0.0.1:{r.http_port} check inter 500ms fall 2 rise 2"
               for i, r in enumerate(replicas)]
    lines = ["global", "    maxconn 4096", "defaults", "    mode http", "    timeout connect 2s",
             "    timeout client 60s", "    timeout server 60s", "    retries 3", "    option redispatch 1"]
    for name, directives in frontends.items():
        lines += [f"frontend {name}", f"    bind 127.0.0.1:{ports[name]}", f"    default_backend {name}-replicas",
                  f"backend {name}-replicas", *(f"    {d}" for d in directives), *(f"    {s}" for s in servers)]
    return "\n".join(lines) + "\n"


@contextlib.contextmanager
def balancer(replicas: list[Replica], root: Path):
    """HAProxy in the foreground of its own process; yields the frontends' ports."""
    binary = shutil.which("haproxy") or "/usr/sbin/haproxy"
    if not Path(binary).exists():
        raise SystemExit("HAProxy is not installed (apt-get install haproxy)")
    ports = {mode: free_port() for mode in MODES}
    config = root / "haproxy.cfg"
    config.write_text(haproxy_config(replicas, ports))
    subprocess.run([binary, "-c", "-q", "-f", str(config)], check=True)
    process = subprocess.Popen([binary, "-db", "-f", str(config)], stdout=subprocess.DEVNULL,
                               stderr=(root / "haproxy.log").open("w"))
    try:
        time.sleep(1.0)
        yield ports
    finally:
        process.terminate()
        process.wait(timeout=30)


# -- the load ------------------------------------------------------------------------------------

class Load:
    """Closed-loop asyncio clients through one frontend; latencies and failures per window."""

    def __init__(self, zipf: Zipf, texts: list[str], clients: int):
        self.zipf, self.texts, self.clients = zipf, texts, clients
        self.latencies: list[float] = []
        self.failures = 0
        self.stream: list[str] = []

    async def _client(self, port: int, seed: int, until: float) -> None:
        rng = random.Random(seed)
        reader = writer = None
        while time.monotonic() < until:
            task, text = self.zipf.draw(rng), rng.choice(self.texts)
            body = json.dumps({"task": task, "inputs": [text]}).encode()
            started = time.perf_counter()
            try:
                if writer is None:
                    reader, writer = await asyncio.open_connection("127.0.0.1", port)
                status = await http_exchange(reader, writer, port, "/v1/predict", body,
                                             headers=f"{TASK_HEADER}: {task}\r\n")
            except (OSError, asyncio.IncompleteReadError, ValueError):
                status, writer = 0, None
            self.stream.append(task)
            if status == 200:
                self.latencies.append(time.perf_counter() - started)
            else:
                self.failures += 1
        if writer is not None:
            writer.close()

    def run(self, port: int, seconds: float, seed: int) -> dict:
        """Drive the frontend for `seconds`; QPS, p50/p99 and failures of that run."""
        self.latencies, self.failures, self.stream = [], 0, []
        until = time.monotonic() + seconds
        started = time.monotonic()

        async def everyone():
            await asyncio.gather(*(self._client(port, seed * 1000 + i, until) for i in range(self.clients)))

        asyncio.run(everyone())
        wall = time.monotonic() - started
        ordered = sorted(self.latencies) or [float("nan")]
        return {"qps": len(self.latencies) / wall, "p50_ms": 1000 * ordered[len(ordered) // 2],
                "p99_ms": 1000 * ordered[int(len(ordered) * 0.99)], "requests": len(self.latencies),
                "failures": self.failures}


def measured(load: Load, replicas: list[Replica], port: int, seconds: float, seed: int) -> dict:
    """One window: the load's numbers and the replicas' cache counts over it (in all and each)."""
    before = [r.cache_events() for r in replicas]
    result = load.run(port, seconds, seed)
    each = [after - first for after, first in zip((r.cache_events() for r in replicas), before)]
    total = sum(each, collections.Counter())
    hits, misses = total["hit"], total["miss"]
    return result | {"hit_rate": hits / max(hits + misses, 1), "misses_per_s": misses / seconds,
                     "cold_loads_per_s": total["load"] / seconds, "evictions_per_s": total["eviction"] / seconds,
                     "per_replica": [{"lookups": c["hit"] + c["miss"], "hit_rate": c["hit"] / max(c["hit"] + c["miss"], 1)}
                                     for c in each]}


def failover(load: Load, replicas: list[Replica], port: int, seconds: float, seed: int) -> list[dict]:
    """The affinity frontend in WINDOW_SECONDS steps; the last replica is killed after a quarter
    of `seconds` and started again at half (it reloads what hashes to it when it is back)."""
    windows, victim, events = [], replicas[-1], {}
    steps = int(seconds / WINDOW_SECONDS)
    restarted, ready = None, False
    for step in range(steps):
        if step == steps // 4:
            victim.kill()
            events[step] = "killed"
        if step == steps // 2:
            victim.start()
            restarted = time.monotonic()
            events[step] = "restarting"
        if restarted and not ready and victim.process.poll() is None:
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(f"http://127.0.0.1:{victim.http_port}/v2/health/ready", timeout=1):
                    events[step], ready = f"ready after {time.monotonic() - restarted:.0f} s", True
        windows.append({"t_s": step * WINDOW_SECONDS, "event": events.get(step, ""),
                        **measured(load, replicas, port, WINDOW_SECONDS, seed + step)})
        print(json.dumps(windows[-1]), flush=True)
    return windows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=1000)
    parser.add_argument("--zipf", type=float, default=1.1, help="the exponent s of the task popularity")
    parser.add_argument("--hot-share", type=float, default=0.95, help="requests the hot set draws")
    parser.add_argument("--clients", type=int, default=24)
    parser.add_argument("--seconds", type=float, default=60.0, help="per measured window")
    parser.add_argument("--warmup", type=float, default=30.0, help="before each window, same frontend")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--failover-seconds", type=float, default=120.0)
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="ts-bench-replicas-"))
    registry_root, sizes = registry(root, args.tasks)
    zipf = Zipf(sorted(sizes), args.zipf)
    hot = zipf.hot(args.hot_share)
    budget = sum(sizes[name] for name in hot) // REPLICAS
    texts = [json.loads(line)["sentence"] for line in SST2_DEV.read_text().splitlines()]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    replicas = [Replica(registry_root, budget, env, root / f"replica{i}.log") for i in range(REPLICAS)]
    run = {"run": time.strftime("%Y-%m-%dT%H:%M:%S"), "cpu": cpu_name(), "cpu_count": os.cpu_count(),
           "replicas": REPLICAS, "tasks": args.tasks, "kinds": list(KINDS), "zipf_s": args.zipf,
           "hot_share": args.hot_share, "hot_tasks": len(hot), "cache_bytes_per_replica": budget,
           "clients": args.clients, "seconds": args.seconds, "warmup_s": args.warmup,
           "haproxy_backend": shipped_backend(),
           "haproxy": subprocess.run(["haproxy", "-v"], capture_output=True, text=True).stdout.splitlines()[0]}
    rng = random.Random(7)
    stream = [zipf.draw(rng) for _ in range(200_000)]
    run["single_cache_lru_hit_rate"] = lru_hit_rate(stream, sizes, budget)
    run["one_cache_of_all_lru_hit_rate"] = lru_hit_rate(stream, sizes, budget * REPLICAS)
    print(json.dumps(run), flush=True)
    load = Load(zipf, texts, args.clients)
    phases = []
    try:
        for replica in replicas:
            replica.start()
        for replica in replicas:
            replica.wait_ready()
        with balancer(replicas, root) as ports:
            for round_ in range(args.rounds):
                for mode in (MODES if round_ % 2 == 0 else MODES[::-1]):
                    load.run(ports[mode], args.warmup, seed=round_ * 10 + 1)
                    phases.append({"phase": mode, "round": round_,
                                   **measured(load, replicas, ports[mode], args.seconds, seed=round_ * 10 + 2)})
                    print(json.dumps(phases[-1]), flush=True)
            load.run(ports["affinity"], args.warmup, seed=99)
            run["failover"] = failover(load, replicas, ports["affinity"], args.failover_seconds, seed=100)
    finally:
        for replica in replicas:
            replica.stop()
    run["phases"] = phases
    RESULTS.write_text(json.dumps(run, indent=1) + "\n")
    write_report()
    shutil.rmtree(root, ignore_errors=True)


def write_report(results: Path = RESULTS, report: Path = REPORT) -> None:
    r = json.loads(results.read_text())
    by_mode = collections.defaultdict(list)
    for phase in r["phases"]:
        by_mode[phase["phase"]].append(phase)

    def spread(rows: list[dict], key: str, fmt: str) -> str:
        values = sorted(row[key] for row in rows)
        return format(values[0], fmt) if len(values) == 1 else f"{format(values[0], fmt)}–{format(values[-1], fmt)}"

    failover_rows = r.get("failover", [])
    lines = ["# Replicas behind HAProxy: task affinity vs round-robin (generated by `benchmarks/system/replicas.py`)", "",
             f"Run {r['run']} on {r['cpu']} ({r['cpu_count']} cores, shared by the {r['replicas']} replicas, HAProxy "
             f"and the load); {r['haproxy']}. {r['tasks']:,} synthetic tasks ({', '.join(r['kinds'])} in turn) in one "
             f"registry; Zipf s = {r['zipf_s']}; the hot set is the {r['hot_tasks']} most requested tasks "
             f"({r['hot_share']:.0%} of requests), and each replica's cache holds a third of its bytes "
             f"({r['cache_bytes_per_replica'] / 2**20:.1f} MiB). {r['clients']} closed-loop HTTP clients, one "
             f"sentence per request, {r['warmup_s']:.0f} s warm-up then {r['seconds']:.0f} s measured per phase, "
             f"frontends alternated over {len({p['round'] for p in r['phases']})} rounds (ranges over rounds).", "",
             f"The affinity backend is the shipped one (deploy/balancers/haproxy.cfg): "
             f"`{'; '.join(r['haproxy_backend'])}`.", "",
             "| frontend | cache hit rate | misses/s | cold loads/s | requests/s | p50 ms | p99 ms | failed requests | "
             "each replica's share of lookups : hit rate (last round) |", "|---|---|---|---|---|---|---|---|---|"]

    def each(row: dict) -> str:
        lookups = sum(r["lookups"] for r in row["per_replica"]) or 1
        return ", ".join(f"{r['lookups'] / lookups:.2f} : {r['hit_rate']:.2f}" for r in row["per_replica"])

    def loads(rows: list[dict]) -> str:  # runs before the cache counted loads apart from misses have none
        return spread(rows, "cold_loads_per_s", ".1f") if all("cold_loads_per_s" in row for row in rows) else "–"

    for mode, rows in by_mode.items():
        lines.append(f"| {mode} | {spread(rows, 'hit_rate', '.3f')} | {spread(rows, 'misses_per_s', '.1f')} | "
                     f"{loads(rows)} | "
                     f"{spread(rows, 'qps', '.0f')} | {spread(rows, 'p50_ms', '.1f')} | {spread(rows, 'p99_ms', '.0f')} | "
                     f"{sum(row['failures'] for row in rows)} | {each(rows[-1])} |")
    lines += ["", f"One LRU cache of a replica's budget over the same request stream (simulated) hits "
                  f"{r['single_cache_lru_hit_rate']:.3f}; one of all three budgets together "
                  f"{r['one_cache_of_all_lru_hit_rate']:.3f}.", ""]
    if failover_rows:
        lines += ["## A replica killed and started again (affinity frontend)", "",
                  f"{WINDOW_SECONDS:.0f}-second windows; the third replica is killed with SIGKILL, then started again.", "",
                  "| t, s | event | hit rate | misses/s | requests/s | p99 ms | failed requests | lookups per replica |",
                  "|---|---|---|---|---|---|---|---|"]
        lines += [f"| {w['t_s']:.0f} | {w['event']} | {w['hit_rate']:.3f} | {w['misses_per_s']:.1f} | {w['qps']:.0f} | "
                  f"{w['p99_ms']:.0f} | {w['failures']} | {', '.join(str(round(r['lookups'])) for r in w['per_replica'])} |"
                  for w in failover_rows]
        lines.append("")
    discussion = HERE / "replicas_discussion.md"
    report.write_text("\n".join(lines) + ("\n" + discussion.read_text() if discussion.exists() else ""))


if __name__ == "__main__":
    main()
