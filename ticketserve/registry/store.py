"""The store interface, artifact references and the scheme → store registration.

A store keeps bytes: manifests and the files they list, under `name:version`, with movable
tags. It never interprets tensors. Every store verifies checksums on read.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import tarfile
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from ticketserve.registry.errors import CorruptArtifact, InvalidArgument, NotFound, StorageError, TicketserveError, excerpt
from ticketserve.registry.manifest import FileEntry, Manifest

# every pattern is matched whole (fullmatch): `$` alone would let a trailing newline through
NAME_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,127}")
TAG_RE = re.compile(r"[a-z][a-z0-9._-]{0,63}")
VERSION_RE = re.compile(r"[0-9]{1,9}")  # ASCII digits only: str.isdigit() also takes '²', '٣', '𝟏'
DIGEST_RE = re.compile(r"sha256:[0-9a-f]{64}")
DEFAULT_TAG = "latest"
_REF_RE = re.compile(rf"(?P<name>[^:@]+)(?::(?P<tag>[^:@]+))?(?:@(?P<digest>{DIGEST_RE.pattern}))?")


def check_name(name: str) -> str:
    if not NAME_RE.fullmatch(name):
        raise InvalidArgument(
            f"invalid artifact name {excerpt(name)}: use lowercase letters, digits, '.', '_' or '-' (at most 128)"
        )
    return name


def check_tag(tag: str) -> str:
    if not TAG_RE.fullmatch(tag):
        raise InvalidArgument(f"invalid tag {excerpt(tag)}: start with a letter; letters, digits, '.', '_', '-' (at most 64)")
    return tag


def is_version(selector: str) -> bool:
    """A version number (ASCII digits, at most 9 of them) rather than a tag."""
    return VERSION_RE.fullmatch(selector) is not None


def check_selector(selector: str) -> str:
    """A version number or a tag, as a request may name one."""
    if not is_version(selector) and not TAG_RE.fullmatch(selector):
        raise InvalidArgument(f"invalid version {excerpt(selector)}: a version number (up to 9 ASCII digits) or a tag")
    return selector


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def parse_version(data: bytes, where: object) -> int:
    """A tag file's content: one version number; anything else names the broken file."""
    text = data.decode("ascii", "replace").strip()
    if not is_version(text):
        raise CorruptArtifact(f"tag file {where} holds {excerpt(text)}, not a version number")
    return int(text)


def parse_digest(data: bytes, where: object) -> str:
    """A version pointer's content: one manifest digest; anything else names the broken file."""
    text = data.decode("ascii", "replace").strip()
    if not DIGEST_RE.fullmatch(text):
        raise CorruptArtifact(f"version file {where} holds {excerpt(text)}, not a sha256 digest")
    return text


@dataclass(frozen=True)
class Reference:
    """What a user types: `name`, `name:3`, `name:latest`, `name@sha256:…`."""

    name: str
    selector: str | None = None  # a version number or a tag
    digest: str | None = None

    @classmethod
    def parse(cls, text: str) -> Reference:
        match = _REF_RE.fullmatch(text)
        if not match:
            raise InvalidArgument(f"invalid artifact reference {excerpt(text)}: expected NAME[:VERSION|:TAG][@sha256:DIGEST]")
        return cls.of(match["name"], match["tag"], match["digest"])

    @classmethod
    def of(cls, name: str, selector: str | None = None, digest: str | None = None) -> Reference:
        """A reference from its parts (e.g. a request's task and version fields), each checked."""
        return cls(check_name(name), None if selector is None else check_selector(selector), digest)

    @property
    def pinned(self) -> bool:
        """Names one immutable version (a number or a digest), never following a tag."""
        return self.digest is not None or (self.selector is not None and is_version(self.selector))

    def __str__(self) -> str:
        return self.name + (f":{self.selector}" if self.selector else "") + (f"@{self.digest}" if self.digest else "")


@dataclass(frozen=True)
class ArtifactVersion:
    """A resolved, immutable artifact version."""

    name: str
    version: int
    digest: str

    def __str__(self) -> str:
        return f"{self.name}:{self.version}"


