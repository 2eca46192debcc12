"""Artifact kinds, one module each; importing this package registers them all."""

from ticketserve.core.kinds import (  # noqa: F401
    backbone,
    full,
    importance,
    lora,
    plain,
    row_delta,
    structure_mask,
    supermask,
    superticket,
    ticket,
)
from ticketserve.core.kinds.base import GraphInputs, Kind, Tensors, get_kind, kinds, register_kind

__all__ = ["GraphInputs", "Kind", "Tensors", "get_kind", "kinds", "register_kind"]
