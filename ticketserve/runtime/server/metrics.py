"""Prometheus metrics of one server (its own registry, so several servers can share a process).

Label values are bounded: `task` is an artifact name the server resolved, and only the first
`task_series` of those (--metrics-task-series) have their own series — a server holding 10,000
tasks would otherwise export hundreds of thousands of lines per scrape; anything else counts
under `OTHER_TASK`, so totals stay exact. `method` is a method the server implements.

Three of them are what the Kubernetes Gateway API Inference Extension's endpoint picker reads
from a model server (its model-server protocol; deploy/gateway/ configures it for us):
`ticketserve_queue_depth` (queued requests), `ticketserve_requests_running` (requests in the
forward pass) and `ticketserve_task_residency_info` — the resident tasks in the shape of vLLM's
`vllm:lora_requests_info`, so that the picker's adapter affinity sends a task's requests to the
replicas that hold it."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
OTHER_TASK = "_other"  # requests naming no task this server knows, or beyond the per-task series
RESIDENCY = "ticketserve_task_residency_info"


@dataclass(frozen=True)
class Residency:
    """What the task cache holds, as the endpoint picker reads it."""

    resident: list[str]  # task names with a resident version
    loading: list[str]  # task names whose load is under way (for a request)
    slots: int  # tasks of the resident ones' mean size the budget holds
    changed: float  # when either list last changed (Unix time)


class ResidencyCollector:
    """`ticketserve_task_residency_info`, read from the cache at each scrape: one series whose
    labels list the tasks (`running_lora_adapters`, `waiting_lora_adapters`, comma-separated)
    and the cache's slots (`max_lora`), valued at when the lists last changed — the picker takes
    the series with the highest value."""

    def __init__(self, residency: Callable[[], Residency]):
        self.residency = residency

    def describe(self):  # the registry asks at registration: no scrape before the cache exists
        return [GaugeMetricFamily(RESIDENCY, self.documentation, labels=self.labels)]

    documentation = ("Resident tasks in the shape of vLLM's lora_requests_info (the Gateway API Inference Extension's "
                     "adapter affinity): running_lora_adapters the resident tasks, waiting_lora_adapters those being "
                     "loaded, max_lora how many tasks the cache holds; the value is when they last changed")
    labels = ["running_lora_adapters", "waiting_lora_adapters", "max_lora"]

    def collect(self):
        now = self.residency()
        family = GaugeMetricFamily(RESIDENCY, self.documentation, labels=self.labels)
        family.add_metric([",".join(now.resident), ",".join(now.loading), str(now.slots)], now.changed)
        yield family


class Metrics:
    def __init__(self, cache_budget_bytes: int = 0, task_series: int = 100) -> None:
        self.registry = CollectorRegistry()
        self.task_series = task_series
        self._labelled: set[str] = set()  # the task names with their own series (kept for the process's life)
        self._labelling = threading.Lock()
        self.started = time.time()
        r = self.registry
        self.requests = Counter("ticketserve_requests", "Predict requests by task and status code", ["task", "code"], registry=r)
        self.responses = Counter("ticketserve_responses", "Answers of every RPC by method and status code",
                                 ["method", "code"], registry=r)
        self.unexpected_errors = Counter("ticketserve_unexpected_errors", "RPCs that failed on an unexpected "
                                         "exception (logged with traceback and request id)", ["method"], registry=r)
        self.examples = Counter("ticketserve_examples", "Examples predicted by task", ["task"], registry=r)
        self.latency = Histogram("ticketserve_request_seconds", "Predict latency by task", ["task"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("ticketserve_batch_size", "Examples per forward pass",
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=r)
        self.batch_tasks = Histogram("ticketserve_batch_tasks", "Distinct tasks per forward pass",
                                     buckets=(1, 2, 4, 8, 16, 32, 64), registry=r)
        self.batch_seconds = Histogram("ticketserve_batch_seconds", "Forward pass time", buckets=LATENCY_BUCKETS, registry=r)
        self.queue_depth = Gauge("ticketserve_queue_depth", "Requests waiting for a batch", registry=r)
        self.requests_running = Gauge("ticketserve_requests_running", "Requests in the forward pass now", registry=r)
        self.in_flight = Gauge("ticketserve_requests_in_flight", "Requests to our services being served (what a "
                               "drain waits for)", registry=r)
        self.cache_events = Counter("ticketserve_task_cache", "Task cache events: hit and miss per "
                                    "request (one that waits for another's load of its task is a miss), load per "
                                    "task loaded, eviction", ["event"], registry=r)
        self.resident_bytes = Gauge("ticketserve_resident_bytes", "Bytes of resident task artifacts", registry=r)
        self.resident_tasks = Gauge("ticketserve_resident_tasks", "Resident task versions", registry=r)
        self.cache_budget = Gauge("ticketserve_cache_budget_bytes", "The task cache's budget (--cache-bytes)", registry=r)
        self.over_budget = Gauge("ticketserve_cache_over_budget_bytes", "Resident bytes above the budget: every "
                                 "resident task is in use, so none could be evicted", registry=r)
        self.task_bytes = Gauge("ticketserve_task_resident_bytes", "Resident bytes per task version",
                                ["task", "version"], registry=r)
        self.residency = ResidencyCollector(lambda: Residency([], [], 0, self.started))
        r.register(self.residency)
        self.cache_budget_bytes = cache_budget_bytes
        self.cache_budget.set(cache_budget_bytes)

    def task(self, name: str | None) -> str:
        """The `task` label for a resolved artifact name (None: nothing resolved): its own while
        fewer than `task_series` names have one, else OTHER_TASK. A name keeps its label once
        given, so no counter ever moves between series."""
        if name is None:
            return OTHER_TASK
        if name not in self._labelled:
            with self._labelling:
                if len(self._labelled) >= self.task_series:
                    return OTHER_TASK
                self._labelled.add(name)
        return name

    # engine observer
    def batch(self, size: int, tasks: int, seconds: float) -> None:
        self.batch_size.observe(size)
        self.batch_tasks.observe(tasks)
        self.batch_seconds.observe(seconds)

    def queue(self, depth: int) -> None:
        self.queue_depth.set(depth)

    def running(self, requests: int) -> None:
        self.requests_running.set(requests)

    def watch_residency(self, residency: Callable[[], Residency]) -> None:
        """Read the residency gauge from `residency` (the task cache's) at each scrape."""
        self.residency.residency = residency

    # loader observer
    def cache(self, event: str) -> None:
        self.cache_events.labels(event).inc()

    def resident(self, size: int, count: int) -> None:
        self.resident_bytes.set(size)
        self.resident_tasks.set(count)
        self.over_budget.set(max(0, size - self.cache_budget_bytes))

    def task_resident(self, handle, resident: bool) -> None:
        if (self.task(handle.version.name) if resident else handle.version.name) not in self._labelled:
            return  # beyond the per-task series: ticketserve_resident_bytes counts it
        labels = (handle.version.name, str(handle.version.version))
        if resident:
            self.task_bytes.labels(*labels).set(handle.bytes)
        else:
            try:
                self.task_bytes.remove(*labels)
            except KeyError:
                pass

    def serve(self, port: int, host: str = "127.0.0.1") -> int:
        server, _ = start_http_server(port, addr=host, registry=self.registry)
        return server.server_port
