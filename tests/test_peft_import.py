"""A directory saved by stock PEFT (LoRA on a BERT/RoBERTa sequence classifier) serves through
ticketserve with stock PEFT + transformers' outputs, alone and mixed in one batch with our own
kinds; what cannot be reproduced exactly is refused with a clear error."""

from __future__ import annotations

import json

import pytest
import torch

from tests.helpers import TEXTS, ByName, assert_serves_like_stock
from ticketserve.core import artifact
from ticketserve.core.backbone import load_backbone
from ticketserve.core.errors import BackboneMismatch, InvalidArgument
from ticketserve.core.tasks import get_task
from ticketserve.formats.peft_import import read_peft
from ticketserve.registry import open_store
from ticketserve.runtime.executor import Runtime

peft = pytest.importorskip("peft")


def stock_adapter(checkpoint, directory, seed: int = 0, **overrides):
    """A stock classifier with a LoRA adapter (query r=4, value r=2), trained-looking weights, saved."""
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(str(checkpoint), num_labels=2).eval()
    config = dict(r=4, lora_alpha=8, target_modules=["query", "value"], rank_pattern={"value": 2},
                  alpha_pattern={"value": 6}, modules_to_save=["classifier"], task_type="SEQ_CLS") | overrides
    model = peft.get_peft_model(model, peft.LoraConfig(**config)).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                parameter.normal_(0, 0.5)
    model.save_pretrained(directory)
    return model


def stock_logits(model, backbone, texts):
    inputs = backbone.tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        return model(**inputs).logits


@pytest.mark.parametrize("arch", ["bert", "roberta", "minilm"])
def test_a_stock_peft_adapter_serves_with_stock_outputs_alone_and_mixed(arch, tiny_checkpoints, minilm, tmp_path):
    checkpoint = minilm.source if arch == "minilm" else tiny_checkpoints[arch]  # MiniLM's pooler: from its checkpoint
    # the tiny BERT checkpoint has no pooler, so the stock classifier's is random: it must travel with the adapter
    saved = ["classifier", "pooler"] if arch == "bert" else ["classifier"]
    model = stock_adapter(checkpoint, tmp_path / "adapter", modules_to_save=saved)
    backbone = load_backbone(str(checkpoint))
    expected = stock_logits(model, backbone, TEXTS)

    manifest, tensors = read_peft(tmp_path / "adapter", backbone, "imported", get_task("sst2"))
    assert manifest.kind == "lora" and manifest.head.dense and manifest.head.pooling == "cls"
    assert_serves_like_stock(manifest, tensors, backbone, expected, tmp_path / "registry")


def test_the_cli_imports_an_adapter_and_predicts_with_it(tiny_checkpoints, tmp_path):
    from typer.testing import CliRunner

    from ticketserve.cli import app

    checkpoint = tiny_checkpoints["bert"]
    model = stock_adapter(checkpoint, tmp_path / "adapter", seed=2, modules_to_save=["classifier", "pooler"])
    registry = str(tmp_path / "registry")
    result = CliRunner().invoke(app, ["registry", "import", str(tmp_path / "adapter"), "--format", "peft", "--task",
                                      "sst2", "--name", "from-peft", "--backbone", str(checkpoint), "--registry", registry])
    assert result.exit_code == 0 and "imported from-peft:1" in result.output, result.output
    result = CliRunner().invoke(app, ["predict", "from-peft", "--backbone", str(checkpoint), "--registry", registry,
                                      "--json", TEXTS[0]])
    assert result.exit_code == 0, result.output
    want = stock_logits(model, load_backbone(str(checkpoint)), TEXTS[:1]).softmax(-1)[0]
    got = json.loads(result.output)["predictions"][0]["probabilities"]
    assert [got["negative"], got["positive"]] == pytest.approx(want.tolist(), abs=1e-5)


@pytest.mark.parametrize("what", ["pickle", "dora", "bias", "embeddings", "other base", "no classifier", "not lora",
                                  "random pooler"])
