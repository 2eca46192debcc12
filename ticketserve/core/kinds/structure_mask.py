"""Kind `structure_mask`: which attention heads and FFN blocks a task uses
(docs/concepts/methods.md#super-tickets-and-ticket-share).

Payload: `gates.heads` uint8[L, H] and `gates.ffn` uint8[L] (1 = kept). Applied as
per-example gates of the shared encoder it names (`SharedEncoder.gates`) — for Ticket-Share,
the shared multi-task encoder published as a `backbone` entry — so structure-mask tasks mix
in one batch.
"""

from __future__ import annotations

import torch
from torch import nn

from ticketserve.core.errors import CorruptArtifact
from ticketserve.core.kinds.base import GraphInputs, Kind, Tensors, register_kind
from ticketserve.core.routing import Routing
from ticketserve.core.shared_encoder import SharedEncoder

HEADS, FFN = "gates.heads", "gates.ffn"


def to_tensors(keep_heads: torch.Tensor, keep_ffn: torch.Tensor) -> Tensors:
    return {HEADS: keep_heads.to(torch.uint8).contiguous(), FFN: keep_ffn.to(torch.uint8).contiguous()}


@register_kind
class StructureMaskKind(Kind):
    name = "structure_mask"
    in_graph = True

    def validate(self, tensors: Tensors, encoder: nn.Module) -> None:
        config = encoder.config
        if set(tensors) != {HEADS, FFN}:
            raise CorruptArtifact(f"a structure mask holds exactly {HEADS} and {FFN}")
        heads, ffn = tensors[HEADS], tensors[FFN]
        if tuple(heads.shape) != (config.num_hidden_layers, config.num_attention_heads) or \
                tuple(ffn.shape) != (config.num_hidden_layers,):
            raise CorruptArtifact(f"structure mask shapes {tuple(heads.shape)}, {tuple(ffn.shape)} do not fit "
                                  f"{config.num_hidden_layers} layers × {config.num_attention_heads} heads")
        if heads.dtype != torch.uint8 or ffn.dtype != torch.uint8 or heads.max() > 1 or ffn.max() > 1:
            raise CorruptArtifact("structure mask gates must be uint8 0/1")
        if (heads.sum(1) == 0).any():
            raise CorruptArtifact("a structure mask must keep at least one head per layer")

    def attach(self, shared: SharedEncoder, slot: int, tensors: Tensors) -> nn.Module:
        device = shared.device
        shared.gates.patterns[slot] = (tensors[HEADS].float().to(device), tensors[FFN].float().to(device))
        return shared.module

    def detach(self, shared: SharedEncoder, slot: int) -> None:
        shared.gates.patterns.pop(slot, None)

    def feed_graph(self, shared: SharedEncoder, routing: Routing, inputs: GraphInputs) -> None:
        gated = shared.gates.for_batch(routing)
        if gated is not None:
            inputs.set_gates(gated.heads, gated.ffn)
