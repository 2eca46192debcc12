"""Methods that train one artifact of one kind in the shared loop: data → model → method's
trainable parameters → `loop.fit` → the method's tensors (+ the head) → one published artifact."""

from __future__ import annotations

import sys
import time
from abc import abstractmethod
from dataclasses import dataclass

import torch
from accelerate.utils import set_seed
from torch import nn

from ticketserve.core import artifact
from ticketserve.core.data import data_source, load_full_split, subset
from ticketserve.core.errors import InvalidArgument
from ticketserve.core.kinds import get_kind
from ticketserve.core.losses import check_loss
from ticketserve.core.model import TaskModel
from ticketserve.registry import ArtifactVersion, HeadConfig, Manifest, TaskSpec
from ticketserve.trainers.base import Method, Outcome, RunContext, run_manifest
from ticketserve.trainers.config import TrainConfig
from ticketserve.trainers.loop import FitResult, accelerator_for, fit, tokenize


@dataclass
class TrainOutcome(Outcome):
    version: ArtifactVersion | None  # None on non-main processes of a distributed run
    manifest: Manifest
    fit: FitResult
    tensors: dict[str, torch.Tensor]  # the payload (every process has it, published or not)
    method: Method


def for_loss(train, loss: str):
    """The training split as `loss` takes it, and what was done (for the manifest's details):
    `mnrl` keeps the positive pairs (the rows with the highest label); `cosine` and `bce` take
    labels scaled into [0, 1] by the largest (STS-B's 0…5 → 0…1)."""
    if loss == "mnrl":
        positive = max(train["label"])
        return train.filter(lambda row: row["label"] == positive), {"loss": loss, "positive_label": positive}
    if loss in ("cosine", "bce"):
        largest = max(abs(v) for v in train["label"])
        if largest > 1:
            return train.map(lambda row: {"label": row["label"] / largest}), {"loss": loss, "label_scale": 1 / largest}
    return train, {"loss": loss}


def embedding_widths(spec: TaskSpec, config: TrainConfig, hidden_size: int) -> list[int]:
    """The smaller widths an embedding task trains (`--matryoshka-dims`), widest first."""
    if not config.matryoshka_dims:
        return []
    if spec.type != "embedding":
        raise InvalidArgument("--matryoshka-dims trains embedding tasks (--task-type embedding)")
    if not all(0 < width < hidden_size for width in config.matryoshka_dims):
        raise InvalidArgument(f"--matryoshka-dims: each width must be below the embedding's {hidden_size}")
    return sorted(set(config.matryoshka_dims), reverse=True)


