"""HTTP on its own port, one process with the gRPC server and on the same request path
(predictor.py): the Open Inference Protocol's REST half under /v2 (with the binary tensor data
and model repository extensions), a JSON API for people with curl under /v1, and the OpenAI
embeddings and rerank shapes (http_peer_apis.py). This module is
the FastAPI app — its middleware, its error handlers (the one place HTTP maps errors to
statuses: runtime/status.py's table, as {"error": "..."}, as the v2 protocol has them) and its
routes; the bodies are in http_bodies.py, the v2 tensors in http_tensors.py, what stands in
front of it in http_door.py. The OpenAPI document is served at /openapi.json and committed as
docs/openapi.json."""

from __future__ import annotations

import logging
from collections.abc import Callable

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException

from ticketserve import __version__
from ticketserve.core.errors import TicketserveError, Unavailable
from ticketserve.runtime.server import about, routing
from ticketserve.runtime.server.about import ServerInfo
from ticketserve.runtime.server.auth import Tokens
from ticketserve.runtime.server.http_bodies import (ErrorResponse, FanOutRequest, FanOutResponse, IndexRequest,
                                                    InferenceRequest, InferenceResponse, ModelIndex, ModelMetadata,
                                                    PredictRequest, PredictResponse, ServerMetadata, TasksResponse,
                                                    predict_response, texts_of)
from ticketserve.runtime.server.http_door import BINARY, PUBLIC, Front, method_label
from ticketserve.runtime.server import http_peer_apis
from ticketserve.runtime.server.http_tensors import infer_response, input_tensors
from ticketserve.runtime.server.observe import Observe, request_id_of
from ticketserve.runtime.server.openinference import OpenInference
from ticketserve.runtime.server.predictor import Ask, Predictor
from ticketserve.runtime.status import http_status_of
from ticketserve.v1 import TASK_HEADER

ROUTING_HEADER = TASK_HEADER.encode()

log = logging.getLogger("ticketserve.runtime.server")


# -- the app --------------------------------------------------------------------------------

def _route(scope: dict) -> str:
    """The matched route's path pattern (a metric label from a closed set), or `unmatched`."""
    route = scope.get("route")
    return route.path if route else "unmatched"


def _error(status: int, message: str, request_id: str | None = None, request: Request | None = None) -> JSONResponse:
    headers = {"x-request-id": request_id} if request_id else None
    message = message.encode("utf-8", "backslashreplace").decode()  # an echo of bad input stays sendable
    path = request.url.path if request is not None else ""
    return JSONResponse(http_peer_apis.error_body(path, status, message), status_code=status, headers=headers)


