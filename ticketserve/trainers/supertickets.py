"""Super tickets (Liang et al.; docs/concepts/methods.md#super-tickets-and-ticket-share):
head/FFN importance, then one-shot pruning at several levels with rewinding to the pre-trained weights, fine-tuning each survivor
structure; the best level on dev is the super ticket. The sweep traces the phase transition
(winning vs random vs losing tickets).
"""

from __future__ import annotations

import os
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from torch import nn

from ticketserve.core import artifact
from ticketserve.core.backbone import Backbone, fresh_copy
from ticketserve.core.data import data_source, load_split
from ticketserve.core.errors import InvalidArgument
from ticketserve.core.gates import Gates
from ticketserve.core.kinds import get_kind
from ticketserve.core.kinds.importance import FFN as SCORES_FFN
from ticketserve.core.kinds.importance import HEADS as SCORES_HEADS
from ticketserve.core.kinds.structure_mask import FFN, HEADS, to_tensors
from ticketserve.core.model import TaskHead, TaskModel
from ticketserve.core.routing import DEFAULT_SLOT
from ticketserve.core.shared_encoder import SharedEncoder
from ticketserve.registry import ArtifactVersion, Manifest, Store, TaskSpec
from ticketserve.trainers.base import Method, Outcome, RunContext, register_method, run_manifest
from ticketserve.trainers.config import TrainConfig
from ticketserve.trainers.full import FullFineTuning
from ticketserve.trainers.loop import MODEL_INPUTS, FitResult, tokenize, training_batches
from ticketserve.trainers.pruning import prune
from ticketserve.trainers.run import train
from ticketserve.trainers.single import ArtifactMethod
from ticketserve.trainers.ticket_report import importance_rows


