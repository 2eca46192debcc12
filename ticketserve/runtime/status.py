"""The one table between ticketserve errors and gRPC status codes, both ways: the server answers
an error with its status (and its class name in the trailing metadata), the client raises the
same error class again — an `errors.NotFound` on the server is an `errors.NotFound` for the
caller, which is also a `grpc.RpcError` with `.code()` and `.details()`."""

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
# what a status means when the answer names no class (interceptors, gRPC itself)
_BY_STATUS = {grpc.StatusCode.INVALID_ARGUMENT: errors.InvalidArgument, grpc.StatusCode.NOT_FOUND: errors.NotFound,
              grpc.StatusCode.RESOURCE_EXHAUSTED: errors.Overloaded, grpc.StatusCode.UNAUTHENTICATED: errors.Unauthenticated,
              grpc.StatusCode.PERMISSION_DENIED: errors.PermissionDenied, grpc.StatusCode.UNAVAILABLE: errors.Unavailable,
              grpc.StatusCode.DEADLINE_EXCEEDED: errors.DeadlineExceeded}
ERROR_KEY = "ticketserve-error"  # trailing metadata: the error's class name
# the same meaning over HTTP (the Open Inference Protocol's REST half and the JSON API)
HTTP_STATUS = {grpc.StatusCode.INVALID_ARGUMENT: 400, grpc.StatusCode.UNAUTHENTICATED: 401,
               grpc.StatusCode.PERMISSION_DENIED: 403, grpc.StatusCode.NOT_FOUND: 404,
               grpc.StatusCode.FAILED_PRECONDITION: 412, grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
               grpc.StatusCode.INTERNAL: 500, grpc.StatusCode.UNAVAILABLE: 503, grpc.StatusCode.DEADLINE_EXCEEDED: 504}


def http_status_of(exc: BaseException) -> int:
    return HTTP_STATUS[status_of(exc)]


def status_of(exc: BaseException) -> grpc.StatusCode:
    for cls in type(exc).__mro__:
        if cls in STATUS:
            return STATUS[cls]
    return grpc.StatusCode.INTERNAL


class RemoteError(grpc.RpcError):
    """Mixed into the error class a server answered with: its status and detail, as gRPC's own
    errors give them."""

    def __init__(self, status: grpc.StatusCode, detail: str):
        Exception.__init__(self, detail)
        self.status, self.detail = status, detail

    def code(self) -> grpc.StatusCode:
        return self.status

    def details(self) -> str:
        return self.detail


_REMOTE: dict[type[errors.TicketserveError], type] = {}


def from_rpc(exc: grpc.RpcError) -> errors.TicketserveError:
    """The ticketserve error a failed call stands for."""
    named = dict(exc.trailing_metadata() or ()).get(ERROR_KEY)
    cls = next((c for c in STATUS if c.__name__ == named), None) or _BY_STATUS.get(exc.code(), errors.TicketserveError)
    if cls not in _REMOTE:
        _REMOTE[cls] = type(cls.__name__, (cls, RemoteError), {"__module__": __name__})
    return _REMOTE[cls](exc.code(), exc.details() or "")
