"""Trainers: each method turns (backbone, task data, config) into an artifact of one kind.

A method is one module with a `Method` subclass decorated by `register_method`; its
method-specific settings are a pydantic `Options` model.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict, ValidationError
from torch import nn

from registry import Store, TaskSpec
from ticketserve.backbone import Backbone
from ticketserve.errors import InvalidArgument, NotFound
from ticketserve.model import TaskModel
from trainers.config import TrainConfig

if TYPE_CHECKING:
    from trainers.loop import FitResult


class NoOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")


@dataclass
class RunContext:
    """What a method may need beyond the model: the run's inputs (e.g. to search a ticket first)."""

    spec: TaskSpec
    backbone: Backbone
    config: TrainConfig
    store: Store
    data_dir: str | Path | None
    show_progress: bool


class Method(ABC):
    name: ClassVar[str]
    kind: ClassVar[str]
    default_lr: ClassVar[float]
    description: ClassVar[str]
    Options: ClassVar[type[BaseModel]] = NoOptions

    def __init__(self, options: BaseModel):
        self.options = options

    @abstractmethod
    def trainable(self, model: TaskModel, context: RunContext) -> list[nn.Parameter]:
        """Prepare the model and return the parameters to train (the head's included)."""

    @abstractmethod
    def export(self, model: TaskModel) -> dict[str, torch.Tensor]:
        """The artifact's kind tensors (the head is added by the caller for task kinds)."""

    def penalty(self, model: TaskModel) -> torch.Tensor | None:
        """A term added to the task loss at every step (e.g. an L1 pull to θ0)."""
        return None

    def weight_decay(self, param: nn.Parameter) -> bool:
        """Whether AdamW decays this parameter (default: matrices, not biases)."""
        return param.dim() >= 2

    def learning_rate(self, param: nn.Parameter, lr: float) -> float:
        """This parameter's peak learning rate (default: the run's `--lr` for all)."""
        return lr

    def after_fit(self, model: TaskModel, fit: FitResult) -> dict:
        """Extra work once training is done (`fit.evaluate`, `fit.train_loader`); returns facts
        for the manifest's details."""
        return {}

    def details(self) -> dict:
        """Method facts recorded in the manifest (options, which rows, which ticket, ...)."""
        return self.options.model_dump(exclude_none=True)


_METHODS: dict[str, type[Method]] = {}


def register_method(cls: type[Method]) -> type[Method]:
    if cls.name in _METHODS:
        raise ValueError(f"training method {cls.name!r} is already registered")
    _METHODS[cls.name] = cls
    return cls


def methods() -> dict[str, type[Method]]:
    from trainers import bitfit, dominant, full, supermask, supertickets  # noqa: F401  (registration)

    return dict(_METHODS)


def get_method(name: str, options: dict[str, Any] | None = None) -> Method:
    known = methods()
    if name not in known:
        raise NotFound(f"unknown method {name!r} (known: {', '.join(sorted(known))})")
    cls = known[name]
    try:
        return cls(cls.Options(**(options or {})))
    except ValidationError as exc:
        problems = "; ".join(
            f"takes no option --{e['loc'][0]}" if e["type"] == "extra_forbidden"
            else f"{'.'.join(map(str, e['loc'])) or 'options'}: {e['msg']}" for e in exc.errors())
        raise InvalidArgument(f"method {name}: {problems}") from None
