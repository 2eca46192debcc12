"""One training run end to end: data → model → method → shared loop → published artifact."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

from registry import ArtifactVersion, HeadConfig, Manifest, Store, TaskSpec
from ticketserve import artifact
from ticketserve.backbone import Backbone
from ticketserve.data import data_source, load_split
from ticketserve.model import TaskModel
from ticketserve.kinds import get_kind
from trainers import Method, RunContext, get_method
from trainers.config import TrainConfig
from trainers.loop import FitResult, fit, tokenize


@dataclass
class TrainOutcome:
    version: ArtifactVersion | None  # None on non-main processes of a distributed run
    manifest: Manifest
    fit: FitResult
    tensors: dict[str, torch.Tensor]  # the published payload (every process has it)
    method: Method


def train(method_name: str, spec: TaskSpec, backbone: Backbone, config: TrainConfig, store: Store,
          data_dir: str | Path | None = None, name: str | None = None, tags: tuple[str, ...] = (),
          show_progress: bool = True, options: dict | None = None, publish: bool = True) -> TrainOutcome:
    """Train one artifact; `publish=False` returns it without storing (e.g. a sweep's levels)."""
    method = get_method(method_name, options)
    accelerator = Accelerator(cpu=not _has_accelerator())  # cpu=True is what enables multi-process CPU (gloo)
    set_seed(config.seed)
    with accelerator.main_process_first():  # the first process fills the datasets cache
        train_ds = tokenize(load_split(spec, spec.train_split, data_dir, config.train_samples, config.seed),
                            backbone.tokenizer, config.max_length)
        eval_ds = tokenize(load_split(spec, spec.eval_split, data_dir, config.eval_samples, config.seed),
                           backbone.tokenizer, config.max_length)
    head = HeadConfig(pooling=config.pooling, dropout=config.head_dropout)
    model = TaskModel(backbone.model, spec, head)
    params = method.trainable(model, RunContext(spec, backbone, config, store, data_dir, show_progress))
    lr = config.lr or method.default_lr
    result = fit(accelerator, model, method, params, train_ds, eval_ds, backbone.tokenizer, config, lr, show_progress)
    extra_details = method.after_fit(model, result)
    model.eval()
    tensors = method.export(model)
    if get_kind(method.kind).is_task:
        tensors |= model.head.tensors()
    manifest = Manifest(
        name=name or f"{spec.name}-{method.name}",
        kind=method.kind,
        method=method.name,
        task=spec,
        head=head,
        backbone=backbone.ref(),
        hyperparameters=config.model_dump() | {"lr": lr, "world_size": accelerator.num_processes},
        metrics=result.metrics,
        curves=result.curves,
        trainable_params=sum(p.numel() for p in params),
        details=method.details() | extra_details | {
            "train_examples": len(train_ds), "eval_examples": len(eval_ds), "steps": result.steps,
            "best_step": result.best_step, "train_seconds": round(result.train_seconds, 2),
            "seconds_per_step": round(result.train_seconds / max(result.steps, 1), 4),
            "torch_threads": torch.get_num_threads(),  # step times are only comparable at equal thread counts
            "optimizer_state_bytes": result.optimizer_state_bytes,
            "data": data_source(spec, data_dir),
        },
    )
    version = artifact.publish(store, manifest, tensors, tags) if publish and accelerator.is_main_process else None
    accelerator.wait_for_everyone()
    return TrainOutcome(version, manifest, result, tensors, method)


def _has_accelerator() -> bool:
    return torch.cuda.is_available() or torch.backends.mps.is_available() or (
        hasattr(torch, "xpu") and torch.xpu.is_available())
