"""Artifact kinds, one module each; importing this package registers them all."""

from ticketserve.core.kinds import backbone, full, importance, row_delta, structure_mask, supermask, superticket, ticket  # noqa: F401
from ticketserve.core.kinds.base import GraphInputs, Kind, Tensors, get_kind, kinds, register_kind

__all__ = ["GraphInputs", "Kind", "Tensors", "get_kind", "kinds", "register_kind"]
