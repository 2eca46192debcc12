"""The gRPC servicers: translate protos to engine/loader calls and errors to status codes.
No batching, loading or model logic lives here."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import grpc

from ticketserve.core.errors import InvalidArgument
from ticketserve.core.tagging import check_aggregation
from ticketserve.registry import Reference
from ticketserve.runtime.engine import Engine
from ticketserve.runtime.server import about, routing
from ticketserve.runtime.server.admission import Admission
from ticketserve.runtime.server.loader import TaskLoader
from ticketserve.runtime.server.predictor import Ask, Predictor
from ticketserve.runtime.server.status import statuses
from ticketserve.v1 import pb, rpc


def _version(request) -> str | None:
    return request.version if request.HasField("version") and request.version else None


def _task(info: about.TaskInfo) -> pb.TaskInfo:
    return pb.TaskInfo(**(info.model_dump() | {"state": pb.TaskState.Value(f"TASK_STATE_{info.state}")}))


class InferenceService(rpc.InferenceServicer):
    def __init__(self, predictor: Predictor):
        self.predictor = predictor

    async def _answer(self, request: pb.PredictRequest, context: grpc.aio.ServicerContext) -> pb.PredictResponse:
        remaining = context.time_remaining()
        deadline = time.monotonic() + remaining if remaining is not None else None
        texts = [i.text for i in request.inputs]
        pairs = [i.text_pair if i.HasField("text_pair") else None for i in request.inputs]
        aggregation = check_aggregation(request.aggregation if request.HasField("aggregation") else None)
        answer = await self.predictor.predict(Ask(request.task, _version(request)), texts, pairs, deadline)
        found = answer.entities(texts, aggregation)
        return pb.PredictResponse(
            predictions=[pb.Prediction(label=p.label or "", score=p.score, probabilities=p.probabilities,
                                       embedding=p.embedding or (),
                                       entities=[pb.Entity(**vars(e)) for e in entities],
                                       tokens=[pb.TokenLabel(label=t.label, score=t.score, start=t.start, end=t.end)
                                               for t in (p.tokens or []) if request.return_tokens],
                                       **({"value": p.score} if answer.type == "regression" else {}))
                         for p, entities in zip(answer.predictions, found)],
            artifact=str(answer.version), digest=answer.version.digest,
            metadata=pb.Metadata(queue_time_us=answer.queue_time_us, inference_time_us=answer.inference_time_us,
                                 batch_size=answer.batch_size, batch_tasks=answer.batch_tasks))

    @statuses
    async def Predict(self, request, context):
        return await self._answer(request, context)

    @statuses
    async def PredictStream(self, request_iterator, context) -> AsyncIterator[pb.PredictResponse]:
        async for request in request_iterator:
            yield await self._answer(request, context)


class TasksService(rpc.TasksServicer):
    def __init__(self, loader: TaskLoader, admission: Admission):
        self.loader, self.admission = loader, admission

    async def _blocking(self, call, *args):
        return await self.admission.run(self.admission.loading, call, *args)

    @statuses
    async def ListTasks(self, request, context):
        rows = await about.tasks(self.loader, self.admission, request.include_registry)
        return pb.ListTasksResponse(tasks=[_task(row) for row in rows])

    @statuses
    async def GetTask(self, request, context):
        routing.check([request.task])
        store = self.loader.store
        ref = Reference.of(request.task, _version(request))
        version = await self._blocking(store.resolve, ref)
        manifest = await self._blocking(store.manifest, version)
        rows, errored = self.loader.describe()
        resident = {str(r.version): r.bytes for r in rows}
        state = about.READY if str(version) in resident else about.AVAILABLE
        error = self.loader.failed().get(str(version)) or next(
            (e for a, e in errored.items() if a.name == request.task), "")
        if error and state != about.READY:
            state = about.ERRORED
        return pb.GetTaskResponse(task=_task(about.task_info(str(version), version.digest, manifest, state,
                                                             resident.get(str(version), 0), error)),
                                  manifest_json=manifest.model_dump_json())

    @statuses
    async def LoadTask(self, request, context):
        if not request.task:
            raise InvalidArgument("task is required")
        routing.check([request.task])
        handle = await self._blocking(self.loader.preload, request.task, _version(request))
        return pb.LoadTaskResponse(task=_task(about.task_info(handle.key, handle.version.digest, handle.loaded.manifest,
                                                              about.READY, handle.bytes)))

    @statuses
    async def UnloadTask(self, request, context):
        if not request.task:
            raise InvalidArgument("task is required")
        routing.check([request.task])
        unloaded = await self._blocking(self.loader.unload, request.task)
        return pb.UnloadTaskResponse(unloaded=unloaded)


class InfoService(rpc.InfoServicer):
    def __init__(self, engine: Engine, registry_url: str, max_message_bytes: int):
        self.engine, self.registry_url, self.max_message_bytes = engine, registry_url, max_message_bytes

    async def ServerInfo(self, request, context):
        info = about.server_info(self.engine, self.registry_url, self.max_message_bytes)
        return pb.ServerInfoResponse(**(info.model_dump() | {"limits": pb.Limits(**info.limits.model_dump())}))
