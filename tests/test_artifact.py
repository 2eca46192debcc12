"""Artifacts through the registry: round trip, and refusal of corrupt or foreign payloads."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save as save_safetensors

from tests.helpers import manifest_for, random_head, random_row_delta
from ticketserve.core import artifact
from ticketserve.core.backbone import load_backbone
from ticketserve.core.errors import BackboneMismatch, CorruptArtifact, NotFound


def test_round_trip_keeps_every_tensor(store, tiny_backbone):
    tensors = random_row_delta(tiny_backbone) | random_head(tiny_backbone)
    version = artifact.publish(store, manifest_for(tiny_backbone, "rt"), tensors)
    loaded = artifact.load(store, "rt", tiny_backbone)
    assert loaded.version == version and loaded.manifest.ticketserve_version
    assert loaded.tensors.keys() == tensors.keys()
    for key, tensor in tensors.items():
        assert torch.equal(loaded.tensors[key], tensor)


def test_artifact_from_another_backbone_is_refused(store, tiny_checkpoints):
    bert = load_backbone(str(tiny_checkpoints["bert"]))
    roberta = load_backbone(str(tiny_checkpoints["roberta"]))
    artifact.publish(store, manifest_for(bert, "bert-task"), random_row_delta(bert) | random_head(bert))
    with pytest.raises(BackboneMismatch, match="bert-task:1 was trained on backbone"):
        artifact.load(store, "bert-task", roberta)


def _payload_blob(store, ref) -> Path:
    version = store.resolve(ref)
    sha = store.manifest(version).files[artifact.PAYLOAD].sha256
    return Path(store.url) / "blobs" / "sha256" / sha[:2] / sha


def test_flipped_payload_byte_is_never_loaded(store, tiny_backbone):
    artifact.publish(store, manifest_for(tiny_backbone, "flip"), random_row_delta(tiny_backbone) | random_head(tiny_backbone))
    blob = _payload_blob(store, "flip")
    data = bytearray(blob.read_bytes())
    data[-3] ^= 0x40
    blob.write_bytes(bytes(data))
    with pytest.raises(CorruptArtifact, match="checksum mismatch"):
        artifact.load(store, "flip", tiny_backbone)


def test_payload_that_does_not_fit_the_kind_or_head_is_refused(store, tiny_backbone):
    bad_delta = random_row_delta(tiny_backbone)
    key = next(k for k in bad_delta if k.endswith(".delta"))
    bad_delta[key] = bad_delta[key][:, :3]
    artifact.publish(store, manifest_for(tiny_backbone, "bad-delta"), bad_delta | random_head(tiny_backbone))
    with pytest.raises(CorruptArtifact, match="delta shape"):
        artifact.load(store, "bad-delta", tiny_backbone)
    artifact.publish(store, manifest_for(tiny_backbone, "no-head"), random_row_delta(tiny_backbone))
    with pytest.raises(CorruptArtifact, match="the task head must be exactly head.weight, head.bias"):
        artifact.load(store, "no-head", tiny_backbone)
    artifact.publish(store, manifest_for(tiny_backbone, "wide-head"), random_head(tiny_backbone, outputs=5))
    with pytest.raises(CorruptArtifact, match=r"head.weight is torch.float32 \(5, 32\); the task \(2 outputs\)"):
        artifact.load(store, "wide-head", tiny_backbone)
    for key, bad in {"head.bias": torch.zeros(7), "head.weight": torch.zeros(2, 32, dtype=torch.int64)}.items():
        artifact.publish(store, manifest_for(tiny_backbone, "odd-head"), random_row_delta(tiny_backbone)
                         | random_head(tiny_backbone) | {key: bad})
        with pytest.raises(CorruptArtifact, match=f"{key} is"):  # verified bytes that would not attach
            artifact.load(store, "odd-head", tiny_backbone)
    artifact.publish(store, manifest_for(tiny_backbone, "extra"), random_row_delta(tiny_backbone)
                     | random_head(tiny_backbone) | {"head.scale": torch.ones(1)})
    with pytest.raises(CorruptArtifact, match="payload has head.bias, head.scale, head.weight"):
        artifact.load(store, "extra", tiny_backbone)


def test_non_safetensors_payload_and_unknown_kind_are_refused(store, tiny_backbone):
    store.publish(manifest_for(tiny_backbone, "junk"), {artifact.PAYLOAD: b"\x00" * 64})
    with pytest.raises(CorruptArtifact, match="not valid safetensors"):
        artifact.load(store, "junk", tiny_backbone)
    store.publish(manifest_for(tiny_backbone, "alien", kind="hologram"),
                  {artifact.PAYLOAD: save_safetensors(random_head(tiny_backbone))})
    with pytest.raises(NotFound, match="unknown artifact kind"):
        artifact.load(store, "alien", tiny_backbone)
    with pytest.raises(NotFound):
        artifact.publish(store, manifest_for(tiny_backbone, "alien2", kind="hologram"), random_head(tiny_backbone))
