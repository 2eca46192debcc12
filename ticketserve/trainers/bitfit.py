"""BitFit: only the bias of each of the six dense matrices per block (+ head) trains.

Stored as a `row_delta` whose single row per matrix is the bias row (index = in_features),
so it is served exactly like a dominant ticket and mixes with them in one batch.
"""

from __future__ import annotations

from ticketserve.core.model import TaskModel
from ticketserve.trainers.base import RunContext, register_method
from ticketserve.trainers.rows import RowMethod, matrix_sizes
from ticketserve.trainers.tickets import bias_rows


@register_method
class BitFit(RowMethod):
    name = "bitfit"
    description = "bias row of every dense matrix + head (row_delta artifact)"

    def rows(self, model: TaskModel, context: RunContext) -> dict[str, list[int]]:
        return bias_rows(matrix_sizes(model.encoder))
