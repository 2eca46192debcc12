"""The task a request was routed by: the `x-ticketserve-task` header (gRPC metadata), which a
load balancer hashes on (deploy/balancers/) so that every request for a task reaches the
replica that holds it. A door records the header for the request (`routed_by`); whatever then
names a task checks that it agrees (`check`): a request routed by one task and answered for
another would load that task on a replica the balancer never sends it to, and nobody would see
why the caches churn."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from contextvars import ContextVar

from ticketserve.core.errors import InvalidArgument
from ticketserve.v1 import TASK_HEADER

_routed: ContextVar[str | None] = ContextVar("routed_task", default=None)


@contextlib.contextmanager
def routed_by(header: str | None) -> Iterator[None]:
    """The request being served carries `header` (None or empty: it carries none)."""
    token = _routed.set(header or None)
    try:
        yield
    finally:
        with contextlib.suppress(ValueError):  # a stream's generator closed from another context
            _routed.reset(token)


def from_metadata(metadata: Iterable[tuple[str, str | bytes]] | None) -> str | None:
    """The header's value among a gRPC call's invocation metadata."""
    return next((value for key, value in metadata or () if key == TASK_HEADER and isinstance(value, str)), None)


def check(tasks: Iterable[str]) -> None:
    """Refuse a request whose header names a task other than the one it asks for (with several
    tasks, a fan-out: one of them). A version after a colon (`name:version`) is not compared."""
    routed = _routed.get()
    if routed is None:
        return
    names = {task.partition(":")[0] for task in tasks if task}
    if names and routed.partition(":")[0] not in names:
        asked = ", ".join(sorted(names))
        raise InvalidArgument(f"the {TASK_HEADER} header names {routed!r} but the request asks for {asked}: "
                              "they must agree (balancers route by the header)")
