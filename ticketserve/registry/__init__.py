"""Artifact registry: the schema of an artifact and the stores that keep them. No torch here."""

from ticketserve.registry.manifest import BackboneRef, FileEntry, HeadConfig, Manifest, TaskSpec
from ticketserve.registry.store import ArtifactVersion, Reference, Store, bundle_manifest, register_store
from ticketserve.registry.stores import open_store

__all__ = [
    "ArtifactVersion",
    "BackboneRef",
    "FileEntry",
    "HeadConfig",
    "Manifest",
    "Reference",
    "Store",
    "TaskSpec",
    "bundle_manifest",
    "open_store",
    "register_store",
]
