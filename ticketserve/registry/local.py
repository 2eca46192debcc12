"""Local directory store: content-addressed blobs, atomic publish, safe for concurrent writers.

Layout under the root:
    blobs/sha256/<ab>/<hex>        every manifest and payload file, named by its hash
    refs/<name>/versions/<n>       the manifest digest of version n
    refs/<name>/tags/<tag>         a version number
    tmp/                           files being written, each locked by its writer (gc removes
                                   those no live process holds)
    locks/<name>.lock              serialises version numbering per name

Every write goes to tmp/, is fsynced and renamed into place, so a killed process leaves
at most unreferenced blobs or temp files, never a visible half-written version. A version's
pointer and its tags are staged together before any is renamed, so a full disk fails the
publish with nothing new visible. Version
numbers are allocated under an OS file lock (released by the kernel if the holder dies).
"""

from __future__ import annotations

import errno
import fcntl
import os
import time
import uuid
from pathlib import Path

from filelock import FileLock

from ticketserve.registry.errors import NotFound, StorageError, TicketserveError
from ticketserve.registry.store import (
    DEFAULT_TAG,
    NAME_RE,
    TAG_RE,
    ArtifactVersion,
    NameRefs,
    Store,
    check_name,
    check_tag,
    is_version,
    parse_digest,
    parse_version,
    register_store,
    sha256_digest,
)

STALE_TMP_SECONDS = 3600
TMP_GRACE_SECONDS = 10.0
RECENT_SECONDS = 2.0  # a refs folder changed this recently is stamped file by file (see ref_stamps)


@register_store("file")
class LocalStore(Store):
    def __init__(self, url: str):
        self.root = Path(url.removeprefix("file://")).expanduser().resolve()
        self.url = str(self.root)
        for sub in ("blobs/sha256", "refs", "tmp", "locks"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)

    # -- low-level writes ------------------------------------------------------------------

    def _stage(self, data: bytes) -> _Staged:
        """Write `data` to a new temp file, fsynced and locked until it is committed or
        dropped: a writer killed mid-way leaves an unlocked file that gc recognises."""
        path = self.root / "tmp" / f"{uuid.uuid4().hex}.part"
        fd = -1
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            fcntl.flock(fd, fcntl.LOCK_EX)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        except OSError as exc:
            if fd >= 0:
                os.close(fd)
            path.unlink(missing_ok=True)
            raise self._storage_error(path, exc) from exc
        return _Staged(path, fd)

    def _storage_error(self, path: Path, exc: OSError) -> StorageError:
        reason = "disk full" if exc.errno == errno.ENOSPC else exc.strerror or str(exc)
        return StorageError(f"cannot write {path} in registry {self.url}: {reason}")

    def _write_all(self, writes: dict[Path, bytes]) -> None:
        """Put several files in place, all or none: every one is staged first (where a full
        disk fails, nothing is visible yet), then each is renamed into place in order; if a
        rename fails, those already renamed get their previous content back."""
        staged: list[tuple[Path, _Staged]] = []
        try:
            for path, data in writes.items():
                try:
                    path.parent.mkdir(parents=True, exist_ok=True)
                except OSError as exc:
                    raise self._storage_error(path, exc) from exc
                staged.append((path, self._stage(data)))
        except StorageError:
            for _, tmp in staged:
                tmp.drop()
            raise
        previous = {path: path.read_bytes() if path.exists() else None for path in writes}
        done: list[Path] = []
        try:
            for path, tmp in staged:
                os.replace(tmp.path, path)
                done.append(path)
            for folder in {path.parent for path in writes}:
                _fsync_dir(folder)
        except OSError as exc:
            for path in done:  # best effort: renames and unlinks need no free space
                if previous[path] is None:
                    path.unlink(missing_ok=True)
                else:
                    path.write_bytes(previous[path])
            raise self._storage_error(path, exc) from exc
        finally:
            for _, tmp in staged:
                tmp.drop()

    def _write_atomic(self, path: Path, data: bytes) -> None:
        """tmp + fsync + rename; on failure (e.g. disk full) nothing is left behind."""
        self._write_all({path: data})

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
            pointer = {refs / "versions" / str(version): digest.encode()}
            self._write_all(pointer | {refs / "tags" / tag: str(version).encode() for tag in (DEFAULT_TAG, *tags)})
        return version

    def names(self) -> list[str]:
        return sorted(entry.name for entry in _name_folders(self.root / "refs")
                      if any(is_version(f) for f in _listing(os.path.join(entry.path, "versions"))))

    def versions(self, name: str) -> dict[int, str]:
        return _versions_in(str(self._refs(name)))

    def tags(self, name: str) -> dict[str, int]:
        return _tags_in(str(self._refs(name)))

    def listing(self) -> list[NameRefs]:
        """One pass over refs/ with plain string paths (at 10,000 names, path objects were most
        of a listing's time); a file removed while listing is left out, as on S3."""
        found = []
        for entry in sorted(_name_folders(self.root / "refs"), key=lambda e: e.name):
            try:
                tags = _tags_in(entry.path)  # before versions, as Store._resolve reads them
                versions = _versions_in(entry.path)
            except TicketserveError as exc:
                found.append(NameRefs(entry.name, {}, {}, str(exc)))
                continue
            except OSError as exc:
                found.append(NameRefs(entry.name, {}, {}, str(self._storage_error(Path(entry.path), exc))))
                continue
            if versions:
                found.append(NameRefs(entry.name, versions, tags))
        return found

    def ref_stamps(self) -> dict[str, str]:
        """A name's stamp is the inode and mtime of its versions/ and tags/ folders: every publish,
        tag move and removal renames into or unlinks from one of them, which moves the folder's
        mtime — two stats per name, however many versions it has. Two changes within one tick of
        the file system's clock can share an mtime, so a folder changed in the last
        `RECENT_SECONDS` is stamped file by file as well (as git treats a racily clean index)."""
        stamps = {}
        recent = time.time_ns() - int(RECENT_SECONDS * 1e9)
        for entry in _name_folders(self.root / "refs"):
            parts = []
            for kind in ("versions", "tags"):
                folder = os.path.join(entry.path, kind)
                try:
                    st = os.stat(folder)
                except FileNotFoundError:
                    continue
                parts.append(f"{kind}|{st.st_ino}|{st.st_mtime_ns}")
                if st.st_mtime_ns >= recent:
                    parts += _file_stamps(folder)
            stamps[entry.name] = "\n".join(parts)
        return stamps

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
        removed_blobs = 0
        cutoff = time.time() - min_age_seconds  # younger blobs may belong to a publish in flight
        for path in (self.root / "blobs" / "sha256").glob("*/*"):
            if "sha256:" + path.name not in live and _mtime(path) < cutoff:
                path.unlink(missing_ok=True)
                removed_blobs += 1
        leftovers = self.leftovers(min(min_age_seconds, TMP_GRACE_SECONDS))
        for path, _ in leftovers:
            path.unlink(missing_ok=True)
        return {"blobs_removed": removed_blobs, "tmp_removed": len(leftovers), "blobs_kept": len(live)}

    def leftovers(self, grace_seconds: float = TMP_GRACE_SECONDS) -> list[tuple[Path, int]]:
        """Temp files whose writer is gone: no process holds their lock (a live writer holds it
        from creation to rename; the kernel drops it when the writer dies, `kill -9` included)."""
        found = []
        grace = time.time() - grace_seconds  # a file is created an instant before it is locked
        for path in (self.root / "tmp").iterdir():
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:  # renamed or dropped meanwhile
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # a live writer
            else:
                info = os.fstat(fd)
                if info.st_mtime < grace:
                    found.append((path, info.st_size))
            finally:
                os.close(fd)
        return found


