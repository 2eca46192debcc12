"""In-process execution of tasks on one shared backbone.

Tasks of backbone-sharing kinds attach to the shared encoder under a slot, so one forward
pass serves a batch that mixes them; other kinds run on their own encoder. Each task keeps
its own head. The runtime's backend (`backends/`: torch, ONNX) runs the forwards. The server
builds on this; the CLI's eval and predict use it directly.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ticketserve.core.artifact import Artifact
from ticketserve.core.backbone import Backbone, in_precision
from ticketserve.core.errors import CorruptArtifact, InvalidArgument, TicketserveError, excerpt
from ticketserve.core.kinds import Kind, get_kind
from ticketserve.core.model import head_from_tensors
from ticketserve.core.quantize import QUANTIZATIONS, quantize_int8
from ticketserve.core.routing import Routing
from ticketserve.core.tagging import Token
from ticketserve.core.shared_encoder import SharedEncoder
from ticketserve.registry import ArtifactVersion
from ticketserve.registry.manifest import Manifest, TaskSpec
from ticketserve.runtime.backends import backend_named
from ticketserve.runtime.tokenizing import OFFSETS, WORD_IDS, Tokenization

TAGGING = "token_classification"


@dataclass
class LoadedTask:
    """A servable task. Its tensors live where its kind put them (the shared encoder's row or
    gate tables, a mask set, a private encoder), not here: a resident task costs one copy."""

    name: str
    version: ArtifactVersion
    manifest: Manifest
    slot: int
    encoder: nn.Module
    head: nn.Module  # TaskHead, EmbeddingHead or TokenHead
    kind: Kind
    head_group: Hashable  # tasks with equal groups compute the same head function (`head_group`)

    @property
    def spec(self) -> TaskSpec:
        return self.manifest.task


@dataclass
class Prediction:
    label: str | None
    score: float  # probability of the label, the regression value, or a pair's relevance (0…1)
    probabilities: dict[str, float]
    embedding: list[float] | None = None  # embedding tasks (their score is 0)
    tokens: list[Token] | None = None  # token classification: each word piece's label and span (score 0)


class Runtime:
    """Applies loaded tasks to the shared backbone. It keeps no map of tasks: callers hold the
    `LoadedTask` that `add` returned (the server's loader keeps the one map of resident tasks)
    and pass those objects back in."""

    def __init__(self, backbone: Backbone, device: str | torch.device | None = None, max_length: int = 256,
                 dtype: torch.dtype = torch.float32, quantize: str = "none", backend: str = "torch"):
        self.backbone = backbone
        backend_cls = backend_named(backend)
        self.device = backend_cls.placement(device, dtype, quantize)
        self.dtype = dtype  # of the shared encoder; task terms follow it, heads stay float32
        self.quantize = quantize  # "int8": the shared dense products in int8 (CPU), task terms exact
        if quantize not in QUANTIZATIONS:
            raise InvalidArgument(f"unknown quantization {quantize!r} (one of: {', '.join(QUANTIZATIONS)})")
        # every kind's per-task state for this runtime lives in its shared encoder
        self.shared = SharedEncoder(in_precision(backbone.model, self.device, dtype).eval(), master=backbone.model)
        self.encoder = self.shared.module
        if quantize == "int8":
            quantize_int8(self.encoder)
        self.backend = backend_cls(self.shared, backbone, None if device is None else str(device))  # runs the forwards
        self.tokenization = Tokenization.for_backbone(backbone, max_length)  # the engine's way, with its defaults
        self._slots = itertools.count(1)
        self._lock = threading.Lock()
        # forwards on the shared encoder run one at a time (supermask tasks substitute their
        # weights into it for the duration of their forward; intra-op threads still apply),
        # and a task is detached only between forwards
        self._forward_lock = threading.Lock()

    def add(self, artifact: Artifact, name: str | None = None) -> LoadedTask:
        """Make an artifact servable; `name` (default: its artifact name) is what it is shown as."""
        kind = get_kind(artifact.manifest.kind)
        with self._lock:  # kinds change their shared state one task at a time
            slot = next(self._slots)
            try:
                prepared = artifact.prepared if artifact.prepared is not None else \
                    kind.prepare(artifact.kind_tensors, self.shared.master)
                encoder = kind.attach(self.shared, slot, prepared)  # placed on the encoder's device
                manifest = artifact.manifest
                head = head_from_tensors(manifest.task, manifest.head, artifact.head_tensors,
                                         self.backbone.config.hidden_size).to(self.device)
            except Exception as exc:  # no forward routes to this slot yet: undo whatever attach did
                kind.detach(self.shared, slot)
                if isinstance(exc, TicketserveError):
                    raise
                raise CorruptArtifact(f"{artifact.version} passed its checks but cannot be attached "
                                      f"({type(exc).__name__}: {excerpt(str(exc), 300)})") from exc
        return LoadedTask(name or artifact.manifest.name, artifact.version, artifact.manifest, slot, encoder, head, kind,
                          head_group(head, manifest, slot))

    def remove(self, task: LoadedTask) -> None:
        """Stop serving a task: its kind releases its slot, never under a forward that uses it."""
        with self._forward_lock, self._lock:
            task.kind.detach(self.shared, task.slot)

    def tokenize(self, texts: list[str], pairs: list[str] | None = None) -> dict[str, torch.Tensor]:
        return self.tokenization(texts, pairs, self.device)

    @torch.inference_mode()
    def logits(self, tasks: Sequence[LoadedTask], inputs: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """One output row per example; examples may belong to different tasks. Examples that can
        share a forward (`group`) run in one; each other group in its own."""
        with self._forward_lock:
            outputs: list[torch.Tensor | None] = [None] * len(tasks)
            groups: dict[Hashable, list[int]] = {}
            for i, task in enumerate(tasks):
                groups.setdefault(self.backend.group(task), []).append(i)
            for rows in groups.values():
                sub = inputs if len(rows) == len(tasks) else _rows(inputs, rows, self.device)
                members = [tasks[i] for i in rows]
                lengths = sub["attention_mask"].sum(1).tolist() if self.device.type == "cpu" else None
                hidden = self.backend.hidden(members, sub, Routing([t.slot for t in members], self.device, lengths))
                by_head: dict[Hashable, list[int]] = {}
                for position, task in enumerate(members):
                    by_head.setdefault(task.head_group, []).append(position)
                for positions in by_head.values():
                    # heads run in float32 whatever the encoder's dtype
                    part = {"hidden": hidden, "mask": sub["attention_mask"]}
                    if len(positions) < len(members):
                        part = _rows(part, positions, self.device)
                    out = members[positions[0]].head(part["hidden"].float(), part["mask"])
                    for position, row in zip(positions, out):
                        outputs[rows[position]] = row
        return outputs  # type: ignore[return-value]

    def predict(self, tasks: Sequence[LoadedTask], texts: list[str], pairs: list[str] | None = None) -> list[Prediction]:
        if len(tasks) != len(texts):
            raise InvalidArgument(f"{len(texts)} texts but {len(tasks)} tasks")
        features = self.tokenization.features(texts, pairs, spans=any(t.spec.type == TAGGING for t in tasks))
        return self.predictions(tasks, self.logits(tasks, self.tokenization.pad(features, self.device)), features)

    @staticmethod
    def predictions(tasks: Sequence[LoadedTask], outputs: list[torch.Tensor],
                    features: Sequence[dict] | None = None) -> list[Prediction]:
        """Labels and probabilities, values, relevance scores (the sigmoid of a reranker's logit),
        embeddings, or each word piece's label (token classification: `features` with spans)
        from per-example outputs."""
        results = []
        for i, (task, row) in enumerate(zip(tasks, outputs)):
            spec = task.spec
            if spec.type == "embedding":
                results.append(Prediction(None, 0.0, {}, row.float().tolist()))
                continue
            if spec.type == TAGGING:
                results.append(Prediction(None, 0.0, {}, tokens=_tokens(spec.labels, row, features[i])))
                continue
            if spec.is_regression:
                value = row[0].float()
                results.append(Prediction(None, float(value.sigmoid() if spec.type == "reranking" else value), {}))
                continue
            probs = row.float().softmax(-1).tolist()
            best = max(range(len(probs)), key=probs.__getitem__)
            results.append(Prediction(spec.labels[best], probs[best], dict(zip(spec.labels, probs))))
        return results


def head_group(head: nn.Module, manifest: Manifest, slot: int) -> Hashable:
    """What a task's head computes, as a key: a head without tensors (an embedding's pooling and
    normalisation) is the same function for every task with its type and config, so a batch runs
    it once for all of them — one call per batch instead of one per task present (about 28 in a
    batch of 32 drawn from 100 tasks); any other head is its task's own."""
    if next(head.parameters(), None) is None:
        return type(head).__name__, manifest.task.type, manifest.head.model_dump_json()
    return slot


def _rows(tensors: dict[str, torch.Tensor], rows: list[int], device) -> dict[str, torch.Tensor]:
    index = torch.tensor(rows, device=device)
    return {k: v.index_select(0, index) for k, v in tensors.items()}


def _tokens(labels: list[str], logits: torch.Tensor, feature: dict) -> list[Token]:
    """The word pieces of one text (special tokens and padding left out) with their labels."""
    probabilities = logits[:len(feature[OFFSETS])].float().softmax(-1).tolist()
    found = []
    for (start, end), word, row in zip(feature[OFFSETS], feature[WORD_IDS], probabilities):
        if word is None or start == end:
            continue
        best = max(range(len(row)), key=row.__getitem__)
        found.append(Token(labels[best], row[best], dict(zip(labels, row)), start, end, word))
    return found
