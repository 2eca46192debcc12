"""The HTTP API's wire types: a pydantic model for every body of the JSON API (/v1) and of
the Open Inference Protocol's REST half (/v2), and the one conversion of an answer to the
JSON API's shape. The OpenAPI document is generated from these."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ticketserve.core.tagging import AGGREGATIONS
from ticketserve.runtime.server.about import TaskInfo
from ticketserve.runtime.server.predictor import Answer


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TextInput(_Body):
    text: str
    text_pair: str | None = Field(None, description="second segment, for pair tasks")


Inputs = Annotated[list[str | TextInput], Field(description="texts, or {text, text_pair} objects for pair tasks")]


Aggregation = Annotated[Literal[AGGREGATIONS], Field(  # type: ignore[valid-type]
    description="token classification: how word pieces group into entities (transformers' pipeline strategies)")]
ReturnTokens = Annotated[bool, Field(description="token classification: also each word piece's label")]


class PredictRequest(_Body):
    task: str = Field(description="artifact name, e.g. sst2-bitfit")
    version: str | None = Field(None, description="a version number or tag; default: latest, followed live")
    inputs: Inputs
    aggregation: Aggregation = "simple"
    return_tokens: ReturnTokens = False


class FanOutRequest(_Body):
    tasks: list[str] = Field(description="artifact names, each optionally name:version or name:tag")
    inputs: Inputs
    aggregation: Aggregation = "simple"
    return_tokens: ReturnTokens = False


class EntityBody(BaseModel):
    entity_group: str = Field(description="its type (with aggregation none: a piece's own label, e.g. B-PER)")
    score: float = Field(description="mean probability of its pieces' labels")
    word: str = Field(description="the text's characters start…end")
    start: int = Field(description="character offset into the text (Unicode code points)")
    end: int


class TokenBody(BaseModel):
    label: str
    score: float
    start: int
    end: int


class Prediction(BaseModel):
    label: str | None = Field(description="classification tasks only (null otherwise)")
    score: float = Field(description="probability of `label`, the regression value, or a pair's relevance (0…1)")
    probabilities: dict[str, float]
    value: float | None = Field(None, description="regression tasks only")
    embedding: list[float] | None = Field(None, description="embedding tasks only (their score is 0)")
    entities: list[EntityBody] | None = Field(None, description="token classification only (its score is 0)")
    tokens: list[TokenBody] | None = Field(None, description="token classification with return_tokens")


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


class TasksResponse(BaseModel):
    tasks: list[TaskInfo]


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


def texts_of(inputs: list[str | TextInput]) -> tuple[list[str], list[str | None] | None]:
    texts = [i if isinstance(i, str) else i.text for i in inputs]
    pairs = [None if isinstance(i, str) else i.text_pair for i in inputs]
    return texts, pairs if any(p is not None for p in pairs) else None


def predict_response(answer: Answer, texts: list[str], aggregation: str = "simple",
                     return_tokens: bool = False) -> PredictResponse:
    tagged = answer.type == "token_classification"
    found = answer.entities(texts, aggregation)
    return PredictResponse(
        artifact=str(answer.version), digest=answer.version.digest,
        predictions=[Prediction(label=p.label, score=p.score, probabilities=p.probabilities,
                                value=p.score if answer.type == "regression" else None, embedding=p.embedding,
                                entities=[EntityBody(**vars(e)) for e in entities] if tagged else None,
                                tokens=[TokenBody(label=t.label, score=t.score, start=t.start, end=t.end)
                                        for t in p.tokens or []] if tagged and return_tokens else None)
                     for p, entities in zip(answer.predictions, found)],
        metadata=Metadata(queue_time_us=answer.queue_time_us, inference_time_us=answer.inference_time_us,
                          batch_size=answer.batch_size, batch_tasks=answer.batch_tasks))
