"""The gRPC servicers: translate protos to engine/loader calls and errors to status codes.
No batching, loading or model logic lives here."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import grpc

from ticketserve import __version__
from ticketserve.core.errors import InvalidArgument, TicketserveError
from ticketserve.registry import Reference
from ticketserve.runtime.engine import Engine, Result
from ticketserve.runtime.server.admission import Admission
from ticketserve.runtime.server.catalog import offers
from ticketserve.runtime.server.loader import TaskLoader
from ticketserve.runtime.server.metrics import OTHER_TASK, Metrics
from ticketserve.runtime.server.status import abort
from ticketserve.runtime.status import status_of
from ticketserve.v1 import pb, rpc


def _version(request) -> str | None:
    return request.version if request.HasField("version") and request.version else None


def _task_info(artifact: str, digest: str, manifest, state, resident_bytes: int = 0, error: str = "") -> pb.TaskInfo:
    if manifest is None:  # a registry entry that cannot be read
        return pb.TaskInfo(name=artifact.split(":")[0], artifact=artifact, state=state, error=error)
    return pb.TaskInfo(name=manifest.name, artifact=artifact, digest=digest, kind=manifest.kind, method=manifest.method,
                       task=manifest.task.name, labels=manifest.task.labels, state=state,
                       resident_bytes=resident_bytes, error=error)


class InferenceService(rpc.InferenceServicer):
    def __init__(self, engine: Engine, loader: TaskLoader, metrics: Metrics, admission: Admission):
        self.engine, self.loader, self.metrics, self.admission = engine, loader, metrics, admission

    async def _predict(self, request: pb.PredictRequest, context: grpc.aio.ServicerContext) -> pb.PredictResponse:
        started = time.perf_counter()
        if not request.task:
            raise InvalidArgument("task is required")
        handle = None
        try:
            with self.admission as admission:
                handle = await admission.run(admission.loading, self.loader.acquire, request.task, _version(request))
                remaining = context.time_remaining()
                deadline = time.monotonic() + remaining if remaining is not None else None
                texts = [i.text for i in request.inputs]
                pairs = [i.text_pair if i.HasField("text_pair") else None for i in request.inputs]
                future = await admission.run(admission.tokenizing, self.engine.submit, handle.loaded, texts, pairs, deadline)
            try:
                result: Result = await asyncio.wrap_future(future)
            except asyncio.CancelledError:
                future.cancel()  # a cancelled RPC never costs a forward pass
                raise
        finally:
            if handle is not None:
                self.loader.release(handle)
        task = handle.version.name
        self.metrics.latency.labels(task).observe(time.perf_counter() - started)
        self.metrics.examples.labels(task).inc(len(texts))
        return pb.PredictResponse(
            predictions=[pb.Prediction(label=p.label or "", score=p.score, probabilities=p.probabilities,
                                       **({"value": p.score} if p.label is None else {})) for p in result.predictions],
            artifact=handle.key, digest=handle.version.digest,
            metadata=pb.Metadata(queue_time_us=int(result.queue_seconds * 1e6),
                                 inference_time_us=int(result.inference_seconds * 1e6),
                                 batch_size=result.batch_size, batch_tasks=result.batch_tasks))

    async def _answer(self, request, context) -> pb.PredictResponse:
        """Predict, count the outcome by task and status. A request that resolved names its
        task; a failed one is counted under its name only if that name is resident here."""
        try:
            response = await self._predict(request, context)
        except TicketserveError as exc:
            task = request.task if self.loader.serves(request.task) else OTHER_TASK
            self.metrics.requests.labels(task, status_of(exc).name).inc()
            await abort(context, exc)
        self.metrics.requests.labels(request.task, "OK").inc()
        return response

    async def Predict(self, request, context):
        return await self._answer(request, context)

    async def PredictStream(self, request_iterator, context) -> AsyncIterator[pb.PredictResponse]:
        async for request in request_iterator:
            yield await self._answer(request, context)


class TasksService(rpc.TasksServicer):
    def __init__(self, loader: TaskLoader, admission: Admission):
        self.loader, self.admission = loader, admission

    async def _blocking(self, call, *args):
        return await self.admission.run(self.admission.loading, call, *args)

    async def ListTasks(self, request, context):
        rows, errored = self.loader.describe()
        tasks = [_task_info(r["artifact"], r["digest"], r["manifest"], pb.TASK_STATE_READY, r["bytes"],
                            errored.get(r["alias"] or "", "")) for r in rows]
        if request.include_registry:
            loaded = {r["artifact"] for r in rows}
            try:
                found = await self._blocking(offers, self.loader.store, self.loader.runtime.backbone, self.loader.failed())
            except TicketserveError as exc:
                await abort(context, exc)
            tasks += [_task_info(o.artifact, o.digest, o.manifest,
                                 pb.TASK_STATE_ERRORED if o.error else pb.TASK_STATE_AVAILABLE, error=o.error)
                      for o in found if o.artifact not in loaded]
        return pb.ListTasksResponse(tasks=tasks)

    async def GetTask(self, request, context):
        store = self.loader.store
        try:
            ref = Reference.of(request.task, _version(request))
            version = await self._blocking(store.resolve, ref)
            manifest = await self._blocking(store.manifest, version)
        except TicketserveError as exc:
            await abort(context, exc)
        rows, errored = self.loader.describe()
        resident = {r["artifact"]: r["bytes"] for r in rows}
        state = pb.TASK_STATE_READY if str(version) in resident else pb.TASK_STATE_AVAILABLE
        error = self.loader.failed().get(str(version)) or next(
            (e for a, e in errored.items() if a.split(":")[0] == request.task), "")
        if error and state != pb.TASK_STATE_READY:
            state = pb.TASK_STATE_ERRORED
        return pb.GetTaskResponse(task=_task_info(str(version), version.digest, manifest, state,
                                                  resident.get(str(version), 0), error),
                                  manifest_json=manifest.model_dump_json())

    async def LoadTask(self, request, context):
        try:
            if not request.task:
                raise InvalidArgument("task is required")
            handle = await self._blocking(self.loader.preload, request.task, _version(request))
        except TicketserveError as exc:
            await abort(context, exc)
        return pb.LoadTaskResponse(task=_task_info(handle.key, handle.version.digest, handle.loaded.manifest,
                                                   pb.TASK_STATE_READY, handle.bytes))

    async def UnloadTask(self, request, context):
        try:
            if not request.task:
                raise InvalidArgument("task is required")
            unloaded = await self._blocking(self.loader.unload, request.task)
        except TicketserveError as exc:
            await abort(context, exc)
        return pb.UnloadTaskResponse(unloaded=unloaded)


class InfoService(rpc.InfoServicer):
    def __init__(self, engine: Engine, registry_url: str, max_message_bytes: int):
        self.engine, self.registry_url, self.max_message_bytes = engine, registry_url, max_message_bytes

    async def ServerInfo(self, request, context):
        backbone, config = self.engine.runtime.backbone, self.engine.config
        return pb.ServerInfoResponse(
            version=__version__, backbone=backbone.name, fingerprint=backbone.fingerprint,
            model_type=backbone.config.model_type, device=str(self.engine.runtime.device), registry=self.registry_url,
            limits=pb.Limits(max_texts_per_request=config.max_texts_per_request, max_tokens_per_text=self.engine.max_tokens,
                             truncate=config.truncate, max_batch_size=config.max_batch_size,
                             max_batch_tokens=config.max_batch_tokens, max_queue_size=config.max_queue_size,
                             max_message_bytes=self.max_message_bytes, max_text_bytes=config.max_text_bytes))
