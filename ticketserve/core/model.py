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
    """Pooling (+ dense + tanh) + dropout + linear; its tensors are stored in every artifact
    under `head.`: `head.weight`, `head.bias`, and with `dense` also `head.dense.weight`,
    `head.dense.bias`. With `dense` and `cls` pooling it computes what the classifier of
    BertForSequenceClassification (pooler → classifier) and RobertaForSequenceClassification
    (dense → tanh → out_proj on the first token) compute."""

    def __init__(self, hidden_size: int, num_outputs: int, config: HeadConfig):
        super().__init__()
        self.config = config
        self.dropout = nn.Dropout(config.dropout)
        self.dense = nn.Linear(hidden_size, hidden_size) if config.dense else None
        self.linear = nn.Linear(hidden_size, num_outputs)

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        pooled = pool(hidden, attention_mask, self.config.pooling)
        if self.dense is not None:
            pooled = torch.tanh(self.dense(pooled))
        return self.linear(self.dropout(pooled))

    def tensors(self) -> dict[str, torch.Tensor]:
        return {HEAD_PREFIX + k.removeprefix("linear."): v.detach().cpu().contiguous()
                for k, v in self.state_dict().items()}

    @staticmethod
    def shapes(hidden_size: int, num_outputs: int, config: HeadConfig) -> dict[str, tuple[int, ...]]:
        """Every head tensor's name and shape, for a config."""
        shapes = {HEAD_PREFIX + "weight": (num_outputs, hidden_size), HEAD_PREFIX + "bias": (num_outputs,)}
        if config.dense:
            shapes |= {HEAD_PREFIX + "dense.weight": (hidden_size, hidden_size), HEAD_PREFIX + "dense.bias": (hidden_size,)}
        return shapes

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], config: HeadConfig) -> TaskHead:
        weight = tensors[HEAD_PREFIX + "weight"]
        head = cls(weight.shape[1], weight.shape[0], config)
        state = {("linear." if k.count(".") == 1 else "") + k.removeprefix(HEAD_PREFIX): v
                 for k, v in tensors.items() if k.startswith(HEAD_PREFIX)}
        head.load_state_dict(state)
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
