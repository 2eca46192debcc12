"""The request shapes our users already call, on the same request path as every door: OpenAI's
`POST /v1/embeddings`, the Cohere/Jina `POST /v1/rerank` that vLLM, Infinity and their clients
use, and TEI's `POST /rerank`. `model` is a task (`name` or `name:version`). A long input list is
cut into requests the engine takes, queued together (one task version answers all of them).

Where we differ from them (docs/guides/protocols.md): errors of /v1/embeddings have OpenAI's
shape (`{"error": {"message", "type", "code"}}`, so its client shows the message), the others
ticketserve's `{"error": "..."}` (as do refusals before routing: a missing token, a body over the
limit); token-id inputs are refused (we tokenize with the backbone's tokenizer);
`dimensions` is honoured only for the widths a task declares (Matryoshka-trained); TEI's
`truncate` follows the server's `--truncate/--reject-long`, and its body may name the task
(`model`) or the `x-ticketserve-task` header may, since one server holds many.
"""

from __future__ import annotations

import base64
import math
from typing import Literal

import numpy as np
from fastapi import FastAPI, Header
from pydantic import BaseModel, ConfigDict, Field

from ticketserve.core.errors import InvalidArgument
from ticketserve.runtime.server.observe import new_request_id
from ticketserve.runtime.server.predictor import Answer, Ask, Predictor
from ticketserve.v1 import TASK_HEADER

OPENAI_PATHS = ("/v1/embeddings",)
OPENAI_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                      404: "not_found_error", 429: "rate_limit_error"}


def error_body(path: str, status: int, message: str) -> dict:
    """An HTTP error's JSON body: OpenAI's shape on its paths, ticketserve's elsewhere."""
    if path in OPENAI_PATHS:
        return {"error": {"message": message, "type": OPENAI_ERROR_TYPES.get(status, "server_error"), "param": None,
                          "code": status}}
    return {"error": message}


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


# -- OpenAI embeddings -----------------------------------------------------------------------

class EmbeddingsRequest(_Body):
    model: str = Field(description="an embedding task: name or name:version")
    input: str | list[str] | list[int] | list[list[int]] = Field(description="a text or a list of texts")
    encoding_format: Literal["float", "base64"] = Field("float", description="base64: little-endian float32 bytes")
    dimensions: int | None = Field(None, gt=0, description="a smaller width the task declares (Matryoshka)")
    user: str | None = Field(None, description="accepted and ignored")


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    embedding: list[float] | str
    index: int


class EmbeddingsUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingsResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str = Field(description="the exact version that answered: name:version")
    usage: EmbeddingsUsage


# -- rerank (Cohere/Jina/vLLM, and TEI) -------------------------------------------------------

class Document(_Body):
    text: str


class RerankRequest(_Body):
    model: str = Field(description="a reranking, embedding or pair-scoring task: name or name:version")
    query: str
    documents: list[str | Document]
    top_n: int | None = Field(None, gt=0, description="the best n results (default: all)")
    return_documents: bool = Field(True, description="echo each result's document")


class RerankResult(BaseModel):
    index: int
    relevance_score: float
    document: Document | None = None


class RerankUsage(BaseModel):
    total_tokens: int


class RerankResponse(BaseModel):
    id: str
    model: str = Field(description="the exact version that answered: name:version")
    results: list[RerankResult] = Field(description="best first")
    usage: RerankUsage


class TeiRerankRequest(_Body):
    query: str
    texts: list[str]
    model: str | None = Field(None, description=f"the task; or the {TASK_HEADER} header")
    raw_scores: bool = Field(False, description="a reranker's logits instead of its 0…1 scores")
    return_text: bool = False
    truncate: bool | None = Field(None, description="accepted: the server's --truncate/--reject-long decides")
    truncation_direction: Literal["Left", "Right", "left", "right"] | None = Field(
        None, description="accepted: texts are cut on the right")


class TeiRank(BaseModel):
    index: int
    score: float
    text: str | None = None


# -- the scoring --------------------------------------------------------------------------------

def _input_limit(predictor: Predictor) -> int:
    config = predictor.engine.config
    return config.max_texts_per_request * config.max_tasks_per_request


async def _answers(predictor: Predictor, model: str, texts: list[str], pairs: list[str] | None,
                   types: tuple[str, ...]) -> list[Answer]:
    """One task's answers for a list of texts (and pairs) of any length up to the server's
    limit, cut into requests of at most `max_texts_per_request`."""
    limit = _input_limit(predictor)
    if not texts:
        raise InvalidArgument("no inputs: give at least one text")
    if len(texts) > limit:
        raise InvalidArgument(f"{len(texts)} inputs; at most {limit} per request "
                              "(max_texts_per_request × max_tasks_per_request)")
    step = predictor.engine.config.max_texts_per_request
    ask = Ask.parse(model)
    return await predictor.predict_each(
        [(ask, texts[i:i + step], None if pairs is None else pairs[i:i + step]) for i in range(0, len(texts), step)],
        types=types)


