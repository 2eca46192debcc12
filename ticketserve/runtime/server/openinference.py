"""The Open Inference Protocol (KServe's v2 protocol) in ticketserve's terms, for both of its
transports (openinference_grpc.py, http.py), which only move tensors in and out:

* a model is a task artifact, named as in the registry; a model version is a version number
  or a tag (default: `latest`, followed live);
* a request gives its texts as a BYTES input `text`, and pair tasks their second segments as
  a BYTES input `text_pair` of the same size; any shape holding that many elements will do;
* the answer gives per text `label` (BYTES), `score` (FP32: the label's probability) and
  `probabilities` (FP32, [n, labels] in the order of the model's labels) — or `value` (FP32)
  for a regression task — and, as response parameters, the exact artifact and digest that
  answered, the labels (JSON) and the batch it was served in.

Binary tensor data (raw bytes; BYTES elements as a 4-byte little-endian length and the bytes)
is decoded and encoded here for both transports."""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass, field

from ticketserve import __version__
from ticketserve.core.errors import InvalidArgument
from ticketserve.core.tagging import check_aggregation
from ticketserve.registry import Reference, Store
from ticketserve.runtime.server import about, routing
from ticketserve.runtime.server.admission import Admission
from ticketserve.runtime.server.loader import TaskLoader
from ticketserve.runtime.server.predictor import Answer, Ask, Predictor

PLATFORM = "ticketserve"
EXTENSIONS = ["model_repository", "binary_tensor_data"]
TEXT, TEXT_PAIR = "text", "text_pair"
EMBEDDING = "embedding"  # an embedding task's output: FP32 [n, d]
CLASSIFICATION_OUTPUTS = ("label", "score", "probabilities")
REGRESSION_OUTPUTS = ("value",)


@dataclass
class Tensor:
    name: str
    datatype: str
    shape: list[int]
    data: list = field(default_factory=list)  # flat, row-major: bytes or str (BYTES), float (FP32)


@dataclass
class Inferred:
    model_name: str
    model_version: str
    outputs: list[Tensor]
    parameters: dict[str, str | int]


# -- binary tensor data ---------------------------------------------------------------------

def declared_elements(name: str, shape: list[int], limit: int) -> int:
    """The element count a tensor's shape declares, refused past `limit` before any of its data
    is decoded (the request's text limit: a model input is one text per element)."""
    declared = math.prod(shape) if all(d >= 0 for d in shape) else -1
    if not 0 <= declared <= limit:
        raise InvalidArgument(f"input {name!r}: shape {list(shape)[:8]} declares {declared} elements; at most {limit} "
                              "per request")
    return declared


def decode_raw(datatype: str, raw: bytes, elements: int) -> list:
    """The elements of a tensor sent as raw bytes; decoding stops past the `elements` its shape
    declares (a short shape with a long body costs no more than the shape allows)."""
    if datatype == "BYTES":
        decoded, offset = [], 0
        while offset < len(raw):
            if len(decoded) == elements:
                raise InvalidArgument(f"raw BYTES tensor: more elements than its shape's {elements}")
            if offset + 4 > len(raw):
                raise InvalidArgument("raw BYTES tensor: truncated element length")
            (size,) = struct.unpack_from("<I", raw, offset)
            offset += 4
            if offset + size > len(raw):
                raise InvalidArgument("raw BYTES tensor: an element runs past the end of the data")
            decoded.append(raw[offset:offset + size])
            offset += size
        return decoded
    if datatype == "FP32":
        if len(raw) % 4:
            raise InvalidArgument("raw FP32 tensor: length is not a multiple of 4")
        if len(raw) // 4 > elements:
            raise InvalidArgument(f"raw FP32 tensor: more elements than its shape's {elements}")
        return list(struct.unpack(f"<{len(raw) // 4}f", raw))
    raise InvalidArgument(f"datatype {datatype} is not used by ticketserve's models (BYTES inputs)")