def importance(model: TaskModel, batches) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean over examples of |∂L/∂gate| at gate = 1, taken per example and per token and summed
    (the reference code's score); head scores L2-normalised per layer."""
    config = model.encoder.config
    layers, heads = config.num_hidden_layers, config.num_attention_heads
    device = next(model.parameters()).device
    head_total, ffn_total, examples = torch.zeros(layers, heads), torch.zeros(layers), 0
    model.eval()
    shared = SharedEncoder(model.encoder)
    for batch in batches:
        size, length = batch["input_ids"].shape
        head_gates = torch.ones(size, length, layers, heads, device=device, requires_grad=True)
        ffn_gates = torch.ones(size, length, layers, device=device, requires_grad=True)
        with shared.applying(gates=Gates(head_gates, ffn_gates)):
            logits = model(**{k: batch[k] for k in MODEL_INPUTS if k in batch})
            loss = model.loss(logits, batch["labels"]) * size  # each example's own gradient, whatever the batch size
        head_grad, ffn_grad = torch.autograd.grad(loss, [head_gates, ffn_gates])
        head_total += head_grad.abs().sum((0, 1)).cpu()
        ffn_total += ffn_grad.abs().sum((0, 1)).cpu()
        examples += size
    head_scores = head_total / max(examples, 1)
    head_scores = head_scores / head_scores.norm(dim=1, keepdim=True).clamp(min=1e-12)
    return head_scores, ffn_total / max(examples, 1)


class ImportanceOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    fine_tuned: str | None = Field(None, description="score this published full fine-tuning of the task instead of "
                                   "fine-tuning again (its own settings and data apply)")


@register_method
class Importance(ArtifactMethod):
    """Fine-tune, then score every head and FFN on the training data (kind `importance`)."""

    name = "importance"
    kind = "importance"
    default_lr = 5e-5  # the rate benchmarks/studies/supertickets.md ran at; gated runs were not tuned further
    description = "fine-tune (or take --fine-tuned), then head/FFN importance (mean |dL/dgate|): an importance entry"
    Options = ImportanceOptions

    def run(self, context: RunContext) -> Outcome:
        if self.options.fine_tuned is None:
            outcome = super().run(context)
            if outcome.version is not None:
                outcome.summary["layers"] = importance_rows(outcome.tensors)
            return outcome
        version, scores = score_fine_tuned(self.options.fine_tuned, context.task, context.backbone, context.store,
                                           context.data_dir, context.name)
        return Outcome([version], {"artifact": str(version), "digest": version.digest, "layers": importance_rows(scores)},
                       f"published [bold]{version}[/]: head and FFN importance of {self.options.fine_tuned}")

    def trainable(self, model: TaskModel, context: RunContext) -> list[nn.Parameter]:
        return list(model.parameters())

    def after_fit(self, model: TaskModel, fit: FitResult) -> dict:
        self.scores = importance(model, fit.train_loader)
        return {"scored_on": "train"}

    def export(self, model: TaskModel) -> dict[str, torch.Tensor]:
        return {SCORES_HEADS: self.scores[0], SCORES_FFN: self.scores[1]}


def score_fine_tuned(ref: str, spec: TaskSpec, backbone: Backbone, store: Store, data_dir=None,
                     name: str | None = None) -> tuple[ArtifactVersion, dict[str, torch.Tensor]]:
    """Importance of a published full fine-tuning of `spec`, scored on the data it was trained
    on: the same scores as `importance` would give after fine-tuning again with its settings,
    without that fine-tuning. The entry carries the run's settings and metrics, so a sweep
    with those settings takes its level 0 from it."""
    found = artifact.load(store, ref, backbone, expect_kind="full")
    source = found.manifest
    if source.task.name != spec.name:
        raise InvalidArgument(f"{found.version} is a {source.task.name} fine-tuning, not {spec.name}")
    if source.details.get("data") != data_source(spec, data_dir):
        raise InvalidArgument(f"{found.version} was trained on {source.details.get('data')}, "
                              f"not on {data_source(spec, data_dir)}: importance is scored on the training data")
    config = TrainConfig(**{k: v for k, v in source.hyperparameters.items() if k in TrainConfig.model_fields})
    encoder = fresh_copy(backbone.model, get_kind("full").dense_state(backbone.model, found.kind_tensors))
    model = TaskModel(encoder, spec, source.head)
    model.head = TaskHead.from_tensors(found.tensors, source.head)
    train_ds = tokenize(load_split(spec, spec.train_split, data_dir, config.train_samples, config.seed),
                        backbone.tokenizer, config.max_length)
    scores = importance(model, training_batches(train_ds, backbone.tokenizer, config))
    tensors = {SCORES_HEADS: scores[0], SCORES_FFN: scores[1]}
    manifest = run_manifest(name or f"{spec.name}-importance", "importance", "importance", spec, backbone.ref(), config,
                            head=source.head, hyperparameters=source.hyperparameters, metrics=source.metrics,
                            curves=source.curves, trainable_params=source.trainable_params,
                            details={k: source.details[k] for k in ("train_seconds", "steps", "data") if k in source.details}
                            | {"scored_on": "train", "fine_tuning": f"{found.version}@{found.version.digest}"})
    return artifact.publish(store, manifest, tensors), tensors


class StructureOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    heads: list[list[int]] | None = Field(None, description="keep mask per layer and head (1 = kept)",
                                          json_schema_extra={"cli": False})  # set by a sweep, not by hand
    ffn: list[int] | None = Field(None, description="keep mask per layer (1 = kept)", json_schema_extra={"cli": False})
    structure: str | None = Field(None, description="a structure_mask artifact: its mask, and its head as the start")

    @model_validator(mode="after")
    def _one_source(self) -> StructureOptions:
        if (self.structure is None) == (self.heads is None or self.ffn is None):
            raise ValueError("give either heads and ffn, or a structure artifact")
        return self


@register_method
class GatedFineTuning(FullFineTuning):
    """Full fine-tuning with a fixed structure mask: one level of a super-ticket sweep, or —
    from a `structure_mask` artifact on its shared encoder — the optional per-task fine-tuning
    after Ticket-Share, which starts from that task's shared encoder and head. Its result is
    full-size: a reported figure, not the serving artifact."""

    name = "gated-full"
    default_lr = Importance.default_lr  # a sweep's level 0 is the importance run's fine-tuning: one rate
    description = "full fine-tuning with some heads/FFNs gated off (a super-ticket level; after Ticket-Share: --structure)"
    Options = StructureOptions

    def starts_from(self, store: Store) -> tuple[TaskSpec, str] | None:
        if self.options.structure is None:
            return None
        start = store.manifest(store.resolve(self.options.structure))
        return start.task, start.backbone.name  # a custom task's spec travels with its artifacts

    def trainable(self, model: TaskModel, context: RunContext) -> list[nn.Parameter]:
        device = next(model.parameters()).device
        heads, ffn = self.options.heads, self.options.ffn
        if self.options.structure is not None:
            heads, ffn = self._start_from(self.options.structure, model, context)
        self.shared = SharedEncoder(model.encoder)
        self.shared.gates.patterns[DEFAULT_SLOT] = (
            torch.tensor(heads, dtype=torch.float32, device=device), torch.tensor(ffn, dtype=torch.float32, device=device))
        return super().trainable(model, context)

    def _start_from(self, ref: str, model: TaskModel, context: RunContext) -> tuple[list, list]:
        """The artifact's mask; its head replaces the fresh one (checked: task, backbone, head shape)."""
        found = artifact.load(context.store, ref, context.backbone, expect_kind="structure_mask")
        if found.manifest.task.name != context.spec.name:
            raise InvalidArgument(f"{found.version} masks {found.manifest.task.name}, not {context.spec.name}")
        if found.manifest.head != model.head.config:
            raise InvalidArgument(f"{found.version}'s head ({found.manifest.head}) differs from this run's "
                                  f"({model.head.config}): pass the same --pooling")
        model.head = TaskHead.from_tensors(found.tensors, found.manifest.head).train().to(next(model.parameters()).device)
        self.options.structure = f"{found.version}@{found.version.digest}"  # recorded in the details
        return found.tensors[HEADS].int().tolist(), found.tensors[FFN].int().tolist()

    def export(self, model: TaskModel) -> dict[str, torch.Tensor]:
        self.shared.gates.patterns.pop(DEFAULT_SLOT, None)
        return super().export(model)

    def details(self) -> dict:
        """The mask itself is only worth recording when it came from no artifact."""
        return self.options.model_dump(exclude_none=True, exclude={"heads", "ffn"} if self.options.structure else set())


class SweepOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    levels: str = Field("0,10,20,30,40,50", description="pruning levels in percent")
    ticket_type: Literal["winning", "random", "losing"] = Field(
        "winning", description="prune the least important (winning), the most (losing) or at random")

    @field_validator("levels")
    @classmethod
    def _percentages(cls, text: str) -> str:
        try:
            values = [float(v) for v in text.split(",")]
        except ValueError:
            raise ValueError(f"takes percentages like 0,10,20 (got {text!r})") from None
        if not all(0 <= v < 100 for v in values):
            raise ValueError("levels must lie in [0, 100)")
        return text

    @property
    def shares(self) -> tuple[float, ...]:
        return tuple(float(v) / 100 for v in self.levels.split(","))


class SuperticketOptions(SweepOptions):
    importance: str | None = Field(None, description="a published importance entry to prune by "
                                   "(default: fine-tune and score first)")
    resume: bool = Field(False, description="continue a killed sweep of the same --name from its last finished level")


@register_method
class Superticket(Method):
    """The super-ticket sweep as a method: one `superticket` entry (plus the `importance`
    entry it scores first, unless given one)."""

    name = "superticket"
    kind = "superticket"
    default_lr = GatedFineTuning.default_lr
    description = "super-ticket sweep: importance, one-shot pruning per level, rewind, fine-tune; the phase curve"
    Options = SuperticketOptions

    def run(self, context: RunContext) -> Outcome:
        options = self.options
        version = sweep(context.task, context.backbone, context.config, context.store, context.data_dir, options.shares,
                        options.ticket_type, options.importance, context.name, context.show_progress, options.resume)
        curve = context.store.manifest(version).details
        return Outcome([version], {"artifact": str(version), "digest": version.digest, **curve},
                       f"published [bold]{version}[/]: best level {curve['best_level']:.0%}; "
                       + ", ".join(f"{p['level']:.0%} → {p['metric']:.4f}" for p in curve["levels"]))


def sweep(spec: TaskSpec, backbone: Backbone, config: TrainConfig, store: Store, data_dir=None,
          levels: tuple[float, ...] = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5), ticket_type: str = "winning",
          importance_ref: str | None = None, name: str | None = None, show_progress: bool = True,
          resume: bool = False) -> ArtifactVersion:
    """Prune at every level, rewind to θ0, fine-tune, evaluate; publish the sweep (kind
    `superticket`: the keep-masks per level, the scores, the curve, the best level).

    Each finished level is published at once (details `pending`: the levels still to run), so a
    killed sweep loses at most the level in flight. `resume` continues from the latest version
    of `name` when it is the same sweep: its finished levels are kept, an unfinished checkpoint
    is replaced, and a sweep that already has every level is returned as it is.

    Level 0 prunes nothing, so when the importance run used this sweep's settings it *is* that
    level (same θ0, seed and data order: equal metrics, tested) and is not trained again."""
    name = name or f"{spec.name}-superticket-{ticket_type}"
    previous = _previous(store, name, spec, backbone, config, ticket_type, importance_ref) if resume else None
    done = {point["level"] for point in previous.manifest.details["levels"]} if previous is not None else set()
    if previous is not None and not previous.manifest.details.get("pending") and set(levels) <= done:
        return previous.version  # finished already
    theta0 = {k: v.detach().clone() for k, v in backbone.model.state_dict().items()}
    if previous is not None:
        importance_ref = previous.manifest.details["importance"]
    if importance_ref is None:
        scored = train("importance", spec, backbone, config, store, data_dir, name=f"{spec.name}-importance",
                       show_progress=show_progress)
    else:
        scored = artifact.load(store, importance_ref, backbone, expect_kind="importance")
    importance_ref, scores = f"{scored.version}@{scored.version.digest}", scored.tensors
    tensors = {SCORES_HEADS: scores[SCORES_HEADS], SCORES_FFN: scores[SCORES_FFN]}
    curve, checkpoint = [], None  # checkpoint: this sweep's unfinished version, replaced by each newer one
    if previous is not None:
        curve = [point for point in previous.manifest.details["levels"] if point["level"] in levels]
        tensors |= {k: v for k, v in previous.tensors.items() if k.split(".")[0] in {_tag(p["level"]) for p in curve}}
        checkpoint = previous.version if previous.manifest.details.get("pending") else None
    for level in levels:
        if any(point["level"] == level for point in curve):
            continue
        keep_heads, keep_ffn = prune(scores[SCORES_HEADS], scores[SCORES_FFN], level, ticket_type, config.seed)
        tensors |= {f"{_tag(level)}.{k}": v for k, v in to_tensors(keep_heads, keep_ffn).items()}
        point = {"level": level, "heads_pruned": int((~keep_heads).sum()), "ffn_pruned": int((~keep_ffn).sum())}
        if level == 0 and _fine_tuned_alike(scored.manifest, spec, config, data_dir):
            # pruning nothing is the importance run's own fine-tuning: same θ0, settings and seed
            metrics = scored.manifest.metrics
            point |= {"metric": metrics[spec.metric], "metrics": metrics, "reused": "importance",
                      "train_seconds": scored.manifest.details.get("train_seconds")}
        else:
            backbone.model.load_state_dict(theta0)  # rewind the survivors to the pre-trained weights
            outcome = train("gated-full", spec, backbone, config, store, data_dir, show_progress=show_progress,
                            options={"heads": keep_heads.int().tolist(), "ffn": keep_ffn.int().tolist()}, publish=False)
            point |= {"metric": outcome.fit.metrics[spec.metric], "metrics": outcome.fit.metrics,
                      "train_seconds": outcome.fit.train_seconds}
        curve.append(point)
        pending = [lv for lv in levels if all(point["level"] != lv for point in curve)]
        published = _publish(store, name, spec, backbone, config, ticket_type, importance_ref, curve, tensors, pending)
        if checkpoint is not None:
            store.remove(checkpoint)  # only the latest checkpoint is kept
        checkpoint = published
    backbone.model.load_state_dict(theta0)
    if checkpoint is None or store.manifest(checkpoint).details["pending"]:  # resumed with no level left to run
        final = _publish(store, name, spec, backbone, config, ticket_type, importance_ref, curve, tensors, [])
        if checkpoint is not None:
            store.remove(checkpoint)
        checkpoint = final
    return checkpoint


