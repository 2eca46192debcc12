"""Malloc settings for a long-running server process: glibc's, tuned at start, or jemalloc
where the process runs with it (the image preloads it), and when to give memory back.

By default glibc raises its mmap threshold each time a large block is freed (up to 32 MiB),
so later large buffers — request messages, activations of long batches — come from the heap
and its per-thread arenas, where freed memory fragments instead of going back to the system.
Under a mix of large and small requests the chaos run saw RSS swing between 600 and 1,000 MiB
with the same load; two arenas and a fixed threshold keep it steady (`benchmarks/system/chaos.md`).

The threshold is fixed at glibc's maximum, 32 MiB, with the trim threshold at 1 GiB: a forward's
activations (a 32-text batch of short texts: a few MiB each) are then reused from the heap on
every batch. At the 1 MiB threshold shipped before, each of them was mmapped, unmapped and
page-faulted again on every forward: 1,500–1,700 minor faults per one-text request, 0.17–0.19
of a core in the kernel and 65 QPS where the same server now does 76–79
(`benchmarks/system/allocator.md`, the in-process engine under each setting beside it). What
glibc still maps and faults again: a thread arena's heap, which it unmaps as soon as its top
is free, whatever the trim threshold — the inference thread's arena mapped a fresh 64 MiB heap
tens of times a second. A 64 MiB top pad (MALLOC_TOP_PAD_) keeps them (35 faults per request
against 54–101), but then a flood's memory stays in those heaps for good: the chaos run's RSS
grew 21.9 % after its flood (target 10 %), so glibc keeps its default pad. Memory a burst left
free inside the heap (a flood of 2 MB messages) is kept rather than unmapped, so the server
returns it itself, when that gives something back (`Trimmer`): `malloc_trim(0)` returns the
free pages of every arena, and the pages a forward uses again fault back in. Trimming every 2 s
held the chaos run's RSS (+7.8 %, +21.8 % never trimming) but cost 190–220 faults per request
against the engine's 2–11, so the server trims only when that gives memory back (see `Trimmer`).

The rest of what glibc faults in the server and not in the engine is protobuf's: its upb
messages call `malloc_trim(0)` every 10,000 arena frees (protobuf's python/message.c), which
returns the forward's free pages just as ours would — 2/3 of the faults left with the top pad
(35 per request; 11–32 with protobuf's pure-Python messages, which cost 80–400 µs per request
instead). Under jemalloc that call trims glibc's empty heap: the image runs the server with
jemalloc (LD_PRELOAD), never decaying (freed pages stay for the next forward), purged by the
same `Trimmer` rules (`arena.<all>.purge`) — 0.3 faults per request against the engine's 0.6
under the same malloc, and the chaos run's RSS +6.9 % after its flood.

Values set in the environment (MALLOC_MMAP_THRESHOLD_, MALLOC_TRIM_THRESHOLD_, MALLOC_ARENA_MAX;
jemalloc's MALLOC_CONF) win; elsewhere nothing changes. Transparent huge
pages for malloc (GLIBC_TUNABLES=glibc.malloc.hugetlb=1) halved the server's faults but let the
chaos run's RSS grow 15 % after the flood, so the server leaves them to the operator.
TICKETSERVE_MALLOC_TRIM=always (every 2 s, the policy before) or =off (never) override the
policy, for measuring it (`benchmarks/system/allocator.py`).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

log = logging.getLogger("ticketserve.runtime.server")
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -3, -8  # glibc's mallopt parameters
SETTINGS = {"MALLOC_MMAP_THRESHOLD_": (M_MMAP_THRESHOLD, 32 << 20), "MALLOC_TRIM_THRESHOLD_": (M_TRIM_THRESHOLD, 1 << 30),
            "MALLOC_ARENA_MAX": (M_ARENA_MAX, 2)}
TRIM_SECONDS = 2.0  # how often the server asks its Trimmer


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


@functools.cache
def _libc_function(name: str):
    """A C library function, looked up once (find_library runs ldconfig: not every 2 s)."""
    library = ctypes.util.find_library("c")
    try:
        function = getattr(ctypes.CDLL(library), name) if library else None
    except (OSError, AttributeError):
        return None
    if function is not None and name == "mallinfo2":
        function.restype = _MallInfo2
    return function


@functools.cache
def _mallctl():
    """jemalloc's control function when jemalloc is this process's malloc (LD_PRELOAD, as the
    image runs the server), else None."""
    try:
        mallctl = ctypes.CDLL(None).mallctl
    except (OSError, AttributeError):
        return None
    mallctl.argtypes = [ctypes.c_char_p, ctypes.c_void_p, ctypes.POINTER(ctypes.c_size_t), ctypes.c_void_p,
                        ctypes.c_size_t]
    return mallctl


def _jemalloc_write(name: str, value: ctypes._SimpleCData | None = None) -> bool:
    size = ctypes.sizeof(value) if value is not None else 0
    return _mallctl()(name.encode(), None, None, ctypes.byref(value) if value is not None else None, size) == 0


def _jemalloc_read(name: str, kind=ctypes.c_size_t) -> int:
    value, size = kind(), ctypes.c_size_t(ctypes.sizeof(kind))
    if _mallctl()(name.encode(), ctypes.byref(value), ctypes.byref(size), None, 0) != 0:
        raise OSError(f"mallctl {name} failed")
    return value.value


def allocator() -> str:
    return "jemalloc" if _mallctl() is not None else "glibc" if _libc_function("mallopt") is not None else "other"


def tune_malloc() -> dict[str, int]:
    """Apply the settings the environment does not set; returns what was applied. Under
    jemalloc: no decay (freed pages stay for the next forward; the Trimmer purges), unless
    MALLOC_CONF says otherwise."""
    if _mallctl() is not None:
        if "MALLOC_CONF" in os.environ:
            return {}
        never = ctypes.c_ssize_t(-1)
        names = ["arenas.dirty_decay_ms", "arenas.muzzy_decay_ms"]  # arenas made later, then those that exist
        names += [f"arena.{i}.{kind}_decay_ms" for i in range(_jemalloc_read("arenas.narenas", ctypes.c_uint))
                  for kind in ("dirty", "muzzy")]
        applied = {name: -1 for name in names if _jemalloc_write(name, never)}
        log.debug("jemalloc settings: %s", applied)
        return applied
    mallopt = _libc_function("mallopt")
    if mallopt is None:
        return {}
    applied = {}
    for variable, (parameter, value) in SETTINGS.items():
        if variable not in os.environ and mallopt(parameter, value) == 1:
            applied[variable] = value
    log.debug("malloc settings: %s", applied)
    return applied


def trim() -> bool:
    """Give the free pages of every malloc arena back to the system (glibc's malloc_trim,
    jemalloc's purge of every arena; False elsewhere)."""
    if _mallctl() is not None:
        return _jemalloc_write("arena.4096.purge")  # MALLCTL_ARENAS_ALL
    malloc_trim = _libc_function("malloc_trim")
    return bool(malloc_trim and malloc_trim(0))


def in_use_bytes() -> int | None:
    """Bytes malloc has handed out (jemalloc's stats.allocated; glibc 2.33+'s mallinfo2; None
    elsewhere)."""
    if _mallctl() is not None:
        _jemalloc_write("epoch", ctypes.c_uint64(1))  # refresh the statistics
        return _jemalloc_read("stats.allocated")
    mallinfo2 = _libc_function("mallinfo2")
    return mallinfo2().uordblks if mallinfo2 else None


def resident_bytes() -> int:
    """This process's resident set (Linux's /proc/self/statm; 0 elsewhere)."""
    statm = Path("/proc/self/statm")
    return int(statm.read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") if statm.exists() else 0


@dataclass
class Trimmer:
    """Decides, once per TRIM_SECONDS, whether trimming would give memory back: when the bytes in
    use fell by more than the slack from their highest since the last trim (a flood of large
    messages ended: those pages were touched, so they are resident and now free), or when the
    resident set grew by more than the slack beyond the bytes in use (a burst between two looks
    left free pages behind). Otherwise it never trims: each trim returns the free pages a
    forward reuses, and faulting them back cost the server 85,000 faults (a third of a GB) per
    trim. The slack is `slack` or a quarter of the highest bytes in use, whichever is more: a
    forward's own activations come and go by tens of MiB between two looks (MiniLM, 32 short
    texts), more on larger encoders and longer texts, and must not count as freed. The
    resident set's baseline is the most it held beyond the bytes in use over the first `settle`
    looks after the start and after each trim, when nothing is trimmed: the working set comes
    back batch shape by batch shape, and a baseline taken at one look (the idle server before
    its first load) made the server trim as soon as load arrived, and again after each trim.
    Without mallinfo2 it trims on every call, as the server did before."""

    policy: str = field(default_factory=lambda: os.environ.get("TICKETSERVE_MALLOC_TRIM", "adaptive"))
    slack: int = 64 << 20
    settle: int = 15  # looks: 30 s
    in_use: Callable[[], int | None] = in_use_bytes
    resident: Callable[[], int] = resident_bytes
    trim: Callable[[], bool] = trim
    _peak: int = field(default=0, init=False)
    _baseline: int = field(default=0, init=False)  # resident − in use, the most over the settling looks
    _settling: int = field(default=0, init=False)  # looks left before the rules apply

    def __post_init__(self):
        self._settling = self.settle

    def __call__(self) -> bool:
        """Trim if it gives memory back; True when it trimmed."""
        if self.policy == "off":
            return False
        in_use = self.in_use() if self.policy == "adaptive" else None
        if in_use is not None:
            unused = self.resident() - in_use
            self._peak = max(self._peak, in_use)
            if self._settling > 0:
                self._settling -= 1
                self._baseline = max(self._baseline, unused)
                return False
            freed, grown, slack = self._peak - in_use, unused - self._baseline, max(self.slack, self._peak // 4)
            if freed <= slack and grown <= slack:
                return False
            log.debug("malloc_trim: in use %d MiB (highest %d MiB), resident beyond it %+d MiB", in_use >> 20,
                      self._peak >> 20, grown >> 20)
        self.trim()
        self._peak, self._baseline, self._settling = 0, 0, self.settle
        return True
