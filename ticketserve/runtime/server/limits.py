"""The process around a server under a connection flood: enough file descriptors for its
connection caps (a service's default soft limit, often 1,024, is below them), and event-loop
errors — a failed accept when descriptors do run out comes once per attempt — logged at most
once per interval per kind, with a count of those left out."""

from __future__ import annotations

import asyncio
import logging
import resource
import time

log = logging.getLogger("ticketserve.runtime.server")


def raise_descriptor_limit(wanted: int) -> int:
    """Raise the soft RLIMIT_NOFILE towards the hard one (up to `wanted`); returns the new soft
    limit, warning once when the hard limit keeps it below `wanted`."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    if soft != resource.RLIM_INFINITY and soft < wanted:
        log.warning("file descriptor limit %d (hard %d) is below the %d the connection caps need: raise it "
                    "(ulimit -n, or the container runtime's nofile)", soft, hard, wanted)
    return soft


def limit_loop_errors(loop: asyncio.AbstractEventLoop, interval: float = 10.0) -> None:
    """Log the loop's unhandled errors at most once per `interval` per (message, error type)."""
    last: dict[tuple, float] = {}
    skipped: dict[tuple, int] = {}

    def handler(loop: asyncio.AbstractEventLoop, context: dict) -> None:
        error = context.get("exception")
        key = (context.get("message"), type(error).__name__)
        now = time.monotonic()
        if now - last.get(key, -interval) < interval:
            skipped[key] = skipped.get(key, 0) + 1
            return
        last[key] = now
        more = skipped.pop(key, 0)
        log.error("event loop: %s: %s%s", key[0], error or "", f" ({more} more like it in the last {interval:g} s)"
                  if more else "")

    loop.set_exception_handler(handler)
