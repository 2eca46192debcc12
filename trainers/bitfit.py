"""BitFit: only the bias of each of the six dense matrices per block (+ head) trains.

Stored as a `row_delta` whose single row per matrix is the bias row (index = in_features),
so it is served exactly like a dominant ticket and mixes with them in one batch.
"""

from __future__ import annotations

import torch
from torch import nn

from ticketserve.backbone import Backbone, dense_matrices
from ticketserve.kinds import row_delta
from ticketserve.kinds.routing import DEFAULT_SLOT
from ticketserve.model import TaskModel
from trainers import Method, register_method


@register_method
class BitFit(Method):
    name = "bitfit"
    kind = "row_delta"
    default_lr = 1e-3
    description = "bias row of every dense matrix + head (row_delta artifact)"

    def trainable(self, model: TaskModel, backbone: Backbone) -> list[nn.Parameter]:
        rows = {name: [linear.in_features] for name, linear in dense_matrices(model.encoder).items()}
        return row_delta.add_trainable(model.encoder, DEFAULT_SLOT, rows) + list(model.head.parameters())

    def export(self, model: TaskModel) -> dict[str, torch.Tensor]:
        return row_delta.export(model.encoder, DEFAULT_SLOT)
