"""Trainers: each method turns (backbone, task data, config) into an artifact of one kind.

A method is one module with a `Method` subclass decorated by `register_method`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import torch
from torch import nn

from ticketserve.backbone import Backbone
from ticketserve.errors import NotFound
from ticketserve.model import TaskModel


class Method(ABC):
    name: ClassVar[str]
    kind: ClassVar[str]
    default_lr: ClassVar[float]
    description: ClassVar[str]

    @abstractmethod
    def trainable(self, model: TaskModel, backbone: Backbone) -> list[nn.Parameter]:
        """Prepare the model and return the parameters to train (the head's included)."""

    @abstractmethod
    def export(self, model: TaskModel) -> dict[str, torch.Tensor]:
        """The artifact's kind tensors (the head is added by the caller)."""

    def details(self) -> dict:
        """Method facts recorded in the manifest (which rows, which ticket, ...)."""
        return {}


_METHODS: dict[str, type[Method]] = {}


def register_method(cls: type[Method]) -> type[Method]:
    if cls.name in _METHODS:
        raise ValueError(f"training method {cls.name!r} is already registered")
    _METHODS[cls.name] = cls
    return cls


def methods() -> dict[str, type[Method]]:
    from trainers import bitfit, full  # noqa: F401  (registration)

    return dict(_METHODS)


def get_method(name: str) -> Method:
    known = methods()
    if name not in known:
        raise NotFound(f"unknown method {name!r} (known: {', '.join(sorted(known))})")
    return known[name]()
