"""The one table from ticketserve errors to gRPC status codes."""

from __future__ import annotations

import grpc

from ticketserve import errors

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


def status_of(exc: BaseException) -> grpc.StatusCode:
    for cls in type(exc).__mro__:
        if cls in STATUS:
            return STATUS[cls]
    return grpc.StatusCode.INTERNAL
