"""Compiled CPU kernels: a torch C++ extension built once at install time (`python -m
ticketserve.core.kernels build`; `make install` runs it) into this package's `build/`
directory (or TICKETSERVE_KERNEL_DIR), then loaded at run time without a compiler. Not
built, built from other sources, or not loadable: one warning, and callers take their
portable torch path."""

from __future__ import annotations

import functools
import hashlib
import os
import warnings
from pathlib import Path

import torch

HERE = Path(__file__).parent
SOURCES = (HERE / "supermask_correction.cpp", HERE / "lora_gather_free.cpp", HERE / "levels.h")
NAME = "ticketserve_kernels"
# -fopenmp: at::parallel_for spreads work over torch's threads only when compiled with OpenMP
# (without it, it silently runs on the calling thread); the library then shares the libgomp
# torch already loaded (same soname), not a second thread pool
CFLAGS, LDFLAGS = ("-O3", "-fopenmp"), ("-fopenmp",)


def build_dir() -> Path:
    return Path(os.environ.get("TICKETSERVE_KERNEL_DIR") or HERE / "build")


def sources_digest() -> str:
    """What the library must have been built from: its sources, flags and the torch it links."""
    digest = hashlib.sha256(" ".join((torch.__version__, *CFLAGS, *LDFLAGS)).encode())
    for source in SOURCES:
        digest.update(source.read_bytes())
    return digest.hexdigest()


def build(verbose: bool = False) -> Path:
    """Compile the kernels (needs a C++ compiler and ninja); returns the library's path."""
    from torch.utils.cpp_extension import load

    target = build_dir()
    target.mkdir(parents=True, exist_ok=True)
    load(name=NAME, sources=[str(s) for s in SOURCES if s.suffix == ".cpp"], build_directory=str(target), is_python_module=False,
         extra_cflags=list(CFLAGS), extra_ldflags=list(LDFLAGS), verbose=verbose)
    (target / f"{NAME}.sha256").write_text(sources_digest())
    return target / f"{NAME}.so"


@functools.cache
def available() -> bool:
    """Whether the compiled kernels are loaded (warns once, naming why, when they are not)."""
    library, stamp = build_dir() / f"{NAME}.so", build_dir() / f"{NAME}.sha256"
    if not library.exists():
        why = f"not built ({library} is missing)"
    elif not stamp.exists() or stamp.read_text() != sources_digest():
        why = "built from other sources or another torch"
    else:
        try:
            torch.ops.load_library(str(library))
            return True
        except (OSError, RuntimeError) as exc:
            why = f"not loadable ({exc})"
    warnings.warn(f"ticketserve: compiled kernels {why}; using the portable torch path "
                  "(build them: python -m ticketserve.core.kernels build)", RuntimeWarning, stacklevel=2)
    return False


@functools.cache
def best_level() -> int:
    """The fastest dispatch level this CPU runs: 2 AVX-512, 1 AVX2, 0 portable C++ (-1: not built)."""
    return int(torch.ops.ticketserve.supermask_best_level()) if available() else -1
