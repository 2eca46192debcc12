"""What every RPC goes through first: a request id, a count by status code, a traceback in the
log for anything unexpected, and the bookkeeping a drain needs.

* The request id is the caller's `x-request-id` (when it is short and printable) or a new
  one; it comes back in the trailing metadata of every answer.
* An exception that is not an abort is a bug: it is logged once with its traceback and the
  request id, counted, and answered INTERNAL naming the id — never gRPC's bare UNKNOWN.
* RPCs of our own services (both APIs) are counted while in flight; once `draining` is set, new
  ones are answered UNAVAILABLE at once (clients retry elsewhere) and the drain waits for the
  rest. Probes and reflection pass untouched. HTTP requests join the same count (`enter`/`leave`).
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import time

import grpc

from ticketserve.runtime.server.handlers import rewrap, settle, stream
from ticketserve.runtime.server.methods import is_own

log = logging.getLogger("ticketserve.runtime.server")
REQUEST_ID = "x-request-id"


_ids = random.Random()  # seeded from os.urandom; reseeded in a forked child (below)
os.register_at_fork(after_in_child=_ids.seed)


def new_request_id() -> str:
    """A fresh request id: 128 random bits as hex, like uuid4().hex, but drawn without a system
    call — uuid4 reads os.urandom, which lets go of the GIL, and the event loop then waits for
    the inference thread to hand it back before it can go on with the next request."""
    return f"{_ids.getrandbits(128):032x}"


def request_id_of(given) -> str:
    """The caller's request id when it is short and printable, else a new one."""
    if isinstance(given, str) and 0 < len(given) <= 64 and given.isascii() and given.isprintable():
        return given
    return new_request_id()


def _request_id(metadata) -> str:
    return request_id_of(next((v for k, v in metadata or () if k == REQUEST_ID), None))


class Observe(grpc.aio.ServerInterceptor):
    def __init__(self, metrics):
        self.metrics = metrics
        self.in_flight = 0
        metrics.in_flight.set_function(lambda: self.in_flight)
        self.draining = False
        self._idle: asyncio.Event | None = None

    async def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        handler = await continuation(details)
        if handler is None:
            return None
        own = is_own(details.method)
        return rewrap(handler, lambda b: self._unary(details.method, own, b),
                      lambda b: self._streaming(details.method, own, b))

    # -- the two shapes ---------------------------------------------------------------------

    def _unary(self, method: str, own: bool, behaviour):
        async def call(request, context):
            with _Observed(self, method, own, context) as request_id:
                await self._refuse_if_draining(own, context)
                try:
                    return await settle(behaviour(request, context))
                except grpc.aio.AbortError:
                    raise
                except Exception as exc:
                    await self._unexpected(method, context, exc, request_id)

        return call

    def _streaming(self, method: str, own: bool, behaviour):
        async def call(request, context):
            with _Observed(self, method, own, context) as request_id:
                await self._refuse_if_draining(own, context)
                try:
                    async for response in stream(behaviour(request, context)):
                        yield response
                except grpc.aio.AbortError:
                    raise
                except Exception as exc:
                    await self._unexpected(method, context, exc, request_id)

        return call

    # -- shared steps -----------------------------------------------------------------------

    async def _refuse_if_draining(self, own: bool, context) -> None:
        if own and self.draining:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the server is draining; retry on another replica")

    async def _unexpected(self, method: str, context, exc: Exception, request_id: str) -> None:
        log.error("unexpected error in %s (request id %s)", method, request_id, exc_info=exc)
        self.metrics.unexpected_errors.labels(method).inc()
        await context.abort(grpc.StatusCode.INTERNAL, f"internal error (request id {request_id})")

    # -- drain ------------------------------------------------------------------------------

    def enter(self) -> None:
        self.in_flight += 1

    def leave(self) -> None:
        self.in_flight -= 1
        if self.in_flight == 0 and self._idle is not None:
            self._idle.set()

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until no RPC of our services is in flight (True), or `timeout` passes."""
        deadline = time.monotonic() + timeout
        while self.in_flight and time.monotonic() < deadline:
            self._idle = asyncio.Event()
            try:
                await asyncio.wait_for(self._idle.wait(), max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                break
        return self.in_flight == 0


class _Observed:
    """Around one RPC: its request id in the trailing metadata, the in-flight count, and its
    status code counted when it ends (cancelled by the client included)."""

    def __init__(self, observe: Observe, method: str, own: bool, context):
        self.observe, self.method, self.own, self.context = observe, method, own, context
        self.request_id = _request_id(context.invocation_metadata())

    def __enter__(self) -> str:
        self.context.set_trailing_metadata(((REQUEST_ID, self.request_id),))
        if self.own:  # in flight until gRPC has sent the status, not only until the handler returns:
            self.observe.enter()  # a drain that ended in between exited before the answer left
            self.context.add_done_callback(lambda _: self.observe.leave())
        return self.request_id

    def __exit__(self, kind, exc, tb) -> None:
        if kind is not None and issubclass(kind, asyncio.CancelledError):
            code = grpc.StatusCode.CANCELLED
        else:
            code = self.context.code() or grpc.StatusCode.OK
        name = code.name if isinstance(code, grpc.StatusCode) else str(code)
        self.observe.metrics.responses.labels(self.method, name).inc()
