"""How the server ends an RPC with a ticketserve error: its status from the one table
(runtime/status.py), its class name in the trailing metadata, its message cut to fit a header.
`statuses` is the one place a servicer method's errors become statuses."""

from __future__ import annotations

import functools
import inspect

import grpc

from ticketserve.core import errors
from ticketserve.runtime.server.routing import from_metadata, routed_by
from ticketserve.runtime.status import ERROR_KEY, status_of

MAX_DETAILS = 1024  # characters of an error's message in the status (grpc-message travels as a header)


async def abort(context: grpc.aio.ServicerContext, exc: errors.TicketserveError) -> None:
    message = str(exc)
    if len(message) > MAX_DETAILS:
        message = message[:MAX_DETAILS] + "…"
    await context.abort(status_of(exc), message, trailing_metadata=((ERROR_KEY, type(exc).__name__),))


def statuses(method):
    """A servicer method (unary or streaming) whose ticketserve errors end its RPC with their status,
    run knowing the task the call was routed by (its x-ticketserve-task metadata, routing.py)."""
    if inspect.isasyncgenfunction(method):
        @functools.wraps(method)
        async def stream(self, request, context):
            try:
                with routed_by(from_metadata(context.invocation_metadata())):
                    async for item in method(self, request, context):
                        yield item
            except errors.TicketserveError as exc:
                await abort(context, exc)

        return stream

    @functools.wraps(method)
    async def unary(self, request, context):
        try:
            with routed_by(from_metadata(context.invocation_metadata())):
                return await method(self, request, context)
        except errors.TicketserveError as exc:
            await abort(context, exc)

    return unary
