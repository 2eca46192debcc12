"""Requests whose bytes do not decode get INVALID_ARGUMENT, like any other bad input (left to
gRPC they surface as UNKNOWN or INTERNAL with a logged traceback) — on every method."""

from __future__ import annotations

from dataclasses import dataclass

import grpc

from ticketserve.runtime.server.handlers import rewrap, settle, stream


@dataclass
class _Malformed:
    reason: str


def _safe(decode):
    def deserialize(data: bytes):
        try:
            return decode(data)
        except Exception as exc:  # DecodeError and friends: the bytes are the caller's
            return _Malformed(f"{type(exc).__name__}: {str(exc)[:200]}")

    return deserialize


async def _checked(request, context):
    """The request, or for request streams an iterator that refuses the first bad message."""
    if isinstance(request, _Malformed):
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"malformed request message ({request.reason})")
    if not hasattr(request, "__aiter__"):
        return request

    async def messages():
        async for message in request:
            yield await _checked(message, context)

    return messages()


def _unary(behaviour):
    async def call(request, context):
        return await settle(behaviour(await _checked(request, context), context))

    return call


def _streaming(behaviour):
    async def call(request, context):
        async for response in stream(behaviour(await _checked(request, context), context)):
            yield response

    return call


class RejectMalformed(grpc.aio.ServerInterceptor):
    async def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        handler = await continuation(details)
        if handler is None or handler.request_deserializer is None:
            return handler
        return rewrap(handler, _unary, _streaming, _safe(handler.request_deserializer))
