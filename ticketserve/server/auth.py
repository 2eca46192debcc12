"""Optional bearer-token auth: `authorization: Bearer <token>` metadata, compared in constant
time. Admin calls (LoadTask, UnloadTask) take the admin token when one is configured.
Health checks stay open so orchestrators can probe without secrets."""

from __future__ import annotations

import hmac
import os
from pathlib import Path

import grpc

from ticketserve.errors import InvalidArgument

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
    """A handler of the same streaming shape as `handler` that only aborts."""

    async def unary(request, context):
        await context.abort(code, message)

    async def streaming(request, context):
        await context.abort(code, message)
        yield  # an async generator, as response-streaming handlers are

    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(streaming)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(streaming)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(unary)
    return grpc.unary_unary_rpc_method_handler(unary)


class TokenAuth(grpc.aio.ServerInterceptor):
    def __init__(self, token: str | None, admin_token: str | None = None):
        self.token, self.admin_token = token, admin_token

    async def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        method = details.method
        if method.startswith(OPEN_PREFIXES):
            return await continuation(details)
        required = self.admin_token if (method in ADMIN_METHODS and self.admin_token) else self.token
        handler = await continuation(details)
        if required is None or handler is None:
            return handler
        header = dict(details.invocation_metadata or ()).get("authorization", "")
        given = header.removeprefix("Bearer ").strip() if header.startswith("Bearer ") else ""
        if not given:
            return _denied_like(handler, grpc.StatusCode.UNAUTHENTICATED, "missing bearer token")
        if not hmac.compare_digest(given.encode(), required.encode()):
            admin = method in ADMIN_METHODS and self.admin_token
            return _denied_like(handler, grpc.StatusCode.PERMISSION_DENIED if admin else grpc.StatusCode.UNAUTHENTICATED,
                                "invalid token")
        return handler
