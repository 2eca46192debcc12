"""What the registry offers a server (`tasks --all`): each name's newest version as a task
that can be loaded, or as errored with the reason — a corrupt or unreadable entry, an unknown
kind, another backbone, a load that failed. Entries that are not tasks (tickets, importance
records, sweeps, backbones) are not listed. One broken entry never hides the others."""

from __future__ import annotations

from dataclasses import dataclass

from ticketserve.core.artifact import check_backbone
from ticketserve.core.backbone import Backbone
from ticketserve.core.errors import TicketserveError
from ticketserve.core.kinds import get_kind
from ticketserve.registry import ArtifactVersion, Manifest, Store


@dataclass
class Offer:
    artifact: str  # name:version, or the bare name when it does not resolve
    digest: str
    manifest: Manifest | None  # None when the entry cannot be read
    error: str  # empty when the version can be loaded, as far as the registry tells


def offers(store: Store, backbone: Backbone, failed: dict[str, str]) -> list[Offer]:
    """Every task name's newest version; `failed` maps version keys to why they did not load."""
    newest: dict[str, ArtifactVersion | TicketserveError] = {}
    for refs in store.listing():
        try:
            newest[refs.name] = refs.newest()
        except TicketserveError as exc:
            newest[refs.name] = exc
    versions = [v for v in newest.values() if isinstance(v, ArtifactVersion)]
    manifests = dict(zip(versions, store.manifests(versions)))
    found = []
    for name, version in newest.items():
        if isinstance(version, TicketserveError):
            found.append(Offer(name, "", None, str(version)))
            continue
        manifest = manifests[version]
        try:
            if isinstance(manifest, TicketserveError):
                raise manifest
            if not get_kind(manifest.kind).is_task:
                continue
        except TicketserveError as exc:  # unreadable, or a kind this server does not know
            found.append(Offer(str(version), version.digest, None, str(exc)))
            continue
        error = failed.get(str(version), "")
        if not error:
            try:
                check_backbone(version, manifest, backbone)
            except TicketserveError as exc:
                error = str(exc)
        found.append(Offer(str(version), version.digest, manifest, error))
    return found
