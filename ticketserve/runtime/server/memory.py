"""glibc malloc settings for a long-running server process.

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
(`benchmarks/system/allocator.md`, the in-process engine under each setting beside it). Memory a
burst left free inside the heap (a flood of 2 MB messages) is then kept rather than unmapped,
so the server returns it itself, when that gives something back (`Trimmer`): `malloc_trim(0)`
returns the free pages of every arena, and the pages a forward uses again fault back in. Trimming
every 2 s held the chaos run's RSS (+7.8 %, +21.8 % never trimming) but cost 190–220 faults per
request against the engine's 2–11, so the server trims only when that gives memory back (see
`Trimmer`). Values set in the environment (MALLOC_MMAP_THRESHOLD_,
MALLOC_TRIM_THRESHOLD_, MALLOC_ARENA_MAX) win; elsewhere than glibc nothing changes. Transparent
huge pages for malloc (GLIBC_TUNABLES=glibc.malloc.hugetlb=1) halved the server's faults but
let the chaos run's RSS grow 15 % after the flood, so the server leaves them to the operator.
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


def tune_malloc() -> dict[str, int]:
    """Apply the settings the environment does not set; returns what was applied."""
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
    """Give the free pages of every malloc arena back to the system (glibc; False elsewhere)."""
    malloc_trim = _libc_function("malloc_trim")
    return bool(malloc_trim and malloc_trim(0))


def in_use_bytes() -> int | None:
    """Bytes malloc has handed out from its arenas (glibc 2.33+'s mallinfo2; None elsewhere)."""
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
    baseline is taken one call after a trim, once the working set is back. Without mallinfo2
    it trims on every call, as the server did before."""

    policy: str = field(default_factory=lambda: os.environ.get("TICKETSERVE_MALLOC_TRIM", "adaptive"))
    slack: int = 64 << 20
    in_use: Callable[[], int | None] = in_use_bytes
    resident: Callable[[], int] = resident_bytes
    trim: Callable[[], bool] = trim
    _peak: int = field(default=0, init=False)
    _baseline: int | None = field(default=None, init=False)  # resident − in use, settled after a trim

    def __call__(self) -> bool:
        """Trim if it gives memory back; True when it trimmed."""
        if self.policy == "off":
            return False
        in_use = self.in_use() if self.policy == "adaptive" else None
        if in_use is not None:
            unused = self.resident() - in_use
            if self._baseline is None:  # the first call, or the first after a trim
                self._baseline, self._peak = unused, in_use
                return False
            self._peak = max(self._peak, in_use)
            freed, grown, slack = self._peak - in_use, unused - self._baseline, max(self.slack, self._peak // 4)
            if freed <= slack and grown <= slack:
                return False
            log.debug("malloc_trim: in use %d MiB (highest %d MiB), resident beyond it %+d MiB", in_use >> 20,
                      self._peak >> 20, grown >> 20)
        self.trim()
        self._baseline = None
        return True
