"""Kind `superticket`: a super-ticket sweep (DESIGN.md §3) — the importance scores it pruned by,
the keep-masks of every pruning level (`level-<p>.gates.heads`, `level-<p>.gates.ffn`) and, in
the manifest, the phase curve and the best level. A record, not a task."""

from __future__ import annotations

from ticketserve.core.kinds.base import register_kind
from ticketserve.core.kinds.importance import ImportanceKind


@register_kind
class SuperticketKind(ImportanceKind):
    name = "superticket"
