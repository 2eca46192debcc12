"""Kind `ticket`: the result of a dominant-ticket search, not a servable task.

Payload: `<matrix>.counts` int32[in + 1] — out-weighted parameters per dimension of W̃, for
every matrix. Any Dominant-k ticket is cut from it (`tickets.top_k`), and the counts are the
histograms the analysis commands draw.
"""

from __future__ import annotations

import torch
from torch import nn

from ticketserve.core.backbone import dense_matrices
from ticketserve.core.errors import CorruptArtifact, InvalidArgument
from ticketserve.core.kinds.base import Kind, Tensors, register_kind
from ticketserve.core.shared_encoder import SharedEncoder

SUFFIX = ".counts"


def counts_of(tensors: Tensors) -> dict[str, torch.Tensor]:
    return {key.removesuffix(SUFFIX): value.long() for key, value in tensors.items()}


def to_tensors(counts: dict[str, torch.Tensor]) -> Tensors:
    return {name + SUFFIX: value.int().contiguous() for name, value in counts.items()}


@register_kind
class TicketKind(Kind):
    name = "ticket"
    is_task = False

    def validate(self, tensors: Tensors, encoder: nn.Module) -> None:
        matrices = dense_matrices(encoder)
        if {k.removesuffix(SUFFIX) for k in tensors} != matrices.keys() or not all(k.endswith(SUFFIX) for k in tensors):
            raise CorruptArtifact("a ticket must hold `<matrix>.counts` for exactly this backbone's matrices")
        for name, linear in matrices.items():
            counts = tensors[name + SUFFIX]
            if counts.dtype != torch.int32 or tuple(counts.shape) != (linear.in_features + 1,) or (counts < 0).any():
                raise CorruptArtifact(f"ticket {name}: counts must be int32[{linear.in_features + 1}], non-negative")

    def attach(self, shared: SharedEncoder, slot: int, tensors: Tensors) -> nn.Module:
        raise InvalidArgument("a ticket is not a task: train on it with `--method dominant --ticket NAME`")
