"""Local directory store: content-addressed blobs, atomic publish, safe for concurrent writers.

Layout under the root:
    blobs/sha256/<ab>/<hex>        every manifest and payload file, named by its hash
    refs/<name>/versions/<n>       the manifest digest of version n
    refs/<name>/tags/<tag>         a version number
    tmp/                           files being written (removed by gc when stale)
    locks/<name>.lock              serialises version numbering per name

Every write goes to tmp/, is fsynced and renamed into place, so a killed process leaves
at most unreferenced blobs or temp files, never a visible half-written version. Version
numbers are allocated under an OS file lock (released by the kernel if the holder dies).
"""

from __future__ import annotations

import errno
import os
import time
import uuid
from pathlib import Path

from filelock import FileLock

from registry.store import DEFAULT_TAG, ArtifactVersion, Store, check_name, check_tag, register_store, sha256_digest
from ticketserve.errors import NotFound, StorageError

STALE_TMP_SECONDS = 3600


@register_store("file")
class LocalStore(Store):
    def __init__(self, url: str):
        self.root = Path(url.removeprefix("file://")).expanduser().resolve()
        self.url = str(self.root)
        for sub in ("blobs/sha256", "refs", "tmp", "locks"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)

    # -- low-level writes ------------------------------------------------------------------

    def _write_atomic(self, path: Path, data: bytes) -> None:
        """tmp + fsync + rename; on failure (e.g. disk full) nothing is left behind."""
        tmp = self.root / "tmp" / f"{uuid.uuid4().hex}.part"
        try:
            with open(tmp, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            path.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp, path)
            _fsync_dir(path.parent)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            reason = "disk full" if exc.errno == errno.ENOSPC else exc.strerror or str(exc)
            raise StorageError(f"cannot write {path} in registry {self.url}: {reason}") from exc

    def _blob_path(self, digest: str) -> Path:
        hexdigest = digest.removeprefix("sha256:")
        return self.root / "blobs" / "sha256" / hexdigest[:2] / hexdigest

    def _put_blob(self, data: bytes) -> str:
        digest = sha256_digest(data)
        path = self._blob_path(digest)
        if path.exists():  # content-addressed: these bytes are stored; refresh mtime so gc keeps them
            os.utime(path)
        else:
            self._write_atomic(path, data)
        return digest

    def _read_blob(self, digest: str) -> bytes:
        try:
            return self._blob_path(digest).read_bytes()
        except FileNotFoundError:
            raise NotFound(f"blob {digest} is missing from registry {self.url}") from None

    def _refs(self, name: str) -> Path:
        return self.root / "refs" / check_name(name)

    # -- the Store interface ---------------------------------------------------------------

    def _commit_version(self, name: str, digest: str, tags: tuple[str, ...]) -> int:
        refs = self._refs(name)
        with FileLock(self.root / "locks" / f"{name}.lock"):
            version = max(self.versions(name), default=0) + 1
            self._write_atomic(refs / "versions" / str(version), digest.encode())
            for tag in (DEFAULT_TAG, *tags):
                self._write_atomic(refs / "tags" / tag, str(version).encode())
        return version

    def names(self) -> list[str]:
        return sorted(p.name for p in (self.root / "refs").iterdir() if (p / "versions").is_dir() and self.versions(p.name))

    def versions(self, name: str) -> dict[int, str]:
        folder = self._refs(name) / "versions"
        if not folder.is_dir():
            return {}
        return {int(p.name): p.read_text().strip() for p in folder.iterdir() if p.name.isdigit()}

    def tags(self, name: str) -> dict[str, int]:
        folder = self._refs(name) / "tags"
        if not folder.is_dir():
            return {}
        return {p.name: int(p.read_text().strip()) for p in folder.iterdir() if not p.name.startswith(".")}

    def set_tag(self, name: str, tag: str, version: int) -> None:
        check_tag(tag)
        if version not in self.versions(name):
            raise NotFound(f"{name} has no version {version}")
        with FileLock(self.root / "locks" / f"{name}.lock"):
            self._write_atomic(self._refs(name) / "tags" / tag, str(version).encode())

    def remove(self, ref: ArtifactVersion) -> None:
        refs = self._refs(ref.name)
        with FileLock(self.root / "locks" / f"{ref.name}.lock"):
            (refs / "versions" / str(ref.version)).unlink(missing_ok=True)
            remaining = self.versions(ref.name)
            for tag, version in self.tags(ref.name).items():
                if version != ref.version:
                    continue
                if tag == DEFAULT_TAG and remaining:  # latest falls back to the newest left
                    self._write_atomic(refs / "tags" / tag, str(max(remaining)).encode())
                else:
                    (refs / "tags" / tag).unlink(missing_ok=True)

    def gc(self, min_age_seconds: float = STALE_TMP_SECONDS) -> dict[str, int]:
        live = self.live_digests()
        removed_blobs = removed_tmp = 0
        cutoff = time.time() - min_age_seconds  # younger files may belong to a publish in flight
        for path in (self.root / "blobs" / "sha256").glob("*/*"):
            if "sha256:" + path.name not in live and path.stat().st_mtime < cutoff:
                path.unlink(missing_ok=True)
                removed_blobs += 1
        for path in (self.root / "tmp").iterdir():
            if path.stat().st_mtime < cutoff:
                path.unlink(missing_ok=True)
                removed_tmp += 1
        return {"blobs_removed": removed_blobs, "tmp_removed": removed_tmp, "blobs_kept": len(live)}


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