def encode_raw(tensor: Tensor) -> bytes:
    if tensor.datatype == "BYTES":
        parts = [value if isinstance(value, bytes) else str(value).encode() for value in tensor.data]
        return b"".join(struct.pack("<I", len(part)) + part for part in parts)
    return struct.pack(f"<{len(tensor.data)}f", *tensor.data)


# -- the protocol ---------------------------------------------------------------------------

def _texts(tensor: Tensor) -> list[str]:
    if tensor.datatype != "BYTES":
        raise InvalidArgument(f"input {tensor.name!r} must be BYTES (UTF-8 texts), not {tensor.datatype}")
    if tensor.shape and any(d < 0 for d in tensor.shape):
        raise InvalidArgument(f"input {tensor.name!r}: shape {tensor.shape} has a negative dimension")
    if tensor.shape and math.prod(tensor.shape) != len(tensor.data):
        raise InvalidArgument(f"input {tensor.name!r}: shape {tensor.shape} holds {math.prod(tensor.shape)} "
                              f"elements but {len(tensor.data)} were sent")
    texts = []
    for value in tensor.data:
        if isinstance(value, bytes):
            try:
                value = value.decode()
            except UnicodeDecodeError:
                raise InvalidArgument(f"input {tensor.name!r}: an element is not UTF-8") from None
        if not isinstance(value, str):
            raise InvalidArgument(f"input {tensor.name!r}: elements must be strings")
        texts.append(value)
    return texts


def _inputs(tensors: list[Tensor]) -> tuple[list[str], list[str | None] | None]:
    by_name = {}
    for tensor in tensors:
        if tensor.name not in (TEXT, TEXT_PAIR):
            raise InvalidArgument(f"unknown input {tensor.name!r}: the inputs are {TEXT!r} and, for pair tasks, "
                                  f"{TEXT_PAIR!r}")
        if tensor.name in by_name:
            raise InvalidArgument(f"input {tensor.name!r} given twice")
        by_name[tensor.name] = _texts(tensor)
    if TEXT not in by_name:
        raise InvalidArgument(f"the input {TEXT!r} (BYTES) is required")
    texts, pairs = by_name[TEXT], by_name.get(TEXT_PAIR)
    if pairs is not None and len(pairs) != len(texts):
        raise InvalidArgument(f"{len(texts)} texts but {len(pairs)} text pairs")
    return texts, pairs


def _outputs(answer: Answer, requested: list[str] | None, texts: list[str], aggregation: str | None) -> list[Tensor]:
    predictions = answer.predictions
    n = len(predictions)
    if answer.type == "token_classification":  # ragged: one JSON array per text
        found = answer.entities(texts, aggregation)
        available = {
            "entities": Tensor("entities", "BYTES", [n], [json.dumps([vars(e) for e in row]) for row in found]),
            "tokens": Tensor("tokens", "BYTES", [n], [json.dumps([{"label": t.label, "score": t.score, "start": t.start,
                                                                   "end": t.end} for t in p.tokens or []])
                                                      for p in predictions]),
        }
        if not requested:
            return [available["entities"]]
    elif answer.labels:
        available = {
            "label": Tensor("label", "BYTES", [n], [p.label for p in predictions]),
            "score": Tensor("score", "FP32", [n], [p.score for p in predictions]),
            "probabilities": Tensor("probabilities", "FP32", [n, len(answer.labels)],
                                    [p.probabilities[label] for p in predictions for label in answer.labels]),
        }
    elif answer.type == "embedding":
        width = len(predictions[0].embedding or [])
        available = {EMBEDDING: Tensor(EMBEDDING, "FP32", [n, width], [x for p in predictions for x in p.embedding or []])}
    else:
        name = "score" if answer.type == "reranking" else "value"
        available = {name: Tensor(name, "FP32", [n], [p.score for p in predictions])}
    if not requested:
        return list(available.values())
    unknown = [name for name in requested if name not in available]
    if unknown:
        raise InvalidArgument(f"unknown output {unknown[0]!r}: this model's outputs are {', '.join(available)}")
    return [available[name] for name in requested]


