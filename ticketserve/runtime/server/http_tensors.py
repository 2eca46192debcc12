"""The Open Inference Protocol's REST tensors: a request's inputs checked against their
declared shapes and decoded (JSON data nested no deeper than its shape, or binary tensor data
after the JSON header), and a response's outputs encoded as JSON or binary data, as asked."""

from __future__ import annotations

import json

from fastapi.responses import Response

from ticketserve.core.errors import InvalidArgument
from ticketserve.runtime.server.http_bodies import InferenceRequest
from ticketserve.runtime.server.http_door import BINARY_HEADER
from ticketserve.runtime.server.openinference import Inferred, Tensor, declared_elements, decode_raw, encode_raw


def _flat(data: list, depth: int, name: str) -> list:
    """`data` row-major, nested at most `depth` lists deep (the declared shape's rank), without
    recursion: a body nested deeper than its shape says is refused before it costs a stack."""
    flat, stack = [], [(iter(data), 1)]
    while stack:
        items, level = stack[-1]
        item = next(items, stack)
        if item is stack:
            stack.pop()
        elif isinstance(item, list):
            if level >= depth:
                raise InvalidArgument(f"input {name!r}: data is nested deeper than its shape's {depth} dimension(s)")
            stack.append((iter(item), level + 1))
        else:
            flat.append(item)
    return flat


def input_tensors(body: InferenceRequest, binary: bytes, max_elements: int) -> list[Tensor]:
    """The request's tensors, each checked against its declared shape and the element limit
    before its data is decoded."""
    tensors, offset = [], 0
    for given in body.inputs:
        declared = declared_elements(given.name, given.shape, max_elements)
        size = (given.parameters or {}).get("binary_data_size")
        if size is not None:
            if not isinstance(size, int) or size < 0 or offset + size > len(binary):
                raise InvalidArgument(f"input {given.name!r}: binary_data_size {size} does not fit the binary data")
            data = decode_raw(given.datatype, binary[offset:offset + size], declared)
            offset += size
        elif given.data is None:
            raise InvalidArgument(f"input {given.name!r} has neither data nor binary_data_size")
        else:
            data = _flat(given.data, max(len(given.shape), 1), given.name)
        tensors.append(Tensor(given.name, given.datatype, given.shape, data))
    if offset != len(binary):
        raise InvalidArgument(f"{len(binary) - offset} bytes of binary data belong to no input")
    return tensors


def _wants_binary(body: InferenceRequest, name: str) -> bool:
    requested = next((o for o in body.outputs or [] if o.name == name), None)
    if requested is not None and requested.parameters and "binary_data" in requested.parameters:
        return bool(requested.parameters["binary_data"])
    return bool((body.parameters or {}).get("binary_data_output", False))


def infer_response(body: InferenceRequest, inferred: Inferred) -> Response:
    outputs, binary = [], []
    for tensor in inferred.outputs:
        if _wants_binary(body, tensor.name):
            raw = encode_raw(tensor)
            binary.append(raw)
            outputs.append({"name": tensor.name, "shape": tensor.shape, "datatype": tensor.datatype,
                            "parameters": {"binary_data_size": len(raw)}})
        else:
            data = [v.decode() if isinstance(v, bytes) else v for v in tensor.data]
            outputs.append({"name": tensor.name, "shape": tensor.shape, "datatype": tensor.datatype, "data": data})
    document = {"model_name": inferred.model_name, "model_version": inferred.model_version,
                "parameters": inferred.parameters, "outputs": outputs}
    if body.id is not None:
        document["id"] = body.id
    header = json.dumps(document, separators=(",", ":")).encode()
    if not binary:
        return Response(header, media_type="application/json")
    return Response(header + b"".join(binary), media_type="application/octet-stream",
                    headers={BINARY_HEADER: str(len(header))})
