"""What an artifact kind is, and the registry of kinds by name.

A kind knows tensors, never storage. `prepare` checks a payload against the backbone and
returns what `attach` needs (the payload itself, or what checking it decoded); `attach`
returns the module a task runs on: kinds that share the backbone keep their per-task state
under a task slot in the `SharedEncoder` (its gates, or `Terms` of its dense matrices, so one
forward mixes their tasks) and return the shared module; the others return an encoder of
their own, and the runtime groups their examples per task. A kind that can feed an exported
graph (the ONNX backend) says so with `feed_graph`; every other kind runs on torch there.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar, Protocol

import torch
from torch import nn

from ticketserve.core.errors import InvalidArgument, NotFound
from ticketserve.core.routing import Routing
from ticketserve.core.shared_encoder import SharedEncoder

Tensors = dict[str, torch.Tensor]


class GraphInputs(Protocol):
    """The per-example inputs of an exported shared-encoder graph, which kinds fill for a batch.
    Examples a kind does not own get its neutral value (zero rows and factors, open gates)."""

    def add_rows(self, matrix: str, index: torch.Tensor, delta: torch.Tensor, bias: torch.Tensor) -> None:
        """y += x[..., index_e]·delta_e + bias_e per example e: index (B, K), delta (B, K, out), bias (B, out)."""

    def add_low_rank(self, matrix: str, a: torch.Tensor, b: torch.Tensor) -> None:
        """y += (x·a_e)·b_e per example e: a (B, in, R), b (B, R, out)."""

    def set_gates(self, heads: torch.Tensor, ffn: torch.Tensor) -> None:
        """Per-example head gates (B, L, H) and FFN gates (B, L)."""


class Kind(ABC):
    name: ClassVar[str]
    is_task: ClassVar[bool] = True  # a servable task (with a head); False for e.g. tickets
    in_graph: ClassVar[bool] = False  # whether `feed_graph` expresses it on an exported graph

    @abstractmethod
    def validate(self, tensors: Tensors, encoder: nn.Module) -> None:
        """Raise CorruptArtifact unless the tensors fit this encoder exactly."""

    def prepare(self, tensors: Tensors, encoder: nn.Module) -> Any:
        """Validate, and return what `attach` takes: the tensors, unless checking them built
        something `attach` would build again."""
        self.validate(tensors, encoder)
        return tensors

    @abstractmethod
    def attach(self, shared: SharedEncoder, slot: int, prepared: Any) -> nn.Module:
        """Make the task runnable; returns the module to run it on (`shared.module` to share it)."""

    def detach(self, shared: SharedEncoder, slot: int) -> None:
        """Release what `attach` kept for this slot (nothing, for encoders of their own)."""

    def feed_graph(self, shared: SharedEncoder, routing: Routing, inputs: GraphInputs) -> None:
        """Express this kind's tasks in `routing` as graph inputs (only when `in_graph`)."""
        raise NotImplementedError(f"kind {self.name} runs on torch only")

    def dense_state(self, encoder: nn.Module, tensors: Tensors) -> Tensors:
        """The encoder tensors this task effectively runs with, for those it changes (by
        state-dict name) — for analysis and dense exports, never for serving."""
        raise InvalidArgument(f"a {self.name} artifact has no dense weights")


_KINDS: dict[str, Kind] = {}


def register_kind(cls: type[Kind]) -> type[Kind]:
    if cls.name in _KINDS:
        raise ValueError(f"artifact kind {cls.name!r} is already registered")
    _KINDS[cls.name] = cls()
    return cls


def get_kind(name: str) -> Kind:
    try:
        return _KINDS[name]
    except KeyError:
        raise NotFound(f"unknown artifact kind {name!r} (known: {', '.join(sorted(_KINDS))})") from None


def kinds() -> dict[str, Kind]:
    """Every registered kind by name."""
    return dict(_KINDS)