class Observed:
    """ASGI middleware inside `Front`: the request id (the client's, or a new one; echoed in the
    answer), the drain (503 while draining), the in-flight count the drain waits for, the task
    header (routing.py), and every answer counted by route and status. Plain ASGI: Starlette's
    BaseHTTPMiddleware, used before, ran each request's app in a task of its own behind a
    stream."""

    def __init__(self, app, observe: Observe):
        self.app, self.observe = app, observe

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        given, routed = "", None
        for key, value in scope["headers"]:  # ASGI header names are lower case
            if key == b"x-request-id":
                given = value.decode("latin-1")
            elif key == ROUTING_HEADER:
                routed = value.decode("latin-1")
        request_id = request_id_of(given)
        scope.setdefault("state", {})["request_id"] = request_id
        status = 500  # unless an answer starts: an exception no handler turned into one

        async def answer(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message = message | {"headers": [*message.get("headers", ()), (b"x-request-id", request_id.encode())]}
            await send(message)

        own = scope["path"] not in PUBLIC
        try:
            if own and self.observe.draining:
                refusal = _error(503, str(Unavailable("the server is draining; retry on another replica")),
                                 request=Request(scope))
                await refusal(scope, receive, answer)
                return
            if own:
                self.observe.enter()
            try:
                with routing.routed_by(routed):
                    await self.app(scope, receive, answer)
            finally:
                if own:
                    self.observe.leave()
        finally:
            self.observe.metrics.responses.labels(f"HTTP {method_label(scope['method'])} {_route(scope)}",
                                                  str(status)).inc()


def build_app(predictor: Predictor, protocol: OpenInference, tokens: Tokens, observe: Observe,
              info: Callable[[], ServerInfo], ready: Callable[[], bool], max_body_bytes: int) -> FastAPI:
    app = FastAPI(title="ticketserve", version=__version__, summary="Many NLP tasks on one shared encoder",
                  description="The Open Inference Protocol (KServe v2) REST API under /v2, a JSON API under "
                              "/v1, OpenAI's /v1/embeddings and the Cohere/Jina (/v1/rerank) and TEI (/rerank) "
                              "rerank APIs. Send `Authorization: Bearer <token>` when the server requires one.",
                  responses={400: {"model": ErrorResponse}, 401: {"model": ErrorResponse},
                             404: {"model": ErrorResponse}, 429: {"model": ErrorResponse}},
                  docs_url="/docs", redoc_url=None)
    # the token is checked by `Front`, once and before the body is read (admin paths: the admin token)

    @app.exception_handler(TicketserveError)
    async def ticketserve_error(request: Request, exc: TicketserveError):
        return _error(http_status_of(exc), str(exc)[:1024], request=request)

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, exc: RequestValidationError):
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()[:5])
        return _error(400, f"invalid request: {problems}", request=request)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        return _error(exc.status_code, str(exc.detail), request=request)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception):
        request_id = getattr(request.state, "request_id", "")
        log.error("unexpected error in HTTP %s %s (request id %s)", request.method, request.url.path, request_id,
                  exc_info=exc)
        observe.metrics.unexpected_errors.labels(f"HTTP {_route(request.scope)}").inc()
        return _error(500, f"internal error (request id {request_id})", request_id, request)

    # -- the JSON API --------------------------------------------------------------------

    @app.post("/v1/predict", response_model=PredictResponse, tags=["json"])
    async def predict(body: PredictRequest) -> PredictResponse:
        """Predictions of one task for up to `max_texts_per_request` texts."""
        texts, pairs = texts_of(body.inputs)
        answer = await predictor.predict(Ask(body.task, body.version), texts, pairs)
        return predict_response(answer, texts, body.aggregation, body.return_tokens)

    @app.post("/v1/fanout", response_model=FanOutResponse, tags=["json"])
    async def fan_out(body: FanOutRequest) -> FanOutResponse:
        """The same texts to several tasks, answered from one mixed batch when they fit."""
        texts, pairs = texts_of(body.inputs)
        asks = [Ask.parse(t) for t in body.tasks]
        return FanOutResponse(results=[predict_response(a, texts, body.aggregation, body.return_tokens)
                                       for a in await predictor.fan_out(asks, texts, pairs)])

    http_peer_apis.add_routes(app, predictor)  # OpenAI embeddings, Cohere/Jina and TEI rerank

    @app.get("/v1/tasks", response_model=TasksResponse, tags=["json"])
    async def list_tasks(include_registry: bool = Query(False, alias="all")) -> TasksResponse:
        """Resident tasks; with `all=true` also what the registry offers."""
        return TasksResponse(tasks=await about.tasks(predictor.loader, predictor.admission, include_registry))

    @app.get("/v1/info", response_model=ServerInfo, tags=["json"])
    async def server_info() -> ServerInfo:
        return info()

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
        """`text` (BYTES) and for pair tasks `text_pair` in; `label`, `score`, `probabilities` (or `value`,
        `embedding`, a reranker's `score`, a token classifier's `entities` — the `aggregation` parameter —
        and on request `tokens`) out. Binary tensor data (the `Inference-Header-Content-Length` header) is accepted and, when
        asked for with `binary_data`, returned."""
        tensors = input_tensors(body, request.scope.get(BINARY, b""), protocol.max_elements)
        requested = [o.name for o in body.outputs or []]
        aggregation = (body.parameters or {}).get("aggregation")
        return infer_response(body, await protocol.infer(name, version, tensors, requested,
                                                         aggregation=None if aggregation is None else str(aggregation)))

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
    if observe is not None:
        app.add_middleware(Observed, observe=observe)
    app.add_middleware(Front, max_bytes=max_body_bytes, tokens=tokens, count=count)
    return app



def openapi_document() -> dict:
    """The HTTP API's OpenAPI document, as a server serves it at /openapi.json."""
    return build_app(None, None, Tokens(None), None, dict, bool, 0).openapi()
