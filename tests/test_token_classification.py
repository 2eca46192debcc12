"""Token classification: IOB2 entities and scores equal seqeval's, labels sit on each word's
first piece, answers keep exact character offsets (accents, emoji, CJK, runs of spaces), pieces
group into entities as transformers' pipeline groups them, token tasks mix with the others in
one batch, and every door carries the entities."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from tests.helpers import TEXTS, ByName, random_head
from ticketserve.core import artifact, synthetic
from ticketserve.core.backbone import load_backbone
from ticketserve.core.errors import InvalidArgument
from ticketserve.core.tagging import IGNORED, Token, entities, entity_scores, joined, piece_labels, spans, word_ids
from ticketserve.core.tasks import as_type, get_task
from ticketserve.registry import HeadConfig, Manifest
from ticketserve.runtime.executor import Runtime

seqeval = pytest.importorskip("seqeval.metrics")

CONLL = get_task("conll2003")
TRICKY = ["Café  owners in São Paulo 🙂 told  Reuters about 東京 deals.", "  leading and trailing  ", "Ünïcödé—dash…and ‘quotes’"]


def test_entity_scores_equal_seqeval_on_random_tag_sequences():
    rng = random.Random(0)
    labels = CONLL.labels
    true = [[rng.choice(labels) for _ in range(rng.randrange(1, 30))] for _ in range(300)]
    predicted = [[tag if rng.random() < 0.7 else rng.choice(labels) for tag in sentence] for sentence in true]
    ours = entity_scores(true, predicted)
    assert ours["entity_f1"] == pytest.approx(seqeval.f1_score(true, predicted), abs=1e-12)
    assert ours["entity_precision"] == pytest.approx(seqeval.precision_score(true, predicted), abs=1e-12)
    assert ours["entity_recall"] == pytest.approx(seqeval.recall_score(true, predicted), abs=1e-12)
    assert ours["token_accuracy"] == pytest.approx(seqeval.accuracy_score(true, predicted), abs=1e-12)
    assert spans(["I-PER", "I-PER", "B-LOC", "I-ORG", "O"]) == [("PER", 0, 2), ("LOC", 2, 3), ("ORG", 3, 4)]


@pytest.mark.parametrize("arch", ["bert", "roberta"])
def test_each_word_label_goes_on_its_first_piece(arch, tiny_checkpoints):
    tokenizer = load_backbone(str(tiny_checkpoints[arch])).tokenizer
    words = ["Angela", "Merkelberg", "visited", "São", "Paulo", "🙂", "東京", "."]
    labels = [1, 2, 0, 5, 6, 0, 5, 0]
    text, word_spans = joined(words)
    encoded = tokenizer(text, return_offsets_mapping=True)
    pieces = piece_labels(word_ids(encoded["offset_mapping"], word_spans), labels)
    assert len(pieces) == len(encoded["input_ids"]) and pieces[0] == IGNORED
    assert [p for p in pieces if p != IGNORED] == labels  # every word labelled once, in order
    firsts = [i for i, p in enumerate(pieces) if p != IGNORED]
    for i, word in zip(firsts, words):  # on the piece where the word starts
        assert encoded["offset_mapping"][i][0] == word_spans[words.index(word)][0]


def _tokens(*rows):
    return [Token(label, score, {label: score}, start, end, word) for label, score, start, end, word in rows]


def test_pieces_group_into_entities_as_the_pipeline_groups_them():
    text = "Angela Merkelberg met Paris"
    tokens = _tokens(("B-PER", 0.9, 0, 6, 0), ("I-PER", 0.8, 7, 13, 1), ("B-PER", 0.4, 13, 17, 1),
                     ("O", 0.9, 18, 21, 2), ("B-LOC", 0.7, 22, 27, 3))
    simple = entities(text, tokens, "simple")
    assert [(e.entity_group, e.word, e.start, e.end) for e in simple] == [
        ("PER", "Angela Merkel", 0, 13), ("PER", "berg", 13, 17), ("LOC", "Paris", 22, 27)]
    assert simple[0].score == pytest.approx(0.85)
    first = entities(text, tokens, "first")  # the word Merkelberg takes its first piece's label
    assert [(e.entity_group, e.word) for e in first] == [("PER", "Angela Merkelberg"), ("LOC", "Paris")]
    assert [e.word for e in entities(text, tokens, "max")] == ["Angela Merkelberg", "Paris"]
    assert [e.entity_group for e in entities(text, tokens, "none")] == ["B-PER", "I-PER", "B-PER", "B-LOC"]
    with pytest.raises(InvalidArgument, match="aggregation"):
        entities(text, tokens, "longest")


def _publish_token_task(store, backbone, name, seed):
    generator = torch.Generator().manual_seed(seed)
    hidden = backbone.config.hidden_size
    head = {"head.weight": torch.randn(len(CONLL.labels), hidden, generator=generator) * 3,
            "head.bias": torch.randn(len(CONLL.labels), generator=generator)}
    manifest = Manifest(name=name, kind="row_delta", method="test", task=CONLL, head=HeadConfig(), backbone=backbone.ref())
    return artifact.publish(store, manifest, synthetic.row_delta(backbone, k=2, seed=seed, scale=0.5) | head)


def test_token_tasks_mix_with_classifiers_and_embedders_in_one_batch(tiny_backbone, store):
    backbone = tiny_backbone
    versions = [_publish_token_task(store, backbone, "ner-a", 1), _publish_token_task(store, backbone, "ner-b", 2),
                artifact.publish(store, Manifest(name="sst2", kind="row_delta", method="test", task=get_task("sst2"),
                                                 head=HeadConfig(), backbone=backbone.ref()),
                                 synthetic.row_delta(backbone, k=2, seed=3, scale=0.5) | random_head(backbone)),
                artifact.publish(store, Manifest(name="embed", kind="plain", method="test",
                                                 task=as_type(get_task("stsb"), "embedding"), head=HeadConfig(),
                                                 backbone=backbone.ref()), {})]
    runtime = ByName(Runtime(backbone))
    for version in versions:
        runtime.add(artifact.load(store, version, backbone), name=version.name)
    texts = TEXTS[:4] + TRICKY
    names = [v.name for v in versions]
    mixed_names = [names[i % len(names)] for i in range(len(texts))]
    mixed = runtime.predict(mixed_names, texts)
    for name, text, got in zip(mixed_names, texts, mixed):
        alone = runtime.predict([name], [text])[0]
        if got.tokens is not None:
            assert [(t.label, t.start, t.end) for t in got.tokens] == [(t.label, t.start, t.end) for t in alone.tokens]
            np.testing.assert_allclose([t.score for t in got.tokens], [t.score for t in alone.tokens], atol=1e-5)
        elif got.embedding is not None:
            np.testing.assert_allclose(got.embedding, alone.embedding, atol=1e-5)
        else:
            assert got.label == alone.label and got.score == pytest.approx(alone.score, abs=1e-5)


@pytest.fixture(scope="module")
def minilm_tagger(tmp_path_factory):
    """A private MiniLM (tasks attach to it) serving a token task."""
    from ticketserve.registry import open_store

    backbone = load_backbone()
    store = open_store(str(tmp_path_factory.mktemp("tagger")))
    runtime = Runtime(backbone)
    return runtime, runtime.add(artifact.load(store, _publish_token_task(store, backbone, "ner", 0), backbone))


@pytest.mark.parametrize("text", TRICKY)
def test_served_pieces_cover_every_character_of_the_text_once(minilm_tagger, text):
    runtime, task = minilm_tagger
    tokens = runtime.predict([task], [text])[0].tokens
    covered = [i for t in tokens for i in range(t.start, t.end)]
    assert covered == sorted(set(covered))  # in order, no piece overlapping another
    assert {i for i, c in enumerate(text) if not c.isspace()} == set(covered)
    assert all(not text[t.start:t.end].isspace() for t in tokens)
    for entity in entities(text, tokens, "simple"):
        assert entity.word == text[entity.start:entity.end]


def test_every_door_answers_entities(registry, tiny_bert):
    from tests.test_protocols import http, serve, text_input
    from ticketserve.runtime.client import Client
    from ticketserve.v1 import pb

    tritonclient_http = pytest.importorskip("tritonclient.http")
    backbone = load_backbone(tiny_bert)
    _publish_token_task(registry, backbone, "ner", 5)
    texts = TRICKY[:2]
    runtime = ByName(Runtime(backbone))
    runtime.add(artifact.load(registry, "ner", backbone), name="ner")
    want = runtime.predict(["ner"] * len(texts), texts)
    expected = [[e.__dict__ for e in entities(t, p.tokens, "first")] for t, p in zip(texts, want)]
    with serve(registry, tiny_bert) as server:
        base = f"http://127.0.0.1:{server.http_port}"
        status, body = http("POST", base + "/v1/predict", {"task": "ner", "inputs": texts, "aggregation": "first",
                                                           "return_tokens": True})
        assert status == 200
        for got, entity_rows, prediction in zip(body["predictions"], expected, want):
            assert [(e["entity_group"], e["start"], e["end"], e["word"]) for e in got["entities"]] == \
                [(e["entity_group"], e["start"], e["end"], e["word"]) for e in entity_rows]
            assert [(t["label"], t["start"], t["end"]) for t in got["tokens"]] == \
                [(t.label, t.start, t.end) for t in prediction.tokens]
        status, body = http("POST", base + "/v1/predict", {"task": "ner", "inputs": texts, "aggregation": "longest"})
        assert status == 400
        status, body = http("POST", base + "/v1/fanout", {"tasks": ["ner", "alpha"], "inputs": texts})
        assert status == 200 and body["results"][1]["predictions"][0]["entities"] is None
        with Client(f"127.0.0.1:{server.port}") as client:
            response = client.inference.Predict(pb.PredictRequest(task="ner", inputs=[{"text": t} for t in texts],
                                                                   aggregation="first"))
            for got, entity_rows in zip(response.predictions, expected):
                assert [(e.entity_group, e.start, e.end, e.word) for e in got.entities] == \
                    [(e["entity_group"], e["start"], e["end"], e["word"]) for e in entity_rows]
                assert not got.tokens  # only on request
        rest = tritonclient_http.InferenceServerClient(f"127.0.0.1:{server.http_port}")
        inferred = rest.infer("ner", [text_input(tritonclient_http, texts)], parameters={"aggregation": "first"})
        found = [json.loads(row) for row in inferred.as_numpy("entities")]
        assert [[(e["entity_group"], e["start"], e["end"]) for e in row] for row in found] == \
            [[(e["entity_group"], e["start"], e["end"]) for e in row] for row in expected]
        assert [o["name"] for o in rest.get_model_metadata("ner")["outputs"]] == ["entities", "tokens"]


@pytest.mark.parametrize("arch", ["bert", "roberta", "minilm"])
def test_stock_token_classifiers_and_their_peft_adapters_serve_with_stock_logits(arch, tiny_checkpoints, tmp_path):
    from transformers import AutoModelForTokenClassification

    from tests.helpers import assert_serves_like_stock
    from ticketserve.formats.hf_import import read_classifier
    from ticketserve.formats.peft_import import read_peft

    peft = pytest.importorskip("peft")
    checkpoint = load_backbone().source if arch == "minilm" else str(tiny_checkpoints[arch])
    backbone = load_backbone(checkpoint)
    inputs = backbone.tokenizer(TEXTS, padding=True, return_tensors="pt")
    torch.manual_seed(0)
    model = AutoModelForTokenClassification.from_pretrained(checkpoint, num_labels=len(CONLL.labels)).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.02)
        expected = model(**inputs).logits
    model.save_pretrained(tmp_path / "classifier")
    manifest, tensors = read_classifier(tmp_path / "classifier", backbone, "imported", CONLL)
    assert manifest.kind == "full" and manifest.task.type == "token_classification"
    assert_serves_like_stock(manifest, tensors, backbone, expected, tmp_path / "registry")

    base = AutoModelForTokenClassification.from_pretrained(checkpoint, num_labels=len(CONLL.labels)).eval()
    adapted = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"],
                                                        task_type="TOKEN_CLS")).eval()
    with torch.no_grad():
        for name, parameter in adapted.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                parameter.normal_(0, 0.5)
        expected = adapted(**inputs).logits
    adapted.save_pretrained(tmp_path / "adapter")
    manifest, tensors = read_peft(tmp_path / "adapter", backbone, "imported", CONLL)
    assert manifest.kind == "lora"
    assert_serves_like_stock(manifest, tensors, backbone, expected, tmp_path / "registry-lora")
    with pytest.raises(InvalidArgument, match="ForSequenceClassification"):
        read_classifier(tmp_path / "classifier", backbone, "wrong", get_task("sst2"))


def test_a_trained_tagger_serves_the_entity_f1_its_training_measured(store):
    from ticketserve.core.data import load_split
    from ticketserve.runtime.evaluate import evaluate
    from ticketserve.trainers.config import TrainConfig
    from ticketserve.trainers.run import train

    backbone = load_backbone()  # a private copy: training attaches to it
    spec = get_task("wnut17")
    config = TrainConfig(max_steps=4, batch_size=16, train_samples=64, eval_samples=64, lr=5e-3)
    outcome = train("bitfit", spec, backbone, config, store, data_dir="sample", show_progress=False)
    manifest = store.manifest(outcome.published[0])
    assert manifest.task.type == "token_classification" and manifest.task.scheme == "IOB2"
    assert set(manifest.metrics) == {"entity_f1", "token_accuracy"}
    served = load_backbone()
    runtime = Runtime(served)
    task = runtime.add(artifact.load(store, outcome.published[0], served))
    measured = evaluate(runtime, task, load_split(spec, spec.eval_split, "sample", 64, seed=42))
    assert measured == pytest.approx(manifest.metrics, abs=1e-6)


def test_a_text_past_the_token_limit_is_cut_with_exact_offsets_or_refused(tiny_backbone, store):
    from ticketserve.runtime.tokenizing import Tokenization

    version = _publish_token_task(store, tiny_backbone, "ner", 4)
    runtime = Runtime(tiny_backbone, max_length=12)
    task = runtime.add(artifact.load(store, version, tiny_backbone))
    text = "Angela Merkel  visited São Paulo 🙂 and 東京 with Emmanuel Macron and twenty other people"
    tokens = runtime.predict([task], [text])[0].tokens
    assert len(tokens) == 10  # 12 with [CLS] and [SEP]
    covered = [i for t in tokens for i in range(t.start, t.end)]
    assert set(covered) == {i for i, c in enumerate(text[:tokens[-1].end]) if not c.isspace()}  # a prefix, exactly
    refusing = Tokenization(tiny_backbone.tokenizer, max_tokens=12, truncate=False)
    with pytest.raises(InvalidArgument, match="tokens; the limit is 12"):
        refusing.features([text], spans=True)


@pytest.mark.parametrize(("given", "used"), [(None, 1e-2), (3e-3, 3e-3)])
def test_a_supermask_tagger_trains_its_fresh_token_head_at_its_own_rate(store, given, used):
    """At the sequence head's 1e-3 a supermask tagger learned nothing in 2 epochs of WNUT-17 (every
    word O); a token task's head takes 1e-2 unless the user names a rate."""
    from ticketserve.trainers.config import TrainConfig
    from ticketserve.trainers.run import train

    config = TrainConfig(max_steps=1, batch_size=8, train_samples=8, eval_samples=8)
    outcome = train("supermask", get_task("wnut17"), load_backbone(), config, store, data_dir="sample",
                    show_progress=False, options={"head_lr": given} if given else None)
    assert store.manifest(outcome.published[0]).details["head_lr"] == used


@pytest.mark.slow  # about a minute in all; training on token tasks stays in the default run through bitfit and supermask
@pytest.mark.parametrize(("method", "options"), [
    ("full", None), ("bitfit", None), ("dominant", None), ("dominant", {"ticket": "search"}), ("random", None),
    ("lora", None), ("supermask", None)])
def test_every_method_trains_a_tagger(store, method, options):
    """The study's rows, one step each: every method (Dominant-1 on the ticket shipped for
    MiniLM and on one searched on the set itself) publishes a token task scored by entity F1."""
    from ticketserve.trainers.config import TrainConfig
    from ticketserve.trainers.run import train

    config = TrainConfig(max_steps=1, batch_size=8, train_samples=8, eval_samples=8)
    outcome = train(method, get_task("wnut17"), load_backbone(), config, store, data_dir="sample",
                    show_progress=False, options=options)
    manifest = store.manifest(outcome.published[-1])
    assert manifest.task.type == "token_classification" and set(manifest.metrics) == {"entity_f1", "token_accuracy"}
    if method == "dominant":
        assert manifest.details["ticket_source"] == ("searched" if options else "shipped")
