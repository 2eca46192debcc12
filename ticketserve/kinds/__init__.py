"""Artifact kinds: how a payload's tensors (minus the head) are checked and applied.

A kind knows tensors, never storage. `attach` returns the encoder a task runs on: kinds that
share the backbone return the shared encoder itself (state kept per task slot, so a batch
mixes their tasks in one forward); the others return a view or copy of their own, and the
runtime groups their examples per task.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import torch
from torch import nn

from ticketserve.errors import InvalidArgument, NotFound

Tensors = dict[str, torch.Tensor]


class Kind(ABC):
    name: ClassVar[str]
    is_task: ClassVar[bool] = True  # a servable task (with a head); False for e.g. tickets

    @abstractmethod
    def validate(self, tensors: Tensors, encoder: nn.Module) -> None:
        """Raise CorruptArtifact unless the tensors fit this encoder exactly."""

    @abstractmethod
    def attach(self, encoder: nn.Module, slot: int, tensors: Tensors) -> nn.Module:
        """Make the task runnable; returns the encoder to run it on."""

    def detach(self, encoder: nn.Module, slot: int) -> None:
        """Release what `attach` added to a shared encoder (nothing, for private copies)."""

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
    from ticketserve.kinds import (  # noqa: F401  (registration)
        analysis, encoder, full, row_delta, structure_mask, supermask, ticket)

    try:
        return _KINDS[name]
    except KeyError:
        raise NotFound(f"unknown artifact kind {name!r} (known: {', '.join(sorted(_KINDS))})") from None
