"""The task model: shared encoder → pooling → task head (a label, value or score: `TaskHead`;
a vector: `EmbeddingHead`; a label per word piece: `TokenHead`). Used by trainers and the runtime."""

from __future__ import annotations

import torch
from torch import nn

from ticketserve.core.losses import task_loss
from ticketserve.registry.manifest import HeadConfig, TaskSpec

HEAD_PREFIX = "head."
PAIR = "pair_"  # a training batch's second texts, embedded apart: pair_input_ids, pair_attention_mask, …


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


class EmbeddingHead(nn.Module):
    """Pooling, an optional projection (+ activation) and optional L2 normalisation — what a
    sentence-transformers model's Pooling, Dense and Normalize modules compute. Its tensors,
    with a projection only: `head.weight` (projection, hidden) and `head.bias`."""

    def __init__(self, hidden_size: int, config: HeadConfig):
        super().__init__()
        self.config = config
        self.projection = nn.Linear(hidden_size, config.projection) if config.projection else None

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        pooled = pool(hidden, attention_mask, self.config.pooling)
        if self.projection is not None:
            pooled = self.projection(pooled)
            if self.config.activation == "tanh":
                pooled = torch.tanh(pooled)
        return nn.functional.normalize(pooled, dim=-1) if self.config.normalize else pooled

    def tensors(self) -> dict[str, torch.Tensor]:
        return {HEAD_PREFIX + k.removeprefix("projection."): v.detach().cpu().contiguous()
                for k, v in self.state_dict().items()}

    @staticmethod
    def shapes(hidden_size: int, config: HeadConfig) -> dict[str, tuple[int, ...]]:
        if not config.projection:
            return {}
        return {HEAD_PREFIX + "weight": (config.projection, hidden_size), HEAD_PREFIX + "bias": (config.projection,)}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], config: HeadConfig, hidden_size: int) -> EmbeddingHead:
        head = cls(hidden_size, config)
        head.load_state_dict({"projection." + k.removeprefix(HEAD_PREFIX): v
                              for k, v in tensors.items() if k.startswith(HEAD_PREFIX)})
        return head.eval()

    def width(self, hidden_size: int) -> int:
        return self.config.projection or hidden_size


class TokenHead(nn.Module):
    """Dropout + linear on every token state: (B, T, H) → (B, T, labels) — what the classifier of
    BertForTokenClassification and RobertaForTokenClassification computes. Tensors: `head.weight`
    (labels, hidden), `head.bias`."""

    def __init__(self, hidden_size: int, num_outputs: int, config: HeadConfig):
        super().__init__()
        self.config = config
        self.dropout = nn.Dropout(config.dropout)
        self.linear = nn.Linear(hidden_size, num_outputs)

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.linear(self.dropout(hidden))

    def tensors(self) -> dict[str, torch.Tensor]:
        return {HEAD_PREFIX + k.removeprefix("linear."): v.detach().cpu().contiguous()
                for k, v in self.state_dict().items()}

    @staticmethod
    def shapes(hidden_size: int, num_outputs: int) -> dict[str, tuple[int, ...]]:
        return {HEAD_PREFIX + "weight": (num_outputs, hidden_size), HEAD_PREFIX + "bias": (num_outputs,)}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], config: HeadConfig) -> TokenHead:
        weight = tensors[HEAD_PREFIX + "weight"]
        head = cls(weight.shape[1], weight.shape[0], config)
        head.load_state_dict({"linear." + k.removeprefix(HEAD_PREFIX): v for k, v in tensors.items()})
        return head.eval()


def make_head(spec: TaskSpec, config: HeadConfig, hidden_size: int) -> nn.Module:
    """A fresh head for a task: an embedding head, a per-token head, or a linear head of the
    task's outputs."""
    if spec.type == "embedding":
        return EmbeddingHead(hidden_size, config)
    if spec.type == "token_classification":
        return TokenHead(hidden_size, spec.num_outputs, config)
    return TaskHead(hidden_size, spec.num_outputs, config)


def head_shapes(spec: TaskSpec, config: HeadConfig, hidden_size: int) -> dict[str, tuple[int, ...]]:
    """Every head tensor's name and shape, for a task, its head config and a backbone width."""
    if spec.type == "embedding":
        return EmbeddingHead.shapes(hidden_size, config)
    if spec.type == "token_classification":
        return TokenHead.shapes(hidden_size, spec.num_outputs)
    return TaskHead.shapes(hidden_size, spec.num_outputs, config)


def head_from_tensors(spec: TaskSpec, config: HeadConfig, tensors: dict[str, torch.Tensor],
                      hidden_size: int) -> nn.Module:
    """A stored head, ready to run (shapes checked by `artifact.load` before)."""
    if spec.type == "embedding":
        return EmbeddingHead.from_tensors(tensors, config, hidden_size)
    if spec.type == "token_classification":
        return TokenHead.from_tensors(tensors, config)
    return TaskHead.from_tensors(tensors, config)


class TaskModel(nn.Module):
    """Encoder + head; `forward` returns logits (one value per example for regression and
    reranking, a vector for embeddings). A training batch of an embedding task carries both
    texts of each pair (the second under `pair_…` names): both are embedded, stacked (B, 2, d)."""

    def __init__(self, encoder: nn.Module, spec: TaskSpec, head_config: HeadConfig, loss: str | None = None):
        super().__init__()
        self.encoder = encoder
        self.spec = spec
        self.objective = loss
        self.widths = tuple(head_config.dimensions)  # an embedding's smaller widths, trained as well
        self.head = make_head(spec, head_config, encoder.config.hidden_size)

    def forward(self, input_ids, attention_mask, token_type_ids=None, labels=None, pair_input_ids=None,
                pair_attention_mask=None, pair_token_type_ids=None):
        out = self.head(encode(self.encoder, input_ids, attention_mask, token_type_ids), attention_mask)
        if pair_input_ids is None:
            return out
        other = self.head(encode(self.encoder, pair_input_ids, pair_attention_mask, pair_token_type_ids),
                          pair_attention_mask)
        return torch.stack((out, other), 1)

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return task_loss(self.spec, logits, labels, self.objective, self.widths)


def encode(encoder: nn.Module, input_ids, attention_mask, token_type_ids=None) -> torch.Tensor:
    kwargs = {"token_type_ids": token_type_ids} if token_type_ids is not None else {}
    return encoder(input_ids=input_ids, attention_mask=attention_mask, **kwargs).last_hidden_state


def predictions(spec: TaskSpec, logits: torch.Tensor) -> torch.Tensor:
    """What a task's metrics score: label ids, values, relevance logits, or — for an embedding
    task's pairs (B, 2, d) — the cosine similarity of each pair."""
    if spec.type == "embedding":
        return nn.functional.cosine_similarity(logits[:, 0], logits[:, 1], dim=-1)
    return logits.squeeze(-1) if spec.is_regression else logits.argmax(-1)
