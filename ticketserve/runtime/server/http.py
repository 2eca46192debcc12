"""HTTP on its own port, one process with the gRPC server and on the same request path
(predictor.py): the Open Inference Protocol's REST half under /v2 (with the binary tensor data
and model repository extensions) and a JSON API for people with curl under /v1. FastAPI with a
pydantic model for every body; the OpenAPI document is served at /openapi.json and committed
as docs/openapi.json. Errors keep their meaning across protocols (runtime/status.py) and come
as {"error": "..."}, as the v2 protocol has them."""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Callable
from typing import Annotated, Any

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException

from ticketserve import __version__
from ticketserve.core.errors import InvalidArgument, TicketserveError, Unavailable
from ticketserve.runtime.server import about
from ticketserve.runtime.server.auth import Tokens
from ticketserve.runtime.server.http_door import BINARY, BINARY_HEADER, PUBLIC, Front, method_label
from ticketserve.runtime.server.observe import Observe
from ticketserve.runtime.server.openinference import (Inferred, OpenInference, Tensor, declared_elements, decode_raw,
                                                         encode_raw)
from ticketserve.runtime.server.predictor import Answer, Ask, Predictor
from ticketserve.runtime.status import http_status_of

log = logging.getLogger("ticketserve.runtime.server")


# -- bodies ---------------------------------------------------------------------------------

class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TextInput(_Body):
    text: str
    text_pair: str | None = Field(None, description="second segment, for pair tasks")


Inputs = Annotated[list[str | TextInput], Field(description="texts, or {text, text_pair} objects for pair tasks")]


class PredictRequest(_Body):
    task: str = Field(description="artifact name, e.g. sst2-bitfit")
    version: str | None = Field(None, description="a version number or tag; default: latest, followed live")
    inputs: Inputs


class FanOutRequest(_Body):
    tasks: list[str] = Field(description="artifact names, each optionally name:version or name:tag")
    inputs: Inputs


class Prediction(BaseModel):
    label: str | None = Field(description="null for regression tasks")
    score: float = Field(description="probability of `label`, or the regression value")
    probabilities: dict[str, float]
    value: float | None = Field(None, description="regression tasks only")


class Metadata(BaseModel):
    queue_time_us: int
    inference_time_us: int
    batch_size: int = Field(description="examples in the batch that served this request (all tasks)")
    batch_tasks: int = Field(description="distinct tasks in that batch")


class PredictResponse(BaseModel):
    artifact: str = Field(description="the exact version that answered: name:version")
    digest: str
    predictions: list[Prediction]
    metadata: Metadata


class FanOutResponse(BaseModel):
    results: list[PredictResponse] = Field(description="one per task, in the order asked")


class TaskInfo(BaseModel):
    name: str
    artifact: str
    digest: str
    kind: str
    method: str
    task: str
    labels: list[str]
    state: str = Field(description="READY (resident), AVAILABLE (in the registry), ERRORED (see error)")
    resident_bytes: int
    error: str


class TasksResponse(BaseModel):
    tasks: list[TaskInfo]


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


class ErrorResponse(BaseModel):
    error: str


Parameters = dict[str, bool | int | float | str]


class RequestInput(_Body):
    name: str
    shape: list[int]
    datatype: str
    parameters: Parameters | None = None
    data: list[Any] | None = Field(None, description="row-major, flat or nested; absent with binary data")


class RequestOutput(_Body):
    name: str
    parameters: Parameters | None = None


class InferenceRequest(_Body):
    id: str | None = None
    parameters: Parameters | None = None
    inputs: list[RequestInput]
    outputs: list[RequestOutput] | None = None


class ResponseOutput(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    parameters: Parameters | None = None
    data: list[Any] | None = None


class InferenceResponse(BaseModel):
    model_name: str
    model_version: str
    id: str | None = None
    parameters: Parameters | None = None
    outputs: list[ResponseOutput]


class ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class TensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int]


class ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]
    labels: list[str] = Field(description="columns of `probabilities`, in order (empty: regression)")
    task: str
    kind: str
    method: str
    artifact: str = Field(description="the version a request without one would get")


class IndexRequest(_Body):
    ready: bool = False


class ModelIndex(BaseModel):
    name: str
    version: str
    state: str
    reason: str


# -- translation ----------------------------------------------------------------------------

def _texts(inputs: list[str | TextInput]) -> tuple[list[str], list[str | None] | None]:
    texts = [i if isinstance(i, str) else i.text for i in inputs]
    pairs = [None if isinstance(i, str) else i.text_pair for i in inputs]
    return texts, pairs if any(p is not None for p in pairs) else None


def _predict_response(answer: Answer) -> PredictResponse:
    result = answer.result
    return PredictResponse(
        artifact=answer.artifact, digest=answer.digest,
        predictions=[Prediction(label=p.label, score=p.score, probabilities=p.probabilities,
                                value=p.score if p.label is None else None) for p in result.predictions],
        metadata=Metadata(queue_time_us=int(result.queue_seconds * 1e6),
                          inference_time_us=int(result.inference_seconds * 1e6),
                          batch_size=result.batch_size, batch_tasks=result.batch_tasks))


def _flat(data: list, depth: int, name: str) -> list:
    """`data` row-major, nested at most `depth` lists deep (the declared shape's rank), without
    recursion: a body nested deeper than its shape says is refused before it costs a stack."""
    flat, stack = [], [(iter(data), 1)]
    while stack:
        items, level = stack[-1]
        item = next(items, stack)
        if item is stack:
            stack.pop()
        elif isinstance(item, list):
            if level >= depth:
                raise InvalidArgument(f"input {name!r}: data is nested deeper than its shape's {depth} dimension(s)")
            stack.append((iter(item), level + 1))
        else:
            flat.append(item)
    return flat


def _input_tensors(body: InferenceRequest, binary: bytes, max_elements: int) -> list[Tensor]:
    """The request's tensors, each checked against its declared shape and the element limit
    before its data is decoded."""
    tensors, offset = [], 0
    for given in body.inputs:
        declared = declared_elements(given.name, given.shape, max_elements)
        size = (given.parameters or {}).get("binary_data_size")
        if size is not None:
            if not isinstance(size, int) or size < 0 or offset + size > len(binary):
                raise InvalidArgument(f"input {given.name!r}: binary_data_size {size} does not fit the binary data")
            data = decode_raw(given.datatype, binary[offset:offset + size], declared)
            offset += size
        elif given.data is None:
            raise InvalidArgument(f"input {given.name!r} has neither data nor binary_data_size")
        else:
            data = _flat(given.data, max(len(given.shape), 1), given.name)
        tensors.append(Tensor(given.name, given.datatype, given.shape, data))
    if offset != len(binary):
        raise InvalidArgument(f"{len(binary) - offset} bytes of binary data belong to no input")
    return tensors


def _wants_binary(body: InferenceRequest, name: str) -> bool:
    requested = next((o for o in body.outputs or [] if o.name == name), None)
    if requested is not None and requested.parameters and "binary_data" in requested.parameters:
        return bool(requested.parameters["binary_data"])
    return bool((body.parameters or {}).get("binary_data_output", False))


def _infer_response(body: InferenceRequest, inferred: Inferred) -> Response:
    outputs, binary = [], []
    for tensor in inferred.outputs:
        if _wants_binary(body, tensor.name):
            raw = encode_raw(tensor)
            binary.append(raw)
            outputs.append({"name": tensor.name, "shape": tensor.shape, "datatype": tensor.datatype,
                            "parameters": {"binary_data_size": len(raw)}})
        else:
            data = [v.decode() if isinstance(v, bytes) else v for v in tensor.data]
            outputs.append({"name": tensor.name, "shape": tensor.shape, "datatype": tensor.datatype, "data": data})
    document = {"model_name": inferred.model_name, "model_version": inferred.model_version,
                "parameters": inferred.parameters, "outputs": outputs}
    if body.id is not None:
        document["id"] = body.id
    header = json.dumps(document, separators=(",", ":")).encode()
    if not binary:
        return Response(header, media_type="application/json")
    return Response(header + b"".join(binary), media_type="application/octet-stream",
                    headers={BINARY_HEADER: str(len(header))})


