"""Full fine-tuning: every encoder weight trains. The size and quality baseline."""

from __future__ import annotations

import torch
from torch import nn

from ticketserve.core.kinds.full import changed_tensors
from ticketserve.core.model import TaskModel
from ticketserve.trainers.base import RunContext, register_method
from ticketserve.trainers.single import ArtifactMethod


@register_method
class FullFineTuning(ArtifactMethod):
    name = "full"
    kind = "full"
    # benchmarks/studies/dominant.md: MRPC's grid (2e-5–2e-4) peaks at 2e-4, SST-2 and RTE choose it too (CoLA: 5e-5, by 0.007)
    default_lr = 2e-4
    description = "all encoder weights + head (baseline; artifact holds every changed tensor)"

    def trainable(self, model: TaskModel, context: RunContext) -> list[nn.Parameter]:
        self.reference = {k: v.detach().cpu().clone() for k, v in model.encoder.state_dict().items()}
        return list(model.parameters())

    def export(self, model: TaskModel) -> dict[str, torch.Tensor]:
        return changed_tensors(model.encoder.state_dict(), self.reference)
