"""The gRPC servicers: translate protos to engine/loader calls and errors to status codes.
No batching, loading or model logic lives here."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator

import grpc

from ticketserve import __version__
from ticketserve.engine import Engine, Result
from ticketserve.errors import InvalidArgument, TicketserveError
from ticketserve.server.loader import TaskLoader
from ticketserve.server.metrics import Metrics
from ticketserve.server.status import status_of
from ticketserve.v1 import pb, rpc

log = logging.getLogger("ticketserve.server")


async def _abort(context: grpc.aio.ServicerContext, exc: TicketserveError) -> None:
    await context.abort(status_of(exc), str(exc))


def _version(request) -> str | None:
    return request.version if request.HasField("version") and request.version else None


def _task_info(manifest, artifact: str, digest: str, state, resident_bytes: int = 0, error: str = "") -> pb.TaskInfo:
    return pb.TaskInfo(name=manifest.name, artifact=artifact, digest=digest, kind=manifest.kind, method=manifest.method,
                       task=manifest.task.name, labels=manifest.task.labels, state=state,
                       resident_bytes=resident_bytes, error=error)


class InferenceService(rpc.InferenceServicer):
    def __init__(self, engine: Engine, loader: TaskLoader, metrics: Metrics):
        self.engine, self.loader, self.metrics = engine, loader, metrics

    async def _predict(self, request: pb.PredictRequest, context: grpc.aio.ServicerContext) -> pb.PredictResponse:
        started = time.perf_counter()
        loop = asyncio.get_running_loop()
        if not request.task:
            raise InvalidArgument("task is required")
        handle = await loop.run_in_executor(None, self.loader.acquire, request.task, _version(request))
        try:
            remaining = context.time_remaining()
            deadline = time.monotonic() + remaining if remaining is not None else None
            texts = [i.text for i in request.inputs]
            pairs = [i.text_pair if i.HasField("text_pair") else None for i in request.inputs]
            future = await loop.run_in_executor(None, self.engine.submit, handle.key, texts, pairs, deadline)
            try:
                result: Result = await asyncio.wrap_future(future)
            except asyncio.CancelledError:
                future.cancel()  # a cancelled RPC never costs a forward pass
                raise
        finally:
            self.loader.release(handle)
        self.metrics.latency.labels(request.task).observe(time.perf_counter() - started)
        self.metrics.examples.labels(request.task).inc(len(texts))
        return pb.PredictResponse(
            predictions=[pb.Prediction(label=p.label or "", score=p.score, probabilities=p.probabilities,
                                       **({"value": p.score} if p.label is None else {})) for p in result.predictions],
            artifact=handle.key, digest=handle.version.digest,
            metadata=pb.Metadata(queue_time_us=int(result.queue_seconds * 1e6),
                                 inference_time_us=int(result.inference_seconds * 1e6),
                                 batch_size=result.batch_size, batch_tasks=result.batch_tasks))

    async def _answer(self, request, context) -> pb.PredictResponse:
        """Predict, count the outcome by status code, turn errors into their status."""
        try:
            response = await self._predict(request, context)
        except TicketserveError as exc:
            self.metrics.requests.labels(request.task, status_of(exc).name).inc()
            await _abort(context, exc)
        self.metrics.requests.labels(request.task, "OK").inc()
        return response

    async def Predict(self, request, context):
        return await self._answer(request, context)

    async def PredictStream(self, request_iterator, context) -> AsyncIterator[pb.PredictResponse]:
        async for request in request_iterator:
            yield await self._answer(request, context)


class TasksService(rpc.TasksServicer):
    def __init__(self, loader: TaskLoader):
        self.loader = loader

    async def ListTasks(self, request, context):
        rows, errored = self.loader.describe()
        tasks = [_task_info(r["manifest"], r["artifact"], r["digest"], pb.TASK_STATE_READY, r["bytes"],
                            errored.get(r["alias"] or "", "")) for r in rows]
        if request.include_registry:
            store = self.loader.store
            loaded = {r["artifact"] for r in rows}
            try:
                for name in await asyncio.get_running_loop().run_in_executor(None, store.names):
                    latest = store.resolve(name)
                    if str(latest) not in loaded and store.manifest(latest).kind != "ticket":
                        tasks.append(_task_info(store.manifest(latest), str(latest), latest.digest,
                                                pb.TASK_STATE_AVAILABLE, error=errored.get(f"{name}:latest", "")))
            except TicketserveError as exc:
                await _abort(context, exc)
        return pb.ListTasksResponse(tasks=tasks)

    async def GetTask(self, request, context):
        try:
            store = self.loader.store
            ref = f"{request.task}:{_version(request)}" if _version(request) else request.task
            version = await asyncio.get_running_loop().run_in_executor(None, store.resolve, ref)
            manifest = store.manifest(version)
        except TicketserveError as exc:
            await _abort(context, exc)
        rows, errored = self.loader.describe()
        resident = {r["artifact"]: r["bytes"] for r in rows}
        state = pb.TASK_STATE_READY if str(version) in resident else pb.TASK_STATE_AVAILABLE
        error = next((e for a, e in errored.items() if a.split(":")[0] == request.task), "")
        if error and state != pb.TASK_STATE_READY:
            state = pb.TASK_STATE_ERRORED
        return pb.GetTaskResponse(task=_task_info(manifest, str(version), version.digest, state,
                                                  resident.get(str(version), 0), error),
                                  manifest_json=manifest.model_dump_json())

    async def LoadTask(self, request, context):
        try:
            handle = await asyncio.get_running_loop().run_in_executor(None, self.loader.preload, request.task,
                                                                      _version(request))
        except TicketserveError as exc:
            await _abort(context, exc)
        manifest = handle.loaded.manifest
        return pb.LoadTaskResponse(task=_task_info(manifest, handle.key, handle.version.digest, pb.TASK_STATE_READY,
                                                   handle.bytes))

    async def UnloadTask(self, request, context):
        if not request.task:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "task is required")
        return pb.UnloadTaskResponse(unloaded=self.loader.unload(request.task))


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
                             max_message_bytes=self.max_message_bytes))
