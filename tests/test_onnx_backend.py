"""The ONNX Runtime backend answers what the torch engine answers (≤ 1e-4) on mixed batches."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import ByName, in_memory_artifact, random_row_delta
from tests.test_supermask import _random_masks
from ticketserve.core.backbone import load_backbone
from ticketserve.core.kinds.structure_mask import to_tensors
from ticketserve.core.kinds.supermask import encode_masks
from ticketserve.runtime.executor import Runtime

TEXTS = ["a fine, moving film", "dreadful", "it could have been shorter, and funnier", "yes", "no way"]


@pytest.fixture(autouse=True)
def onnx_cache(tmp_path_factory, monkeypatch):
    """One export per tiny backbone for the whole module (exports are cached by fingerprint)."""
    root = tmp_path_factory.getbasetemp() / "onnx-cache"
    monkeypatch.setenv("XDG_CACHE_HOME", str(root))
    return root / "ticketserve" / "onnx"


def _tasks(backbone):
    layers, heads = backbone.config.num_hidden_layers, backbone.config.num_attention_heads
    keep = torch.ones(layers, heads, dtype=torch.bool)
    keep[0, 1] = keep[1, 3] = False
    return [in_memory_artifact(backbone, "rows-a", random_row_delta(backbone, k=3, seed=1, scale=0.3), seed=1),
            in_memory_artifact(backbone, "rows-b", random_row_delta(backbone, k=1, seed=2, scale=0.3), seed=2),
            in_memory_artifact(backbone, "gated", to_tensors(keep, torch.tensor([True, False])), seed=3,
                               kind="structure_mask"),
            in_memory_artifact(backbone, "masked", encode_masks(_random_masks(backbone, 4)), seed=4, kind="supermask")]


def test_onnx_matches_torch_on_a_batch_mixing_every_kind(tiny_checkpoints):
    for arch in ("bert", "roberta"):
        path = str(tiny_checkpoints[arch])
        torch_runtime = ByName(Runtime(load_backbone(path), device="cpu"))
        onnx_runtime = ByName(Runtime(load_backbone(path), backend="onnx"))
        for task in _tasks(torch_runtime.backbone):
            torch_runtime.add(task)
            onnx_runtime.add(task)
        names = ["rows-a", "gated", "rows-b", "masked", "rows-a"]
        expected = torch_runtime.logits(names, torch_runtime.tokenize(TEXTS))
        served = onnx_runtime.logits(names, onnx_runtime.tokenize(TEXTS))
        for got, want in zip(served, expected):
            torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
        plain = onnx_runtime.logits(["rows-b"], onnx_runtime.tokenize(TEXTS[:1]))[0]
        torch.testing.assert_close(plain, torch_runtime.logits(["rows-b"], torch_runtime.tokenize(TEXTS[:1]))[0],
                                   atol=1e-4, rtol=0)


def test_export_is_cached_by_fingerprint(tiny_checkpoints, onnx_cache):
    from ticketserve.runtime.backends.onnx_backend import cached_export

    backbone = load_backbone(str(tiny_checkpoints["bert"]))
    first = cached_export(backbone)
    assert first.parent.parent == onnx_cache and first.name == "encoder-v2.onnx"
    stamp = first.stat().st_mtime_ns
    again = cached_export(load_backbone(str(tiny_checkpoints["bert"])))
    assert again == first and again.stat().st_mtime_ns == stamp
    assert backbone.fingerprint.removeprefix("sha256:") in str(first)


def test_server_with_the_onnx_backend(tiny_checkpoints, tmp_path):
    from tests import helpers
    from tests.test_server import in_process

    path = str(tiny_checkpoints["roberta"])
    store, served, _ = helpers.serve_and_predict(path, tmp_path / "registry", backend="onnx")
    expected = in_process(store, path, "rows", helpers.TEXTS)
    for got, want in zip(served, expected):
        assert got.label == want.label and abs(got.score - want.score) < 1e-4
