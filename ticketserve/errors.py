"""Errors users can act on. Each class names one cause; the server maps them to status codes."""


class TicketserveError(Exception):
    """Base of every error ticketserve reports to a user (CLI: one line, exit 2)."""


class InvalidArgument(TicketserveError):
    """The request or command itself is malformed (bad name, missing field, bad value)."""


class NotFound(TicketserveError):
    """An artifact, version, tag, task or file that was asked for does not exist."""


class BackboneMismatch(TicketserveError):
    """An artifact was trained on a different backbone than the one it is applied to."""


class CorruptArtifact(TicketserveError):
    """Stored bytes fail their checksum or do not form a valid artifact of their kind."""


class DataUnavailable(TicketserveError):
    """Task data cannot be read (offline without --data-dir, missing split file, ...)."""


class StorageError(TicketserveError):
    """The registry's storage failed (disk full, permissions); nothing partial was published."""


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


def excerpt(text: str, limit: int = 64) -> str:
    """`text` as an error may echo it: quoted, at most `limit` characters of it, and its length
    when cut (a caller's 20 KB name must not come back inside the error)."""
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}… ({len(text):,} characters)"
