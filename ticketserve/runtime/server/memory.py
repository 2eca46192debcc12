"""glibc malloc settings for a long-running server process.

By default glibc raises its mmap threshold each time a large block is freed (up to 32 MiB),
so later large buffers — request messages, activations of long batches — come from the heap
and its per-thread arenas, where freed memory fragments instead of going back to the system.
Under a mix of large and small requests the chaos run saw RSS swing between 600 and 1,000 MiB
with the same load; two arenas and a fixed threshold keep it steady (`benchmarks/chaos.md`).

The threshold is fixed at glibc's maximum, 32 MiB, with the trim threshold at 1 GiB: a forward's
activations (a 32-text batch of short texts: a few MiB each) are then reused from the heap on
every batch. At the 1 MiB threshold shipped before, each of them was mmapped, unmapped and
page-faulted again on every forward: 1,500–1,700 minor faults per one-text request, 0.17–0.19
of a core in the kernel and 65 QPS where the same server now does 76–79
(`benchmarks/allocator.md`, the in-process engine under each setting beside it). Memory a
burst left free inside the heap (a flood of 2 MB messages) is then kept rather than unmapped,
so the server returns it itself: `malloc_trim(0)` every 2 s gives the free pages of every arena
back. The chaos run's RSS growth was +21.8 % without it, +13.5 % trimming every 10 s, +7.8 %
every 2 s; the re-faulting after each trim costs 160–180 faults per request. Values set in the
environment (MALLOC_MMAP_THRESHOLD_, MALLOC_TRIM_THRESHOLD_, MALLOC_ARENA_MAX) win; elsewhere
than glibc nothing changes.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

log = logging.getLogger("ticketserve.runtime.server")
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -3, -8  # glibc's mallopt parameters
SETTINGS = {"MALLOC_MMAP_THRESHOLD_": (M_MMAP_THRESHOLD, 32 << 20), "MALLOC_TRIM_THRESHOLD_": (M_TRIM_THRESHOLD, 1 << 30),
            "MALLOC_ARENA_MAX": (M_ARENA_MAX, 2)}


TRIM_SECONDS = 2.0


def _libc_function(name: str):
    library = ctypes.util.find_library("c")
    try:
        return getattr(ctypes.CDLL(library), name) if library else None
    except (OSError, AttributeError):
        return None


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
