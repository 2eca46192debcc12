"""Embedding and reranking tasks: imports equal sentence-transformers, losses equal its
definitions, and embedding, reranking and classification tasks mix in one batch."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ticketserve.core import artifact, losses, synthetic
from ticketserve.core.backbone import load_backbone
from ticketserve.core.errors import InvalidArgument
from ticketserve.core.tasks import as_type, get_task
from ticketserve.formats.sentence_transformers import read_sentence_transformer
from ticketserve.registry import HeadConfig, Manifest
from ticketserve.runtime.executor import Runtime
from tests.helpers import TEXTS, random_head

st = pytest.importorskip("sentence_transformers")
from sentence_transformers.sentence_transformer.modules import Dense, Normalize, Pooling, Transformer  # noqa: E402


def _served(store, backbone, version, texts):
    runtime = Runtime(backbone)
    task = runtime.add(artifact.load(store, version, backbone))
    return np.array([p.embedding for p in runtime.predict([task] * len(texts), texts)])


def test_the_bundled_minilm_serves_its_own_embeddings_as_sentence_transformers_computes_them(minilm, store):
    path = minilm.source
    manifest, tensors = read_sentence_transformer(path, minilm, "minilm-embed")
    assert (manifest.kind, manifest.task.type, tensors) == ("plain", "embedding", {})
    assert manifest.head.pooling == "mean" and manifest.head.normalize
    assert read_sentence_transformer(path, minilm, "cut", [128, 256])[0].head.dimensions == [256, 128]
    with pytest.raises(InvalidArgument, match="below the model's 384"):
        read_sentence_transformer(path, minilm, "cut", [384])
    version = artifact.publish(store, manifest, tensors)
    expected = st.SentenceTransformer(path, device="cpu").encode(TEXTS, normalize_embeddings=True)
    np.testing.assert_allclose(_served(store, load_backbone(), version, TEXTS), expected, atol=1e-5)


def test_a_fine_tuned_model_with_cls_pooling_and_a_dense_projection_imports_as_full(tiny_checkpoints, store, tmp_path):
    base = str(tiny_checkpoints["bert"])
    transformer = Transformer(base)
    with torch.no_grad():  # fine-tuned: one matrix moved away from the base
        transformer.model.encoder.layer[0].attention.self.query.weight.add_(0.05)
    model = st.SentenceTransformer(modules=[transformer, Pooling(transformer.get_embedding_dimension(), "cls"),
                                            Dense(transformer.get_embedding_dimension(), 16), Normalize()], device="cpu")
    model.save(str(tmp_path / "st"))
    backbone = load_backbone(base)
    manifest, tensors = read_sentence_transformer(tmp_path / "st", backbone, "tiny-embed")
    assert manifest.kind == "full" and manifest.head.projection == 16 and manifest.head.activation == "tanh"
    assert [k for k in tensors if not k.startswith("head.")] == ["encoder.encoder.layer.0.attention.self.query.weight"]
    version = artifact.publish(store, manifest, tensors)
    np.testing.assert_allclose(_served(store, backbone, version, TEXTS), model.encode(TEXTS), atol=1e-5)


def test_other_pooling_modes_and_modules_are_refused(tiny_checkpoints, tmp_path):
    base = str(tiny_checkpoints["bert"])
    transformer = Transformer(base)
    st.SentenceTransformer(modules=[transformer, Pooling(transformer.get_embedding_dimension(), "max")],
                           device="cpu").save(str(tmp_path / "max"))
    with pytest.raises(InvalidArgument, match="pooling max"):
        read_sentence_transformer(tmp_path / "max", load_backbone(base), "x")


@pytest.mark.parametrize("name", ["cosent", "cosine", "mnrl"])
def test_embedding_losses_equal_sentence_transformers_definitions(name):
    from sentence_transformers.sentence_transformer import losses as st_losses

    generator = torch.Generator().manual_seed(0)
    pairs = torch.randn(12, 2, 8, generator=generator)
    labels = torch.rand(12, generator=generator)
    theirs = {"cosent": st_losses.CoSENTLoss, "cosine": st_losses.CosineSimilarityLoss,
              "mnrl": st_losses.MultipleNegativesRankingLoss}[name](model=None)
    expected = theirs.compute_loss_from_embeddings([pairs[:, 0], pairs[:, 1]], labels)
    torch.testing.assert_close(losses.task_loss(as_type(get_task("stsb"), "embedding"), pairs, labels, name),
                               expected, atol=1e-5, rtol=1e-5)


def test_a_matryoshka_loss_is_the_loss_summed_over_the_full_and_each_leading_width():
    generator = torch.Generator().manual_seed(1)
    pairs, labels = torch.randn(8, 2, 16, generator=generator), torch.rand(8, generator=generator)
    spec = as_type(get_task("stsb"), "embedding")
    expected = sum(losses.cosent(pairs[..., :width], labels) for width in (16, 8, 4))
    torch.testing.assert_close(losses.task_loss(spec, pairs, labels, "cosent", (8, 4)), expected)


def _embedding_manifest(backbone, name, kind, **head) -> Manifest:
    return Manifest(name=name, kind=kind, method="test", task=as_type(get_task("stsb"), "embedding"),
                    head=HeadConfig(**head), backbone=backbone.ref())


def test_embedding_reranking_and_classification_tasks_mix_in_one_batch_as_each_alone(tiny_backbone, store):
    backbone = tiny_backbone
    hidden = backbone.config.hidden_size
    published = [
        artifact.publish(store, _embedding_manifest(backbone, "embed-plain", "plain", normalize=True), {}),
        artifact.publish(store, _embedding_manifest(backbone, "embed-rows", "row_delta", pooling="cls", projection=8),
                         synthetic.row_delta(backbone, k=2, seed=1, scale=0.5)
                         | {"head.weight": torch.randn(8, hidden), "head.bias": torch.randn(8)}),
        artifact.publish(store, Manifest(name="rerank", kind="row_delta", method="test",
                                         task=as_type(get_task("mrpc"), "reranking"), head=HeadConfig(),
                                         backbone=backbone.ref()),
                         synthetic.row_delta(backbone, k=2, seed=2, scale=0.5) | random_head(backbone, outputs=1)),
        artifact.publish(store, Manifest(name="sst2", kind="row_delta", method="test", task=get_task("sst2"),
                                         head=HeadConfig(), backbone=backbone.ref()),
                         synthetic.row_delta(backbone, k=2, seed=3, scale=0.5) | random_head(backbone)),
    ]
    runtime = Runtime(backbone)
    tasks = [runtime.add(artifact.load(store, v, backbone)) for v in published]
    pairs = {"rerank"}
    texts = TEXTS[:4]
    mixed_tasks = [t for t in tasks for _ in texts]
    mixed_texts = texts * len(tasks)
    alone = {t.name: runtime.predict([t] * len(texts), texts, texts if t.name in pairs else None) for t in tasks}
    rows = [runtime.tokenization.features([x], [x] if t.name in pairs else None)[0] for t, x in zip(mixed_tasks, mixed_texts)]
    mixed = runtime.predictions(mixed_tasks, runtime.logits(mixed_tasks, runtime.tokenization.pad(rows, runtime.device)))
    for i, (task, prediction) in enumerate(zip(mixed_tasks, mixed)):
        expected = alone[task.name][i % len(texts)]
        if task.spec.type == "embedding":
            np.testing.assert_allclose(prediction.embedding, expected.embedding, atol=1e-5)
        else:
            assert prediction.label == expected.label and prediction.score == pytest.approx(expected.score, abs=1e-5)
    assert 0 < alone["rerank"][0].score < 1 and alone["rerank"][0].label is None
    assert len(alone["embed-rows"][0].embedding) == 8
    assert np.linalg.norm(alone["embed-plain"][0].embedding) == pytest.approx(1.0, abs=1e-5)


def test_heads_without_tensors_run_once_for_every_task_that_computes_them_and_only_for_those(tiny_backbone, store):
    """Embedding heads with no projection are one function per config: a batch runs each such
    function once for all its tasks, and tasks that pool or normalise differently stay apart."""
    backbone = tiny_backbone
    published = [
        artifact.publish(store, _embedding_manifest(backbone, "mean-a", "plain", normalize=True), {}),
        artifact.publish(store, _embedding_manifest(backbone, "mean-b", "row_delta", normalize=True),
                         synthetic.row_delta(backbone, k=2, seed=4, scale=0.5)),
        artifact.publish(store, _embedding_manifest(backbone, "cls-raw", "row_delta", pooling="cls", normalize=False),
                         synthetic.row_delta(backbone, k=2, seed=5, scale=0.5)),
    ]
    runtime = Runtime(backbone)
    tasks = [runtime.add(artifact.load(store, v, backbone)) for v in published]
    assert tasks[0].head_group == tasks[1].head_group != tasks[2].head_group
    texts = TEXTS[:3]
    mixed_tasks = [tasks[i % 3] for i in range(len(texts) * 3)]
    mixed_texts = [texts[i // 3] for i in range(len(texts) * 3)]
    mixed = runtime.predict(mixed_tasks, mixed_texts)
    for task, text, prediction in zip(mixed_tasks, mixed_texts, mixed):
        alone = runtime.predict([task], [text])[0]
        np.testing.assert_allclose(prediction.embedding, alone.embedding, atol=1e-5)
    assert np.linalg.norm(mixed[2].embedding) != pytest.approx(1.0, abs=1e-3)  # cls-raw: not normalised


def _spearman_served(store, version, backbone, spec, samples):
    from scipy.stats import spearmanr

    from ticketserve.core.data import load_split

    rows = load_split(spec, spec.eval_split, "sample", samples, seed=42)
    runtime = Runtime(backbone)
    task = runtime.add(artifact.load(store, version, backbone))
    first = np.array([p.embedding for p in runtime.predict([task] * len(rows), rows["text"])])
    second = np.array([p.embedding for p in runtime.predict([task] * len(rows), rows["text_pair"])])
    cosine = (first * second).sum(1) / np.linalg.norm(first, axis=1) / np.linalg.norm(second, axis=1)
    return spearmanr(cosine, rows["label"])[0]


def test_a_trained_embedding_task_serves_the_spearman_its_training_measured(store):
    from ticketserve.trainers.config import TrainConfig
    from ticketserve.trainers.run import train

    minilm = load_backbone()  # training attaches rows to it: a private copy, not the session one
    config = TrainConfig(max_steps=3, batch_size=16, train_samples=64, eval_samples=96, task_type="embedding",
                         matryoshka_dims=[64, 128])
    outcome = train("bitfit", get_task("stsb"), minilm, config, store, data_dir="sample", show_progress=False)
    manifest = store.manifest(outcome.published[0])
    assert (manifest.task.type, manifest.head.normalize, manifest.details["loss"]) == ("embedding", True, "cosent")
    assert manifest.head.dimensions == [128, 64]  # requests may cut its vectors to these
    served = _spearman_served(store, outcome.published[0], load_backbone(), manifest.task, 96)
    assert served == pytest.approx(manifest.metrics["spearman"], abs=1e-4)


def test_a_reranker_trains_on_scaled_scores_and_answers_relevance(store):
    from ticketserve.trainers.config import TrainConfig
    from ticketserve.trainers.run import train

    minilm = load_backbone()  # a private copy: training attaches to it
    config = TrainConfig(max_steps=2, batch_size=16, train_samples=32, eval_samples=32, task_type="reranking")
    outcome = train("lora", get_task("stsb"), minilm, config, store, data_dir="sample", show_progress=False)
    manifest = store.manifest(outcome.published[0])
    assert manifest.task.type == "reranking" and manifest.details["label_scale"] == pytest.approx(0.2)
    backbone = load_backbone()
    runtime = Runtime(backbone)
    task = runtime.add(artifact.load(store, outcome.published[0], backbone))
    scores = [p.score for p in runtime.predict([task] * 2, ["a dog runs", "a dog runs"], ["a dog is running", "tax law"])]
    assert all(0 < s < 1 for s in scores)
    with pytest.raises(InvalidArgument, match="trains with bce"):
        train("lora", get_task("stsb"), minilm, config.model_copy(update={"loss": "mnrl"}), store, data_dir="sample",
              show_progress=False)


def test_a_peft_lora_adapter_of_a_sentence_transformer_imports_as_a_lora_embedding_task(minilm, store, tmp_path):
    from peft import LoraConfig

    model = st.SentenceTransformer(minilm.source, device="cpu")
    model.add_adapter(LoraConfig(task_type="FEATURE_EXTRACTION", r=4, lora_alpha=8, target_modules=["query", "value"]))
    with torch.no_grad():  # trained: B moved away from its zero start
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.05, generator=torch.Generator().manual_seed(0))
    model.save_pretrained(str(tmp_path / "adapter"))
    manifest, tensors = read_sentence_transformer(tmp_path / "adapter", minilm, "minilm-lora-embed")
    assert (manifest.kind, manifest.task.type, manifest.head.normalize) == ("lora", "embedding", True)
    version = artifact.publish(store, manifest, tensors)
    np.testing.assert_allclose(_served(store, load_backbone(), version, TEXTS), model.encode(TEXTS), atol=1e-5)


def test_a_classifiers_manifest_is_written_as_earlier_releases_read_it(tiny_checkpoints):
    """Fields v1 gained later are left out where unused: replicas of an earlier release share the registry."""
    import json

    backbone = load_backbone(str(tiny_checkpoints["bert"]))
    stored = json.loads(Manifest(name="t", kind="row_delta", method="test", task=get_task("sst2"), head=HeadConfig(),
                                 backbone=backbone.ref()).to_bytes())
    assert {"type", "scheme"}.isdisjoint(stored["task"]) and stored["head"] == {"pooling": "mean", "dropout": 0.1,
                                                                                  "dense": False}
    embedding = Manifest(name="e", kind="plain", method="test", task=as_type(get_task("stsb"), "embedding"),
                         head=HeadConfig(normalize=True), backbone=backbone.ref())
    again = Manifest.model_validate_json(embedding.to_bytes())
    assert (again.task.type, again.head.normalize) == ("embedding", True) and again == embedding
