"""Errors users can act on. Each class names one cause; the servers map them to status codes.

The hierarchy starts here, in the lowest layer, because the registry raises its first members;
`ticketserve.core.errors` adds the rest and is what every other layer imports."""


class TicketserveError(Exception):
    """Base of every error ticketserve reports to a user (CLI: one line, exit 2)."""


class InvalidArgument(TicketserveError):
    """The request or command itself is malformed (bad name, missing field, bad value)."""


class NotFound(TicketserveError):
    """An artifact, version, tag, task or file that was asked for does not exist."""


class CorruptArtifact(TicketserveError):
    """Stored bytes fail their checksum or do not form a valid artifact of their kind."""


class StorageError(TicketserveError):
    """The registry's storage failed (disk full, permissions); nothing partial was published."""


def excerpt(text: str, limit: int = 64) -> str:
    """`text` as an error may echo it: quoted, at most `limit` characters of it, and its length
    when cut (a caller's 20 KB name must not come back inside the error)."""
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}… ({len(text):,} characters)"
