"""Kind `full`: the full fine-tuning baseline. Stores every encoder tensor that changed and
runs on an encoder of its own (sharing the unchanged tensors with the backbone) — the memory
cost ticket kinds exist to avoid."""

from __future__ import annotations

import torch
from torch import nn

from ticketserve.core.backbone import fresh_copy
from ticketserve.core.errors import CorruptArtifact
from ticketserve.core.kinds.base import Kind, Tensors, register_kind
from ticketserve.core.shared_encoder import SharedEncoder

PREFIX = "encoder."


def changed_tensors(state: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> Tensors:
    """Encoder tensors (a state dict) that differ from the pre-trained ones, keyed `encoder.<name>`."""
    return {
        PREFIX + name: tensor.detach().cpu().contiguous()
        for name, tensor in state.items()
        if not torch.equal(tensor.cpu(), reference[name])
    }


@register_kind
class FullKind(Kind):
    name = "full"

    def validate(self, tensors: Tensors, encoder: nn.Module) -> None:
        state = encoder.state_dict()
        for key, tensor in tensors.items():
            name = key.removeprefix(PREFIX)
            if not key.startswith(PREFIX) or name not in state:
                raise CorruptArtifact(f"full artifact holds {key!r}, which this backbone does not have")
            if tensor.shape != state[name].shape:
                raise CorruptArtifact(f"full artifact {key}: shape {tuple(tensor.shape)} != {tuple(state[name].shape)}")
            if tensor.is_floating_point() != state[name].is_floating_point():
                raise CorruptArtifact(f"full artifact {key}: dtype {tensor.dtype} cannot stand for {state[name].dtype}")

    def attach(self, shared: SharedEncoder, slot: int, tensors: Tensors) -> nn.Module:
        return fresh_copy(shared.module, self.dense_state(shared.module, tensors))

    def dense_state(self, encoder: nn.Module, tensors: Tensors) -> Tensors:
        return {k.removeprefix(PREFIX): v for k, v in tensors.items()}
