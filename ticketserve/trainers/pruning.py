"""One-shot pruning of heads and FFN blocks by importance (super tickets:
docs/concepts/methods.md#super-tickets-and-ticket-share)."""

from __future__ import annotations

import torch


def level_counts(level: float, num_layers: int, num_heads: int) -> tuple[int, int]:
    """Heads and FFNs pruned at a pruning level (share): floor of the share of each total,
    as the reference code pairs them (10 % of BERT-base → 14 heads + 1 FFN)."""
    return int(level * num_layers * num_heads + 1e-9), int(level * num_layers + 1e-9)


def prune(head_scores: torch.Tensor, ffn_scores: torch.Tensor, level: float, kind: str = "winning",
          seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep-masks (L, H) and (L,) after one-shot pruning of `level` of heads and of FFNs:
    `winning` prunes the least important, `losing` the most, `random` at random. At least
    one head stays in every layer."""
    layers, heads = head_scores.shape
    n_heads, n_ffn = level_counts(level, layers, heads)
    generator = torch.Generator().manual_seed(seed)
    order = {"winning": lambda s: s.flatten().argsort(),
             "losing": lambda s: s.flatten().argsort(descending=True),
             "random": lambda s: torch.randperm(s.numel(), generator=generator)}[kind]
    keep_heads = torch.ones(layers, heads, dtype=torch.bool)
    pruned = 0
    for flat in order(head_scores).tolist():
        if pruned == n_heads:
            break
        layer, head = divmod(flat, heads)
        if keep_heads[layer].sum() > 1:
            keep_heads[layer, head] = False
            pruned += 1
    keep_ffn = torch.ones(layers, dtype=torch.bool)
    keep_ffn[order(ffn_scores)[:n_ffn]] = False
    return keep_heads, keep_ffn
