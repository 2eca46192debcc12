"""Methods that train a few rows of W̃ per matrix (+ head) and ship a `row_delta`.

BitFit, Dominant-k and Random-k differ only in which rows they choose. Only the chosen rows
exist as parameters — gradients and optimizer state cover them alone, never a dense mask.
"""

from __future__ import annotations

from abc import abstractmethod

import torch
from torch import nn

from ticketserve.core.backbone import dense_matrices
from ticketserve.core.kinds import row_delta
from ticketserve.core.model import TaskModel
from ticketserve.core.routing import DEFAULT_SLOT
from ticketserve.core.shared_encoder import SharedEncoder
from ticketserve.trainers.base import RunContext
from ticketserve.trainers.single import ArtifactMethod


def matrix_sizes(encoder: nn.Module) -> dict[str, int]:
    """Rows of W̃ per matrix: in_features + 1 (the bias row)."""
    return {name: linear.in_features + 1 for name, linear in dense_matrices(encoder).items()}


class RowMethod(ArtifactMethod):
    kind = "row_delta"
    # benchmarks/studies/dominant.md: every row method peaks at 3e-3 on MRPC's grid (3e-4–1e-2), SST-2 and RTE choose it
    # too (CoLA: 1e-3 for BitFit and Dominant); 15× full fine-tuning's rate, as the paper's 10–100×
    default_lr = 3e-3

    @abstractmethod
    def rows(self, model: TaskModel, context: RunContext) -> dict[str, list[int]]:
        """Which rows of W̃ to train, per matrix (row `in` = bias; an empty list = none)."""

    def trainable(self, model: TaskModel, context: RunContext) -> list[nn.Parameter]:
        self.chosen = self.rows(model, context)
        self.shared = SharedEncoder(model.encoder)
        return row_delta.add_trainable(self.shared, DEFAULT_SLOT, self.chosen) + list(model.head.parameters())

    def export(self, model: TaskModel) -> dict[str, torch.Tensor]:
        return row_delta.export(self.shared, DEFAULT_SLOT)

    def details(self) -> dict:
        return super().details() | {"rows": sum(len(r) for r in self.chosen.values()),
                                    "matrices_with_rows": sum(bool(r) for r in self.chosen.values())}
