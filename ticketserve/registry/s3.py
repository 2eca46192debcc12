"""S3-compatible object storage store (AWS S3, MinIO, Ceph, ...): `s3://bucket/prefix`.

Same layout and guarantees as the local store, with object-store primitives instead of
rename and file locks:
  * blobs and the manifest are uploaded before the version pointer, and an object is only
    visible once complete, so a version never appears half-published;
  * version numbers are allocated by exclusive create (`If-None-Match: *`): concurrent
    publishers from any number of machines each get their own number, nothing is lost;
  * `latest` is derived (the highest version), so racing publishers cannot move it backwards;
  * blobs are content-addressed and verified on every read; a local read-through cache
    keeps pulled blobs (valid forever: a digest names its bytes).
Endpoint: $TICKETSERVE_S3_ENDPOINT (or botocore's own $AWS_ENDPOINT_URL); credentials the
usual AWS way. Cache: $TICKETSERVE_S3_CACHE, default the user cache dir.
"""

from __future__ import annotations

import hashlib
import os
import time
import uuid
from pathlib import Path

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

MAX_VERSION_RACES = 64


@register_store("s3")
class S3Store(Store):
    def __init__(self, url: str):
        import s3fs
        from platformdirs import user_cache_dir

        self.url = url.rstrip("/")
        self.bucket, _, self.prefix = self.url.removeprefix("s3://").partition("/")
        endpoint = os.environ.get("TICKETSERVE_S3_ENDPOINT") or None
        self.fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint} if endpoint else {},
                                    skip_instance_cache=True, use_listings_cache=False)
        self.cache = Path(os.environ.get("TICKETSERVE_S3_CACHE") or Path(user_cache_dir("ticketserve")) / "s3-blobs")
        self._digests: dict[tuple[str, int], str] = {}  # version pointers never change: remember them

    # -- object helpers -----------------------------------------------------------------------

    def _key(self, *parts: str) -> str:
        return "/".join(p for p in (self.prefix, *parts) if p)

    def _path(self, *parts: str) -> str:
        return f"{self.bucket}/{self._key(*parts)}"

    def _put(self, data: bytes, *parts: str, exclusive: bool = False) -> None:
        extra = {"IfNoneMatch": "*"} if exclusive else {}
        try:
            self.fs.call_s3("put_object", Bucket=self.bucket, Key=self._key(*parts), Body=data, **extra)
        except FileExistsError:
            raise
        except (OSError, ValueError) as exc:
            raise StorageError(f"cannot write {self._key(*parts)} to {self.url}: {exc}") from exc

    def _names_under(self, *parts: str) -> list[str]:
        try:
            return [p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(self._path(*parts), detail=False)]
        except FileNotFoundError:
            return []

    def _blob_parts(self, digest: str) -> tuple[str, ...]:
        hexdigest = digest.removeprefix("sha256:")
        return "blobs", "sha256", hexdigest[:2], hexdigest

    def _put_blob(self, data: bytes) -> str:
        digest = sha256_digest(data)
        if not self.fs.exists(self._path(*self._blob_parts(digest))):
            self._put(data, *self._blob_parts(digest))
        return digest

    def _read_blob(self, digest: str) -> bytes:
        data = self._cached(digest)
        if data is None:
            try:
                data = self.fs.cat(self._path(*self._blob_parts(digest)))
            except FileNotFoundError:
                raise NotFound(f"blob {digest} is missing from registry {self.url}") from None
            self._keep(digest, data)
        return data

    def _read_blobs(self, digests: list[str]) -> dict[str, bytes | Exception]:
        """What the cache lacks is fetched in concurrent GETs (fsspec's batched cat)."""
        found: dict[str, bytes | Exception] = {}
        fetch = {}
        for digest in digests:
            data = self._cached(digest)
            if data is None:
                fetch[self._path(*self._blob_parts(digest))] = digest
            else:
                found[digest] = data
        for digest, data in self._cat(fetch).items():
            if isinstance(data, bytes):
                self._keep(digest, data)
            elif isinstance(data, FileNotFoundError):
                data = NotFound(f"blob {digest} is missing from registry {self.url}")
            found[digest] = data
        return found

    def _cat(self, paths: dict[str, object]) -> dict[object, bytes | Exception]:
        """Objects read concurrently: each path's key (in `paths`) → its bytes or the error reading it."""
        if not paths:
            return {}
        read = self.fs.cat(list(paths), on_error="return")
        return {key: read.get(path, FileNotFoundError(path)) for path, key in paths.items()}

    def _cached(self, digest: str) -> bytes | None:
        cached = self.cache / digest.removeprefix("sha256:")
        if cached.exists():
            data = cached.read_bytes()
            if sha256_digest(data) == digest:
                return data
            cached.unlink(missing_ok=True)  # a damaged cache entry is refetched, never trusted
        return None

    def _keep(self, digest: str, data: bytes) -> None:
        if sha256_digest(data) == digest:
            self.cache.mkdir(parents=True, exist_ok=True)
            tmp = self.cache / f".{uuid.uuid4().hex}.part"
            tmp.write_bytes(data)
            os.replace(tmp, self.cache / digest.removeprefix("sha256:"))

    # -- the Store interface ------------------------------------------------------------------

    def _commit_version(self, name: str, digest: str, tags: tuple[str, ...]) -> int:
        for _ in range(MAX_VERSION_RACES):
            version = max(self.versions(name), default=0) + 1
            try:
                self._put(digest.encode(), "refs", name, "versions", str(version), exclusive=True)
                break
            except FileExistsError:  # another publisher took this number: take the next
                continue
        else:
            raise StorageError(f"could not allocate a version of {name} after {MAX_VERSION_RACES} races")
        try:
            for tag in tags:
                self._put(str(version).encode(), "refs", name, "tags", tag)
        except StorageError:  # all or nothing: the version goes with its tags
            self.fs.rm(self._path("refs", name, "versions", str(version)))
            raise
        return version

    def names(self) -> list[str]:
        return sorted(name for name, files in self._ref_files().items() if any(map(is_version, files["versions"])))

    def listing(self) -> list[NameRefs]:
        """One paginated LIST of every ref, then the pointers not yet known and every tag in
        concurrent GETs: a few dozen round trips at 10,000 names, not four per name."""
        files = self._ref_files()
        wanted = {}
        for name, entries in files.items():
            wanted |= {self._path("refs", name, "versions", v): (name, "versions", v)
                       for v in entries["versions"] if is_version(v) and (name, int(v)) not in self._digests}
            wanted |= {self._path("refs", name, "tags", t): (name, "tags", t)
                       for t in entries["tags"] if TAG_RE.fullmatch(t)}
        read = self._cat(wanted)
        found = []
        for name, entries in sorted(files.items()):
            if not any(map(is_version, entries["versions"])):
                continue
            try:
                found.append(self._name_refs(name, entries["versions"], entries["tags"], read))
            except TicketserveError as exc:
                found.append(NameRefs(name, {}, {}, str(exc)))
        return found

    def _name_refs(self, name: str, versions: list[str], tags: list[str], read: dict) -> NameRefs:
        def content(kind: str, entry: str) -> bytes | None:
            data = read[(name, kind, entry)]
            if isinstance(data, FileNotFoundError):  # removed while listing
                return None
            if isinstance(data, Exception):
                raise StorageError(f"cannot read refs/{name}/{kind}/{entry} from {self.url}: {data}")
            return data

        where = f"{self.url}/refs/{name}"
        for v in versions:
            if is_version(v) and (name, int(v)) not in self._digests and (data := content("versions", v)) is not None:
                self._digests[(name, int(v))] = parse_digest(data, f"{where}/versions/{v}")
        found_versions = {int(v): self._digests[(name, int(v))] for v in versions if (name, int(v)) in self._digests}
        found_tags = {t: parse_version(data, f"{where}/tags/{t}") for t in tags
                      if TAG_RE.fullmatch(t) and (data := content("tags", t)) is not None}
        if found_versions:
            found_tags[DEFAULT_TAG] = max(found_versions)
        return NameRefs(name, found_versions, found_tags)

    def _ref_files(self) -> dict[str, dict[str, list[str]]]:
        """name → {"versions": its version files, "tags": its tag files}, from one paginated LIST."""
        root = self._path("refs")
        files: dict[str, dict[str, list[str]]] = {}
        for path in self._refs_listed():
            name, kind, entry = (path.removeprefix(root + "/").split("/") + ["", "", ""])[:3]
            if NAME_RE.fullmatch(name) and kind in ("versions", "tags") and entry:
                files.setdefault(name, {"versions": [], "tags": []})[kind].append(entry)
        return files

    def _refs_listed(self) -> dict[str, dict]:
        try:
            return self.fs.find(self._path("refs"), detail=True)
        except FileNotFoundError:
            return {}

    def versions(self, name: str) -> dict[int, str]:
        found = {}
        for entry in self._names_under("refs", check_name(name), "versions"):
            if not is_version(entry):
                continue
            key = (name, int(entry))
            if key not in self._digests:
                try:
                    data = self.fs.cat(self._path("refs", name, "versions", entry))
                except FileNotFoundError:  # removed while listing
                    continue
                self._digests[key] = parse_digest(data, f"{self.url}/refs/{name}/versions/{entry}")
            found[int(entry)] = self._digests[key]
        return found

    def tags(self, name: str) -> dict[str, int]:
        tags = {}
        for tag in self._names_under("refs", check_name(name), "tags"):
            if not TAG_RE.fullmatch(tag):
                continue
            try:
                data = self.fs.cat(self._path("refs", name, "tags", tag))
            except FileNotFoundError:
                continue
            tags[tag] = parse_version(data, f"{self.url}/refs/{name}/tags/{tag}")
        versions = self.versions(name)
        if versions:
            tags[DEFAULT_TAG] = max(versions)
        return tags

    def ref_stamps(self) -> dict[str, str]:
        root = self._path("refs")
        stamps: dict[str, hashlib._Hash] = {}
        for path, info in sorted(self._refs_listed().items()):  # one paginated LIST for every name
            relative = path.removeprefix(root + "/")
            stamps.setdefault(relative.split("/")[0], hashlib.sha256()).update(
                f"{relative}|{info.get('ETag')}|{info.get('LastModified')}|{info.get('size')}\n".encode())
        return {name: stamp.hexdigest() for name, stamp in stamps.items() if NAME_RE.fullmatch(name)}

    def set_tag(self, name: str, tag: str, version: int) -> None:
        check_tag(tag)
        if tag == DEFAULT_TAG:
            raise StorageError(f"'{DEFAULT_TAG}' always names the newest version in an S3 registry")
        if version not in self.versions(name):
            raise NotFound(f"{name} has no version {version}")
        self._put(str(version).encode(), "refs", name, "tags", tag)

    def remove(self, ref: ArtifactVersion) -> None:
        self.fs.rm(self._path("refs", ref.name, "versions", str(ref.version)))
        self._digests.pop((ref.name, ref.version), None)
        for tag, version in self.tags(ref.name).items():
            if version == ref.version and tag != DEFAULT_TAG:
                self.fs.rm(self._path("refs", ref.name, "tags", tag))

    def gc(self, min_age_seconds: float = 3600) -> dict[str, int]:
        live = self.live_digests()
        cutoff, removed = time.time() - min_age_seconds, 0
        try:
            blobs = self.fs.find(self._path("blobs", "sha256"), detail=True)
        except FileNotFoundError:
            blobs = {}
        for path, info in blobs.items():
            modified = info.get("LastModified")
            age_ok = modified is None or modified.timestamp() < cutoff
            if "sha256:" + path.rsplit("/", 1)[-1] not in live and age_ok:
                self.fs.rm(path)
                removed += 1
        return {"blobs_removed": removed, "tmp_removed": 0, "blobs_kept": len(live)}