class OpenInference:
    def __init__(self, predictor: Predictor, loader: TaskLoader, store: Store, admission: Admission):
        self.predictor, self.loader, self.store, self.admission = predictor, loader, store, admission

    async def _blocking(self, call, *args):
        return await self.admission.run(self.admission.loading, call, *args)

    @property
    def max_elements(self) -> int:
        """Elements a request's input tensor may hold: one text each."""
        return self.predictor.engine.config.max_texts_per_request

    def server_metadata(self) -> dict:
        return {"name": "ticketserve", "version": __version__, "extensions": EXTENSIONS}

    def model_ready(self, name: str, version: str | None) -> bool:
        routing.check([name])
        return self.loader.ready(name, version or None)

    async def model_metadata(self, name: str, version: str | None) -> dict:
        def read():  # the registry calls, on one trip to the loading threads
            resolved = self.store.resolve(Reference.of(name, version or None))
            return resolved, self.store.manifest(resolved), self.store.versions(name)

        routing.check([name])
        resolved, manifest, versions = await self._blocking(read)
        spec = manifest.task
        inputs = [{"name": TEXT, "datatype": "BYTES", "shape": [-1]}]
        if spec.takes_pairs:
            inputs.append({"name": TEXT_PAIR, "datatype": "BYTES", "shape": [-1]})
        if spec.type == "token_classification":  # each element a JSON array (entities; tokens on request)
            outputs = [{"name": "entities", "datatype": "BYTES", "shape": [-1]},
                       {"name": "tokens", "datatype": "BYTES", "shape": [-1]}]
        elif spec.labels:
            outputs = [{"name": "label", "datatype": "BYTES", "shape": [-1]},
                       {"name": "score", "datatype": "FP32", "shape": [-1]},
                       {"name": "probabilities", "datatype": "FP32", "shape": [-1, len(spec.labels)]}]
        elif spec.type == "embedding":
            outputs = [{"name": EMBEDDING, "datatype": "FP32", "shape": [-1, -1]}]
        else:
            outputs = [{"name": "score" if spec.type == "reranking" else "value", "datatype": "FP32", "shape": [-1]}]
        return {"name": name, "versions": [str(v) for v in sorted(versions)], "platform": PLATFORM,
                "inputs": inputs, "outputs": outputs, "labels": list(spec.labels), "task": spec.name,
                "kind": manifest.kind, "method": manifest.method, "artifact": str(resolved)}

    async def infer(self, name: str, version: str | None, inputs: list[Tensor], requested: list[str] | None = None,
                    deadline: float | None = None, aggregation: str | None = None) -> Inferred:
        texts, pairs = _inputs(inputs)
        check_aggregation(aggregation)
        answer = await self.predictor.predict(Ask(name, version or None), texts, pairs, deadline)
        parameters: dict[str, str | int] = {
            "artifact": str(answer.version), "digest": answer.version.digest, "batch_size": answer.batch_size,
            "batch_tasks": answer.batch_tasks, "queue_time_us": answer.queue_time_us,
            "inference_time_us": answer.inference_time_us}
        if answer.labels:
            parameters["labels"] = json.dumps(answer.labels)
        return Inferred(name, str(answer.version.version), _outputs(answer, requested, texts, aggregation), parameters)

    async def index(self, ready_only: bool = False) -> list[dict]:
        """Every task the registry offers (newest version) and every resident one: READY when
        resident, else UNAVAILABLE (loadable, or with the reason it is not)."""
        models = [{"name": info.name, "version": info.artifact.rpartition(":")[2],
                   "state": "READY" if info.state == about.READY else "UNAVAILABLE",
                   "reason": "" if info.state == about.READY else info.error or "not loaded"}
                  for info in await about.tasks(self.loader, self.admission, not ready_only)]
        return sorted(models, key=lambda m: (m["name"], m["version"]))

    async def load(self, name: str, version: str | None = None) -> None:
        routing.check([name])
        await self._blocking(self.loader.preload, name, version)

    async def unload(self, name: str) -> None:
        routing.check([name])
        await self._blocking(self.loader.unload, name)

