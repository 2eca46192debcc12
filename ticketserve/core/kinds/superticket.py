"""Kind `superticket`: a super-ticket sweep (docs/concepts/methods.md#super-tickets-and-ticket-share)
— the importance scores it pruned by, the keep-masks of every pruning level
(`level-<p>.gates.heads`, `level-<p>.gates.ffn`) and, in the manifest, the phase curve and the
best level. A record, not a task."""

from __future__ import annotations

import re

from torch import nn

from ticketserve.core.errors import CorruptArtifact
from ticketserve.core.kinds.base import Tensors, register_kind
from ticketserve.core.kinds.importance import FFN, HEADS, ImportanceKind
from ticketserve.core.kinds.structure_mask import StructureMaskKind

LEVEL = re.compile(r"level-(\d{1,2})\.(gates\.heads|gates\.ffn)")


@register_kind
class SuperticketKind(ImportanceKind):
    name = "superticket"

    def validate(self, tensors: Tensors, encoder: nn.Module) -> None:
        self.check_scores(tensors, encoder)
        levels: dict[str, Tensors] = {}
        for key, tensor in tensors.items():
            if key in (HEADS, FFN):
                continue
            match = LEVEL.fullmatch(key)
            if match is None:
                raise CorruptArtifact(f"a superticket sweep holds importance scores and level-<p> masks, not {key!r}")
            levels.setdefault(match[1], {})[match[2]] = tensor
        for level, masks in levels.items():
            try:
                StructureMaskKind().validate(masks, encoder)
            except CorruptArtifact as exc:
                raise CorruptArtifact(f"superticket level {level}%: {exc}") from None
