"""Kind `importance`: head/FFN importance scores (mean |∂L/∂gate|, DESIGN.md §3), a record of
an analysis rather than a task. Payload: `importance.heads` float[L, H], `importance.ffn` float[L]."""

from __future__ import annotations

from torch import nn

from ticketserve.core.errors import CorruptArtifact, InvalidArgument
from ticketserve.core.kinds.base import Kind, Tensors, register_kind


@register_kind
class ImportanceKind(Kind):
    name = "importance"
    is_task = False

    def validate(self, tensors: Tensors, encoder: nn.Module) -> None:
        config = encoder.config
        heads = tensors.get("importance.heads")
        if heads is None or tuple(heads.shape) != (config.num_hidden_layers, config.num_attention_heads):
            raise CorruptArtifact(f"{self.name} entry lacks importance scores that fit this backbone")

    def attach(self, encoder: nn.Module, slot: int, tensors: Tensors) -> nn.Module:
        raise InvalidArgument(f"a {self.name} entry is not a task")
