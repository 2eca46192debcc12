"""Embedding and reranking tasks through every door of a real server on 127.0.0.1: OpenAI's
/v1/embeddings (spoken to by the `openai` client, unchanged), the Cohere/Jina /v1/rerank, TEI's
/rerank, our JSON API and fan-out, our gRPC API and the Open Inference Protocol — each equal to
in-process prediction, with errors as for classification."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.helpers import TEXTS, ByName, random_head
from tests.test_protocols import http, serve, text_input
from ticketserve.core import artifact, synthetic
from ticketserve.core.backbone import load_backbone
from ticketserve.core.tasks import as_type, get_task
from ticketserve.registry import HeadConfig, Manifest
from ticketserve.runtime.client import Client
from ticketserve.runtime.engine import EngineConfig
from ticketserve.runtime.executor import Runtime

openai = pytest.importorskip("openai")
tritonclient_http = pytest.importorskip("tritonclient.http")

QUERY = "a film about friendship"
DOCUMENTS = ["two friends on a long road trip", "the stock market fell", "a story of loyal companions", "rain"]


@pytest.fixture
def embedding_registry(registry, tiny_bert):
    """The serving registry plus: embed (row deltas, normalised, may be cut to 8 or 16
    dimensions), embed-plain (the backbone's own mean pooling), rerank (a cross-encoder)."""
    backbone = load_backbone(tiny_bert)
    embedding = as_type(get_task("stsb"), "embedding")
    artifact.publish(registry, Manifest(name="embed", kind="row_delta", method="test", task=embedding,
                                        head=HeadConfig(normalize=True, dimensions=[16, 8]), backbone=backbone.ref()),
                     synthetic.row_delta(backbone, k=2, seed=11, scale=0.5))
    artifact.publish(registry, Manifest(name="embed-plain", kind="plain", method="test", task=embedding,
                                        head=HeadConfig(), backbone=backbone.ref()), {})
    artifact.publish(registry, Manifest(name="rerank", kind="row_delta", method="test",
                                        task=as_type(get_task("mrpc"), "reranking"), head=HeadConfig(),
                                        backbone=backbone.ref()),
                     synthetic.row_delta(backbone, k=2, seed=12, scale=0.5) | random_head(backbone, outputs=1, seed=12))
    return registry


def in_process(registry, tiny_bert, name, texts, pairs=None):
    backbone = load_backbone(tiny_bert)
    runtime = ByName(Runtime(backbone, device="cpu"))
    runtime.add(artifact.load(registry, name, backbone), name=name)
    return runtime.predict([name] * len(texts), texts, pairs)


@pytest.fixture
def server(embedding_registry, tiny_bert):
    with serve(embedding_registry, tiny_bert, engine=EngineConfig(max_texts_per_request=4, max_batch_size=8)) as running:
        yield running


def test_the_openai_client_gets_what_in_process_prediction_returns(server, embedding_registry, tiny_bert):
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{server.http_port}/v1", api_key="unused", max_retries=0)
    want = np.array([p.embedding for p in in_process(embedding_registry, tiny_bert, "embed", TEXTS)])
    # six texts: more than one request of the engine (max_texts_per_request=4), one answer
    for chosen in ({"encoding_format": "float"}, {}):  # unless told otherwise, the client asks for base64 and decodes it
        response = client.embeddings.create(model="embed", input=TEXTS, **chosen)
        got = np.array([d.embedding for d in sorted(response.data, key=lambda d: d.index)])
        np.testing.assert_allclose(got, want, atol=1e-5)
        assert response.model == "embed:1" and response.usage.prompt_tokens == response.usage.total_tokens > len(TEXTS)
    single = client.embeddings.create(model="embed", input=TEXTS[0])
    np.testing.assert_allclose(single.data[0].embedding, want[0], atol=1e-5)
    cut = np.array([d.embedding for d in client.embeddings.create(model="embed", input=TEXTS, dimensions=8).data])
    np.testing.assert_allclose(cut, want[:, :8] / np.linalg.norm(want[:, :8], axis=1, keepdims=True), atol=1e-5)
    with pytest.raises(openai.BadRequestError, match="answers 32, 16, 8 dimensions"):
        client.embeddings.create(model="embed", input=TEXTS, dimensions=12)
    with pytest.raises(openai.BadRequestError, match="is a classification task"):
        client.embeddings.create(model="alpha", input=TEXTS)
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="nope", input=TEXTS)


def test_embeddings_refuse_token_ids_and_too_many_inputs(server):
    url = f"http://127.0.0.1:{server.http_port}/v1/embeddings"
    status, body = http("POST", url, {"model": "embed", "input": [101, 2023, 102]})
    assert status == 400 and "token ids" in body["error"]["message"] and body["error"]["type"] == "invalid_request_error"
    status, body = http("POST", url, {"model": "embed", "input": ["x"] * (4 * 16 + 1)})
    assert status == 400 and "at most 64" in body["error"]["message"]
    status, body = http("POST", url, {"model": "embed", "input": []})
    assert status == 400


