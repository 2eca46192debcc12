"""Dominant-ticket math (docs/concepts/methods.md#dominant-tickets): out-weighted parameters,
per-dimension counts, top-k.

A matrix is viewed as W̃ ∈ R^{(in+1)×out} (y = [x, 1]·W̃): dimension j < in is input
feature j, dimension `in` is the bias. A parameter is out-weighted when |Δ| > σ; a ticket
keeps, per matrix, the k dimensions with the most out-weighted parameters (non-zero counts
only, so at most k). Pure functions on tensors: no training, no storage.
"""

from __future__ import annotations

import random

import numpy as np
import torch
from torch import nn

Counts = dict[str, torch.Tensor]  # matrix name → int64[in + 1] out-weighted count per dimension


def tilde(linear: nn.Linear) -> torch.Tensor:
    """W̃ = [Wᵀ; b]: shape (in + 1, out)."""
    bias = linear.bias if linear.bias is not None else torch.zeros(linear.out_features, device=linear.weight.device)
    return torch.cat([linear.weight.detach().T, bias.detach().unsqueeze(0)])


def delta_tilde(current: nn.Linear, reference: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    """Δ̃ = W̃(θ) − W̃(θ0) for one matrix; `reference` is the θ0 state dict of the encoder."""
    ref = torch.cat([reference[f"{name}.weight"].T, reference[f"{name}.bias"].unsqueeze(0)])
    return tilde(current).cpu() - ref.cpu()


def count_outweighted(delta: torch.Tensor, sigma: float) -> torch.Tensor:
    """Out-weighted parameters (|Δ| > σ) per dimension (row of Δ̃)."""
    return (delta.abs() > sigma).sum(dim=1)


def sigma_from_quantile(deltas: list[torch.Tensor], quantile: float) -> float:
    """σ as a quantile of |Δ| over all ticket matrices (the right absolute σ depends on the
    backbone and the training length)."""
    values = np.concatenate([d.abs().flatten().numpy() for d in deltas])
    return float(np.quantile(values, quantile))


def rank(counts: torch.Tensor) -> list[int]:
    """Dimensions with a non-zero count, most out-weighted first; ties → lower index first."""
    order = sorted(range(len(counts)), key=lambda j: (-int(counts[j]), j))
    return [j for j in order if counts[j] > 0]


def top_k(counts: Counts, k: int) -> dict[str, list[int]]:
    """The Dominant-k ticket: at most k dimensions per matrix (none where nothing is out-weighted)."""
    return {name: rank(c)[:k] for name, c in counts.items()}


def random_k(sizes: dict[str, int], k: int, seed: int) -> dict[str, list[int]]:
    """Random-k: k dimensions per matrix, uniformly from its in + 1 rows (the bias included)."""
    rng = random.Random(seed)
    return {name: sorted(rng.sample(range(size), min(k, size))) for name, size in sizes.items()}


def bias_rows(sizes: dict[str, int]) -> dict[str, list[int]]:
    """BitFit as a ticket: the bias row of every matrix."""
    return {name: [size - 1] for name, size in sizes.items()}


def jaccard(a: dict[str, list[int]], b: dict[str, list[int]]) -> float:
    """Jaccard similarity of two tickets' (matrix, dimension) sets."""
    set_a = {(m, d) for m, dims in a.items() for d in dims}
    set_b = {(m, d) for m, dims in b.items() for d in dims}
    union = set_a | set_b
    return len(set_a & set_b) / len(union) if union else 1.0