def test_what_cannot_be_served_exactly_is_refused(what, tiny_checkpoints, tmp_path):
    checkpoint, directory = tiny_checkpoints["bert"], tmp_path / "adapter"
    overrides = {"random pooler": {}, "dora": {"use_dora": True}, "bias": {"bias": "all"}, "no classifier": {"modules_to_save": None,
                                                                                        "task_type": None},
                 "embeddings": {"target_modules": ["query", "word_embeddings"]}}.get(what, {})
    stock_adapter(checkpoint, directory, **({"modules_to_save": ["classifier", "pooler"]} | overrides
                                           if what != "random pooler" else overrides))
    config = json.loads((directory / "adapter_config.json").read_text())
    if what == "pickle":
        (directory / "adapter_model.safetensors").rename(directory / "adapter_model.bin")
    elif what == "other base":
        config["base_model_name_or_path"] = "bert-base-uncased"
    elif what == "not lora":
        config["peft_type"] = "IA3"
    (directory / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(BackboneMismatch if what == "other base" else InvalidArgument) as caught:
        read_peft(directory, load_backbone(str(checkpoint)), "x", get_task("sst2"))
    assert str(caught.value)


@pytest.mark.parametrize("source", ["trained here", "imported from stock PEFT"])
def test_export_then_import_gives_identical_outputs(source, tiny_checkpoints, tmp_path):
    from ticketserve.formats.peft import export_peft
    from ticketserve.trainers.config import TrainConfig
    from ticketserve.trainers.run import train

    checkpoint = tiny_checkpoints["roberta"]
    backbone, store = load_backbone(str(checkpoint)), open_store(str(tmp_path / "registry"))
    if source == "trained here":
        train("lora", get_task("sst2"), load_backbone(str(checkpoint)), TrainConfig(train_samples=32, eval_samples=32,
              batch_size=16, epochs=1, lr=5e-3), store, data_dir="sample", show_progress=False, name="original",
              options={"r": 3, "target": "query,intermediate"})
    else:
        stock_adapter(checkpoint, tmp_path / "stock")
        artifact.publish(store, *read_peft(tmp_path / "stock", backbone, "original", get_task("sst2")))
    original = artifact.load(store, "original", backbone)
    export_peft(original, backbone, tmp_path / "exported")
    artifact.publish(store, *read_peft(tmp_path / "exported", backbone, "again", get_task("sst2")))
    runtime = ByName(Runtime(backbone, device="cpu"))
    runtime.add(original, name="original")
    runtime.add(artifact.load(store, "again", backbone), name="again")
    inputs = runtime.tokenize(TEXTS)
    for got, want in zip(runtime.logits(["again"] * len(TEXTS), inputs), runtime.logits(["original"] * len(TEXTS), inputs)):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", ["bert", "roberta"])
def test_a_classifier_adapter_exports_as_a_stock_seq_cls_adapter(arch, tiny_checkpoints, tmp_path):
    """Imported from stock PEFT, exported again: stock PEFT + transformers load it as a
    sequence classifier (no ticketserve code) and give the original adapter's logits."""
    from transformers import AutoModelForSequenceClassification

    from ticketserve.formats.peft import HEAD_FILE, export_peft

    checkpoint = tiny_checkpoints[arch]
    saved = ["classifier", "pooler"] if arch == "bert" else ["classifier"]
    original = stock_adapter(checkpoint, tmp_path / "stock", seed=5, modules_to_save=saved)
    backbone, store = load_backbone(str(checkpoint)), open_store(str(tmp_path / "registry"))
    artifact.publish(store, *read_peft(tmp_path / "stock", backbone, "imported", get_task("sst2")))
    export_peft(artifact.load(store, "imported", backbone), backbone, tmp_path / "exported")
    config = json.loads((tmp_path / "exported" / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS" and not (tmp_path / "exported" / HEAD_FILE).exists()
    torch.manual_seed(123)  # the stock classifier's fresh head is random: the adapter must replace all of it
    base = AutoModelForSequenceClassification.from_pretrained(str(checkpoint), num_labels=2)
    reloaded = peft.PeftModel.from_pretrained(base, tmp_path / "exported").eval()
    torch.testing.assert_close(stock_logits(reloaded, backbone, TEXTS), stock_logits(original, backbone, TEXTS),
                               atol=1e-5, rtol=0)
