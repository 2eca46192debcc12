"""Kind `plain`: the backbone exactly as it is, under the task's own head — the backbone's own
sentence embeddings (a sentence-transformers model's pooling, projection and normalisation),
or a linear probe. Its payload holds the head's tensors only (none for a pooled, normalised
embedding), and its examples share every forward of the backbone at no cost."""

from __future__ import annotations

from torch import nn

from ticketserve.core.errors import CorruptArtifact
from ticketserve.core.kinds.base import GraphInputs, Kind, Tensors, register_kind
from ticketserve.core.routing import Routing
from ticketserve.core.shared_encoder import SharedEncoder


@register_kind
class PlainKind(Kind):
    name = "plain"
    in_graph = True  # nothing to feed: the exported graph's neutral inputs are the backbone itself

    def validate(self, tensors: Tensors, encoder: nn.Module) -> None:
        if tensors:
            raise CorruptArtifact(f"a plain artifact changes no encoder tensor, but holds {', '.join(sorted(tensors)[:3])}")

    def attach(self, shared: SharedEncoder, slot: int, prepared: Tensors) -> nn.Module:
        return shared.module

    def feed_graph(self, shared: SharedEncoder, routing: Routing, inputs: GraphInputs) -> None:
        return None

    def dense_state(self, encoder: nn.Module, tensors: Tensors) -> Tensors:
        return {}
