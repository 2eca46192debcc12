"""A fine-tuned Hugging Face sequence classifier (BERT, RoBERTa, the bundled MiniLM) imports
as a `full` artifact and serves with the stock model's outputs, alone and mixed with our own
kinds; imports also read hub ids, through huggingface_hub's cache (offline here); what would
not reproduce the stock model is refused with a clear error."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from tests.helpers import TEXTS, assert_serves_like_stock
from ticketserve.core.backbone import load_backbone
from ticketserve.core.errors import CorruptArtifact, InvalidArgument, NotFound
from ticketserve.core.tasks import get_task
from ticketserve.formats.hf_import import read_classifier


def stock_classifier(checkpoint, directory, seed: int = 0):
    """A stock *ForSequenceClassification on the checkpoint, every weight moved as fine-tuning would, saved."""
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(str(checkpoint), num_labels=2).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.02)
    model.save_pretrained(directory)
    return model


def stock_logits(model, backbone, texts):
    with torch.no_grad():
        return model(**backbone.tokenizer(texts, padding=True, return_tensors="pt")).logits


@pytest.mark.parametrize("arch", ["bert", "roberta", "minilm"])
def test_a_fine_tuned_classifier_serves_with_stock_outputs_alone_and_mixed(arch, tiny_checkpoints, minilm, tmp_path):
    checkpoint = minilm.source if arch == "minilm" else tiny_checkpoints[arch]
    model = stock_classifier(checkpoint, tmp_path / "classifier")
    backbone = load_backbone(str(checkpoint))
    expected = stock_logits(model, backbone, TEXTS)

    manifest, tensors = read_classifier(tmp_path / "classifier", backbone, "imported", get_task("sst2"))
    assert manifest.kind == "full" and manifest.head.dense and manifest.head.pooling == "cls"
    assert_serves_like_stock(manifest, tensors, backbone, expected, tmp_path / "registry")


def in_hub_cache(cache, repo_id: str, directory) -> None:
    """Lay `directory` out as huggingface_hub's cache holds a downloaded repository."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    commit = "0" * 40
    shutil.copytree(directory, repo / "snapshots" / commit)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)


@pytest.mark.parametrize("fmt", ["hf", "peft"])
def test_the_cli_imports_a_hub_id_through_the_hub_cache(fmt, tiny_checkpoints, tmp_path):
    """The same path a networked import takes: huggingface_hub resolves the id (here from its
    cache, offline), then the directory reader runs."""
    from tests.test_peft_import import stock_adapter

    checkpoint = tiny_checkpoints["bert"]
    if fmt == "hf":
        model = stock_classifier(checkpoint, tmp_path / "saved", seed=3)
    else:
        model = stock_adapter(checkpoint, tmp_path / "saved", seed=3, modules_to_save=["classifier", "pooler"])
    in_hub_cache(tmp_path / "hub", "someone/sst2-classifier", tmp_path / "saved")
    env = os.environ | {"HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    registry, backbone = str(tmp_path / "registry"), str(checkpoint)
    cli = [sys.executable, "-m", "ticketserve.cli"]
    done = subprocess.run([*cli, "registry", "import", "someone/sst2-classifier", "--format", fmt, "--task", "sst2",
                           "--name", "from-hub", "--backbone", backbone, "--registry", registry],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "imported from-hub:1" in done.stdout, done.stdout + done.stderr
    done = subprocess.run([*cli, "predict", "from-hub", "--backbone", backbone, "--registry", registry, "--json",
                           TEXTS[0]], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    want = stock_logits(model, load_backbone(backbone), TEXTS[:1]).softmax(-1)[0]
    got = json.loads(done.stdout)["predictions"][0]["probabilities"]
    assert [got["negative"], got["positive"]] == pytest.approx(want.tolist(), abs=1e-5)
    done = subprocess.run([*cli, "registry", "import", "someone/absent", "--format", fmt, "--task", "sst2",
                           "--name", "x", "--backbone", backbone, "--registry", registry],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and "cannot fetch 'someone/absent' from the hub" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("what", ["pickle", "bare encoder", "other config", "missing tensor", "foreign tensor",
                                  "outputs", "no directory"])
def test_what_would_not_reproduce_the_stock_model_is_refused(what, tiny_checkpoints, tmp_path):
    from safetensors.torch import load_file, save_file

    checkpoint, directory = tiny_checkpoints["bert"], tmp_path / "classifier"
    stock_classifier(checkpoint, directory)
    config, weights = json.loads((directory / "config.json").read_text()), directory / "model.safetensors"
    task, expected = get_task("sst2"), InvalidArgument
    if what == "pickle":
        weights.rename(directory / "pytorch_model.bin")
    elif what == "bare encoder":
        config["architectures"] = ["BertModel"]
    elif what == "other config":
        config["layer_norm_eps"] = 1e-5
    elif what in ("missing tensor", "foreign tensor"):
        state = load_file(weights)
        if what == "missing tensor":
            state.pop("bert.encoder.layer.0.output.dense.weight")
            expected = CorruptArtifact
        else:
            state["bert.encoder.layer.0.adapter.weight"] = torch.zeros(2)
        save_file(state, weights)
    elif what == "outputs":
        task = get_task("stsb")
    elif what == "no directory":
        directory, expected = tmp_path / "absent", NotFound
    if directory.exists():
        (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(expected) as caught:
        read_classifier(directory, load_backbone(str(checkpoint)), "x", task)
    assert str(caught.value)
