"""Every error ticketserve reports to a user: the registry's (its base class included) and the
ones the layers above raise. Each class names one cause; the servers map them to status codes."""

from ticketserve.registry.errors import (
    CorruptArtifact,
    InvalidArgument,
    NotFound,
    StorageError,
    TicketserveError,
    excerpt,
)

__all__ = ["TicketserveError", "InvalidArgument", "NotFound", "BackboneMismatch", "CorruptArtifact", "DataUnavailable",
           "StorageError", "Overloaded", "Unauthenticated", "PermissionDenied", "Unavailable", "DeadlineExceeded",
           "excerpt"]


class BackboneMismatch(TicketserveError):
    """An artifact was trained on a different backbone than the one it is applied to."""


class DataUnavailable(TicketserveError):
    """Task data cannot be read (offline without --data-dir, missing split file, ...)."""


class Overloaded(TicketserveError):
    """The request queue is full: back-pressure, retry later."""


class Unauthenticated(TicketserveError):
    """A token is required and none or a wrong one was given."""


class PermissionDenied(TicketserveError):
    """The caller's token does not allow this call (admin calls with a separate admin token)."""


class Unavailable(TicketserveError):
    """The server is shutting down or not ready."""


class DeadlineExceeded(TicketserveError):
    """The request's deadline passed before it could be served."""