@dataclass(frozen=True)
class NameRefs:
    """One name's versions (number → manifest digest) and tags (tag → version) as a listing read
    them, or why they could not be read (a listing shows it and goes on with the others)."""

    name: str
    versions: dict[int, str]
    tags: dict[str, int]
    error: str = ""

    def newest(self) -> ArtifactVersion:
        """The version its default tag names (what a bare name resolves to)."""
        if self.error:
            raise StorageError(self.error)
        return pick(Reference.of(self.name), self.tags, self.versions, "")


class Store(ABC):
    """Base of every registry store; subclasses register a URL scheme with `register_store`."""

    url: str

    def publish(self, manifest: Manifest, files: dict[str, bytes], tags: tuple[str, ...] = ()) -> ArtifactVersion:
        """Store files + manifest as the next version of `manifest.name`; visible only when
        complete (blobs first, the version pointer last). `latest` names the highest version;
        `tags` move to this one."""
        check_name(manifest.name)
        for tag in tags:
            check_tag(tag)
        entries = {filename: FileEntry.of(data) for filename, data in files.items()}
        manifest = manifest.model_copy(update={"files": entries, "payload_bytes": sum(len(d) for d in files.values())})
        for data in files.values():
            self._put_blob(data)
        digest = self._put_blob(manifest.to_bytes())
        return ArtifactVersion(manifest.name, self._commit_version(manifest.name, digest, tags), digest)

    @abstractmethod
    def _put_blob(self, data: bytes) -> str:
        """Store bytes under their digest (idempotent); returns `sha256:…`."""

    @abstractmethod
    def _commit_version(self, name: str, digest: str, tags: tuple[str, ...]) -> int:
        """Make `digest` the next version of `name`, safely against concurrent publishers."""

    @abstractmethod
    def names(self) -> list[str]: ...

    @abstractmethod
    def versions(self, name: str) -> dict[int, str]:
        """version → manifest digest, for one artifact name."""

    @abstractmethod
    def tags(self, name: str) -> dict[str, int]: ...

    @abstractmethod
    def set_tag(self, name: str, tag: str, version: int) -> None: ...

    @abstractmethod
    def ref_stamps(self) -> dict[str, str]:
        """Name → an opaque stamp of its versions and tags that changes whenever they do, for
        every name, in one listing: a watcher re-resolves only the names whose stamp moved."""

    @abstractmethod
    def remove(self, ref: ArtifactVersion) -> None:
        """Forget a version (and tags on it); its bytes go at the next `gc`."""

    @abstractmethod
    def gc(self, min_age_seconds: float = 3600) -> dict[str, int]:
        """Delete blobs no version references and temporary files, both older than
        `min_age_seconds` (younger ones may belong to a publish in flight); returns counts."""

    @abstractmethod
    def _read_blob(self, digest: str) -> bytes:
        """Raw bytes stored under a digest (`sha256:…`); NotFound if absent."""

    def leftovers(self) -> list[tuple[object, int]]:
        """Temporary files (path, bytes) that writers which are gone left behind; `gc` removes them."""
        return []

    # -- resolution and verified reads, shared by every store -----------------------------

    def resolve(self, ref: Reference | str) -> ArtifactVersion:
        ref = Reference.parse(ref) if isinstance(ref, str) else ref
        try:
            return self._resolve(ref)
        except OSError as exc:
            raise StorageError(f"cannot read {ref.name}'s versions in registry {self.url}: {exc}") from exc

    def _resolve(self, ref: Reference) -> ArtifactVersion:
        # tags before versions: a publish writes the version before it moves a tag, so the
        # version a tag names is always among versions listed after it (not so the other way)
        by_tag = not is_version(ref.selector or DEFAULT_TAG) and not (ref.selector is None and ref.digest is not None)
        tags = self.tags(ref.name) if by_tag else {}
        return pick(ref, tags, self.versions(ref.name), f" in registry {self.url}")

    def listing(self) -> list[NameRefs]:
        """Every name's versions and tags, by name, for listings (`registry list`, a server's
        `tasks --all`); stores that can read them in fewer round trips than a name at a time
        override it."""
        found = []
        for name in self.names():
            try:
                tags = self.tags(name)  # before versions, as in _resolve
                found.append(NameRefs(name, self.versions(name), tags))
            except TicketserveError as exc:
                found.append(NameRefs(name, {}, {}, str(exc)))
        return found

    def manifests(self, versions: list[ArtifactVersion]) -> list[Manifest | TicketserveError]:
        """Each version's verified manifest, or why it cannot be read, in order (a listing's
        reads; stores fetch them concurrently where they can)."""
        blobs = self._read_blobs([v.digest for v in versions])
        found: list[Manifest | TicketserveError] = []
        for version in versions:
            try:
                found.append(self._parse_manifest(version, self._checked(version.digest, blobs[version.digest],
                                                                          f"manifest of {version}")))
            except TicketserveError as exc:
                found.append(exc)
        return found

    def _read_blobs(self, digests: list[str]) -> dict[str, bytes | Exception]:
        """`_read_blob` for many: each digest's bytes or the exception reading it raised."""
        found: dict[str, bytes | Exception] = {}
        for digest in digests:
            try:
                found[digest] = self._read_blob(digest)
            except (OSError, TicketserveError) as exc:
                found[digest] = exc
        return found

    def read_verified(self, digest: str, what: str) -> bytes:
        try:
            data = self._read_blob(digest)
        except OSError as exc:
            data = exc
        return self._checked(digest, data, what)

    def _checked(self, digest: str, data: bytes | Exception, what: str) -> bytes:
        """A blob's bytes once their hash is the digest they were stored under."""
        if isinstance(data, OSError):
            raise StorageError(f"{what}: cannot read {digest} from registry {self.url}: {data}") from data
        if isinstance(data, Exception):
            raise data
        actual = sha256_digest(data)
        if actual != digest:
            raise CorruptArtifact(f"{what}: checksum mismatch (expected {digest}, stored bytes hash to {actual})")
        return data

    def manifest(self, ref: ArtifactVersion | Reference | str) -> Manifest:
        version = ref if isinstance(ref, ArtifactVersion) else self.resolve(ref)
        return self._parse_manifest(version, self.read_verified(version.digest, f"manifest of {version}"))

    @staticmethod
    def _parse_manifest(version: ArtifactVersion, data: bytes) -> Manifest:
        try:
            return Manifest.model_validate_json(data)
        except ValidationError as exc:
            raise CorruptArtifact(f"manifest of {version} is not a valid v1 manifest: {exc}") from exc

    def read_file(self, ref: ArtifactVersion, manifest: Manifest, filename: str) -> bytes:
        entry = manifest.files.get(filename)
        if entry is None:
            raise NotFound(f"{ref} has no file {filename!r} (files: {sorted(manifest.files)})")
        data = self.read_verified("sha256:" + entry.sha256, f"{filename} of {ref}")
        if len(data) != entry.bytes:
            raise CorruptArtifact(f"{filename} of {ref}: {len(data)} bytes, manifest says {entry.bytes}")
        return data

    def verify(self, ref: ArtifactVersion | Reference | str) -> Manifest:
        """Re-hash the manifest and every file of a version; raises CorruptArtifact or NotFound."""
        version = ref if isinstance(ref, ArtifactVersion) else self.resolve(ref)
        manifest = self.manifest(version)
        for filename in manifest.files:
            self.read_file(version, manifest, filename)
        return manifest

    def live_digests(self) -> set[str]:
        """Every digest some version references (its manifest and files): what gc keeps."""
        live: set[str] = set()
        for name in self.names():
            for version, digest in self.versions(name).items():
                live.add(digest)
                try:
                    manifest = self.manifest(ArtifactVersion(name, version, digest))
                except (CorruptArtifact, NotFound):  # keep what it may reference: verify reports it
                    continue
                live.update("sha256:" + entry.sha256 for entry in manifest.files.values())
        return live

    # -- single-file bundles for moving an artifact between registries --------------------

    def export_bundle(self, ref: ArtifactVersion | Reference | str, path: Path) -> ArtifactVersion:
        """Write a version as one tar file: manifest.json + files/<name>, all verified first."""
        version = ref if isinstance(ref, ArtifactVersion) else self.resolve(ref)
        manifest = self.verify(version)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        with tarfile.open(tmp, "w") as tar:
            members = {"manifest.json": manifest.to_bytes()}
            members |= {f"files/{f}": self.read_file(version, manifest, f) for f in manifest.files}
            for member, data in members.items():
                info = tarfile.TarInfo(member)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        os.replace(tmp, path)
        return version

    def import_bundle(self, path: Path, tags: tuple[str, ...] = ()) -> ArtifactVersion:
        """Publish a bundle written by `export_bundle`, after checking every file's checksum.
        Members are read by name; nothing is extracted to disk."""
        try:
            with tarfile.open(path, "r") as tar:
                members = {m.name: m for m in tar.getmembers() if m.isfile()}
                manifest = Manifest.model_validate_json(_manifest_member(tar, members, path))
                files: dict[str, bytes] = {}
                for filename, entry in manifest.files.items():
                    member = members.get(f"files/{filename}")
                    if member is None:
                        raise CorruptArtifact(f"{path}: bundle lacks {filename}")
                    data = _extract(tar, member)
                    if FileEntry.of(data) != entry:
                        raise CorruptArtifact(f"{path}: {filename} fails its checksum")
                    files[filename] = data
        except (tarfile.TarError, ValidationError) as exc:
            raise CorruptArtifact(f"{path} is not a valid ticketserve bundle: {exc}") from exc
        return self.publish(manifest, files, tags)