def test_rerank_orders_documents_by_a_rerankers_scores(server, embedding_registry, tiny_bert):
    want = [p.score for p in in_process(embedding_registry, tiny_bert, "rerank", [QUERY] * len(DOCUMENTS), DOCUMENTS)]
    order = sorted(range(len(DOCUMENTS)), key=lambda i: -want[i])
    status, body = http("POST", f"http://127.0.0.1:{server.http_port}/v1/rerank",
                        {"model": "rerank", "query": QUERY, "documents": DOCUMENTS, "top_n": 3})
    assert status == 200 and body["model"] == "rerank:1" and body["usage"]["total_tokens"] > 0
    assert [r["index"] for r in body["results"]] == order[:3]
    assert [r["relevance_score"] for r in body["results"]] == pytest.approx([want[i] for i in order[:3]], abs=1e-5)
    assert [r["document"]["text"] for r in body["results"]] == [DOCUMENTS[i] for i in order[:3]]
    status, tei = http("POST", f"http://127.0.0.1:{server.http_port}/rerank",
                       {"query": QUERY, "texts": DOCUMENTS, "raw_scores": True}, {"x-ticketserve-task": "rerank"})
    assert status == 200 and [r["index"] for r in tei] == order
    assert [r["score"] for r in tei] == pytest.approx([float(torch.logit(torch.tensor(want[i]))) for i in order], abs=1e-4)
    assert "text" not in tei[0]


def test_rerank_with_an_embedding_task_ranks_by_cosine_similarity(server, embedding_registry, tiny_bert):
    vectors = np.array([p.embedding for p in in_process(embedding_registry, tiny_bert, "embed-plain", [QUERY, *DOCUMENTS])])
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    want = vectors[1:] @ vectors[0]
    status, body = http("POST", f"http://127.0.0.1:{server.http_port}/v1/rerank",
                        {"model": "embed-plain", "query": QUERY, "documents": [{"text": d} for d in DOCUMENTS],
                         "return_documents": False})
    assert status == 200 and [r["index"] for r in body["results"]] == list(np.argsort(-want))
    assert [r["relevance_score"] for r in body["results"]] == pytest.approx(sorted(want, reverse=True), abs=1e-5)
    assert "document" not in body["results"][0]
    status, body = http("POST", f"http://127.0.0.1:{server.http_port}/rerank", {"query": QUERY, "texts": DOCUMENTS})
    assert status == 400 and "x-ticketserve-task" in body["error"]
    status, body = http("POST", f"http://127.0.0.1:{server.http_port}/v1/rerank",
                        {"model": "alpha", "query": QUERY, "documents": DOCUMENTS})
    assert status == 400 and "takes single texts" in body["error"]


def test_json_fanout_grpc_and_open_inference_carry_embeddings_and_scores(server, embedding_registry, tiny_bert):
    texts = TEXTS[:3]
    want = {name: in_process(embedding_registry, tiny_bert, name, texts) for name in ("embed", "embed-plain", "alpha")}
    status, body = http("POST", f"http://127.0.0.1:{server.http_port}/v1/fanout",
                        {"tasks": ["embed", "embed-plain", "alpha"], "inputs": texts})
    assert status == 200
    for result, name in zip(body["results"], want):
        for got, expected in zip(result["predictions"], want[name]):
            if expected.embedding is None:
                assert got["label"] == expected.label and got["embedding"] is None
            else:
                np.testing.assert_allclose(got["embedding"], expected.embedding, atol=1e-5)
    with Client(f"127.0.0.1:{server.port}") as client:
        result = client.predict("embed", texts)
        np.testing.assert_allclose([p.embedding for p in result.predictions], [p.embedding for p in want["embed"]],
                                   atol=1e-5)
        scored = client.predict("rerank", [QUERY], [DOCUMENTS[0]]).predictions[0]
        assert scored.embedding is None and 0 < scored.score < 1
        assert {t.name: t.type for t in client.list_tasks()}["embed"] == "embedding"
    rest = tritonclient_http.InferenceServerClient(f"127.0.0.1:{server.http_port}")
    inferred = rest.infer("embed", [text_input(tritonclient_http, texts)])
    np.testing.assert_allclose(inferred.as_numpy("embedding"), [p.embedding for p in want["embed"]], atol=1e-5)
    assert [o["name"] for o in rest.get_model_metadata("rerank")["outputs"]] == ["score"]


def test_the_peer_apis_need_the_token_and_count_one_request_per_call(embedding_registry, tiny_bert, tmp_path):
    import urllib.request

    token = tmp_path / "token"
    token.write_text("user-token\n")
    with serve(embedding_registry, tiny_bert, token_file=str(token), metrics_port=0,
               engine=EngineConfig(max_texts_per_request=4, max_batch_size=8)) as server:
        base = f"http://127.0.0.1:{server.http_port}"
        for path, body in (("/v1/embeddings", {"model": "embed", "input": "x"}),
                           ("/v1/rerank", {"model": "rerank", "query": "x", "documents": ["y"]}),
                           ("/rerank", {"model": "rerank", "query": "x", "texts": ["y"]})):
            assert http("POST", base + path, body)[0] == 401, path
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=base + "/v1", api_key="wrong", max_retries=0).embeddings.create(model="embed", input="x")
        client = openai.OpenAI(base_url=base + "/v1", api_key="user-token", max_retries=0)
        assert len(client.embeddings.create(model="embed", input=TEXTS).data) == len(TEXTS)  # two engine requests
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics").read().decode()
    assert 'ticketserve_requests_total{code="OK",task="embed"} 1.0' in metrics
    assert f'ticketserve_examples_total{{task="embed"}} {float(len(TEXTS))}' in metrics
