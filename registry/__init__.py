"""Artifact registry: the schema of an artifact and the stores that keep them. No torch here."""

from registry.manifest import BackboneRef, FileEntry, HeadConfig, Manifest, TaskSpec
from registry.store import ArtifactVersion, Reference, Store, open_store, register_store

__all__ = [
    "ArtifactVersion",
    "BackboneRef",
    "FileEntry",
    "HeadConfig",
    "Manifest",
    "Reference",
    "Store",
    "TaskSpec",
    "open_store",
    "register_store",
]
