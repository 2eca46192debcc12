"""Training losses by task type, the embedding ones as sentence-transformers defines them
(tests/test_embeddings.py compares each with the library's own on the same embeddings).

Embedding losses take the stacked pair embeddings (B, 2, d):
* `cosent` (default for scored pairs): log(1 + Σ exp(s·(cos_kl − cos_ij))) over every two pairs
  whose labels say (i, j) is more similar than (k, l); s = 20. Only the labels' order counts.
* `cosine`: the mean squared error between cos(a, b) and the label (labels in [-1, 1]).
* `mnrl`, multiple negatives ranking (for positive pairs): each text's pair against every other
  pair of the batch, cross-entropy of s·cos over them, s = 20.
With `widths` (Matryoshka), an embedding loss is summed over the full width and each leading
width (sentence-transformers' `MatryoshkaLoss` with unit weights): each cut is a usable embedding.
A reranker (one logit per pair) trains with binary cross-entropy against labels in [0, 1];
regression with squared error, classification with cross-entropy (token classification over the
pieces that carry a word's label).
"""

from __future__ import annotations

import torch
from torch import nn

from ticketserve.core.errors import InvalidArgument
from ticketserve.core.tagging import IGNORED
from ticketserve.registry.manifest import TaskSpec

SCALE = 20.0  # sentence-transformers' default inverse temperature for cosent and mnrl
EMBEDDING_LOSSES = ("cosent", "cosine", "mnrl")
LOSSES = {"classification": ("cross_entropy",), "regression": ("mse",), "reranking": ("bce",),
          "embedding": EMBEDDING_LOSSES, "token_classification": ("cross_entropy",)}


def default_loss(spec: TaskSpec) -> str:
    return LOSSES[spec.type][0]


def check_loss(spec: TaskSpec, loss: str | None) -> str:
    """The loss a run of this task uses: `loss` if the task's type takes it, else its default."""
    if loss is None:
        return default_loss(spec)
    if loss not in LOSSES[spec.type]:
        raise InvalidArgument(f"--loss {loss}: a {spec.type} task trains with {', '.join(LOSSES[spec.type])}")
    return loss


def cosent(pairs: torch.Tensor, labels: torch.Tensor, scale: float = SCALE) -> torch.Tensor:
    scores = nn.functional.cosine_similarity(pairs[:, 0], pairs[:, 1], dim=-1).float() * scale
    differences = scores[:, None] - scores[None, :]  # (i, j): cos_i − cos_j, kept where label_i < label_j
    differences = differences - (labels[:, None] >= labels[None, :]).float() * 1e12
    return torch.logsumexp(torch.cat((differences.new_zeros(1), differences.flatten())), dim=0)


def cosine(pairs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    scores = nn.functional.cosine_similarity(pairs[:, 0], pairs[:, 1], dim=-1)
    return nn.functional.mse_loss(scores.float(), labels.float())


def mnrl(pairs: torch.Tensor, labels: torch.Tensor | None = None, scale: float = SCALE) -> torch.Tensor:
    anchors = nn.functional.normalize(pairs[:, 0].float(), dim=-1)
    candidates = nn.functional.normalize(pairs[:, 1].float(), dim=-1)
    logits = anchors @ candidates.T * scale
    return nn.functional.cross_entropy(logits, torch.arange(len(logits), device=logits.device))


def task_loss(spec: TaskSpec, outputs: torch.Tensor, labels: torch.Tensor, loss: str | None = None,
              widths: tuple[int, ...] = ()) -> torch.Tensor:
    """The loss of a batch's outputs (logits, values, or stacked pair embeddings) against its labels."""
    loss = check_loss(spec, loss)
    if widths and loss in EMBEDDING_LOSSES:
        return sum(task_loss(spec, outputs[..., :width], labels, loss) for width in (outputs.shape[-1], *widths))
    if loss == "cross_entropy":  # per example, or per word piece (B, T, labels): pieces labelled IGNORED skipped
        return nn.functional.cross_entropy(outputs.flatten(0, -2), labels.flatten(), ignore_index=IGNORED)
    if loss == "mse":
        return nn.functional.mse_loss(outputs.squeeze(-1), labels.float())
    if loss == "bce":
        return nn.functional.binary_cross_entropy_with_logits(outputs.squeeze(-1), labels.float())
    return {"cosent": cosent, "cosine": cosine, "mnrl": mnrl}[loss](outputs, labels.float())