class ArtifactMethod(Method):
    """A method whose run is the shared loop; subclasses say what trains and what ships."""

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

    def run(self, context: RunContext) -> TrainOutcome:
        spec, backbone, config = context.task, context.backbone, context.config
        started = time.perf_counter()
        accelerator = accelerator_for(config)
        set_seed(config.seed)
        loss = check_loss(spec, config.loss)
        with accelerator.main_process_first():  # the first process fills the datasets cache (hub data)
            splits = {split: (load_full_split(spec, split, context.data_dir), samples) for split, samples in
                      ((spec.train_split, config.train_samples), (spec.eval_split, config.eval_samples))}
            train_full, objective = for_loss(splits[spec.train_split][0], loss)
            splits[spec.train_split] = (train_full, config.train_samples)
            apart = spec.type == "embedding"
            train_ds, eval_ds = (tokenize(subset(full, samples, config.seed), backbone.tokenizer, config.max_length, apart)
                                 for full, samples in splits.values())
        head = HeadConfig(pooling=config.pooling, dropout=config.head_dropout, normalize=apart,
                          dimensions=embedding_widths(spec, config, backbone.config.hidden_size))
        model = TaskModel(backbone.model, spec, head, loss)
        params = self.trainable(model, context)
        lr = config.lr or self.default_lr
        choices = self._choices(context, lr, {split: (len(full), samples) for split, (full, samples) in splits.items()})
        label = context.phase or f"train {spec.name}"
        if context.show_progress and accelerator.is_main_process:
            print(self._plan(label, choices), file=sys.stderr, flush=True)
        result = fit(accelerator, model, self, params, train_ds, eval_ds, backbone.tokenizer, config, lr,
                     context.show_progress, label)
        extra_details = self.after_fit(model, result)
        model.eval()
        tensors = self.export(model)
        if get_kind(self.kind).is_task:
            tensors |= model.head.tensors()
        manifest = run_manifest(
            context.name or f"{spec.name}-{self.name}", self.kind, self.name, spec, backbone.ref(), config, head=head,
            hyperparameters=config.model_dump() | {"lr": lr, "world_size": accelerator.num_processes},
            metrics=result.metrics,
            curves=result.curves,
            trainable_params=sum(p.numel() for p in params),
            details=self.details() | extra_details | objective | {
                "train_examples": len(train_ds), "eval_examples": len(eval_ds), "steps": result.steps,
                "best_step": result.best_step, "train_seconds": round(result.train_seconds, 2),
                "seconds_per_step": round(result.train_seconds / max(result.steps, 1), 4),
                "torch_threads": torch.get_num_threads(),  # step times are only comparable at equal thread counts
                "optimizer_state_bytes": result.optimizer_state_bytes,
                "data": data_source(spec, context.data_dir),
            },
        )
        publish = context.publish and accelerator.is_main_process
        version = artifact.publish(context.store, manifest, tensors, context.tags) if publish else None
        accelerator.wait_for_everyone()
        return TrainOutcome([version] if version else [],
                            *self._report(version, manifest, result, context, time.perf_counter() - started, choices),
                            version, manifest, result, tensors, self)

    def _choices(self, context: RunContext, lr: float, splits: dict[str, tuple[int, int | None]]) -> dict:
        """The resolved settings a user did not necessarily type: rate, length, data, method choices."""
        config = context.config
        data = {split: {"examples": min(total, samples or total), "of": total,
                        "drawn": f"random subset, seed {config.seed}" if samples and samples < total else "all"}
                for split, (total, samples) in splits.items()}
        return {"lr": lr, "lr_from": "--lr" if config.lr else f"{self.name}'s default", "epochs": config.epochs,
                "max_steps": config.max_steps, "batch_size": config.batch_size, "seed": config.seed,
                "data": data_source(context.task, context.data_dir), "splits": data} | self.resolved()

    def _plan(self, label: str, choices: dict) -> str:
        steps = f", at most {choices['max_steps']} steps" if choices["max_steps"] else ""
        splits = ", ".join(f"{split} {d['examples']:,} of {d['of']:,} ({d['drawn']})" for split, d in choices["splits"].items())
        lines = [f"{label}: lr {choices['lr']:g} ({choices['lr_from']}), {choices['epochs']} epochs{steps}, "
                 f"batch {choices['batch_size']}, seed {choices['seed']} (the model's initialisation and any subset)",
                 f"  data {choices['data']}: {splits}"]
        if self.resolved():
            lines.append(f"  {self._resolved_text()}")
        return "\n".join(lines)

    def _resolved_text(self) -> str:
        return ", ".join(f"{key.replace('_', ' ')} {value}" for key, value in self.resolved().items())

    def _report(self, version, manifest: Manifest, result: FitResult, context: RunContext, wall: float,
                choices: dict) -> tuple[dict, str]:
        if version is None:
            return {}, ""
        payload_bytes = context.store.manifest(version).payload_bytes
        summary = {"artifact": str(version), "digest": version.digest, "kind": manifest.kind,
                   "task": manifest.task.name, "method": manifest.method, "metrics": manifest.metrics,
                   "trainable_params": manifest.trainable_params, "payload_bytes": payload_bytes,
                   "train_seconds": round(result.train_seconds, 1), "total_seconds": round(wall, 1), "steps": result.steps,
                   "choices": choices}
        metric_text = ", ".join(f"{k} {v:.4f}" for k, v in manifest.metrics.items())
        resolved = f"; {self._resolved_text()}" if self.resolved() else ""
        return summary, (f"published [bold]{version}[/] ({manifest.kind}, {payload_bytes:,} bytes, "
                         f"{manifest.trainable_params:,} trainable params{resolved}): {metric_text}; "
                         f"training {summary['train_seconds']} s of {summary['total_seconds']} s in all")
