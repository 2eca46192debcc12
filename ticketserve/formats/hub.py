"""Where an import reads from: a local directory as it is, anything else as a Hugging Face hub
id, fetched into the hub cache by `huggingface_hub` (so HF_TOKEN, HF_ENDPOINT, HF_HUB_OFFLINE
and the cache all work as users expect) — only files matching the import's patterns, so a
pickle is never even downloaded."""

from __future__ import annotations

import json
from pathlib import Path

from ticketserve.core.errors import CorruptArtifact, InvalidArgument, NotFound


def read_json(path: Path, what: str) -> dict:
    """A JSON file of an import's source; `what` says which file is missing, for the error."""
    if not path.is_file():
        raise NotFound(f"{path.parent} holds no {path.name} ({what})")
    try:
        return json.loads(path.read_text())
    except ValueError as exc:
        raise CorruptArtifact(f"{path}: not JSON ({exc})") from None


def local_directory(source: str, patterns: list[str]) -> Path:
    """`source` as a directory on this machine: itself, or its hub snapshot (files in `patterns`)."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise InvalidArgument(f"{source} is a file; an import reads a directory (or a hub id)")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError

    try:
        return Path(snapshot_download(source, allow_patterns=patterns))
    except HFValidationError:
        raise NotFound(f"{source} is neither a directory nor a hub id") from None
    except OSError as exc:  # offline, auth, a missing repository (all OSErrors there): huggingface_hub's words
        raise NotFound(f"cannot fetch {source!r} from the hub: {str(exc).splitlines()[0]}") from exc
