"""Optional bearer-token auth: exactly one `authorization: Bearer <token>` header, compared in
constant time. Admin calls (LoadTask, UnloadTask) take only the admin token. Health checks
stay open so orchestrators can probe without secrets."""

from __future__ import annotations

import hmac
import os
from pathlib import Path

import grpc

from ticketserve.core.errors import InvalidArgument
from ticketserve.runtime.server.handlers import rewrap

ADMIN_METHODS = ("/ticketserve.v1.Tasks/LoadTask", "/ticketserve.v1.Tasks/UnloadTask")
OPEN_PREFIXES = ("/grpc.health.v1.Health/",)


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


def _bearer(metadata) -> str | None:
    """The token of the one `authorization: Bearer …` header; None when absent, several or not Bearer."""
    values = [value for key, value in metadata or () if key == "authorization"]
    if len(values) != 1 or not isinstance(values[0], str) or not values[0].startswith("Bearer "):
        return None
    return values[0].removeprefix("Bearer ").strip() or None


class TokenAuth(grpc.aio.ServerInterceptor):
    """With a user token, every call but health checks needs it (or the admin token); admin
    calls need the admin token, and with auth on but no admin token configured they are
    refused outright — a user token never loads or unloads tasks."""

    def __init__(self, token: str | None, admin_token: str | None = None):
        self.token, self.admin_token = token, admin_token

    async def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        method = details.method
        handler = await continuation(details)
        if method.startswith(OPEN_PREFIXES) or handler is None:
            return handler
        admin = method in ADMIN_METHODS
        accepted = [t for t in ((self.admin_token,) if admin else (self.token, self.admin_token)) if t]
        if not admin and self.token is None:
            return handler  # only an admin token is configured: user calls stay open
        if admin and self.admin_token is None:
            return _denied_like(handler, grpc.StatusCode.PERMISSION_DENIED,
                                "admin calls need the admin token, and this server has none configured")
        given = _bearer(details.invocation_metadata)
        if given is None:
            return _denied_like(handler, grpc.StatusCode.UNAUTHENTICATED,
                                "missing bearer token (one `authorization: Bearer <token>` header)")
        if not any(hmac.compare_digest(given.encode(), t.encode()) for t in accepted):
            if admin:
                return _denied_like(handler, grpc.StatusCode.PERMISSION_DENIED, "this call needs the admin token")
            return _denied_like(handler, grpc.StatusCode.UNAUTHENTICATED, "invalid token")
        return handler
