"""The one training entry point the CLI and the Python API share: any registered method, by
name or as a configured instance, from one run's inputs to its published artifacts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ticketserve.core.backbone import Backbone
from ticketserve.core.tasks import as_type
from ticketserve.registry import Store, TaskSpec
from ticketserve.trainers.base import Method, Outcome, RunContext, get_method
from ticketserve.trainers.config import TrainConfig


def train(method: str | Method, spec: TaskSpec | None, backbone: Backbone, config: TrainConfig, store: Store,
          data_dir: str | Path | None = None, name: str | None = None, tags: tuple[str, ...] = (),
          show_progress: bool = True, options: dict[str, Any] | None = None, publish: bool = True,
          phase: str | None = None) -> Outcome:
    """Run a method (its `options` by field name) and return what it published; `publish=False`
    returns the result without storing it (e.g. a sweep's levels). The config's `task_type`
    turns a pair task into an embedding or reranking task first."""
    if isinstance(method, str):
        method = get_method(method, options)
    elif options:
        raise ValueError("options go with a method name, not with a configured method")
    if spec is not None and config.task_type is not None:
        spec = as_type(spec, config.task_type)
    return method.run(RunContext(spec, backbone, config, store, data_dir, show_progress, name, tags, publish, phase))
