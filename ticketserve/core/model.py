"""The task model: shared encoder → pooling → task head. Used by trainers and the runtime."""

from __future__ import annotations

import torch
from torch import nn

from ticketserve.registry.manifest import HeadConfig, TaskSpec

HEAD_PREFIX = "head."


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, pooling: str) -> torch.Tensor:
    if pooling == "cls":
        return hidden[:, 0]
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)


class TaskHead(nn.Module):
    """Pooling + dropout + linear; its tensors are stored in every artifact under `head.`."""

    def __init__(self, hidden_size: int, num_outputs: int, config: HeadConfig):
        super().__init__()
        self.config = config
        self.dropout = nn.Dropout(config.dropout)
        self.linear = nn.Linear(hidden_size, num_outputs)

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.linear(self.dropout(pool(hidden, attention_mask, self.config.pooling)))

    def tensors(self) -> dict[str, torch.Tensor]:
        return {HEAD_PREFIX + k: v.detach().cpu().contiguous() for k, v in self.linear.state_dict().items()}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], config: HeadConfig) -> TaskHead:
        weight = tensors[HEAD_PREFIX + "weight"]
        head = cls(weight.shape[1], weight.shape[0], config)
        head.linear.load_state_dict({"weight": weight, "bias": tensors[HEAD_PREFIX + "bias"]})
        return head.eval()


class TaskModel(nn.Module):
    """Encoder + head; `forward` returns logits (or one value per example for regression)."""

    def __init__(self, encoder: nn.Module, spec: TaskSpec, head_config: HeadConfig):
        super().__init__()
        self.encoder = encoder
        self.spec = spec
        self.head = TaskHead(encoder.config.hidden_size, spec.num_outputs, head_config)

    def forward(self, input_ids, attention_mask, token_type_ids=None, labels=None):
        hidden = encode(self.encoder, input_ids, attention_mask, token_type_ids)
        return self.head(hidden, attention_mask)

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return task_loss(self.spec, logits, labels)


def encode(encoder: nn.Module, input_ids, attention_mask, token_type_ids=None) -> torch.Tensor:
    kwargs = {"token_type_ids": token_type_ids} if token_type_ids is not None else {}
    return encoder(input_ids=input_ids, attention_mask=attention_mask, **kwargs).last_hidden_state


def predictions(spec: TaskSpec, logits: torch.Tensor) -> torch.Tensor:
    return logits.squeeze(-1) if spec.is_regression else logits.argmax(-1)


def task_loss(spec: TaskSpec, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean squared error for regression, cross-entropy for classification."""
    if spec.is_regression:
        return nn.functional.mse_loss(logits.squeeze(-1), labels.float())
    return nn.functional.cross_entropy(logits, labels)
