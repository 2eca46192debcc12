"""The request path every protocol shares (our gRPC API, the Open Inference Protocol over gRPC
and REST, the JSON API): admission, the task's resident version, the engine's batch, metrics by
task and outcome. Protocols only translate their messages to these calls and errors to their
status codes, so every door batches, mixes tasks, limits and counts alike."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from ticketserve.core.errors import InvalidArgument, TicketserveError
from ticketserve.core.tagging import Entity, entities
from ticketserve.registry import ArtifactVersion, HeadConfig, Manifest, TaskSpec
from ticketserve.runtime.engine import Engine, Result
from ticketserve.runtime.executor import Prediction
from ticketserve.runtime.server import routing
from ticketserve.runtime.server.admission import Admission
from ticketserve.runtime.server.loader import TaskHandle, TaskLoader
from ticketserve.runtime.server.metrics import Metrics
from ticketserve.runtime.status import status_of


@dataclass(frozen=True)
class Ask:
    """One task asked for: its name and optionally a version number or tag."""

    task: str
    version: str | None = None

    @classmethod
    def parse(cls, text: str) -> Ask:
        """`name` or `name:version` (a number or a tag), as users write a task."""
        name, _, version = text.partition(":")
        return cls(name, version or None)


@dataclass(frozen=True)
class Answer:
    """One task's answer to one request, protocol-neutral: each door converts it once."""

    version: ArtifactVersion  # the exact version that answered
    type: str  # the task's type: classification, regression, embedding, reranking
    labels: list[str]  # the task's labels in order (empty but for classification)
    head: HeadConfig  # how it pools (an embedding's normalisation and declared widths)
    predictions: list[Prediction]
    queue_time_us: int
    inference_time_us: int
    batch_size: int  # examples in the batch that served it (every task)
    batch_tasks: int  # distinct tasks in that batch
    tokens: int  # the request's tokens

    def entities(self, texts: list[str], aggregation: str | None) -> list[list[Entity]]:
        """Each text's entities (token classification; none for other types), grouped by `aggregation`."""
        return [entities(text, p.tokens or [], aggregation) for text, p in zip(texts, self.predictions)]

    @classmethod
    def of(cls, version: ArtifactVersion, manifest: Manifest, result: Result) -> Answer:
        return cls(version, manifest.task.type, list(manifest.task.labels), manifest.head, result.predictions, int(result.queue_seconds * 1e6),
                   int(result.inference_seconds * 1e6), result.batch_size, result.batch_tasks, result.tokens)


class Predictor:
    def __init__(self, engine: Engine, loader: TaskLoader, metrics: Metrics, admission: Admission):
        self.engine, self.loader, self.metrics, self.admission = engine, loader, metrics, admission

    async def predict(self, ask: Ask, texts: list[str], pairs: list[str | None] | None = None,
                      deadline: float | None = None) -> Answer:
        """One task's predictions for `texts` (and their pairs)."""
        return (await self.fan_out([ask], texts, pairs, deadline))[0]

    async def fan_out(self, asks: list[Ask], texts: list[str], pairs: list[str | None] | None = None,
                      deadline: float | None = None) -> list[Answer]:
        """The same texts to several tasks, queued together so that they share one batch when
        they fit. All or nothing: one unknown task or bad input fails the whole call."""
        return await self.predict_each([(ask, texts, pairs) for ask in asks], deadline)

    async def spec_of(self, ask: Ask) -> TaskSpec:
        """The task's spec (loading it, as a request would)."""
        routing.check([ask.task])
        with self.admission as admission:
            handle = await self._acquire(admission, ask)
        self.loader.release(handle)
        return handle.loaded.spec

    async def _acquire(self, admission: Admission, ask: Ask) -> TaskHandle:
        """The task's held handle: at once when resident, else from a loading thread."""
        return (self.loader.acquire_resident(ask.task, ask.version)
                or await admission.run(admission.loading, self.loader.acquire, ask.task, ask.version))

    async def predict_each(self, requests: list[tuple[Ask, list[str], list[str | None] | None]],
                           deadline: float | None = None, types: tuple[str, ...] | None = None) -> list[Answer]:
        """Several (task, texts, pairs) requests queued together — a fan-out, or one long list of
        texts cut into requests the engine takes (the OpenAI and rerank doors) — all or nothing;
        `types`: the task types the caller serves (others are refused before any forward)."""
        asks = [ask for ask, _, _ in requests]
        started = time.perf_counter()
        held: dict[Ask, TaskHandle] = {}  # one version per task asked, however many requests name it
        try:
            try:
                if not asks:
                    raise InvalidArgument("name at least one task")
                if any(not ask.task for ask in asks):
                    raise InvalidArgument("task is required")
                routing.check(ask.task for ask in asks)
                with self.admission as admission:
                    for ask in dict.fromkeys(asks):
                        held[ask] = await self._acquire(admission, ask)
                    handles = [held[ask] for ask in asks]
                    for handle in held.values():
                        if types is not None and handle.loaded.spec.type not in types:
                            raise InvalidArgument(f"{handle.version} is a {handle.loaded.spec.type} task; this API "
                                                  f"serves {' or '.join(types)} tasks")
                    futures = await admission.run(admission.tokenizing, self.engine.submit_all,
                                                  [(h.loaded, texts, pairs) for h, (_, texts, pairs)
                                                   in zip(handles, requests)], deadline)
                try:
                    results: list[Result] = [await asyncio.wrap_future(f) for f in futures]
                except asyncio.CancelledError:
                    for future in futures:
                        future.cancel()  # a cancelled call never costs a forward pass
                    raise
            finally:
                for handle in held.values():
                    self.loader.release(handle)
        except TicketserveError as exc:
            for ask in dict.fromkeys(asks or [Ask("")]):  # one call counts once per task, however it was cut
                task = self.metrics.task(ask.task if self.loader.serves(ask.task) else None)
                self.metrics.requests.labels(task, status_of(exc).name).inc()
            raise
        seconds = time.perf_counter() - started
        for handle in held.values():
            task = self.metrics.task(handle.version.name)
            self.metrics.latency.labels(task).observe(seconds)
            self.metrics.requests.labels(task, "OK").inc()
        for handle, result in zip(handles, results):
            self.metrics.examples.labels(self.metrics.task(handle.version.name)).inc(len(result.predictions))
        return [Answer.of(handle.version, handle.loaded.manifest, result) for handle, result in zip(handles, results)]
