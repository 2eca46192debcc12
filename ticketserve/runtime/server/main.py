"""Assemble and run the server: backbone once, registry watch, engine, gRPC services (ours and
the Open Inference Protocol's), HTTP (v2 REST and the JSON API), health, reflection, auth, TLS,
metrics and a graceful drain of every port on SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Literal

import grpc
import uvicorn
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection
from pydantic import BaseModel, ConfigDict, Field, field_validator

from ticketserve.core.backbone import dtype_named, load_backbone
from ticketserve.core.errors import InvalidArgument, TicketserveError
from ticketserve.openinference import rpc as openinference_rpc
from ticketserve.registry import open_store
from ticketserve.runtime.backends import backends
from ticketserve.runtime.engine import Engine, EngineConfig
from ticketserve.runtime.executor import Runtime
from ticketserve.runtime.server import about
from ticketserve.runtime.server.admission import Admission
from ticketserve.runtime.server.auth import TokenAuth, Tokens, read_token
from ticketserve.runtime.server.http import build_app
from ticketserve.runtime.server.http_door import DeadlineH11
from ticketserve.runtime.server.limits import limit_loop_errors, raise_descriptor_limit
from ticketserve.runtime.server.loader import TaskLoader
from ticketserve.runtime.server.malformed import RejectMalformed
from ticketserve.runtime.server.memory import TRIM_SECONDS, Trimmer, tune_malloc
from ticketserve.runtime.server.metrics import Metrics
from ticketserve.runtime.server.observe import Observe
from ticketserve.runtime.server.openinference import OpenInference
from ticketserve.runtime.server.openinference_grpc import SERVICE as OPEN_INFERENCE
from ticketserve.runtime.server.openinference_grpc import OpenInferenceService
from ticketserve.runtime.server.predictor import Ask, Predictor
from ticketserve.runtime.server.service import InferenceService, InfoService, TasksService
from ticketserve.v1 import pb, rpc

log = logging.getLogger("ticketserve.runtime.server")
SERVICES = ("ticketserve.v1.Inference", "ticketserve.v1.Tasks", "ticketserve.v1.Info")


class ServeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    host: str = "127.0.0.1"
    port: int = Field(50051, ge=0, le=65535, description="0 picks a free port")
    registry: str | None = None
    backbone: str | None = None
    device: str | None = None
    backend: str = Field("torch", description="execution of the shared encoder (a registered backend)")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="precision of the shared encoder")
    quantize: Literal["none", "int8"] = Field("none", description="int8: the shared dense products in int8 (CPU)")
    cache_bytes: int = Field(1 << 30, gt=0, description="resident task artifacts, least recently used evicted")
    preload: list[str] = Field(default_factory=list)
    watch_seconds: float = Field(5.0, gt=0, description="how often aliases are re-resolved in the registry")
    engine: EngineConfig = Field(default_factory=EngineConfig)
    max_message_bytes: int = Field(4 << 20, gt=0)

    @field_validator("backend")
    @classmethod
    def _known_backend(cls, value: str) -> str:
        if value not in backends():
            raise ValueError(f"unknown backend {value!r} (one of: {', '.join(backends())})")
        return value
    token_file: str | None = None
    token_env: str | None = None
    admin_token_file: str | None = None
    admin_token_env: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    http_port: int | None = Field(None, ge=0, le=65535, description="HTTP: the Open Inference Protocol's REST API "
                                  "(/v2) and the JSON API (/v1); 0 picks a free port")
    metrics_port: int | None = Field(None, ge=0, le=65535, description="Prometheus endpoint; 0 picks a free port")
    metrics_task_series: int = Field(100, ge=0, description="tasks with their own series in the per-task metrics: the "
                                     "first this many the server loads or serves; the rest count under task=\"_other\"")
    http_request_seconds: float = Field(30.0, gt=0, description="HTTP: a request's head and body must arrive within "
                                        "this, or 408 and the connection closes")
    http_max_connections: int = Field(4096, gt=0, description="HTTP: open connections (and requests) at once; past "
                                      "it new requests get 503")
    drain_seconds: float = Field(30.0, ge=0, description="on SIGTERM, how long requests in flight may take")


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message (+ exception)."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {"time": self.formatTime(record), "level": record.levelname, "logger": record.name,
                 "message": record.getMessage()}
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def configure_logging(level: int = logging.INFO) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger("ticketserve")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False


class Server:
    """A running server; `start()` inside an event loop, `stop()` drains and shuts down."""

    def __init__(self, config: ServeConfig):
        self.config = config
        self.metrics = Metrics(config.cache_bytes, config.metrics_task_series)
        self.store = open_store(config.registry)
        backbone = load_backbone(config.backbone, self.store)
        self.runtime = Runtime(backbone, device=config.device, dtype=dtype_named(config.dtype), quantize=config.quantize,
                               backend=config.backend)
        self.engine = Engine(self.runtime, config.engine, observer=self.metrics)
        self.loader = TaskLoader(self.store, self.runtime, config.cache_bytes, observer=self.metrics)
        self.metrics.watch_residency(self.loader.residency)
        self.admission = Admission(config.engine.max_queue_size)
        self.predictor = Predictor(self.engine, self.loader, self.metrics, self.admission)
        self.protocol = OpenInference(self.predictor, self.loader, self.store, self.admission)
        self.observe = Observe(self.metrics)
        self.health = health_aio.HealthServicer()
        self.serving = False  # every port open, no drain begun
        self.port = 0
        self.http_port: int | None = None
        self.metrics_port: int | None = None
        self._grpc: grpc.aio.Server | None = None
        self._http: _Uvicorn | None = None
        self._http_task: asyncio.Task | None = None
        self._watch: asyncio.Task | None = None
        self._trim: asyncio.Task | None = None

    async def start(self) -> None:
        c = self.config
        limit_loop_errors(asyncio.get_running_loop())
        for ref in c.preload:  # a task the operator requires: failing to load it fails the start
            ask = Ask.parse(ref)
            try:
                handle = self.loader.preload(ask.task, ask.version, pin=True)
                await asyncio.to_thread(self._warm_up, handle.loaded)
            except TicketserveError as exc:
                raise type(exc)(f"--preload {ref}: {exc}") from None
        tokens = Tokens(read_token(c.token_file, c.token_env), read_token(c.admin_token_file, c.admin_token_env))
        options = [("grpc.max_receive_message_length", c.max_message_bytes),
                   ("grpc.max_send_message_length", c.max_message_bytes)]
        auth = [TokenAuth(tokens)] if tokens.enabled else []
        self._grpc = grpc.aio.server(options=options, interceptors=[self.observe, *auth, RejectMalformed()])
        rpc.add_InferenceServicer_to_server(InferenceService(self.predictor), self._grpc)
        rpc.add_TasksServicer_to_server(TasksService(self.loader, self.admission), self._grpc)
        rpc.add_InfoServicer_to_server(InfoService(self.engine, self.store.url, c.max_message_bytes), self._grpc)
        openinference_rpc.add_GRPCInferenceServiceServicer_to_server(
            OpenInferenceService(self.protocol, lambda: self.serving), self._grpc)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._grpc)
        names = [pb.DESCRIPTOR.services_by_name[s.split(".")[-1]].full_name for s in SERVICES]
        reflection.enable_server_reflection([*names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                                             reflection.SERVICE_NAME], self._grpc)
        address = f"{c.host}:{c.port}"
        if c.tls_cert and c.tls_key:
            credentials = grpc.ssl_server_credentials([(Path(c.tls_key).read_bytes(), Path(c.tls_cert).read_bytes())])
            self.port = self._grpc.add_secure_port(address, credentials)
        else:
            self.port = self._grpc.add_insecure_port(address)
        if c.http_port is not None:  # before gRPC: a client that reaches gRPC can reach HTTP
            await self._start_http(tokens)
        await self._grpc.start()
        if c.metrics_port is not None:
            self.metrics_port = self.metrics.serve(c.metrics_port, c.host)
        for service in ("", *SERVICES, OPEN_INFERENCE):
            await self.health.set(service, health_pb2.HealthCheckResponse.SERVING)
        self.serving = True
        self._watch = asyncio.create_task(self._watch_registry())
        self._trim = asyncio.create_task(self._trim_memory())
        log.info("serving %s on %s:%d%s (backbone %s, registry %s)", ", ".join([*SERVICES, OPEN_INFERENCE]), c.host,
                 self.port, f", HTTP (/v2, /v1) on {c.host}:{self.http_port}" if self.http_port else "",
                 self.runtime.backbone.name, self.store.url)

    async def _start_http(self, tokens: Tokens) -> None:
        c = self.config
        app = build_app(self.predictor, self.protocol, tokens, self.observe,
                        lambda: about.server_info(self.engine, self.store.url, c.max_message_bytes),
                        lambda: self.serving, c.max_message_bytes)
        tls = {"ssl_certfile": c.tls_cert, "ssl_keyfile": c.tls_key} if c.tls_cert and c.tls_key else {}
        self._http = _Uvicorn(uvicorn.Config(app, host=c.host, port=c.http_port, log_config=None, access_log=False,
                                             lifespan="off", timeout_graceful_shutdown=5,
                                             http=DeadlineH11.with_deadline(c.http_request_seconds),
                                             limit_concurrency=c.http_max_connections, **tls))
        self._http_task = asyncio.create_task(self._http.serve())
        while not self._http.started:
            if self._http_task.done():  # uvicorn logged why (the port is taken, say) and gave up
                raise InvalidArgument(f"--http-port {c.http_port}: cannot listen on {c.host}:{c.http_port}")
            await asyncio.sleep(0.01)
        self.http_port = self._http.servers[0].sockets[0].getsockname()[1]

    def _warm_up(self, task) -> None:
        """One forward pass of a preloaded task before the port opens: lazily built state (the
        kind's tables, allocator pools, kernels) exists before the first request needs it."""
        pairs = ["warm-up"] if task.spec.takes_pairs else None
        started = time.perf_counter()
        self.engine.submit(task, ["warm-up"], pairs).result(timeout=300)
        log.info("warmed %s up in %.1f ms", task.name, (time.perf_counter() - started) * 1000)

    async def _trim_memory(self) -> None:
        """Free heap pages back to the system when that gives something back (runtime/server/memory.py)."""
        trimmer = Trimmer()
        while await asyncio.sleep(TRIM_SECONDS, True):
            await self.admission.run(self.admission.loading, trimmer)

    async def _watch_registry(self) -> None:
        while True:
            await asyncio.sleep(self.config.watch_seconds)
            try:
                await self.admission.run(self.admission.loading, self.loader.refresh)
            except Exception:  # the watch must outlive any one bad poll
                log.exception("registry watch failed")

    async def drain(self) -> bool:
        """Graceful drain, bounded by `drain_seconds`: health says NOT_SERVING, new requests are
        answered UNAVAILABLE (clients retry elsewhere), requests in flight are served. True
        when every one was."""
        started = time.monotonic()
        self.serving = False
        self.observe.draining = self.admission.draining = True
        for task in (self._watch, self._trim):
            if task:
                task.cancel()
        await self.health.enter_graceful_shutdown()
        drained = await self.observe.wait_idle(self.config.drain_seconds)
        log.info("drained: %s in %.2f s", "all requests served" if drained else
                 f"timed out with {self.observe.in_flight} requests in flight", time.monotonic() - started)
        return drained

    async def stop(self) -> None:
        """Drain, then stop gRPC (what still runs is cancelled) and the engine."""
        await self.drain()
        if self._http_task:
            self._http.should_exit = True
            with contextlib.suppress(BaseException):
                await self._http_task
        if self._grpc:
            await self._grpc.stop(grace=0.5)
        await asyncio.to_thread(self.engine.close)
        self.admission.close()

    async def wait(self) -> None:
        await self._grpc.wait_for_termination()


class _Uvicorn(uvicorn.Server):
    """uvicorn on the server's event loop, without signal handlers of its own: the process's
    SIGTERM handler drains every port."""

    @contextlib.contextmanager
    def capture_signals(self):
        yield


async def _serve(config: ServeConfig) -> None:
    server = Server(config)
    await server.start()
    # What exists now (backbone, libraries: ~400k objects) lives as long as the process: keep it
    # out of the cycle collector. Full collections then take microseconds instead of ~0.2 s and
    # run often enough that the cycles every aborted RPC leaves (gRPC keeps the abort exception,
    # whose traceback holds the call's frames) never pile up into hundreds of MB.
    gc.collect()
    gc.freeze()
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    await stopping.wait()
    log.info("signal received: draining")
    await server.drain()
    # End the process here, loop running: gRPC's own stop answers calls still queued inside
    # its core CANCELLED (grpc/grpc#41785), and so does cancelling their tasks when the loop
    # closes; a closed connection is UNAVAILABLE to every client, which retries elsewhere.
    logging.shutdown()
    os._exit(0)


def serve(config: ServeConfig) -> None:
    """Run until SIGTERM/SIGINT, drain (bounded by `drain_seconds`), exit."""
    configure_logging()
    tune_malloc()  # before the backbone and the server's threads allocate
    raise_descriptor_limit(2 * config.http_max_connections + 1024)  # HTTP's cap, as many on gRPC, the rest
    asyncio.run(_serve(config))


class BackgroundServer:
    """A server on its own event-loop thread (tests, benchmarks, embedding in a program)."""

    def __init__(self, config: ServeConfig):
        self.config = config
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="ticketserve-server", daemon=True)
        self.server: Server | None = None

    def __enter__(self) -> Server:
        self.thread.start()
        self.server = asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(timeout=300)
        return self.server

    async def _start(self) -> Server:
        server = Server(self.config)
        await server.start()
        return server

    def __exit__(self, *exc) -> None:
        asyncio.run_coroutine_threadsafe(self.server.stop(), self.loop).result(timeout=120)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=30)
