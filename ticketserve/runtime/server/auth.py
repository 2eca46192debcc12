"""Optional bearer-token auth, the same on every port: exactly one `authorization: Bearer <token>`
header, compared in constant time. Admin calls (loading and unloading tasks) take only the
admin token. Health checks stay open so orchestrators can probe without secrets."""

from __future__ import annotations

import hmac
import os
from pathlib import Path

import grpc

from ticketserve.core.errors import InvalidArgument, PermissionDenied, TicketserveError, Unauthenticated
from ticketserve.runtime.server.handlers import rewrap
from ticketserve.runtime.server.methods import ADMIN, is_probe
from ticketserve.runtime.status import status_of


def read_token(path: str | None, env: str | None) -> str | None:
    """A token from a file (first line) or an environment variable; None when neither is set."""
    if path:
        token = Path(path).read_text().strip().splitlines()[0] if Path(path).is_file() else ""
        if not token:
            raise InvalidArgument(f"token file {path} is missing or empty")
        return token
    if env:
        token = os.environ.get(env, "").strip()
        if not token:
            raise InvalidArgument(f"environment variable {env} holds no token")
        return token
    return None


def _denied_like(handler: grpc.RpcMethodHandler, code: grpc.StatusCode, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same shape as `handler` that only aborts."""

    def unary(_behaviour):
        async def call(request, context):
            await context.abort(code, message)

        return call

    def streaming(_behaviour):
        async def call(request, context):
            await context.abort(code, message)
            yield  # an async generator, as response-streaming handlers are

        return call

    return rewrap(handler, unary, streaming)


def bearer(values: list) -> str | None:
    """The token of the one `authorization: Bearer …` header; None when absent, several or not Bearer."""
    if len(values) != 1 or not isinstance(values[0], str) or not values[0].startswith("Bearer "):
        return None
    return values[0].removeprefix("Bearer ").strip() or None


class Tokens:
    """Who may call what, for every protocol. With a user token, every call but health checks
    needs it (or the admin token); admin calls need the admin token, and with auth on but no
    admin token configured they are refused outright — a user token never loads or unloads
    tasks. With only an admin token, user calls stay open."""

    def __init__(self, token: str | None, admin_token: str | None = None):
        self.token, self.admin_token = token, admin_token

    @property
    def enabled(self) -> bool:
        return bool(self.token or self.admin_token)

    def check(self, given: str | None, admin: bool) -> None:
        """Raise Unauthenticated or PermissionDenied unless `given` may make this call."""
        if not admin and self.token is None:
            return
        if admin and self.admin_token is None:
            raise PermissionDenied("admin calls need the admin token, and this server has none configured")
        if given is None:
            raise Unauthenticated("missing bearer token (one `authorization: Bearer <token>` header)")
        accepted = [t for t in ((self.admin_token,) if admin else (self.token, self.admin_token)) if t]
        if not any(hmac.compare_digest(given.encode(), t.encode()) for t in accepted):
            if admin:
                raise PermissionDenied("this call needs the admin token")
            raise Unauthenticated("invalid token")


class TokenAuth(grpc.aio.ServerInterceptor):
    """`Tokens` on the gRPC port: a refused call is answered by a handler that only aborts."""

    def __init__(self, tokens: Tokens):
        self.tokens = tokens

    async def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        method = details.method
        handler = await continuation(details)
        if is_probe(method) or handler is None:
            return handler
        given = bearer([value for key, value in details.invocation_metadata or () if key == "authorization"])
        try:
            self.tokens.check(given, admin=method in ADMIN)
        except TicketserveError as exc:
            return _denied_like(handler, status_of(exc), str(exc))
        return handler
