"""An artifact = manifest + tensors. Publishing serialises to safetensors; loading verifies
checksums (via the store), the backbone fingerprint and the tensors' fit to their kind."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from ticketserve import __version__
from ticketserve.core.backbone import Backbone
from ticketserve.core.errors import BackboneMismatch, CorruptArtifact, InvalidArgument, TicketserveError, excerpt
from ticketserve.core.kinds import get_kind
from ticketserve.core.model import HEAD_PREFIX, head_shapes
from ticketserve.registry import ArtifactVersion, Manifest, Reference, Store

PAYLOAD = "payload.safetensors"


@dataclass
class Artifact:
    version: ArtifactVersion
    manifest: Manifest
    tensors: dict[str, torch.Tensor]
    prepared: Any = None  # what its kind's `prepare` returned, once `load` checked it for a backbone

    @property
    def head_tensors(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.tensors.items() if k.startswith(HEAD_PREFIX)}

    @property
    def kind_tensors(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.tensors.items() if not k.startswith(HEAD_PREFIX)}


def publish(store: Store, manifest: Manifest, tensors: dict[str, torch.Tensor],
            tags: tuple[str, ...] = (), files: dict[str, bytes] | None = None) -> ArtifactVersion:
    """Publish tensors as the safetensors payload, plus any extra `files` (e.g. a config)."""
    get_kind(manifest.kind)  # refuse to publish what no runtime can apply
    payload = save_safetensors({k: v.detach().cpu().contiguous() for k, v in tensors.items()})
    manifest = manifest.model_copy(update={"ticketserve_version": __version__})
    return store.publish(manifest, {PAYLOAD: payload, **(files or {})}, tags)


def read(store: Store, ref: str | Reference | ArtifactVersion, expect_kind: str | None = None) -> Artifact:
    """Fetch an artifact with verified checksums, without applying it to any backbone."""
    version = ref if isinstance(ref, ArtifactVersion) else store.resolve(ref)
    manifest = store.manifest(version)
    if expect_kind is not None and manifest.kind != expect_kind:
        raise InvalidArgument(f"{version} is a {manifest.kind!r} artifact, not a {expect_kind!r}")
    try:
        tensors = load_safetensors(store.read_file(version, manifest, PAYLOAD))
    except SafetensorError as exc:
        raise CorruptArtifact(f"{version}: payload is not valid safetensors: {exc}") from exc
    return Artifact(version, manifest, tensors)


def load(store: Store, ref: str | Reference | ArtifactVersion, backbone: Backbone,
         expect_kind: str | None = None) -> Artifact:
    """Fetch and check an artifact for `backbone`; every failure is a clear TicketserveError."""
    artifact = read(store, ref, expect_kind)
    version, manifest = artifact.version, artifact.manifest
    check_backbone(version, manifest, backbone)
    kind = get_kind(manifest.kind)
    try:
        if kind.is_task:
            _check_head(artifact, backbone)
        artifact.prepared = kind.prepare(artifact.kind_tensors, backbone.model)
    except TicketserveError:
        raise
    except Exception as exc:  # a check tripping over tensors it did not foresee: still a bad artifact
        raise CorruptArtifact(f"{version}: its tensors do not fit a {manifest.kind} artifact "
                              f"({type(exc).__name__}: {excerpt(str(exc), 300)})") from exc
    return artifact


def check_backbone(version: ArtifactVersion, manifest: Manifest, backbone: Backbone) -> None:
    if manifest.backbone.fingerprint != backbone.fingerprint:
        raise BackboneMismatch(
            f"{version} was trained on backbone {manifest.backbone.name!r} ({manifest.backbone.fingerprint[:19]}…), "
            f"not on {backbone.name!r} ({backbone.fingerprint[:19]}…)"
        )


def _check_head(artifact: Artifact, backbone: Backbone) -> None:
    """Exactly the head's tensors (a weight and a bias; a dense layer's too with `dense`; an
    embedding's projection, or none), floating point, shaped for the task's outputs and the
    backbone's width — whatever `head_from_tensors` would fail on later fails here."""
    version, manifest, tensors = artifact.version, artifact.manifest, artifact.head_tensors
    outputs, hidden = manifest.task.num_outputs, backbone.config.hidden_size
    expected = head_shapes(manifest.task, manifest.head, hidden)
    if tensors.keys() != expected.keys():
        raise CorruptArtifact(f"{version}: the task head must be exactly {', '.join(expected)} "
                              f"(payload has {', '.join(sorted(tensors)) or 'none'})")
    for key, shape in expected.items():
        tensor = tensors[key]
        if not tensor.is_floating_point() or tuple(tensor.shape) != shape:
            raise CorruptArtifact(f"{version}: {key} is {tensor.dtype} {tuple(tensor.shape)}; the task "
                                  f"({outputs} outputs) on this backbone (width {hidden}) needs floating point {shape}")
