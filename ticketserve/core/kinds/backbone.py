"""Kind `backbone`: a whole encoder published to the registry (Ticket-Share's shared
multi-task encoder). Payload: the encoder's state dict; beside it the checkpoint's config and
tokenizer files, so `--backbone registry:NAME[:VERSION]` loads it like any checkpoint.
Its manifest's `backbone` names the base it was trained from; `details.fingerprint` is its own."""

from __future__ import annotations

from torch import nn

from ticketserve.core.errors import CorruptArtifact, InvalidArgument
from ticketserve.core.kinds.base import Kind, Tensors, register_kind
from ticketserve.core.shared_encoder import SharedEncoder


@register_kind
class BackboneKind(Kind):
    name = "backbone"
    is_task = False

    def validate(self, tensors: Tensors, encoder: nn.Module) -> None:
        state = encoder.state_dict()
        if tensors.keys() != state.keys():
            raise CorruptArtifact("a backbone entry must hold exactly the base encoder's tensors")
        for key, tensor in tensors.items():
            if tensor.shape != state[key].shape or tensor.dtype != state[key].dtype:
                raise CorruptArtifact(f"backbone entry {key}: {tensor.dtype} {tuple(tensor.shape)} where the base encoder "
                                      f"has {state[key].dtype} {tuple(state[key].shape)}")

    def attach(self, shared: SharedEncoder, slot: int, tensors: Tensors) -> nn.Module:
        raise InvalidArgument("a backbone entry is not a task: serve it with --backbone registry:NAME")
