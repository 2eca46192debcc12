"""The torch backend: the shared encoder's forward in eager PyTorch, on the runtime's device
and precision. Examples on the shared module run in one forward with their routing; a task
with an encoder of its own (a full fine-tuning, a dense supermask) runs apart."""

from __future__ import annotations

from collections.abc import Hashable

import torch

from ticketserve.core.model import encode
from ticketserve.core.routing import Routing
from ticketserve.runtime.backends.base import Backend, register_backend


@register_backend
class TorchBackend(Backend):
    name = "torch"

    def group(self, task) -> Hashable:
        return id(task.encoder)

    def hidden(self, tasks, inputs: dict[str, torch.Tensor], routing: Routing) -> torch.Tensor:
        ids, mask, types = inputs["input_ids"], inputs["attention_mask"], inputs.get("token_type_ids")
        if tasks[0].encoder is self.shared.module:
            return self.shared.encode(ids, mask, types, routing)
        return encode(tasks[0].encoder, ids, mask, types)