def pick(ref: Reference, tags: dict[str, int], versions: dict[int, str], where: str) -> ArtifactVersion:
    """The version a reference names among a name's tags and versions (`where` ends messages)."""
    if not versions:
        raise NotFound(f"no artifact named {ref.name!r}{where}")
    if ref.selector is None and ref.digest is not None:
        matches = [v for v, d in versions.items() if d == ref.digest]
        if not matches:
            raise NotFound(f"{ref.name}@{ref.digest} not found{where}")
        return ArtifactVersion(ref.name, max(matches), ref.digest)
    selector = ref.selector or DEFAULT_TAG
    if is_version(selector):
        version = int(selector)
    else:
        if selector not in tags:
            raise NotFound(f"{ref.name} has no tag {selector!r} (tags: {', '.join(sorted(tags)) or 'none'})")
        version = tags[selector]
    if version not in versions:
        raise NotFound(f"{ref.name} has no version {version} (versions: {sorted(versions)})")
    resolved = ArtifactVersion(ref.name, version, versions[version])
    if ref.digest is not None and ref.digest != resolved.digest:
        raise NotFound(f"{ref} resolves to {resolved.digest}, not the digest asked for")
    return resolved


def bundle_manifest(path: Path) -> tuple[Manifest, str]:
    """A bundle's manifest and the digest it will have in any registry, without importing it."""
    try:
        with tarfile.open(path, "r") as tar:
            data = _manifest_member(tar, {m.name: m for m in tar.getmembers() if m.isfile()}, path)
        return Manifest.model_validate_json(data), sha256_digest(data)
    except (tarfile.TarError, ValidationError) as exc:
        raise CorruptArtifact(f"{path} is not a valid ticketserve bundle: {exc}") from exc


def _manifest_member(tar: tarfile.TarFile, members: dict[str, tarfile.TarInfo], path: Path) -> bytes:
    if "manifest.json" not in members:
        raise CorruptArtifact(f"{path} is not a ticketserve bundle (no manifest.json)")
    return _extract(tar, members["manifest.json"])


def _extract(tar: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
    handle = tar.extractfile(member)
    assert handle is not None  # members are regular files
    return handle.read()


STORES: dict[str, Callable[[str], Store]] = {}


def register_store(*schemes: str) -> Callable[[type[Store]], type[Store]]:
    """Class decorator: `open_store` hands URLs with these schemes to the class."""

    def decorate(cls: type[Store]) -> type[Store]:
        for scheme in schemes:
            if scheme in STORES:
                raise ValueError(f"registry scheme {scheme!r} is already registered")
            STORES[scheme] = cls
        return cls

    return decorate
