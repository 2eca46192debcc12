"""Requests between their arrival and the engine's queue: bounded, and off the event loop.

Finding or loading a request's task and tokenizing its texts block, so they run on the
server's own thread pools (never asyncio's default executor, which drain and shutdown need).
At most `limit` requests wait for those steps; past it a request is refused at once with
RESOURCE_EXHAUSTED, so no unbounded queue forms in front of the engine's bounded one.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

from ticketserve.core.errors import Overloaded, Unavailable


class Admission:
    """`with admission:` around a request's blocking steps; `run` them on `loading` or
    `tokenizing`. Only the event loop enters and counts, so the count needs no lock."""

    def __init__(self, limit: int, load_threads: int = 8, tokenize_threads: int = 2):
        self.limit, self.pending = limit, 0
        self.draining = False  # set by the server's drain: e.g. a stream's next request is refused
        self.loading = ThreadPoolExecutor(load_threads, thread_name_prefix="ticketserve-load")
        self.tokenizing = ThreadPoolExecutor(tokenize_threads, thread_name_prefix="ticketserve-tokenize")

    def __enter__(self) -> Admission:
        if self.draining:
            raise Unavailable("the server is draining; retry on another replica")
        if self.pending >= self.limit:
            raise Overloaded(f"{self.pending} requests are being admitted (limit {self.limit}); retry later")
        self.pending += 1
        return self

    def __exit__(self, *exc) -> None:
        self.pending -= 1

    async def run(self, executor: ThreadPoolExecutor, call, *args):
        return await asyncio.get_running_loop().run_in_executor(executor, call, *args)

    def close(self) -> None:
        self.loading.shutdown(wait=False, cancel_futures=True)
        self.tokenizing.shutdown(wait=False, cancel_futures=True)
