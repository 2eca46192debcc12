"""An artifact = manifest + tensors. Publishing serialises to safetensors; loading verifies
checksums (via the store), the backbone fingerprint and the tensors' fit to their kind."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from registry import ArtifactVersion, Manifest, Reference, Store
from ticketserve import __version__
from ticketserve.backbone import Backbone
from ticketserve.errors import BackboneMismatch, CorruptArtifact, InvalidArgument
from ticketserve.kinds import get_kind
from ticketserve.model import HEAD_PREFIX

PAYLOAD = "payload.safetensors"


@dataclass
class Artifact:
    version: ArtifactVersion
    manifest: Manifest
    tensors: dict[str, torch.Tensor]

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
    if manifest.backbone.fingerprint != backbone.fingerprint:
        raise BackboneMismatch(
            f"{version} was trained on backbone {manifest.backbone.name!r} ({manifest.backbone.fingerprint[:19]}…), "
            f"not on {backbone.name!r} ({backbone.fingerprint[:19]}…)"
        )
    kind = get_kind(manifest.kind)
    if kind.is_task:
        _check_head(artifact, backbone)
    kind.validate(artifact.kind_tensors, backbone.model)
    return artifact


def _check_head(artifact: Artifact, backbone: Backbone) -> None:
    version, manifest, tensors = artifact.version, artifact.manifest, artifact.tensors
    head = {HEAD_PREFIX + "weight", HEAD_PREFIX + "bias"}
    if not head <= tensors.keys():
        raise CorruptArtifact(f"{version}: payload lacks the task head ({', '.join(sorted(head))})")
    weight = tensors[HEAD_PREFIX + "weight"]
    if tuple(weight.shape) != (manifest.task.num_outputs, backbone.config.hidden_size):
        raise CorruptArtifact(f"{version}: head shape {tuple(weight.shape)} does not fit task and backbone")
