"""Wrapping a gRPC method handler without changing its shape: the one place that knows the
four RPC shapes, so interceptors (auth, malformed input, observation) only say what to do
around a call."""

from __future__ import annotations

import inspect
from collections.abc import Callable

import grpc


async def settle(result):
    """A behaviour's result, whether the handler was written async (aio servicers) or not."""
    return await result if inspect.isawaitable(result) else result


async def stream(result):
    """Iterate a response-streaming behaviour's result: an async or plain generator, or a
    coroutine that writes its responses itself with `context.write` (grpc's aio health Watch)."""
    if hasattr(result, "__aiter__"):
        async for item in result:
            yield item
    elif inspect.isawaitable(result):
        await result
    else:
        for item in result:
            yield item


def rewrap(handler: grpc.RpcMethodHandler, unary: Callable, streaming: Callable,
           request_deserializer=None) -> grpc.RpcMethodHandler:
    """A handler of `handler`'s shape: `unary(behaviour)` must return the new coroutine
    function for single-response methods, `streaming(behaviour)` the new async generator
    function for response-streaming ones; each receives (request or request iterator, context)."""
    deserializer = request_deserializer or handler.request_deserializer
    serializer = handler.response_serializer
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(unary(handler.unary_unary), deserializer, serializer)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(streaming(handler.unary_stream), deserializer, serializer)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(unary(handler.stream_unary), deserializer, serializer)
    return grpc.stream_stream_rpc_method_handler(streaming(handler.stream_stream), deserializer, serializer)
