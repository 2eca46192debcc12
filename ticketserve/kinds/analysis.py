"""Kinds for registry entries that record analyses rather than tasks: head/FFN `importance`
scores and `superticket` sweeps (keep-masks per pruning level, the phase curve)."""

from __future__ import annotations

from torch import nn

from ticketserve.errors import CorruptArtifact, InvalidArgument
from ticketserve.kinds import Kind, Tensors, register_kind


class _Record(Kind):
    is_task = False

    def validate(self, tensors: Tensors, encoder: nn.Module) -> None:
        config = encoder.config
        heads = tensors.get("importance.heads")
        if heads is None or tuple(heads.shape) != (config.num_hidden_layers, config.num_attention_heads):
            raise CorruptArtifact(f"{self.name} entry lacks importance scores that fit this backbone")

    def attach(self, encoder: nn.Module, slot: int, tensors: Tensors) -> nn.Module:
        raise InvalidArgument(f"a {self.name} entry is not a task")


@register_kind
class ImportanceKind(_Record):
    name = "importance"


@register_kind
class SuperticketKind(_Record):
    name = "superticket"
