"""Kind `full`: the full fine-tuning baseline. Stores every encoder tensor that changed and
runs on a private copy of the encoder — the memory cost ticket kinds exist to avoid."""

from __future__ import annotations

import copy

import torch
from torch import nn

from ticketserve.errors import CorruptArtifact
from ticketserve.kinds import Kind, Tensors, register_kind
from ticketserve.kinds.row_delta import RowDeltaLinear

PREFIX = "encoder."


def changed_tensors(encoder: nn.Module, reference: dict[str, torch.Tensor]) -> Tensors:
    """Encoder tensors that differ from the pre-trained ones, keyed `encoder.<name>`."""
    return {
        PREFIX + name: tensor.detach().cpu().contiguous()
        for name, tensor in encoder.state_dict().items()
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

    def attach(self, encoder: nn.Module, slot: int, tensors: Tensors) -> nn.Module:
        # serving state of the shared encoder is not copied: its mask cache stays behind (it
        # holds a lock), the gate table is shared (the copy's gate hooks still read it) and the
        # row tables (every row-delta task's rows) are shared until the copy drops them
        memo = {id(v): None for k, v in vars(encoder).items() if k == "_ticketserve_mask_cache"}
        table = vars(encoder).get("_ticketserve_gate_table")
        if table is not None:
            memo[id(table)] = table
        for module in encoder.modules():  # row tables are not copied either: the copy drops them below
            if isinstance(module, RowDeltaLinear):
                memo[id(module.table)] = module.table
        private = copy.deepcopy(encoder, memo)
        vars(private).pop("_ticketserve_mask_cache", None)
        for module in private.modules():  # the copy serves this task only: drop shared-kind state
            if isinstance(module, RowDeltaLinear):
                module.clear()
        private.load_state_dict({k.removeprefix(PREFIX): v for k, v in tensors.items()}, strict=False)
        return private.eval()

    def dense_state(self, encoder: nn.Module, tensors: Tensors) -> Tensors:
        return {k.removeprefix(PREFIX): v for k, v in tensors.items()}
