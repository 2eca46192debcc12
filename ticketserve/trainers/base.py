"""What a training method is, and the registry of methods by name.

A method is one module with a `Method` subclass decorated by `register_method`. Its settings
are a pydantic `Options` model — the one source of its CLI flags, defaults and help — and
`run` turns (task, backbone, data, config) into one or more published artifacts. Methods that
train one artifact in the shared loop subclass `ArtifactMethod` (trainers/single.py).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, ValidationError

from ticketserve.core.backbone import Backbone
from ticketserve.core.errors import InvalidArgument, NotFound
from ticketserve.registry import ArtifactVersion, BackboneRef, HeadConfig, Manifest, Store, TaskSpec
from ticketserve.trainers.config import TrainConfig


class NoOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")


@dataclass
class RunContext:
    """One training run's inputs (a method may start further runs from it, e.g. a ticket search)."""

    spec: TaskSpec | None  # None for methods over several tasks (their options name them)
    backbone: Backbone
    config: TrainConfig
    store: Store
    data_dir: str | Path | None = None
    show_progress: bool = True
    name: str | None = None  # the artifact's name (default: the method's choice)
    tags: tuple[str, ...] = ()
    publish: bool = True  # False: return the result without storing it (e.g. a sweep's levels)
    phase: str | None = None  # how progress names this run when it is one of several (`ticket search 1/2`)

    @property
    def task(self) -> TaskSpec:
        if self.spec is None:
            raise InvalidArgument("--task is required")
        return self.spec


@dataclass
class Outcome:
    """What a run published (main artifact first; nothing on the non-main processes of a
    distributed run) and how to report it."""

    published: list[ArtifactVersion]
    summary: dict[str, Any]  # `train --json`
    line: str  # the one-line human summary (rich markup)


class Method(ABC):
    name: ClassVar[str]
    kind: ClassVar[str]  # the kind of its (main) artifact
    default_lr: ClassVar[float]
    description: ClassVar[str]
    Options: ClassVar[type[BaseModel]] = NoOptions
    option_scope: ClassVar[dict[str, str]] = {}  # options some runs of the method use: name → when

    def __init__(self, options: BaseModel):
        self.options = options

    @abstractmethod
    def run(self, context: RunContext) -> Outcome:
        """Train and publish (unless `context.publish` is false)."""

    def starts_from(self, store: Store) -> tuple[TaskSpec, str] | None:
        """The task and backbone implied by an artifact the options start from, if any."""
        return None

    def details(self) -> dict:
        """Method facts recorded in the manifest (options, which rows, which ticket, ...)."""
        return self.options.model_dump(exclude_none=True)

    def resolved(self) -> dict[str, str]:
        """What the method chose that the user did not type (Dominant: which ticket, from
        where), once it has chosen: the run prints it in its first lines and its summary."""
        return {}


def run_manifest(name: str, kind: str, method: str, spec: TaskSpec, backbone: BackboneRef, config: TrainConfig, *,
                 head: HeadConfig | None = None, hyperparameters: dict[str, Any] | None = None,
                 **results: Any) -> Manifest:
    """The manifest of what a training run publishes: its task, the backbone it ran on, the
    run's settings (default: the config's), the head the config describes (unless given) and
    its `results` (metrics, curves, trainable_params, details)."""
    return Manifest(name=name, kind=kind, method=method, task=spec, backbone=backbone,
                    head=head or HeadConfig(pooling=config.pooling, dropout=config.head_dropout),
                    hyperparameters=config.model_dump() if hyperparameters is None else hyperparameters, **results)


_METHODS: dict[str, type[Method]] = {}


def register_method(cls: type[Method]) -> type[Method]:
    if cls.name in _METHODS:
        raise ValueError(f"training method {cls.name!r} is already registered")
    _METHODS[cls.name] = cls
    return cls


def methods() -> dict[str, type[Method]]:
    return dict(_METHODS)


def get_method(name: str, options: dict[str, Any] | None = None) -> Method:
    if name not in _METHODS:
        raise NotFound(f"unknown method {name!r} (known: {', '.join(sorted(_METHODS))})")
    cls = _METHODS[name]
    try:
        return cls(cls.Options(**(options or {})))
    except ValidationError as exc:
        problems = "; ".join(
            f"takes no option --{str(e['loc'][0]).replace('_', '-')}" if e["type"] == "extra_forbidden"
            else f"{'.'.join(map(str, e['loc'])) or 'options'}: {e['msg']}" for e in exc.errors())
        raise InvalidArgument(f"method {name}: {problems}") from None
