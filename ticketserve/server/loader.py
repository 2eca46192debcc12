"""Which task versions are resident, and when they load, swap and go.

Requests name a task (`name`, `name:tag` or `name:version`). Unpinned names and tags are
*aliases* that follow the registry: `refresh()` (the watch loop) re-resolves them and, when a
new version appears, loads it beside the old one, then switches the alias — requests in
flight keep the version they acquired, and the old version unloads once none holds it. A
failed load marks the alias errored and leaves the old version serving. Resident versions
form an LRU bounded by bytes; a version in use is never evicted.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

from registry import ArtifactVersion, Reference, Store
from registry.store import DEFAULT_TAG
from ticketserve import artifact
from ticketserve.errors import NotFound, TicketserveError
from ticketserve.runtime import LoadedTask, Runtime

log = logging.getLogger("ticketserve.loader")


@dataclass
class TaskHandle:
    version: ArtifactVersion
    loaded: LoadedTask
    bytes: int
    refs: int = 0
    retired: bool = False

    @property
    def key(self) -> str:
        return str(self.version)


class TaskLoader:
    def __init__(self, store: Store, runtime: Runtime, cache_bytes: int, observer=None):
        self.store, self.runtime, self.cache_bytes = store, runtime, cache_bytes
        self.observer = observer  # optional: .cache(event) with hit/miss/eviction, .resident(bytes, count)
        self.resident: OrderedDict[str, TaskHandle] = OrderedDict()
        self.aliases: dict[str, str] = {}  # "name:tag" → resident key
        self.errors: dict[str, str] = {}  # alias → why its last load failed
        self._lock = threading.RLock()
        self._loading: dict[str, threading.Lock] = {}

    # -- requests -----------------------------------------------------------------------------

    def acquire(self, name: str, version: str | None = None) -> TaskHandle:
        """The handle to serve a request with; the caller must `release` it."""
        ref = Reference.parse(f"{name}:{version}" if version else name)
        alias = self._alias(ref)
        with self._lock:
            key = self.aliases.get(alias) if alias else str(ref)
            handle = self.resident.get(key) if key else None
            if handle is not None:
                return self._hold(handle, hit=True)
        handle = self._load(self.store.resolve(ref))
        with self._lock:
            if alias and alias not in self.aliases:
                self.aliases[alias] = handle.key
            return self._hold(handle, hit=False)

    def release(self, handle: TaskHandle) -> None:
        with self._lock:
            handle.refs -= 1
            if handle.retired and handle.refs == 0:
                self._unload(handle)

    # -- the watch loop and admin calls -------------------------------------------------------

    def refresh(self) -> None:
        """Follow every alias to the version its tag names now; swap what moved."""
        with self._lock:
            aliases = dict(self.aliases)
        for alias, current in aliases.items():
            try:
                target = self.store.resolve(alias)
                if str(target) == current:
                    self.errors.pop(alias, None)
                    continue
                handle = self._load(target)
            except TicketserveError as exc:  # keep serving what we have
                self.errors[alias] = str(exc)
                log.warning("reload of %s failed; %s keeps serving: %s", alias, current, exc)
                continue
            with self._lock:
                self.errors.pop(alias, None)
                self.aliases[alias] = handle.key
                if current not in self.aliases.values() and current in self.resident:
                    self._retire(self.resident[current])
            log.info("%s now serves %s (was %s)", alias, handle.key, current)

    def preload(self, name: str, version: str | None = None) -> TaskHandle:
        handle = self.acquire(name, version)
        self.release(handle)
        return handle

    def unload(self, name: str) -> bool:
        """Drop every resident version of `name` and its aliases (idempotent)."""
        with self._lock:
            for alias in [a for a in self.aliases if a.split(":")[0] == name]:
                del self.aliases[alias]
            handles = [h for h in self.resident.values() if h.version.name == name]
            for handle in handles:
                self._retire(handle)
        return bool(handles)

    # -- internals ----------------------------------------------------------------------------

    @staticmethod
    def _alias(ref: Reference) -> str | None:
        if ref.selector is not None and ref.selector.isdigit() or ref.digest is not None:
            return None  # pinned: never moves
        return f"{ref.name}:{ref.selector or DEFAULT_TAG}"

    def _hold(self, handle: TaskHandle, hit: bool) -> TaskHandle:
        handle.refs += 1
        self.resident.move_to_end(handle.key)
        self._report("hit" if hit else "miss")
        return handle

    def _load(self, version: ArtifactVersion) -> TaskHandle:
        key = str(version)
        with self._lock:
            gate = self._loading.setdefault(key, threading.Lock())
        with gate:  # one load per version; concurrent first requests wait for it
            with self._lock:
                if key in self.resident and not self.resident[key].retired:
                    return self.resident[key]
            started = time.perf_counter()
            found = artifact.load(self.store, version, self.runtime.backbone)
            loaded = self.runtime.add(found, name=key)
            size = sum(t.numel() * t.element_size() for t in found.tensors.values())
            handle = TaskHandle(version, loaded, size)
            with self._lock:
                self.resident[key] = handle
                self._evict()
            log.info("loaded %s (%s, %d bytes) in %.1f ms", key, found.manifest.kind, size,
                     (time.perf_counter() - started) * 1000)
            return handle

    def _evict(self) -> None:
        total = sum(h.bytes for h in self.resident.values())
        for key in list(self.resident):
            if total <= self.cache_bytes:
                break
            handle = self.resident[key]
            if handle.refs == 0 and len(self.resident) > 1:
                total -= handle.bytes
                self._unload(handle)
                for alias in [a for a, k in self.aliases.items() if k == key]:
                    del self.aliases[alias]
                self._report("eviction")

    def _retire(self, handle: TaskHandle) -> None:
        handle.retired = True
        if handle.refs == 0:
            self._unload(handle)

    def _unload(self, handle: TaskHandle) -> None:
        if self.resident.get(handle.key) is handle:
            del self.resident[handle.key]
            self.runtime.remove(handle.key)
        self._report(None)

    def _report(self, event: str | None) -> None:
        if self.observer is None:
            return
        if event:
            self.observer.cache(event)
        self.observer.resident(sum(h.bytes for h in self.resident.values()), len(self.resident))

    def describe(self) -> tuple[list[dict], dict[str, str]]:
        """Resident versions (with the alias each serves, if any) and the aliases whose last load failed."""
        with self._lock:
            serving = {key: alias for alias, key in self.aliases.items()}
            rows = [{"name": h.version.name, "artifact": h.key, "digest": h.version.digest, "bytes": h.bytes,
                     "manifest": h.loaded.manifest, "alias": serving.get(h.key)} for h in self.resident.values()]
            errored = dict(self.errors)
        return rows, errored
