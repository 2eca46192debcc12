"""The Open Inference Protocol's gRPC service (`inference.GRPCInferenceService`) on the server's
gRPC port, beside ticketserve.v1: protos in, tensors to openinference.py, tensors out as raw
contents (what v2 clients such as tritonclient read), errors as the same status codes."""

from __future__ import annotations

import time

from ticketserve.core.errors import InvalidArgument
from ticketserve.openinference import pb, rpc
from ticketserve.runtime.server.openinference import OpenInference, Tensor, declared_elements, decode_raw, encode_raw
from ticketserve.runtime.server.status import statuses

SERVICE = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
_CONTENTS = {"BYTES": "bytes_contents", "FP32": "fp32_contents"}


def _input_tensors(request: pb.ModelInferRequest, max_elements: int) -> list[Tensor]:
    raw = list(request.raw_input_contents)
    if raw and len(raw) != len(request.inputs):
        raise InvalidArgument(f"{len(raw)} raw_input_contents for {len(request.inputs)} inputs")
    tensors = []
    for i, tensor in enumerate(request.inputs):
        declared = declared_elements(tensor.name, list(tensor.shape), max_elements)
        if raw:
            data = decode_raw(tensor.datatype, raw[i], declared)
        else:
            data = list(getattr(tensor.contents, _CONTENTS.get(tensor.datatype, "bytes_contents")))
        tensors.append(Tensor(tensor.name, tensor.datatype, list(tensor.shape), data))
    return tensors


def _parameter(value: str | int) -> pb.InferParameter:
    return pb.InferParameter(int64_param=value) if isinstance(value, int) else pb.InferParameter(string_param=value)


class OpenInferenceService(rpc.GRPCInferenceServiceServicer):
    def __init__(self, protocol: OpenInference, ready):
        self.protocol, self.is_ready = protocol, ready

    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=self.is_ready())

    async def ServerMetadata(self, request, context):
        return pb.ServerMetadataResponse(**self.protocol.server_metadata())

    @statuses
    async def ModelReady(self, request, context):
        return pb.ModelReadyResponse(ready=self.protocol.model_ready(request.name, request.version))

    @statuses
    async def ModelMetadata(self, request, context):
        meta = await self.protocol.model_metadata(request.name, request.version)
        tensor = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(name=meta["name"], versions=meta["versions"], platform=meta["platform"],
                                        inputs=[tensor(**t) for t in meta["inputs"]],
                                        outputs=[tensor(**t) for t in meta["outputs"]])

    @statuses
    async def ModelInfer(self, request, context):
        remaining = context.time_remaining()
        deadline = time.monotonic() + remaining if remaining is not None else None
        aggregation = request.parameters["aggregation"].string_param if "aggregation" in request.parameters else None
        inferred = await self.protocol.infer(request.model_name, request.model_version,
                                             _input_tensors(request, self.protocol.max_elements),
                                             [o.name for o in request.outputs], deadline, aggregation)
        response = pb.ModelInferResponse(model_name=inferred.model_name, model_version=inferred.model_version,
                                         id=request.id)
        for key, value in inferred.parameters.items():
            response.parameters[key].CopyFrom(_parameter(value))
        for tensor in inferred.outputs:
            response.outputs.add(name=tensor.name, datatype=tensor.datatype, shape=tensor.shape)
            response.raw_output_contents.append(encode_raw(tensor))
        return response

    @statuses
    async def RepositoryIndex(self, request, context):
        models = await self.protocol.index(request.ready)
        return pb.RepositoryIndexResponse(models=[pb.RepositoryIndexResponse.ModelIndex(**m) for m in models])

    @statuses
    async def RepositoryModelLoad(self, request, context):
        await self.protocol.load(request.model_name)
        return pb.RepositoryModelLoadResponse()

    @statuses
    async def RepositoryModelUnload(self, request, context):
        await self.protocol.unload(request.model_name)
        return pb.RepositoryModelUnloadResponse()

