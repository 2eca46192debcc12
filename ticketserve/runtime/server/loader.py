"""Which task versions are resident, and when they load, swap and go.

Requests name a task (`name`, `name:tag` or `name:version`). Unpinned names and tags are
*aliases* that follow the registry: `refresh()` (the watch loop) re-resolves them and, when a
new version appears, loads it beside the old one, then switches the alias — requests in
flight keep the version they acquired, and the old version unloads once none holds it. A
failed load is rolled back, marks the alias (and that version) errored, is retried with
back-off and leaves the old version serving — also when that one was evicted meanwhile: an
alias remembers the last version it served. An alias only ever moves to what a later look at
the registry said: a slow load of what an earlier look found (a request's first load, a poll)
does not put the alias back on an older version that a newer look replaced — also after the
newer version was evicted. Resident versions form an LRU bounded by bytes;
a version in use — or being handed to a request — is never evicted, so a working set larger
than the budget runs over it (reported) instead of failing requests; nor is a pinned one (the
operator's `--preload`: the version its alias serves now, whichever that is).
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass

from ticketserve.core import artifact
from ticketserve.core.errors import BackboneMismatch, CorruptArtifact, TicketserveError
from ticketserve.registry import ArtifactVersion, Manifest, Reference, Store
from ticketserve.registry.store import DEFAULT_TAG, check_name
from ticketserve.runtime.executor import LoadedTask, Runtime
from ticketserve.runtime.server.metrics import Residency

log = logging.getLogger("ticketserve.runtime.loader")
RETRY_BASE_SECONDS = 1.0  # a failed version is tried again after 1, 2, 4, … seconds
RETRY_MAX_SECONDS = 60.0


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


@dataclass(frozen=True)
class Resident:
    """A resident version as `describe` shows it."""

    version: ArtifactVersion
    manifest: Manifest
    bytes: int
    alias: Reference | None  # the name:tag it serves, if any


@dataclass
class LoadFailure:
    """Why a version did not load, and when it may be tried again (immutable versions rarely
    heal, but storage outages do: exponential back-off, logged once)."""

    error: TicketserveError
    attempts: int
    retry_at: float

    def again(self) -> TicketserveError:
        return type(self.error)(str(self.error))  # a fresh exception: raising one instance twice grows its traceback


class TaskLoader:
    def __init__(self, store: Store, runtime: Runtime, cache_bytes: int, observer=None):
        self.store, self.runtime, self.cache_bytes = store, runtime, cache_bytes
        # optional observer: .cache(event) with hit/miss/load/eviction, .resident(bytes, count),
        # .task_resident(handle, resident: bool)
        self.observer = observer
        self.resident: OrderedDict[str, TaskHandle] = OrderedDict()
        self._resident_bytes = 0  # kept with `resident`, so a hit costs the same at 10,000 tasks as at 1
        self._resident_names: Counter[str] = Counter()  # name → resident versions
        self.aliases: dict[Reference, str] = {}  # name:tag → resident key
        self.errors: dict[Reference, str] = {}  # alias → why its last load failed
        self.last_good: dict[Reference, ArtifactVersion] = {}  # alias → the last version it served (kept past eviction)
        self.failures: dict[str, LoadFailure] = {}  # version key → its last failed load
        self._stamps = self._initial_stamps()  # the registry's ref stamps at the last poll
        self.pinned: set[Reference] = set()  # aliases and versions never evicted (the operator's --preload)
        self._looks = itertools.count()  # numbers each look at the registry, in the order they began
        self._installed: dict[Reference, int] = {}  # alias → the look its version came from (kept past eviction)
        self._lock = threading.RLock()
        self._loading: dict[str, threading.Lock] = {}
        self._loading_now: set[str] = set()  # versions whose load is under way
        self._changed = time.time()  # when the resident or loading versions last changed

    def _initial_stamps(self) -> dict[str, str]:
        """Taken before any alias resolves, so the first poll re-resolves only what changed since."""
        try:
            return self.store.ref_stamps()
        except Exception:  # an unreadable registry now: the first poll resolves every alias
            return {}

    # -- requests -----------------------------------------------------------------------------

    def acquire(self, name: str, version: str | None = None) -> TaskHandle:
        """The handle to serve a request with, already held: the caller must `release` it."""
        ref = Reference.of(name, version)
        alias = self._alias(ref)
        with self._lock:
            handle = self._hold_resident(ref, alias)
            if handle is not None:
                return handle
        look = next(self._looks)
        target = self.store.resolve(ref)
        try:
            handle = self._load(target)  # held from the moment it is resident
        except (CorruptArtifact, BackboneMismatch) as exc:
            handle = self._last_good(alias, target, exc)
        with self._lock:
            if alias:  # whichever first load finishes last, the newest look places the alias
                self._install(alias, handle, look)
        self._report("miss")
        return handle

    def acquire_resident(self, name: str, version: str | None = None) -> TaskHandle | None:
        """`acquire` without blocking, for the event loop: the held handle when what is asked
        for is resident and the cache is not busy this instant, else None (then `acquire` on a
        worker thread loads it or waits) — most requests skip a thread hop."""
        ref = Reference.of(name, version)
        if not self._lock.acquire(blocking=False):
            return None
        try:
            return self._hold_resident(ref, self._alias(ref))
        finally:
            self._lock.release()

    def _hold_resident(self, ref: Reference, alias: Reference | None) -> TaskHandle | None:
        key = self.aliases.get(alias) if alias else str(ref)
        handle = self.resident.get(key) if key else None
        return self._hold(handle, hit=True) if handle is not None else None

    def _last_good(self, alias: Reference | None, target: ArtifactVersion, exc: TicketserveError) -> TaskHandle:
        """The version an alias served before its tag moved to one that cannot be served —
        what hot swap keeps serving, so it keeps doing so after an eviction too."""
        previous = self.last_good.get(alias) if alias else None
        if previous is None or previous == target:
            raise exc
        self.errors[alias] = str(exc)
        return self._load(previous)

    def release(self, handle: TaskHandle) -> None:
        with self._lock:
            handle.refs -= 1
            if handle.retired and handle.refs == 0:
                self._unload(handle)
            elif handle.refs == 0:
                self._evict()  # a working set that ran over budget shrinks back as soon as it can

    # -- the watch loop and admin calls -------------------------------------------------------

    def refresh(self) -> None:
        """Follow every alias to the version its tag names now; swap what moved. One listing of
        the registry's refs per poll says which names changed; only their aliases are resolved
        again. One alias's failure (whatever it is) never stops the others."""
        with self._lock:
            aliases = dict(self.aliases)
        try:
            stamps = self.store.ref_stamps()
        except Exception as exc:  # keep serving what we have; the next poll tries again
            for alias, current in aliases.items():
                self._alias_failed(alias, current, exc)
            return
        changed = {name for name in stamps.keys() | self._stamps.keys() if stamps.get(name) != self._stamps.get(name)}
        self._stamps = stamps
        for alias, current in aliases.items():
            if alias.name not in changed and alias not in self.errors:
                continue
            look = next(self._looks)
            try:
                target = self.store.resolve(alias)
            except Exception as exc:  # keep serving what we have
                self._alias_failed(alias, current, exc)
                continue
            if str(target) == current:
                self.errors.pop(alias, None)
                continue
            try:
                handle = self._load(target)
            except TicketserveError as exc:  # `_load` logged it, once per version
                self.errors[alias] = str(exc)
                continue
            except Exception as exc:
                self._alias_failed(alias, current, exc)
                continue
            with self._lock:
                self.errors.pop(alias, None)
                moved = self._install(alias, handle, look)
                if moved and current not in self.aliases.values() and current in self.resident:
                    self._retire(self.resident[current])
            self.release(handle)
            if moved:
                log.info("%s now serves %s (was %s)", alias, handle.key, current)

    def _install(self, alias: Reference, handle: TaskHandle, look: int) -> bool:
        """Point `alias` at `handle` unless a later look at the registry already placed it (under
        the lock); True when it moved."""
        if look < self._installed.get(alias, -1):
            return False
        self._installed[alias] = look
        self.aliases[alias] = handle.key
        self.last_good[alias] = handle.version
        return True

    def _alias_failed(self, alias: Reference, current: str, exc: Exception) -> None:
        """Record why an alias cannot follow its tag; log each new reason once (a bug with its traceback)."""
        expected = isinstance(exc, TicketserveError)
        reason = str(exc) if expected else f"unexpected {type(exc).__name__}: {exc}"
        if self.errors.get(alias) != reason:
            log.warning("%s cannot follow the registry; %s keeps serving: %s", alias, current, reason,
                        exc_info=None if expected else exc)
        self.errors[alias] = reason

    def preload(self, name: str, version: str | None = None, pin: bool = False) -> TaskHandle:
        """Load a task now; `pin` keeps it (whatever version its alias moves to) out of eviction."""
        handle = self.acquire(name, version)
        if pin:
            with self._lock:
                self.pinned.add(self._alias(Reference.of(name, version)) or _pin(handle.version))
        self.release(handle)
        return handle

    def unload(self, name: str) -> bool:
        """Drop every resident version of `name` and its aliases (idempotent). Requests that
        hold a version finish on it; it goes when the last one releases it."""
        check_name(name)
        with self._lock:
            for alias in [a for a in self.aliases if a.name == name]:
                del self.aliases[alias]
            self.pinned = {pin for pin in self.pinned if pin.name != name}
            handles = [h for h in self.resident.values() if h.version.name == name and not h.retired]
            for handle in handles:
                self._retire(handle)
        return bool(handles)

    # -- internals ----------------------------------------------------------------------------

    @staticmethod
    def _alias(ref: Reference) -> Reference | None:
        """What an unpinned reference follows: its name and tag (`latest` when it names none)."""
        return None if ref.pinned else Reference(ref.name, ref.selector or DEFAULT_TAG)

    def _hold(self, handle: TaskHandle, hit: bool) -> TaskHandle:
        handle.refs += 1
        self.resident.move_to_end(handle.key)
        if hit:
            self._report("hit")
        return handle

    def _load(self, version: ArtifactVersion) -> TaskHandle:
        """The resident handle of `version`, loading it if needed; returned held (refs + 1)
        so that no eviction or unload can take it before the caller uses it."""
        key = str(version)
        with self._lock:
            gate = self._loading.setdefault(key, threading.Lock())
        with gate:  # one load per version; concurrent first requests wait for it
            with self._lock:
                if key in self.resident:  # loaded meanwhile, or retired but still attached: serve it again
                    self.resident[key].retired = False
                    return self._hold(self.resident[key], hit=False)
                failure = self.failures.get(key)
                if failure is not None and time.monotonic() < failure.retry_at:
                    raise failure.again()
            started = time.perf_counter()
            self._loads(key, True)
            try:
                found = artifact.load(self.store, version, self.runtime.backbone)
                loaded = self.runtime.add(found, name=key)  # rolls itself back if it fails
            except TicketserveError as exc:
                self._failed(key, exc)
                raise
            finally:
                self._loads(key, False)
            size = sum(t.numel() * t.element_size() for t in found.tensors.values())
            handle = TaskHandle(version, loaded, size)
            with self._lock:
                self.failures.pop(key, None)
                self._admit(handle)
                self._hold(handle, hit=False)
                self._evict()
                self._report("load")
            if self.observer is not None:
                self.observer.task_resident(handle, True)
            log.info("loaded %s (%s, %d bytes) in %.1f ms", key, found.manifest.kind, size,
                     (time.perf_counter() - started) * 1000)
            return handle

    def _loads(self, key: str, under_way: bool) -> None:
        with self._lock:
            (self._loading_now.add if under_way else self._loading_now.discard)(key)
            self._changed = time.time()

    def _failed(self, key: str, exc: TicketserveError) -> None:
        """Record a failed load; log it the first time only (a watched broken version is retried
        with back-off, not re-reported at every poll)."""
        with self._lock:
            previous = self.failures.get(key)
            attempts = previous.attempts + 1 if previous else 1
            delay = min(RETRY_MAX_SECONDS, RETRY_BASE_SECONDS * 2 ** (attempts - 1))
            # kept without its traceback: that holds the failed load's frames and tensors
            self.failures[key] = LoadFailure(type(exc)(str(exc)), attempts, time.monotonic() + delay)
        if previous is None:
            unexpected = exc.__cause__ is not None and not isinstance(exc.__cause__, TicketserveError)
            log.warning("%s cannot be served: %s", key, exc, exc_info=exc if unexpected else None)
        else:
            log.debug("%s still cannot be served (attempt %d): %s", key, attempts, exc)

    def _evict(self) -> None:
        """Unload least recently used versions nobody holds until the budget fits. When every
        resident version is in use the cache stays over budget (requests never fail for it).
        Every release asks: within budget it returns at once (copying the keys of 10,000
        resident versions on every request cost a replica a fifth of its throughput)."""
        total = self._resident_bytes
        if total <= self.cache_bytes:
            return
        for key in list(self.resident):
            if total <= self.cache_bytes:
                break
            handle = self.resident[key]
            if handle.refs == 0 and not self._pinned(handle):
                total -= handle.bytes
                self._unload(handle)
                for alias in [a for a, k in self.aliases.items() if k == key]:
                    del self.aliases[alias]
                self._report("eviction")

    def _pinned(self, handle: TaskHandle) -> bool:
        return _pin(handle.version) in self.pinned or any(self.aliases.get(pin) == handle.key for pin in self.pinned)

    def _retire(self, handle: TaskHandle) -> None:
        handle.retired = True
        if handle.refs == 0:
            self._unload(handle)

    def _unload(self, handle: TaskHandle) -> None:
        if self.resident.get(handle.key) is handle:
            del self.resident[handle.key]
            self._resident_bytes -= handle.bytes
            self._resident_names[handle.version.name] -= 1
            if not self._resident_names[handle.version.name]:
                del self._resident_names[handle.version.name]
            self._changed = time.time()
            self.runtime.remove(handle.loaded)
            if self.observer is not None:
                self.observer.task_resident(handle, False)
        self._report(None)

    def _report(self, event: str | None) -> None:
        if self.observer is None:
            return
        if event:
            self.observer.cache(event)
        self.observer.resident(self._resident_bytes, len(self.resident))

    def _admit(self, handle: TaskHandle) -> None:
        self.resident[handle.key] = handle
        self._resident_bytes += handle.bytes
        self._resident_names[handle.version.name] += 1
        self._changed = time.time()

    def residency(self) -> Residency:
        """The tasks resident and being loaded, and how many tasks the budget holds (of the
        resident ones' mean size), for the endpoint picker (metrics.ResidencyCollector)."""
        with self._lock:
            count, held = len(self.resident), self._resident_bytes
            resident = sorted(self._resident_names)
            loading = sorted({key.rpartition(":")[0] for key in self._loading_now})
            changed = self._changed
        slots = max(len(resident), int(self.cache_bytes * count // max(held, 1))) if count else 0
        return Residency(resident, loading, slots, changed)

    def describe(self) -> tuple[list[Resident], dict[str, str]]:
        """Resident versions (with the alias each serves, if any) and the aliases whose last load failed."""
        with self._lock:
            serving = {key: alias for alias, key in self.aliases.items()}
            rows = [Resident(h.version, h.loaded.manifest, h.bytes, serving.get(h.key))
                    for h in self.resident.values() if not h.retired]
            errored = dict(self.errors)
        return rows, errored

    def ready(self, name: str, version: str | None = None) -> bool:
        """Whether a request for this task (and version or tag) would be served without a load."""
        ref = Reference.of(name, version)
        alias = self._alias(ref)
        with self._lock:
            key = self.aliases.get(alias) if alias else str(ref)
            return key is not None and key in self.resident and not self.resident[key].retired

    def serves(self, name: str) -> bool:
        """Whether some version of the artifact `name` is resident."""
        with self._lock:
            return name in self._resident_names

    def failed(self) -> dict[str, str]:
        """Version key → why its last load failed."""
        with self._lock:
            return {key: str(failure.error) for key, failure in self.failures.items()}


def _pin(version: ArtifactVersion) -> Reference:
    """The reference that pins one version."""
    return Reference(version.name, str(version.version))
