"""Training end to end: trainers → registry → runtime, on the bundled MiniLM and tiny models."""

from __future__ import annotations

import torch

from tests.helpers import ByName, in_memory_artifact, random_row_delta
from ticketserve.core import artifact
from ticketserve.core.backbone import dense_matrices, load_backbone
from ticketserve.core.data import load_split
from ticketserve.core.tasks import get_task
from ticketserve.runtime.evaluate import evaluate
from ticketserve.runtime.executor import Runtime
from ticketserve.trainers.config import TrainConfig
from ticketserve.trainers.run import train

SST2 = get_task("sst2")


def test_bitfit_on_minilm_publish_load_predict(store):
    backbone = load_backbone()  # training attaches rows to it: a private copy, not the session one
    config = TrainConfig(train_samples=48, eval_samples=64, batch_size=16, epochs=2, lr=5e-3, seed=3)
    outcome = train("bitfit", SST2, backbone, config, store, data_dir="sample", show_progress=False)
    manifest = store.manifest(outcome.version)
    assert (manifest.kind, manifest.method, manifest.task.name) == ("row_delta", "bitfit", "sst2")
    matrices = dense_matrices(backbone.model)
    bias_rows = sum(m.out_features for m in matrices.values())
    assert manifest.trainable_params == bias_rows + 384 * 2 + 2
    assert len(manifest.curves["eval"]) == 2 and manifest.curves["train_loss"] is not None
    assert manifest.details["train_examples"] == 48 and manifest.details["steps"] == 6

    fresh = load_backbone()
    loaded = artifact.load(store, outcome.version, fresh)
    assert all(loaded.tensors[f"{name}.index"].tolist() == [m.in_features] for name, m in matrices.items())
    runtime = ByName(Runtime(fresh, device="cpu"))
    runtime.add(loaded)
    dev = load_split(SST2, "validation", "sample", samples=64, seed=3)
    # the best checkpoint was restored and the served artifact scores exactly what training measured
    assert evaluate(runtime, runtime.get(loaded.manifest.name), dev) == manifest.metrics
    predictions = runtime.predict(["sst2-bitfit"] * 2, ["a triumph of a film", "a dreary waste of time"])
    assert all(p.label in SST2.labels and abs(sum(p.probabilities.values()) - 1) < 1e-5 for p in predictions)


def test_full_finetuning_artifact_serves_next_to_row_delta_tasks(store, tiny_checkpoints):
    backbone = load_backbone(str(tiny_checkpoints["bert"]))
    config = TrainConfig(train_samples=40, eval_samples=48, batch_size=8, max_steps=6, eval_steps=2, seed=1)
    outcome = train("full", SST2, backbone, config, store, data_dir="sample", show_progress=False)
    manifest = store.manifest(outcome.version)
    assert manifest.kind == "full" and len(manifest.curves["eval"]) == 3
    best = max(point["accuracy"] for point in manifest.curves["eval"])
    assert manifest.metrics["accuracy"] == best
    loaded = artifact.load(store, "sst2-full", load_backbone(str(tiny_checkpoints["bert"])))
    assert any(key.endswith("attention.self.query.weight") for key in loaded.kind_tensors)
    assert "encoder.embeddings.word_embeddings.weight" in loaded.kind_tensors  # every changed tensor is kept

    runtime = ByName(Runtime(load_backbone(str(tiny_checkpoints["bert"])), device="cpu"))
    runtime.add(loaded)
    runtime.add(in_memory_artifact(runtime.backbone, "rows", random_row_delta(runtime.backbone)))
    dev = load_split(SST2, "validation", "sample", samples=48, seed=1)
    assert evaluate(runtime, runtime.get("sst2-full"), dev) == manifest.metrics
    texts = list(dev["text"][:4])
    mixed = runtime.logits(["sst2-full", "rows", "sst2-full", "rows"], runtime.tokenize(texts))
    for i, name in enumerate(["sst2-full", "rows", "sst2-full", "rows"]):
        torch.testing.assert_close(mixed[i], runtime.logits([name], runtime.tokenize([texts[i]]))[0], atol=1e-5, rtol=0)


def test_early_stopping_ends_the_run(store, tiny_checkpoints):
    backbone = load_backbone(str(tiny_checkpoints["roberta"]))
    config = TrainConfig(train_samples=64, eval_samples=32, batch_size=4, epochs=5, eval_steps=1, patience=2, lr=1e-9)
    outcome = train("bitfit", SST2, backbone, config, store, data_dir="sample", show_progress=False)
    # lr 1e-9 changes nothing: the first evaluation stays best and two more end the run
    assert outcome.fit.steps == 3 and outcome.fit.best_step == 1


def test_lora_trains_only_its_factors_and_serves_what_training_measured(store, tiny_checkpoints):
    backbone = load_backbone(str(tiny_checkpoints["bert"]))
    before = {k: v.clone() for k, v in backbone.model.state_dict().items()}
    config = TrainConfig(train_samples=48, eval_samples=64, batch_size=16, epochs=2, lr=5e-3, seed=3)
    outcome = train("lora", SST2, backbone, config, store, data_dir="sample", show_progress=False,
                    options={"r": 2, "alpha": 4, "target": "query,value,output"})
    manifest = store.manifest(outcome.version)
    assert (manifest.kind, manifest.method) == ("lora", "lora")
    for key, value in backbone.model.state_dict().items():  # the backbone itself never trained
        torch.testing.assert_close(value, before[key], atol=0, rtol=0)
    loaded = artifact.load(store, outcome.version, load_backbone(str(tiny_checkpoints["bert"])))
    layers, hidden = backbone.config.num_hidden_layers, backbone.config.hidden_size
    matrices = {k.rsplit(".", 1)[0] for k in loaded.kind_tensors}
    assert len(matrices) == 3 * layers and not any("attention.output" in m for m in matrices)  # `output` is the FFN's
    assert loaded.tensors["encoder.layer.0.attention.self.query.scaling"].item() == 2.0
    assert any(loaded.tensors[f"{m}.lora_B"].abs().max() > 0 for m in matrices)  # B left zero: nothing learnt
    assert manifest.trainable_params == sum(v.numel() for k, v in loaded.kind_tensors.items()
                                            if not k.endswith(".scaling")) + hidden * 2 + 2
    runtime = ByName(Runtime(load_backbone(str(tiny_checkpoints["bert"])), device="cpu"))
    runtime.add(loaded)
    dev = load_split(SST2, "validation", "sample", samples=64, seed=3)
    assert evaluate(runtime, runtime.get(loaded.manifest.name), dev) == manifest.metrics
