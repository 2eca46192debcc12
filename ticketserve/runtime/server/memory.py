"""glibc malloc settings for a long-running server process.

By default glibc raises its mmap threshold each time a large block is freed (up to 32 MiB),
so later large buffers — request messages, activations of long batches — come from the heap
and its per-thread arenas, where freed memory fragments instead of going back to the system.
Under a mix of large and small requests the chaos run saw RSS swing between 600 and 1,000 MiB
with the same load; with a fixed 1 MiB threshold and two arenas it stayed within 540–650 MiB
at the same latency (`benchmarks/chaos.md`). Values set in the environment
(MALLOC_MMAP_THRESHOLD_, MALLOC_ARENA_MAX) win; elsewhere than glibc nothing changes.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

log = logging.getLogger("ticketserve.runtime.server")
M_MMAP_THRESHOLD, M_ARENA_MAX = -3, -8  # glibc's mallopt parameters
SETTINGS = {"MALLOC_MMAP_THRESHOLD_": (M_MMAP_THRESHOLD, 1 << 20), "MALLOC_ARENA_MAX": (M_ARENA_MAX, 2)}


def tune_malloc() -> dict[str, int]:
    """Apply the settings the environment does not set; returns what was applied."""
    name = ctypes.util.find_library("c")
    try:
        mallopt = ctypes.CDLL(name).mallopt if name else None
    except (OSError, AttributeError):
        mallopt = None
    if mallopt is None:
        return {}
    applied = {}
    for variable, (parameter, value) in SETTINGS.items():
        if variable not in os.environ and mallopt(parameter, value) == 1:
            applied[variable] = value
    log.debug("malloc settings: %s", applied)
    return applied
