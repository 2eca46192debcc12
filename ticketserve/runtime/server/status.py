"""The one table from ticketserve errors to gRPC status codes, and the abort that uses it."""

from __future__ import annotations

import grpc

from ticketserve.core import errors

STATUS: dict[type[errors.TicketserveError], grpc.StatusCode] = {
    errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    errors.BackboneMismatch: grpc.StatusCode.FAILED_PRECONDITION,
    errors.CorruptArtifact: grpc.StatusCode.FAILED_PRECONDITION,
    errors.DataUnavailable: grpc.StatusCode.FAILED_PRECONDITION,
    errors.StorageError: grpc.StatusCode.UNAVAILABLE,
    errors.Overloaded: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    errors.PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    errors.Unavailable: grpc.StatusCode.UNAVAILABLE,
    errors.DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
}
MAX_DETAILS = 1024  # characters of an error's message in the status (grpc-message travels as a header)


def status_of(exc: BaseException) -> grpc.StatusCode:
    for cls in type(exc).__mro__:
        if cls in STATUS:
            return STATUS[cls]
    return grpc.StatusCode.INTERNAL


async def abort(context: grpc.aio.ServicerContext, exc: errors.TicketserveError) -> None:
    """End the RPC with the error's status and its message, cut to fit a header."""
    message = str(exc)
    if len(message) > MAX_DETAILS:
        message = message[:MAX_DETAILS] + "…"
    await context.abort(status_of(exc), message)