def _width(answer: Answer, dimensions: int | None) -> int | None:
    full = len(answer.predictions[0].embedding or [])
    if dimensions is None or dimensions == full:
        return None
    if dimensions not in answer.head.dimensions:
        allowed = ", ".join(map(str, sorted({full, *answer.head.dimensions}, reverse=True)))
        raise InvalidArgument(f"dimensions {dimensions}: task {answer.version.name} answers {allowed} dimensions")
    return dimensions


def embeddings_of(answers: list[Answer], dimensions: int | None = None) -> np.ndarray:
    """Every answer's embeddings as one float32 (n, d) array, cut to `dimensions` (renormalised
    when the task normalises)."""
    vectors = np.asarray([p.embedding for a in answers for p in a.predictions], dtype=np.float32)
    width = _width(answers[0], dimensions)
    if width is not None:
        vectors = vectors[:, :width]
        if answers[0].head.normalize:
            vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    return vectors


async def _scores(predictor: Predictor, model: str, query: str, documents: list[str],
                  raw: bool = False) -> tuple[list[float], str, int]:
    """Each document's relevance to the query, the version that answered and the tokens: a
    reranker's score (its logit when `raw`), a pair regression's value, a binary pair
    classifier's probability of its second label, or the cosine similarity of an embedding
    task's vectors of the query and each document."""
    spec = await predictor.spec_of(Ask.parse(model))
    if spec.type == "embedding":
        answers = await _answers(predictor, model, [query, *documents], None, ("embedding",))
        vectors = embeddings_of(answers)
        vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
        scores = (vectors[1:] @ vectors[0]).tolist()
    else:
        if spec.type == "classification" and len(spec.labels) != 2:
            raise InvalidArgument(f"task {spec.name} has {len(spec.labels)} labels; a classifier reranks with two "
                                  "(relevance = the probability of the second)")
        answers = await _answers(predictor, model, [query] * len(documents), documents,
                                 ("reranking", "regression", "classification"))
        scores = [p.probabilities[a.labels[-1]] if a.labels else p.score for a in answers for p in a.predictions]
        if spec.type == "reranking" and raw:
            scores = [math.log(max(s, 1e-30) / max(1 - s, 1e-30)) for s in scores]
    return scores, str(answers[0].version), sum(a.tokens for a in answers)


def _ranked(scores: list[float], top_n: int | None) -> list[int]:
    return sorted(range(len(scores)), key=lambda i: -scores[i])[:top_n]


def add_routes(app: FastAPI, predictor: Predictor) -> None:
    @app.post("/v1/embeddings", response_model=EmbeddingsResponse, tags=["openai"])
    async def embeddings(body: EmbeddingsRequest) -> EmbeddingsResponse:
        """OpenAI's embeddings API for an embedding task (`model`); the `openai` client works unchanged."""
        texts = [body.input] if isinstance(body.input, str) else body.input
        if any(not isinstance(t, str) for t in texts):
            raise InvalidArgument("input as token ids is not supported: send text (the task's backbone tokenizes it)")
        answers = await _answers(predictor, body.model, texts, None, ("embedding",))
        vectors = embeddings_of(answers, body.dimensions)
        data = [Embedding(embedding=base64.b64encode(v.astype("<f4").tobytes()).decode()
                          if body.encoding_format == "base64" else v.tolist(), index=i) for i, v in enumerate(vectors)]
        tokens = sum(a.tokens for a in answers)
        return EmbeddingsResponse(data=data, model=str(answers[0].version),
                                  usage=EmbeddingsUsage(prompt_tokens=tokens, total_tokens=tokens))

    @app.post("/v1/rerank", response_model=RerankResponse, response_model_exclude_none=True, tags=["rerank"])
    async def rerank(body: RerankRequest) -> RerankResponse:
        """The Cohere/Jina rerank API (as vLLM serves it): the documents by relevance to the query,
        scored by a reranking (cross-encoder), pair-scoring or embedding task."""
        documents = [d if isinstance(d, str) else d.text for d in body.documents]
        scores, version, tokens = await _scores(predictor, body.model, body.query, documents)
        results = [RerankResult(index=i, relevance_score=scores[i],
                                document=Document(text=documents[i]) if body.return_documents else None)
                   for i in _ranked(scores, body.top_n)]
        return RerankResponse(id=new_request_id(), model=version, results=results, usage=RerankUsage(total_tokens=tokens))

    @app.post("/rerank", response_model=list[TeiRank], response_model_exclude_none=True, tags=["rerank"])
    async def tei_rerank(body: TeiRerankRequest,
                         task: str | None = Header(None, alias=TASK_HEADER)) -> list[TeiRank]:
        """Text Embeddings Inference's rerank API; the task is `model` or the x-ticketserve-task header."""
        model = body.model or task
        if not model:
            raise InvalidArgument(f"name the task: `model` in the body or the {TASK_HEADER} header")
        scores, _, _ = await _scores(predictor, model, body.query, body.texts, body.raw_scores)
        return [TeiRank(index=i, score=scores[i], text=body.texts[i] if body.return_text else None)
                for i in _ranked(scores, None)]
