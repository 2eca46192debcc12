"""Kind `importance`: head/FFN importance scores (mean |∂L/∂gate|,
docs/concepts/methods.md#super-tickets-and-ticket-share), a record of an analysis rather than a
task. Payload: `importance.heads` float[L, H], `importance.ffn` float[L]."""

from __future__ import annotations

from torch import nn

from ticketserve.core.errors import CorruptArtifact, InvalidArgument
from ticketserve.core.kinds.base import Kind, Tensors, register_kind
from ticketserve.core.shared_encoder import SharedEncoder

HEADS, FFN = "importance.heads", "importance.ffn"


@register_kind
class ImportanceKind(Kind):
    name = "importance"
    is_task = False

    def validate(self, tensors: Tensors, encoder: nn.Module) -> None:
        if set(tensors) != {HEADS, FFN}:
            raise CorruptArtifact(f"an importance entry holds exactly {HEADS} and {FFN}")
        self.check_scores(tensors, encoder)

    def check_scores(self, tensors: Tensors, encoder: nn.Module) -> None:
        config = encoder.config
        for key, shape in ((HEADS, (config.num_hidden_layers, config.num_attention_heads)),
                           (FFN, (config.num_hidden_layers,))):
            scores = tensors.get(key)
            if scores is None or tuple(scores.shape) != shape or not scores.is_floating_point():
                raise CorruptArtifact(f"{self.name} entry: {key} must be float{list(shape)} for this backbone")

    def attach(self, shared: SharedEncoder, slot: int, tensors: Tensors) -> nn.Module:
        raise InvalidArgument(f"a {self.name} entry is not a task")
