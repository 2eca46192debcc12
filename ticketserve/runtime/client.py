"""Python client for a ticketserve server, sync (`Client`) and asyncio (`AsyncClient`).

Every call that names one task also names it in the `x-ticketserve-task` metadata, which
balancers hash on to send each task's calls to the replica that holds it (docs: scaling out).
Transient UNAVAILABLE errors are retried with exponential backoff by gRPC's own retry policy
(service config), so a rolling restart behind a load balancer is invisible to callers. A call
that fails raises the error class the server answered with (`errors.NotFound`,
`errors.InvalidArgument`, `errors.BackboneMismatch`, `errors.Unavailable`,
`errors.Unauthenticated`, ...), which is also a `grpc.RpcError` with `.code()` and `.details()`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import grpc

from ticketserve.core.errors import (
    BackboneMismatch,
    InvalidArgument,
    NotFound,
    Overloaded,
    PermissionDenied,
    TicketserveError,
    Unauthenticated,
    Unavailable,
)
from ticketserve.runtime.status import RemoteError, from_rpc
from ticketserve.v1 import TASK_HEADER, pb, rpc

__all__ = ["AsyncClient", "BackboneMismatch", "Client", "InvalidArgument", "NotFound", "Overloaded", "PermissionDenied",
           "Prediction", "PredictResult", "TicketserveError", "Unauthenticated", "Unavailable"]

SERVICES = ("ticketserve.v1.Inference", "ticketserve.v1.Tasks", "ticketserve.v1.Info")
ROUTABLE_NAME_CHARS = 512  # a name, tag and digest fit; a longer one is invalid anyway


def _service_config(retries: int) -> str:
    return json.dumps({"methodConfig": [{
        "name": [{"service": s} for s in SERVICES],
        "retryPolicy": {"maxAttempts": max(2, retries + 1), "initialBackoff": "0.1s", "maxBackoff": "2s",
                        "backoffMultiplier": 2, "retryableStatusCodes": ["UNAVAILABLE"]},
    }]})


@dataclass
class Prediction:
    label: str | None
    score: float
    probabilities: dict[str, float]
    embedding: list[float] | None = None

    @classmethod
    def from_proto(cls, p: pb.Prediction) -> Prediction:
        return cls(p.label or None, p.value if p.HasField("value") else p.score, dict(p.probabilities),
                   list(p.embedding) or None)


@dataclass
class PredictResult:
    predictions: list[Prediction]
    artifact: str
    metadata: pb.Metadata


def _request(task: str, texts: list[str], pairs: list[str] | None, version: str | None) -> pb.PredictRequest:
    if pairs is not None and len(pairs) != len(texts):
        raise ValueError(f"{len(texts)} texts but {len(pairs)} text pairs")
    inputs = [pb.TextInput(text=t, **({"text_pair": p} if p is not None else {}))
              for t, p in zip(texts, pairs or [None] * len(texts))]
    return pb.PredictRequest(task=task, inputs=inputs, **({"version": version} if version else {}))


def _result(response: pb.PredictResponse) -> PredictResult:
    return PredictResult([Prediction.from_proto(p) for p in response.predictions], response.artifact, response.metadata)


def _typed(call, *args, **kwargs):
    try:
        return call(*args, **kwargs)
    except RemoteError:
        raise
    except grpc.RpcError as exc:
        raise from_rpc(exc) from None


async def _typed_async(call, *args, **kwargs):
    try:
        return await call(*args, **kwargs)
    except RemoteError:
        raise
    except grpc.RpcError as exc:
        raise from_rpc(exc) from None


class _Base:
    def __init__(self, target: str, token: str | None = None, tls_ca: str | Path | None = None,
                 timeout: float = 30.0, retries: int = 4):
        self.target, self.timeout = target, timeout
        self.metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self.options = [("grpc.enable_retries", 1), ("grpc.service_config", _service_config(retries))]
        self.credentials = (grpc.ssl_channel_credentials(Path(tls_ca).read_bytes() if tls_ca else None)
                            if tls_ca is not None else None)

    def routed(self, task: str) -> tuple[tuple[str, str], ...]:
        """The call's metadata for a call about `task`: the routing header for balancers that hash on it.

        A name no header can carry (control characters, non-ASCII, longer than any valid reference)
        travels in the body alone, so the server answers it with its own INVALID_ARGUMENT rather than
        gRPC refusing the call locally or with a metadata-size error.
        """
        routable = len(task) <= ROUTABLE_NAME_CHARS and task.isascii() and task.isprintable()
        return (*self.metadata, (TASK_HEADER, task)) if routable else self.metadata


class Client(_Base):
    """Blocking client. Use as a context manager or call `close()`."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.channel = (grpc.secure_channel(self.target, self.credentials, self.options) if self.credentials
                        else grpc.insecure_channel(self.target, self.options))
        self.inference, self.tasks, self.info = (rpc.InferenceStub(self.channel), rpc.TasksStub(self.channel),
                                                 rpc.InfoStub(self.channel))

    def predict(self, task: str, texts: list[str], pairs: list[str] | None = None, version: str | None = None) -> PredictResult:
        return _result(_typed(self.inference.Predict, _request(task, texts, pairs, version), timeout=self.timeout,
                              metadata=self.routed(task)))

    def list_tasks(self, include_registry: bool = False) -> list[pb.TaskInfo]:
        return list(_typed(self.tasks.ListTasks, pb.ListTasksRequest(include_registry=include_registry),
                           timeout=self.timeout, metadata=self.metadata).tasks)

    def get_task(self, task: str, version: str | None = None) -> pb.GetTaskResponse:
        return _typed(self.tasks.GetTask, pb.GetTaskRequest(task=task, **({"version": version} if version else {})),
                      timeout=self.timeout, metadata=self.routed(task))

    def load_task(self, task: str, version: str | None = None) -> pb.TaskInfo:
        return _typed(self.tasks.LoadTask, pb.LoadTaskRequest(task=task, **({"version": version} if version else {})),
                      timeout=self.timeout, metadata=self.routed(task)).task

    def unload_task(self, task: str) -> bool:
        return _typed(self.tasks.UnloadTask, pb.UnloadTaskRequest(task=task), timeout=self.timeout,
                      metadata=self.routed(task)).unloaded

    def server_info(self) -> pb.ServerInfoResponse:
        return _typed(self.info.ServerInfo, pb.ServerInfoRequest(), timeout=self.timeout, metadata=self.metadata)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AsyncClient(_Base):
    """asyncio client (grpc.aio). Use as an async context manager or await `close()`."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.channel = (grpc.aio.secure_channel(self.target, self.credentials, self.options) if self.credentials
                        else grpc.aio.insecure_channel(self.target, self.options))
        self.inference, self.tasks, self.info = (rpc.InferenceStub(self.channel), rpc.TasksStub(self.channel),
                                                 rpc.InfoStub(self.channel))

    async def predict(self, task: str, texts: list[str], pairs: list[str] | None = None,
                      version: str | None = None) -> PredictResult:
        return _result(await _typed_async(self.inference.Predict, _request(task, texts, pairs, version),
                                          timeout=self.timeout, metadata=self.routed(task)))

    async def predict_stream(self, requests):
        """Yields one result per (task, texts[, pairs]) tuple of `requests`, in order. A stream may
        mix tasks, so it carries no task metadata: a balancer hashing on it sends streams anywhere."""
        stream = self.inference.PredictStream((_request(*r, *([None] * (4 - len(r)))) for r in requests),
                                              timeout=self.timeout, metadata=self.metadata)
        try:
            async for response in stream:
                yield _result(response)
        except RemoteError:
            raise
        except grpc.RpcError as exc:
            raise from_rpc(exc) from None

    async def server_info(self) -> pb.ServerInfoResponse:
        return await _typed_async(self.info.ServerInfo, pb.ServerInfoRequest(), timeout=self.timeout,
                                  metadata=self.metadata)

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