class _Staged:
    """A fully written, fsynced temp file whose lock says its writer is alive."""

    def __init__(self, path: Path, fd: int):
        self.path, self.fd = path, fd

    def drop(self) -> None:
        """Release the lock and remove the temp file if it was not renamed into place."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        self.path.unlink(missing_ok=True)


def _name_folders(refs: Path) -> list[os.DirEntry]:
    return [entry for entry in os.scandir(refs) if entry.is_dir() and NAME_RE.fullmatch(entry.name)]


def _listing(folder: str) -> list[str]:
    try:
        return os.listdir(folder)
    except (FileNotFoundError, NotADirectoryError):
        return []


def _ref_files(name_folder: str, kind: str, wanted) -> list[tuple[str, bytes, str]]:
    """(file name, its bytes, its path) of a name's version or tag files that `wanted` accepts."""
    folder = os.path.join(name_folder, kind)
    found = []
    for entry in _listing(folder):
        if not wanted(entry):
            continue
        path = os.path.join(folder, entry)
        try:
            with open(path, "rb") as handle:
                found.append((entry, handle.read(), path))
        except FileNotFoundError:  # removed while listing
            continue
    return found


def _versions_in(name_folder: str) -> dict[int, str]:
    return {int(v): parse_digest(data, where) for v, data, where in _ref_files(name_folder, "versions", is_version)}


def _tags_in(name_folder: str) -> dict[str, int]:
    return {t: parse_version(data, where) for t, data, where in _ref_files(name_folder, "tags", TAG_RE.fullmatch)}


def _file_stamps(folder: str) -> list[str]:
    """Each file's name, inode, mtime and size: a rewrite is a new inode (written aside, then renamed)."""
    stamps = []
    for name in sorted(_listing(folder)):
        try:
            st = os.stat(os.path.join(folder, name))
        except FileNotFoundError:
            continue
        stamps.append(f"{name}|{st.st_ino}|{st.st_mtime_ns}|{st.st_size}")
    return stamps


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return float("inf")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
