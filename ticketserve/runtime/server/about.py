"""What a server says about itself and its tasks, for every protocol (gRPC Info and Tasks,
HTTP /v1/info and /v1/tasks): typed, named like ticketserve.v1's messages; each door converts
them once (the HTTP API returns them as they are)."""

from __future__ import annotations

from pydantic import BaseModel, Field

from ticketserve import __version__
from ticketserve.runtime.engine import Engine
from ticketserve.runtime.server.admission import Admission
from ticketserve.runtime.server.catalog import offers
from ticketserve.runtime.server.loader import TaskLoader

READY, AVAILABLE, ERRORED = "READY", "AVAILABLE", "ERRORED"


class TaskInfo(BaseModel):
    name: str
    artifact: str
    digest: str
    kind: str
    method: str
    task: str
    type: str = Field(description="what it returns: classification, regression, embedding, reranking")
    labels: list[str]
    state: str = Field(description="READY (resident), AVAILABLE (in the registry), ERRORED (see error)")
    resident_bytes: int
    error: str


class Limits(BaseModel):
    max_texts_per_request: int
    max_tokens_per_text: int
    truncate: bool
    max_batch_size: int
    max_batch_tokens: int
    max_queue_size: int
    max_message_bytes: int
    max_text_bytes: int


class ServerInfo(BaseModel):
    version: str
    backbone: str
    fingerprint: str
    model_type: str
    device: str
    dtype: str
    quantize: str
    registry: str
    limits: Limits


def server_info(engine: Engine, registry_url: str, max_message_bytes: int) -> ServerInfo:
    backbone, config = engine.runtime.backbone, engine.config
    return ServerInfo(
        version=__version__, backbone=backbone.name, fingerprint=backbone.fingerprint,
        model_type=backbone.config.model_type, device=str(engine.runtime.device),
        dtype=str(engine.runtime.dtype).removeprefix("torch."), quantize=engine.runtime.quantize, registry=registry_url,
        limits=Limits(max_texts_per_request=config.max_texts_per_request, max_tokens_per_text=engine.tokenization.max_tokens,
                      truncate=config.truncate, max_batch_size=config.max_batch_size,
                      max_batch_tokens=config.max_batch_tokens, max_queue_size=config.max_queue_size,
                      max_message_bytes=max_message_bytes, max_text_bytes=config.max_text_bytes))


def task_info(artifact: str, digest: str, manifest, state: str, resident_bytes: int = 0, error: str = "") -> TaskInfo:
    if manifest is None:  # a registry entry that cannot be read
        return TaskInfo(name=artifact.split(":")[0], artifact=artifact, digest="", kind="", method="", task="", type="", labels=[],
                        state=state, resident_bytes=0, error=error)
    return TaskInfo(name=manifest.name, artifact=artifact, digest=digest, kind=manifest.kind, method=manifest.method,
                    task=manifest.task.name, type=manifest.task.type, labels=list(manifest.task.labels), state=state,
                    resident_bytes=resident_bytes, error=error)


async def tasks(loader: TaskLoader, admission: Admission, include_registry: bool) -> list[TaskInfo]:
    """Resident tasks, and with `include_registry` what else the registry offers."""
    rows, errored = loader.describe()
    found = [task_info(str(r.version), r.version.digest, r.manifest, READY, r.bytes, errored.get(r.alias, ""))
             for r in rows]
    if include_registry:
        loaded = {str(r.version) for r in rows}
        offered = await admission.run(admission.loading, offers, loader.store, loader.runtime.backbone, loader.failed())
        found += [task_info(o.artifact, o.digest, o.manifest, ERRORED if o.error else AVAILABLE, error=o.error)
                  for o in offered if o.artifact not in loaded]
    return found