def _fine_tuned_alike(manifest: Manifest, spec: TaskSpec, config: TrainConfig, data_dir) -> bool:
    """Whether a published fine-tuning ran with the settings (rate resolved, process count
    included) and on the data that this sweep's levels train with."""
    wanted = config.model_dump() | {"lr": config.lr or GatedFineTuning.default_lr,
                                    "world_size": int(os.environ.get("WORLD_SIZE", 1))}
    return manifest.hyperparameters == wanted and manifest.details.get("data") == data_source(spec, data_dir)


def _tag(level: float) -> str:
    return f"level-{round(level * 100)}"


def _publish(store, name, spec, backbone, config, ticket_type, importance_ref, curve, tensors, pending) -> ArtifactVersion:
    curve = sorted(curve, key=lambda point: point["level"])
    best = max(curve, key=lambda point: point["metric"])
    manifest = run_manifest(name, "superticket", "superticket", spec, backbone.ref(), config, metrics=best["metrics"],
                            details={"ticket_type": ticket_type, "importance": importance_ref, "levels": curve,
                                     "best_level": best["level"], "pending": pending})
    return artifact.publish(store, manifest, tensors)


def _previous(store, name, spec, backbone, config, ticket_type, importance_ref):
    """The latest sweep of `name`, if it is this sweep (same task, backbone, settings, ticket
    type and importance); a different one is an error, not silently redone or mixed in."""
    if not store.versions(name):
        return None
    found = artifact.read(store, name, expect_kind="superticket")
    details = found.manifest.details
    same = {"task": found.manifest.task.name == spec.name,
            "backbone": found.manifest.backbone.fingerprint == backbone.fingerprint,
            "settings": found.manifest.hyperparameters == config.model_dump(),
            "ticket type": details["ticket_type"] == ticket_type,
            "importance": importance_ref is None or store.resolve(importance_ref).digest == details["importance"].split("@")[1]}
    if not all(same.values()):
        differing = ", ".join(key for key, equal in same.items() if not equal)
        raise InvalidArgument(f"cannot resume {found.version}: its {differing} differ from this sweep's")
    return found


def keep_masks(tensors: dict[str, torch.Tensor], level: float) -> tuple[torch.Tensor, torch.Tensor]:
    tag = _tag(level)
    return tensors[f"{tag}.{HEADS}"].bool(), tensors[f"{tag}.{FFN}"].bool()