# -- the app --------------------------------------------------------------------------------

def _route(request: Request) -> str:
    """The matched route's path pattern (a metric label from a closed set), or `unmatched`."""
    route = request.scope.get("route")
    return route.path if route else "unmatched"


def _error(status: int, message: str, request_id: str | None = None) -> JSONResponse:
    headers = {"x-request-id": request_id} if request_id else None
    message = message.encode("utf-8", "backslashreplace").decode()  # an echo of bad input stays sendable
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def build_app(predictor: Predictor, protocol: OpenInference, tokens: Tokens, observe: Observe,
              info: Callable[[], dict], ready: Callable[[], bool], max_body_bytes: int) -> FastAPI:
    app = FastAPI(title="ticketserve", version=__version__, summary="Many NLP tasks on one shared encoder",
                  description="The Open Inference Protocol (KServe v2) REST API under /v2, and a JSON API under "
                              "/v1. Send `Authorization: Bearer <token>` when the server requires one.",
                  responses={400: {"model": ErrorResponse}, 401: {"model": ErrorResponse},
                             404: {"model": ErrorResponse}, 429: {"model": ErrorResponse}},
                  docs_url="/docs", redoc_url=None)
    # the token is checked by `Front`, once and before the body is read (admin paths: the admin token)

    @app.middleware("http")
    async def observed(request: Request, call_next):
        given = request.headers.get("x-request-id", "")
        request_id = given if 0 < len(given) <= 64 and given.isascii() and given.isprintable() else uuid.uuid4().hex
        request.state.request_id = request_id
        own = request.url.path not in PUBLIC
        if own and observe.draining:
            response = _error(503, str(Unavailable("the server is draining; retry on another replica")), request_id)
        else:
            if own:
                observe.enter()
            try:
                response = await call_next(request)
            finally:
                if own:
                    observe.leave()
        response.headers["x-request-id"] = request_id
        observe.metrics.responses.labels(f"HTTP {method_label(request.method)} {_route(request)}",
                                         str(response.status_code)).inc()
        return response

    @app.exception_handler(TicketserveError)
    async def ticketserve_error(request: Request, exc: TicketserveError):
        return _error(http_status_of(exc), str(exc)[:1024])

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, exc: RequestValidationError):
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()[:5])
        return _error(400, f"invalid request: {problems}")

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        return _error(exc.status_code, str(exc.detail))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception):
        request_id = getattr(request.state, "request_id", "")
        log.error("unexpected error in HTTP %s %s (request id %s)", request.method, request.url.path, request_id,
                  exc_info=exc)
        observe.metrics.unexpected_errors.labels(f"HTTP {_route(request)}").inc()
        return _error(500, f"internal error (request id {request_id})", request_id)

    # -- the JSON API --------------------------------------------------------------------

    @app.post("/v1/predict", response_model=PredictResponse, tags=["json"])
    async def predict(body: PredictRequest) -> PredictResponse:
        """Predictions of one task for up to `max_texts_per_request` texts."""
        texts, pairs = _texts(body.inputs)
        return _predict_response(await predictor.predict(Ask(body.task, body.version), texts, pairs))

    @app.post("/v1/fanout", response_model=FanOutResponse, tags=["json"])
    async def fan_out(body: FanOutRequest) -> FanOutResponse:
        """The same texts to several tasks, answered from one mixed batch when they fit."""
        texts, pairs = _texts(body.inputs)
        asks = [Ask(*t.split(":", 1)) if ":" in t else Ask(t) for t in body.tasks]
        return FanOutResponse(results=[_predict_response(a) for a in await predictor.fan_out(asks, texts, pairs)])

    @app.get("/v1/tasks", response_model=TasksResponse, tags=["json"])
    async def list_tasks(include_registry: bool = Query(False, alias="all")) -> TasksResponse:
        """Resident tasks; with `all=true` also what the registry offers."""
        return TasksResponse(tasks=await about.tasks(predictor.loader, predictor.admission, include_registry))

    @app.get("/v1/info", response_model=ServerInfo, tags=["json"])
    async def server_info() -> ServerInfo:
        return ServerInfo(**info())

    # -- the Open Inference Protocol (v2) -----------------------------------------------

    @app.get("/v2/health/live", tags=["v2"])
    async def live() -> Response:
        return Response(status_code=200)

    @app.get("/v2/health/ready", tags=["v2"])
    async def server_ready() -> Response:
        return Response(status_code=200 if ready() and not observe.draining else 503)

    @app.get("/v2", response_model=ServerMetadata, tags=["v2"])
    async def server_metadata() -> ServerMetadata:
        return ServerMetadata(**protocol.server_metadata())

    @app.get("/v2/models/{name}", response_model=ModelMetadata, tags=["v2"])
    @app.get("/v2/models/{name}/versions/{version}", response_model=ModelMetadata, tags=["v2"])
    async def model_metadata(name: str, version: str | None = None) -> ModelMetadata:
        return ModelMetadata(**await protocol.model_metadata(name, version))

    @app.get("/v2/models/{name}/ready", tags=["v2"])
    @app.get("/v2/models/{name}/versions/{version}/ready", tags=["v2"])
    async def model_ready(name: str, version: str | None = None) -> Response:
        """200 when resident (a request is served without a load), else 400."""
        return Response(status_code=200 if protocol.model_ready(name, version) else 400)

    @app.post("/v2/models/{name}/infer", response_model=InferenceResponse, tags=["v2"])
    @app.post("/v2/models/{name}/versions/{version}/infer", response_model=InferenceResponse,
              tags=["v2"])
    async def infer(name: str, body: InferenceRequest, request: Request, version: str | None = None) -> Response:
        """`text` (BYTES) and for pair tasks `text_pair` in; `label`, `score`, `probabilities` (or `value`)
        out. Binary tensor data (the `Inference-Header-Content-Length` header) is accepted and, when
        asked for with `binary_data`, returned."""
        tensors = _input_tensors(body, request.scope.get(BINARY, b""), protocol.max_elements)
        requested = [o.name for o in body.outputs or []]
        return _infer_response(body, await protocol.infer(name, version, tensors, requested))

    @app.post("/v2/repository/index", response_model=list[ModelIndex], tags=["v2 repository"])
    async def repository_index(body: IndexRequest | None = None) -> list[ModelIndex]:
        return [ModelIndex(**m) for m in await protocol.index(body.ready if body else False)]

    @app.post("/v2/repository/models/{name}/load", tags=["v2 repository"])
    async def repository_load(name: str) -> dict:
        """Load a task now (its latest version). Admin token."""
        await protocol.load(name)
        return {}

    @app.post("/v2/repository/models/{name}/unload", tags=["v2 repository"])
    async def repository_unload(name: str) -> dict:
        """Unload every resident version of a task. Admin token."""
        await protocol.unload(name)
        return {}

    count = (lambda method, status: observe.metrics.responses.labels(method, status).inc()) if observe else None
    app.add_middleware(Front, max_bytes=max_body_bytes, tokens=tokens, count=count)
    return app



def openapi_document() -> dict:
    """The HTTP API's OpenAPI document, as a server serves it at /openapi.json."""
    return build_app(None, None, Tokens(None), None, dict, bool, 0).openapi()
