"""Requests whose bytes do not decode get INVALID_ARGUMENT, like any other bad input
(left to gRPC they surface as UNKNOWN with a logged traceback)."""

from __future__ import annotations

from dataclasses import dataclass

import grpc

PREFIX = "/ticketserve.v1."


@dataclass
class _Malformed:
    reason: str


def _safe(decode):
    def deserialize(data: bytes):
        try:
            return decode(data)
        except Exception as exc:  # DecodeError and friends: the bytes are the caller's
            return _Malformed(f"{type(exc).__name__}: {exc}")

    return deserialize


async def _refuse(context: grpc.aio.ServicerContext, request: _Malformed) -> None:
    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"malformed request message ({request.reason})")


class RejectMalformed(grpc.aio.ServerInterceptor):
    async def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        handler = await continuation(details)
        if handler is None or not details.method.startswith(PREFIX) or handler.request_deserializer is None:
            return handler
        deserialize = _safe(handler.request_deserializer)
        if handler.unary_unary:
            inner = handler.unary_unary

            async def unary(request, context):
                if isinstance(request, _Malformed):
                    await _refuse(context, request)
                return await inner(request, context)

            return grpc.unary_unary_rpc_method_handler(unary, deserialize, handler.response_serializer)
        if handler.stream_stream:
            inner_stream = handler.stream_stream

            async def streaming(request_iterator, context):
                async def checked():
                    async for request in request_iterator:
                        if isinstance(request, _Malformed):
                            await _refuse(context, request)
                        yield request

                async for response in inner_stream(checked(), context):
                    yield response

            return grpc.stream_stream_rpc_method_handler(streaming, deserialize, handler.response_serializer)
        return handler
