"""Supermask training (Radiya-Dixit & Wang; docs/concepts/methods.md#supermasks): the
pre-trained weights never change; a real score ν per masked weight is trained and the forward
uses θ0 ⊙ μ with μ ~ Bernoulli(sigmoid(ν)) and a straight-through gradient to ν. What ships is
the deterministic mask sigmoid(ν) > 0.5, compressed (kind `supermask`).
"""

from __future__ import annotations

import statistics
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from torch.nn.utils import parametrize

from ticketserve.core.backbone import MATRICES, dense_matrices
from ticketserve.core.kinds.supermask import encode_masks, magnitude_mask
from ticketserve.core.model import TaskModel
from ticketserve.trainers.base import RunContext, register_method
from ticketserve.trainers.loop import FitResult
from ticketserve.trainers.single import ArtifactMethod

WORD_EMBEDDINGS = "embeddings.word_embeddings"


class SupermaskOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    init_sparsity: float = Field(0.0, ge=0, lt=1, description="share of smallest-|w| weights per matrix starting masked")
    layers: Literal["all", "no-key", "no-deep"] = Field(
        "all", description="which matrices: all six per block; without key projections; without the deepest blocks")
    deep_blocks: int = Field(2, ge=1, description="no-deep: how many of the last blocks stay unmasked")
    embeddings: bool = Field(False, description="also mask the word embeddings", json_schema_extra={"flag": "--mask-embeddings"})
    init_score: float = Field(5.0, gt=0, description="|ν| at initialisation (sigmoid(5) ≈ 0.993)")
    samples: int = Field(0, ge=0, description="after training, also score N Bernoulli masks (mean ± std)")
    head_lr: float | None = Field(None, gt=0, description="the task head's learning rate (--lr is the scores'); "
                                  "default 1e-3, 1e-2 for token classification")


def default_head_lr(task_type: str) -> float:
    """1e-3 for a sequence head (chosen with the scores' rate on MRPC dev); 1e-2 for a fresh
    per-token head, which at 1e-3 learned nothing in 2 epochs of WNUT-17 — every word O, entity
    F1 0 — and at 1e-2 reached 0.533 (seed 42; full fine-tuning 0.558)."""
    return 1e-2 if task_type == "token_classification" else 1e-3


class ScoreMask(nn.Module):
    """Parametrization W ↦ W ⊙ μ with trainable scores ν; sampled in training, deterministic
    (ν > 0) in eval unless `sample` is set (for the Bernoulli-sample evaluation)."""

    def __init__(self, weight: torch.Tensor, init_sparsity: float, init_score: float):
        super().__init__()
        self.dropped = int(round(init_sparsity * weight.numel()))
        start = magnitude_mask(weight, self.dropped).to(weight.device)
        self.scores = nn.Parameter(torch.where(start, init_score, -init_score).to(weight.dtype))
        self.sample = False

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if self.training or self.sample:
            p = torch.sigmoid(self.scores)
            drawn = (torch.rand_like(p) < p.detach()).to(p.dtype)  # a Bernoulli draw; ~2x cheaper than torch.bernoulli on CPU
            mask = drawn + p - p.detach()  # straight-through: forward is the sample, gradient flows to ν
        else:
            mask = (self.scores > 0).to(weight.dtype)
        return weight * mask

    def deterministic(self) -> torch.Tensor:
        return self.scores.detach() > 0


def select_weights(encoder: nn.Module, options: SupermaskOptions) -> dict[str, nn.Module]:
    """Modules whose `weight` is masked, by module name, per the `layers` preset."""
    num_layers = encoder.config.num_hidden_layers
    chosen = {}
    for name, module in dense_matrices(encoder).items():
        layer = int(name.split(".")[2])
        if options.layers == "no-key" and name.endswith(MATRICES[1]):
            continue
        if options.layers == "no-deep" and layer >= num_layers - options.deep_blocks:
            continue
        chosen[name] = module
    if options.embeddings:
        chosen[WORD_EMBEDDINGS] = encoder.get_submodule(WORD_EMBEDDINGS)
    return chosen


@register_method
class Supermask(ArtifactMethod):
    name = "supermask"
    kind = "supermask"
    default_lr = 0.5  # the scores'; chosen on MRPC dev from 0.05-0.5 (1e-2 flipped no weight in 3 epochs)
    description = "binary masks over the frozen pre-trained weights, Bernoulli-sampled with straight-through scores"
    Options = SupermaskOptions

    def trainable(self, model: TaskModel, context: RunContext) -> list[nn.Parameter]:
        self.head_lr = self.options.head_lr or default_head_lr(context.task.type)
        self.masks: dict[str, ScoreMask] = {}
        for name, module in select_weights(model.encoder, self.options).items():
            mask = ScoreMask(module.weight, self.options.init_sparsity, self.options.init_score)
            parametrize.register_parametrization(module, "weight", mask)
            self.masks[name] = mask
        self.score_ids = {id(m.scores) for m in self.masks.values()}
        return [m.scores for m in self.masks.values()] + list(model.head.parameters())

    def weight_decay(self, param: nn.Parameter) -> bool:
        return id(param) not in self.score_ids and super().weight_decay(param)  # decay would pull ν to 0.5 odds

    def learning_rate(self, param: nn.Parameter, lr: float) -> float:
        return lr if id(param) in self.score_ids else self.head_lr

    def resolved(self) -> dict[str, str]:
        return {"head_lr": str(self.head_lr)}

    def export(self, model: TaskModel) -> dict[str, torch.Tensor]:
        masks = {name: m.deterministic() for name, m in self.masks.items()}
        weights = {name: model.encoder.get_submodule(name).parametrizations.weight.original for name in masks}
        tensors = encode_masks(masks, weights, {name: m.dropped for name, m in self.masks.items()})
        self.sparsity = {name: 1.0 - mask.float().mean().item() for name, mask in masks.items()}
        total = sum(mask.numel() for mask in masks.values())
        self.zeros = sum(int((~mask).sum()) for mask in masks.values())
        self.bits_per_weight = 8 * sum(t.numel() for k, t in tensors.items() if k.endswith(".mask")) / total
        self.masked_weights = total
        return tensors

    def after_fit(self, model: TaskModel, fit: FitResult) -> dict:
        if not self.options.samples:
            return {}
        metric = model.spec.metric
        values = []
        for mask in self.masks.values():
            mask.sample = True
        try:
            for _ in range(self.options.samples):
                values.append(fit.evaluate()[metric])
        finally:
            for mask in self.masks.values():
                mask.sample = False
        return {"sampled": {"metric": metric, "n": len(values), "mean": statistics.mean(values),
                            "std": statistics.stdev(values) if len(values) > 1 else 0.0, "values": values}}

    def details(self) -> dict:
        return super().details() | {
            "head_lr": self.head_lr, "masked_weights": self.masked_weights, "sparsity": self.zeros / self.masked_weights,
            "sparsity_per_matrix": self.sparsity, "bits_per_masked_weight": self.bits_per_weight}
