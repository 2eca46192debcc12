"""Where a Dominant run's ticket comes from when none is named (`--ticket auto`): the ticket
shipped for the backbone, published to the registry on first use, else the registry's newest
ticket found on that backbone. And the consensus of several tickets, which is what ships.

Tickets transfer between tasks (benchmarks/studies/dominant.md), so a new task need not pay for a
search: the shipped ticket is the consensus of the four GLUE tasks' tickets on the bundled
MiniLM, stored as a registry bundle (`registry export`) inside the package.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ticketserve.core import artifact
from ticketserve.core.backbone import Backbone
from ticketserve.core.errors import CorruptArtifact, InvalidArgument, NotFound
from ticketserve.core.kinds.ticket import counts_of, to_tensors
from ticketserve.registry import ArtifactVersion, Store, bundle_manifest
from ticketserve.trainers.base import run_manifest
from ticketserve.trainers.config import TrainConfig

SHIPPED = Path(__file__).with_name("shipped")


def auto_ticket(store: Store, backbone: Backbone) -> tuple[ArtifactVersion, str] | None:
    """The ticket `--ticket auto` trains on, and where it came from ("shipped" or "registry");
    None when neither exists for this backbone (the caller searches one)."""
    shipped = shipped_ticket(store, backbone.fingerprint)
    if shipped is not None:
        return shipped, "shipped"
    newest = newest_ticket(store, backbone.fingerprint)
    return (newest, "registry") if newest is not None else None


def shipped_ticket(store: Store, fingerprint: str) -> ArtifactVersion | None:
    """The package's ticket for this backbone, published to `store` the first time it is asked
    for (an ordinary `ticket` artifact; later calls find the same version by its digest)."""
    for bundle in sorted(SHIPPED.glob("*.tar")):
        manifest, digest = bundle_manifest(bundle)
        if manifest.kind != "ticket" or manifest.backbone.fingerprint != fingerprint:
            continue
        known = {d: v for v, d in store.versions(manifest.name).items()} if manifest.name in store.names() else {}
        if digest in known:
            return ArtifactVersion(manifest.name, known[digest], digest)
        return store.import_bundle(bundle)
    return None


def newest_ticket(store: Store, fingerprint: str) -> ArtifactVersion | None:
    """The most recently created `ticket` in the registry found on this backbone (one manifest
    read per artifact name; unreadable ones are skipped: `registry verify` reports them)."""
    newest = None
    for name in store.names():
        try:
            version = store.resolve(name)
            manifest = store.manifest(version)
        except (CorruptArtifact, NotFound):
            continue
        if manifest.kind == "ticket" and manifest.backbone.fingerprint == fingerprint and (
                newest is None or manifest.created_at > newest[1]):
            newest = (version, manifest.created_at)
    return newest[0] if newest else None


def consensus_counts(counts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Out-weighted counts summed over tickets: a dimension many tasks out-weight ranks first.
    Tickets cut by quantile out-weight the same share of parameters, so each weighs the same."""
    if not counts or any(c.keys() != counts[0].keys() for c in counts):
        raise InvalidArgument("a consensus needs tickets of the same matrices")
    return {name: sum(c[name] for c in counts) for name in counts[0]}


def publish_consensus(store: Store, refs: list[str], name: str) -> ArtifactVersion:
    """Publish the consensus of tickets found on one backbone as a new `ticket` artifact."""
    if len(refs) < 2:
        raise InvalidArgument("a consensus needs at least two tickets")
    found = [artifact.read(store, ref, expect_kind="ticket") for ref in refs]
    backbone = found[0].manifest.backbone
    if any(f.manifest.backbone.fingerprint != backbone.fingerprint for f in found):
        raise InvalidArgument("the tickets were found on different backbones: "
                              + ", ".join(f"{f.version} on {f.manifest.backbone.name}" for f in found))
    counts = consensus_counts([counts_of(f.tensors) for f in found])
    first = found[0].manifest  # a ticket names one task; the sources' tasks are in the details
    manifest = run_manifest(name, "ticket", "ticket-consensus", first.task, backbone, TrainConfig(),
                            head=first.head, hyperparameters={}, details={
                                "sources": [f"{f.version}@{f.version.digest}" for f in found],
                                "tasks": [f.manifest.task.name for f in found],
                                "outweighted": int(sum(int(c.sum()) for c in counts.values()))})
    return artifact.publish(store, manifest, to_tensors(counts))
