"""Backbones: the bundled MiniLM, fingerprints, and refusal of unsupported models."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import GPT2Config, GPT2Model

from ticketserve.core.backbone import MATRICES, dense_matrices, fingerprint, load_backbone
from ticketserve.core.errors import InvalidArgument, NotFound


def test_bundled_minilm_is_the_default(minilm):
    assert minilm.name == "minilm"
    assert minilm.config.model_type == "bert"
    assert (minilm.config.num_hidden_layers, minilm.config.hidden_size) == (6, 384)
    assert len(dense_matrices(minilm.model)) == 6 * len(MATRICES)
    assert minilm.fingerprint.startswith("sha256:") and len(minilm.fingerprint) == 71


def test_fingerprint_is_stable_and_content_sensitive(tiny_checkpoints):
    first = load_backbone(str(tiny_checkpoints["bert"]))
    again = load_backbone(str(tiny_checkpoints["bert"]))
    assert first.fingerprint == again.fingerprint == fingerprint(first.model)
    with torch.no_grad():
        first.model.encoder.layer[0].output.dense.weight[0, 0] += 1e-6
    assert fingerprint(first.model) != again.fingerprint
    assert load_backbone(str(tiny_checkpoints["roberta"])).fingerprint != again.fingerprint


def test_fingerprint_is_cached_per_checkpoint(tiny_checkpoints, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    backbone = load_backbone(str(tiny_checkpoints["roberta"]))
    cache = json.loads((tmp_path / "ticketserve" / "fingerprints.json").read_text())
    assert backbone.fingerprint in cache.values()


def test_unsupported_and_missing_backbones_are_clear_errors(tmp_path):
    GPT2Model(GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=50)).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(InvalidArgument, match="supported: bert, roberta"):
        load_backbone(str(tmp_path / "gpt2"))
    with pytest.raises(NotFound, match="cannot load backbone"):
        load_backbone("no-such-org/no-such-model")
