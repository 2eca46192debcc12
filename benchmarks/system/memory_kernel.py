"""How much of a process's CPU the kernel spends managing its memory — page faults and the
mapping system calls an allocator makes — sampled with `perf` (linux-perf) over a window.

The server's system CPU also holds what an in-process engine never does (socket I/O, thread
hand-offs, epoll); an allocator can change only this part, so this is the share the allocator
benchmark compares. A sample counts when any frame of its kernel stack is one of MEMORY_ENTRIES.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

MEMORY_ENTRIES = frozenset({
    "asm_exc_page_fault", "exc_page_fault", "do_user_addr_fault", "handle_mm_fault",  # faults
    "__x64_sys_mmap", "__x64_sys_munmap", "__x64_sys_mremap", "__x64_sys_madvise", "__x64_sys_brk",
    "__x64_sys_mprotect",  # what malloc and free ask of the kernel
})


def available() -> bool:
    return shutil.which("perf") is not None


def record(pid: int, seconds: float) -> tuple[subprocess.Popen, Path]:
    """Start sampling `pid` (every thread, kernel and user stacks) for `seconds`."""
    descriptor, name = tempfile.mkstemp(prefix="ts-perf-", suffix=".data")
    os.close(descriptor)  # perf writes the file by its name
    path = Path(name)
    process = subprocess.Popen(["perf", "record", "-q", "-F", "499", "-g", "-p", str(pid), "-o", str(path), "--",
                                "sleep", str(seconds)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return process, path


def memory_share(process: subprocess.Popen, path: Path) -> float:
    """The share of the recorded samples spent in the kernel's memory management."""
    process.wait()
    script = subprocess.run(["perf", "script", "-F", "ip,sym", "-i", str(path)], capture_output=True, text=True)
    path.unlink(missing_ok=True)
    samples = memory = 0
    for block in script.stdout.split("\n\n"):  # a sample: one "address symbol" line per frame
        frames = {line.split()[1] for line in block.splitlines() if len(line.split()) > 1}
        if frames:
            samples += 1
            memory += not frames.isdisjoint(MEMORY_ENTRIES)
    return memory / max(samples, 1)
