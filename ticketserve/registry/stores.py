"""Which store serves a registry URL: every store module registers its schemes on import."""

from __future__ import annotations

import os
from pathlib import Path

from ticketserve.registry import local, s3  # noqa: F401  (registration: file://, s3://)
from ticketserve.registry.errors import InvalidArgument
from ticketserve.registry.store import STORES, Store


def default_registry_url() -> str:
    from platformdirs import user_cache_dir

    return os.environ.get("TICKETSERVE_REGISTRY") or str(Path(user_cache_dir("ticketserve")) / "registry")


def open_store(url: str | None = None) -> Store:
    """Open the registry at `url`; default: $TICKETSERVE_REGISTRY, else the user cache dir."""
    url = url or default_registry_url()
    scheme = url.split("://", 1)[0] if "://" in url else "file"
    if scheme not in STORES:
        raise InvalidArgument(f"unsupported registry URL {url!r} (schemes: {', '.join(sorted(STORES))})")
    return STORES[scheme](url)
